//! Live memory snapshots with userfaultfd write-protection.
//!
//! Three phases, so that the guest's pause does not grow with memory size:
//!
//! 1. [`Tracker::arm`] (guest running): write-protect all guest memory. A
//!    handler thread serves write faults in *window* mode: it notes the page
//!    and releases it at once (nothing is copied yet).
//! 2. [`ArmedSnapshot::freeze`] (guest paused, devices quiesced): re-protect
//!    only the pages written since phase 1 and switch the handler to *copy*
//!    mode. This is the snapshot instant.
//! 3. [`ArmedSnapshot::stream`] (guest running): a writer streams every page
//!    to memory.bin while the handler serves write faults first. Each page
//!    is claimed exactly once (an atomic bit), copied, and only then
//!    released. All-zero pages are not written (holes).
//!
//! Any failure switches the handler to *abort* mode: all memory is released
//! and the guest never notices. The handler never writes guest memory and
//! takes no lock that a vCPU or device thread can hold while faulting.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use userfaultfd::Event;

use crate::memory_file::{MemoryFileError, MemoryFileWriter, CHUNK_SIZE, PAGE_SIZE};
use crate::write_protect::{WriteProtectError, WriteProtector};

mod check;

/// A guest RAM region as the host maps it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuestRegion {
    /// Guest-physical start.
    pub gpa: u64,
    /// Host address of the mapping.
    pub host: usize,
    /// Length in bytes (page multiple).
    pub len: usize,
}

/// Errors of a live snapshot.
#[derive(Debug, thiserror::Error)]
pub enum LiveError {
    /// Protecting or releasing memory failed.
    #[error(transparent)]
    WriteProtect(#[from] WriteProtectError),
    /// Writing memory.bin failed (e.g. the disk is full).
    #[error(transparent)]
    File(#[from] MemoryFileError),
    /// The handler thread could not start.
    #[error("cannot start the fault handler: {0}")]
    Thread(std::io::Error),
    /// The fault handler cannot wait on the userfaultfd.
    #[error("the fault handler cannot poll the userfaultfd: {0}")]
    Poll(std::io::Error),
    /// The fault handler cannot read the userfaultfd.
    #[error("the fault handler cannot read the userfaultfd: {0}")]
    ReadEvent(userfaultfd::Error),
    /// [`ArmedSnapshot::freeze`] was called twice.
    #[error("the snapshot was frozen twice")]
    FrozenTwice,
    /// The fault handler still held memory.bin when streaming ended.
    #[error("memory.bin is still in use by the fault handler")]
    FileInUse,
    /// Streaming stopped because the fault handler failed earlier.
    #[error("memory streaming failed: {0}")]
    Failed(Arc<LiveError>),
}

/// Figures of one live snapshot.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LiveStats {
    /// Guest pages in all.
    pub pages: u64,
    /// Pages written to memory.bin (non-zero).
    pub pages_written: u64,
    /// Time to write-protect all memory before the pause.
    pub protect_us: u64,
    /// Pages written between arm and freeze (re-protected in the pause).
    pub window_pages: u64,
    /// Write faults served in copy mode.
    pub faults: u64,
    /// Median fault service time.
    pub fault_p50_us: f64,
    /// 99th percentile fault service time.
    pub fault_p99_us: f64,
    /// Time from freeze to the last page out.
    pub stream_us: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Window,
    Copy,
    Abort,
}

struct Shared {
    wp: Arc<WriteProtector>,
    regions: Vec<GuestRegion>,
    first_page: Vec<u64>,
    pages: u64,
    claimed: Vec<AtomicU64>,
    done: AtomicU64,
    written: AtomicU64,
    mode: Mutex<Mode>,
    dirty: Mutex<Vec<usize>>,
    file: OnceLock<MemoryFileWriter>,
    error: Mutex<Option<Arc<LiveError>>>,
    stop: AtomicBool,
    stop_evt: vmm_sys_util_eventfd::EventFd,
    fault_ns: Mutex<Vec<u32>>,
    /// Pages the handler copied but nobody wrote to the file yet: the
    /// handler never waits for the file (whose inode lock the writer's big
    /// writes hold), the writer drains this between chunks.
    pending: Mutex<Vec<(u64, Vec<u8>)>>,
    pending_pages: AtomicU64,
}

/// Most pages the handler keeps in memory before writing them itself.
const MAX_PENDING_PAGES: u64 = 16384;

/// A tiny eventfd wrapper (the snapshot crate does not depend on the VMM's
/// utility crates).
mod vmm_sys_util_eventfd {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

    pub struct EventFd(OwnedFd);

    impl EventFd {
        pub fn new() -> std::io::Result<Self> {
            // SAFETY: eventfd creates a new descriptor; the result is checked.
            let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: `fd` is a fresh descriptor owned by nobody else.
            Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
        }

        pub fn signal(&self) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a valid u64 to our eventfd.
            unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
        }
    }

    impl AsRawFd for EventFd {
        fn as_raw_fd(&self) -> RawFd {
            self.0.as_raw_fd()
        }
    }
}

impl Shared {
    /// (gpa, global page index) of a host page address.
    fn lookup(&self, host: usize) -> Option<(u64, u64)> {
        self.regions
            .iter()
            .zip(&self.first_page)
            .find_map(|(r, first)| {
                (host >= r.host && host < r.host + r.len).then(|| {
                    let off = (host - r.host) as u64;
                    (r.gpa + off, first + off / PAGE_SIZE)
                })
            })
    }

    /// Claims page `idx`; true if this caller must copy it.
    fn claim(&self, idx: u64) -> bool {
        let bit = 1u64 << (idx % 64);
        self.claimed[(idx / 64) as usize].fetch_or(bit, Ordering::AcqRel) & bit == 0
    }

    fn fail(&self, error: impl Into<LiveError>) {
        let mut e = self.error.lock().unwrap_or_else(|e| e.into_inner());
        if e.is_none() {
            let error = error.into();
            tracing::error!("live snapshot failed: {error}");
            *e = Some(Arc::new(error));
        }
    }

    fn failed(&self) -> Option<Arc<LiveError>> {
        self.error.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The runs of non-zero pages in `[host, host + len)`: (byte offset,
    /// byte length) pairs.
    fn nonzero_runs(host: usize, len: usize) -> Vec<(usize, usize)> {
        let page = PAGE_SIZE as usize;
        // SAFETY: the range lies in a live guest mapping (the VM owns it for
        // longer than any snapshot); it is only read, and the page is still
        // write-protected, so its content is stable.
        let zero = |p: usize| unsafe { page_is_zero(host + p * page) };
        let (pages, mut runs, mut i) = (len / page, Vec::new(), 0);
        while i < pages {
            if zero(i) {
                i += 1;
                continue;
            }
            let start = i;
            while i < pages && !zero(i) {
                i += 1;
            }
            runs.push((start * page, (i - start) * page));
        }
        runs
    }

    /// Writes the non-zero pages of `[host, host + len)` (at `gpa`).
    fn copy_out(&self, host: usize, gpa: u64, len: usize) -> Result<(), MemoryFileError> {
        let Some(file) = self.file.get() else {
            return Ok(());
        };
        for (off, n) in Self::nonzero_runs(host, len) {
            // SAFETY: as in `nonzero_runs`.
            let data = unsafe { std::slice::from_raw_parts((host + off) as *const u8, n) };
            file.write_at(data, gpa + off as u64)?;
            self.written
                .fetch_add((n / PAGE_SIZE as usize) as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Copies the non-zero pages of `[host, host + len)` into `staged` (as
    /// (gpa, start, length) runs of `buf`), so the pages can be released
    /// before the file is written: a write may be throttled by the kernel's
    /// dirty-page limits for tens of milliseconds, and a guest writing one
    /// of those pages would wait that long.
    fn stage(
        host: usize,
        gpa: u64,
        len: usize,
        buf: &mut Vec<u8>,
        staged: &mut Vec<(u64, usize, usize)>,
    ) {
        for (off, n) in Self::nonzero_runs(host, len) {
            // SAFETY: as in `nonzero_runs`.
            let data = unsafe { std::slice::from_raw_parts((host + off) as *const u8, n) };
            staged.push((gpa + off as u64, buf.len(), n));
            buf.extend_from_slice(data);
        }
    }

    /// Writes what [`Shared::stage`] staged, and empties it.
    fn write_staged(
        &self,
        buf: &mut Vec<u8>,
        staged: &mut Vec<(u64, usize, usize)>,
    ) -> Result<(), MemoryFileError> {
        if let Some(file) = self.file.get() {
            for &(gpa, start, n) in staged.iter() {
                file.write_at(&buf[start..start + n], gpa)?;
                self.written
                    .fetch_add((n / PAGE_SIZE as usize) as u64, Ordering::Relaxed);
            }
        }
        buf.clear();
        staged.clear();
        Ok(())
    }

    /// Writes the pages the handler buffered.
    fn drain_pending(&self) -> Result<(), MemoryFileError> {
        let batch = std::mem::take(&mut *self.pending.lock().unwrap_or_else(|e| e.into_inner()));
        if batch.is_empty() {
            return Ok(());
        }
        self.pending_pages
            .fetch_sub(batch.len() as u64, Ordering::Relaxed);
        if let Some(file) = self.file.get() {
            for (gpa, data) in &batch {
                file.write_at(data, *gpa)?;
            }
            self.written
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Releases everything and stops copying (after a failure).
    fn abort(&self) {
        *self.mode.lock().unwrap_or_else(|e| e.into_inner()) = Mode::Abort;
        for r in &self.regions {
            if let Err(e) = self.wp.unprotect(r.host, r.len) {
                tracing::error!("cannot release guest memory after a failed snapshot: {e}");
            }
        }
    }

    /// Copies the claimed, still protected page at `host` (guest `gpa`)
    /// for the file: into `pending` unless that is full, else straight to
    /// the file. An all-zero page is a hole and needs nothing.
    fn keep_page(&self, host: usize, gpa: u64) -> Result<(), MemoryFileError> {
        // SAFETY: a page of a live guest mapping, still write-protected, so
        // stable while read.
        if unsafe { page_is_zero(host) } {
            return Ok(());
        }
        if self.pending_pages.load(Ordering::Relaxed) >= MAX_PENDING_PAGES {
            return self.copy_out(host, gpa, PAGE_SIZE as usize);
        }
        // SAFETY: as above.
        let data = unsafe { std::slice::from_raw_parts(host as *const u8, PAGE_SIZE as usize) };
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((gpa, data.to_vec()));
        self.pending_pages.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn handle_fault(&self, addr: usize) {
        let t0 = Instant::now();
        let page = addr & !(PAGE_SIZE as usize - 1);
        let mode = self.mode.lock().unwrap_or_else(|e| e.into_inner());
        match *mode {
            Mode::Window => {
                self.dirty
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(page);
                if let Err(e) = self.wp.unprotect(page, PAGE_SIZE as usize) {
                    self.fail(e);
                }
            }
            Mode::Copy => {
                if let Some((gpa, idx)) = self.lookup(page) {
                    if self.claim(idx) {
                        if let Err(e) = self.keep_page(page, gpa) {
                            self.fail(e);
                        }
                        if let Err(e) = self.wp.unprotect(page, PAGE_SIZE as usize) {
                            self.fail(e);
                        }
                        self.done.fetch_add(1, Ordering::AcqRel);
                        let ns = t0.elapsed().as_nanos().min(u32::MAX as u128) as u32;
                        self.fault_ns
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(ns);
                    }
                    // Otherwise the writer owns the page and its release
                    // wakes this writer too.
                } else {
                    let _ = self.wp.unprotect(page, PAGE_SIZE as usize);
                }
            }
            Mode::Abort => {
                let _ = self.wp.unprotect(page, PAGE_SIZE as usize);
            }
        }
    }

    fn handler_loop(&self) {
        // vCPUs wait on this thread: it runs first (snapshot/src/priority.rs).
        crate::priority::run_ahead_of_vcpus("live snapshot fault handler");
        let uffd = self.wp.uffd();
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: self.wp.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: self.stop_evt.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two valid pollfd entries.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, 1000) };
            if r < 0 && std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
                self.fail(LiveError::Poll(std::io::Error::last_os_error()));
            }
            loop {
                match uffd.read_event() {
                    Ok(Some(Event::Pagefault { addr, .. })) => self.handle_fault(addr as usize),
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        self.fail(LiveError::ReadEvent(e));
                        self.abort();
                        break;
                    }
                }
            }
            if self.stop.load(Ordering::Acquire) {
                return;
            }
        }
    }
}

/// Tests whether the page at `addr` is all zeroes.
///
/// # Safety
/// `addr` must point to a readable, page-sized, 8-byte aligned range.
unsafe fn page_is_zero(addr: usize) -> bool {
    // SAFETY: guaranteed by the caller.
    let words = unsafe { std::slice::from_raw_parts(addr as *const u64, PAGE_SIZE as usize / 8) };
    words.iter().all(|w| *w == 0)
}

/// Guest memory registered for live snapshots.
pub struct Tracker {
    wp: Arc<WriteProtector>,
    regions: Vec<GuestRegion>,
}

/// A snapshot between arm and the end of streaming.
pub struct ArmedSnapshot {
    shared: Arc<Shared>,
    handler: Option<JoinHandle<()>>,
    chunk_delay: Duration,
    protect_us: u64,
    window_pages: u64,
    frozen_at: Option<Instant>,
    /// Debug aid: where to report, and memory at the instant.
    check: Option<check::InstantCheck>,
}

impl Tracker {
    /// Tracks `regions`, registered with `wp`.
    pub fn new(wp: Arc<WriteProtector>, regions: Vec<GuestRegion>) -> Self {
        Self { wp, regions }
    }

    /// The regions.
    pub fn regions(&self) -> &[GuestRegion] {
        &self.regions
    }

    /// The write-protect registration.
    pub fn write_protector(&self) -> &Arc<WriteProtector> {
        &self.wp
    }

    /// Phase 1: starts the handler and write-protects all memory while the
    /// guest runs.
    pub fn arm(&self) -> Result<ArmedSnapshot, LiveError> {
        let mut first_page = Vec::new();
        let mut pages = 0;
        for r in &self.regions {
            first_page.push(pages);
            pages += r.len as u64 / PAGE_SIZE;
        }
        let shared = Arc::new(Shared {
            wp: self.wp.clone(),
            regions: self.regions.clone(),
            first_page,
            pages,
            claimed: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            done: AtomicU64::new(0),
            written: AtomicU64::new(0),
            mode: Mutex::new(Mode::Window),
            dirty: Mutex::new(Vec::new()),
            file: OnceLock::new(),
            error: Mutex::new(None),
            stop: AtomicBool::new(false),
            stop_evt: vmm_sys_util_eventfd::EventFd::new().map_err(LiveError::Thread)?,
            fault_ns: Mutex::new(Vec::new()),
            pending: Mutex::new(Vec::new()),
            pending_pages: AtomicU64::new(0),
        });
        let s = shared.clone();
        let handler = std::thread::Builder::new()
            .name("uffd-handler".into())
            .spawn(move || s.handler_loop())
            .map_err(LiveError::Thread)?;
        let mut armed = ArmedSnapshot {
            shared,
            handler: Some(handler),
            chunk_delay: Duration::ZERO,
            protect_us: 0,
            window_pages: 0,
            frozen_at: None,
            check: None,
        };
        let t0 = Instant::now();
        for r in &self.regions {
            if let Err(e) = self.wp.protect(r.host, r.len) {
                armed.abort();
                return Err(e.into());
            }
        }
        armed.protect_us = t0.elapsed().as_micros() as u64;
        Ok(armed)
    }
}

/// Coalesces sorted page addresses into (start, len) ranges.
fn ranges(mut pages: Vec<usize>) -> Vec<(usize, usize)> {
    pages.sort_unstable();
    pages.dedup();
    let mut out: Vec<(usize, usize)> = Vec::new();
    for p in pages {
        match out.last_mut() {
            Some((s, l)) if *s + *l == p => *l += PAGE_SIZE as usize,
            _ => out.push((p, PAGE_SIZE as usize)),
        }
    }
    out
}

impl ArmedSnapshot {
    /// Slows streaming down by `delay` per 2 MiB chunk (a test hook that
    /// widens the window for crash tests; zero by default).
    pub fn set_chunk_delay(&mut self, delay: Duration) {
        self.chunk_delay = delay;
    }

    /// Debug aid: copies guest memory at the snapshot instant (in the
    /// pause) and, once memory.bin is written, compares the two and appends
    /// a line to `report`. A difference is a write that reached guest
    /// memory after the instant without a write-protect fault.
    pub fn check_against_instant(&mut self, report: PathBuf) {
        self.check = Some(check::InstantCheck::new(report));
    }

    /// Phase 2, with the guest paused and devices quiesced: re-protects the
    /// pages written since [`Tracker::arm`] and starts copy-before-write.
    /// Everything from here on is the snapshot instant's memory.
    pub fn freeze(&mut self, file: MemoryFileWriter) -> Result<(), LiveError> {
        let mut mode = self.shared.mode.lock().unwrap_or_else(|e| e.into_inner());
        let dirty =
            std::mem::take(&mut *self.shared.dirty.lock().unwrap_or_else(|e| e.into_inner()));
        self.window_pages = dirty.len() as u64;
        for (start, len) in ranges(dirty) {
            self.shared.wp.protect(start, len)?;
        }
        if self.shared.file.set(file).is_err() {
            return Err(LiveError::FrozenTwice);
        }
        if let Some(c) = &mut self.check {
            c.copy_instant(&self.shared.regions);
        }
        *mode = Mode::Copy;
        self.frozen_at = Some(Instant::now());
        Ok(())
    }

    /// Phase 3, with the guest running: streams every page; `progress`
    /// gets (bytes done, bytes in all). Returns the figures and the writer
    /// (to finish the file after the other snapshot files).
    pub fn stream(
        mut self,
        progress: &dyn Fn(u64, u64),
    ) -> Result<(LiveStats, MemoryFileWriter), LiveError> {
        let s = self.shared.clone();
        let total = s.pages * PAGE_SIZE;
        // The writer streams ahead of the vCPU threads
        // (snapshot/src/priority.rs); its own priority comes back after.
        let _nice = crate::priority::Nice::new(crate::priority::WRITER_NICE, "snapshot writer");
        let result = (|| {
            const WRITEBACK_EVERY: usize = 32 << 20;
            let mut buf = Vec::with_capacity(CHUNK_SIZE as usize);
            let mut staged = Vec::new();
            for (r, first) in s.regions.iter().zip(&s.first_page) {
                let mut off = 0usize;
                let mut flushed = 0usize;
                while off < r.len {
                    if let Some(e) = s.failed() {
                        return Err(LiveError::Failed(e));
                    }
                    let len = (CHUNK_SIZE as usize).min(r.len - off);
                    let npages = len / PAGE_SIZE as usize;
                    let base_idx = first + (off as u64) / PAGE_SIZE;
                    let mut i = 0;
                    while i < npages {
                        if !s.claim(base_idx + i as u64) {
                            i += 1;
                            continue;
                        }
                        let start = i;
                        i += 1;
                        while i < npages && s.claim(base_idx + i as u64) {
                            i += 1;
                        }
                        let host = r.host + off + start * PAGE_SIZE as usize;
                        let gpa = r.gpa + (off + start * PAGE_SIZE as usize) as u64;
                        let n = (i - start) * PAGE_SIZE as usize;
                        Shared::stage(host, gpa, n, &mut buf, &mut staged);
                        s.wp.unprotect(host, n)?;
                        s.done.fetch_add((i - start) as u64, Ordering::AcqRel);
                    }
                    // The chunk's pages are released; now the file.
                    s.write_staged(&mut buf, &mut staged)?;
                    off += len;
                    s.drain_pending()?;
                    if off - flushed >= WRITEBACK_EVERY || off == r.len {
                        if let Some(f) = s.file.get() {
                            f.start_writeback(r.gpa + flushed as u64, (off - flushed) as u64);
                        }
                        flushed = off;
                    }
                    progress(s.done.load(Ordering::Acquire) * PAGE_SIZE, total);
                    if !self.chunk_delay.is_zero() {
                        std::thread::sleep(self.chunk_delay);
                    }
                }
            }
            // Pages the handler claimed may still be in flight.
            while s.done.load(Ordering::Acquire) < s.pages {
                if let Some(e) = s.failed() {
                    return Err(LiveError::Failed(e));
                }
                std::thread::sleep(Duration::from_micros(50));
            }
            s.drain_pending()?;
            if let (Some(c), Some(f)) = (&self.check, s.file.get()) {
                c.report(f, &s.regions);
            }
            progress(total, total);
            s.failed().map_or(Ok(()), |e| Err(LiveError::Failed(e)))
        })();
        if let Err(e) = result {
            self.abort();
            return Err(e);
        }
        self.stop_handler();
        let stream_us = self
            .frozen_at
            .map(|t| t.elapsed().as_micros() as u64)
            .unwrap_or(0);
        let mut lat = std::mem::take(&mut *s.fault_ns.lock().unwrap_or_else(|e| e.into_inner()));
        lat.sort_unstable();
        let pct = |p: f64| {
            if lat.is_empty() {
                0.0
            } else {
                lat[((lat.len() - 1) as f64 * p).round() as usize] as f64 / 1000.0
            }
        };
        let stats = LiveStats {
            pages: s.pages,
            pages_written: s.written.load(Ordering::Relaxed),
            protect_us: self.protect_us,
            window_pages: self.window_pages,
            faults: lat.len() as u64,
            fault_p50_us: pct(0.5),
            fault_p99_us: pct(0.99),
            stream_us,
        };
        drop(s);
        let file = Arc::get_mut(&mut self.shared)
            .and_then(|sh| sh.file.take())
            .ok_or(LiveError::FileInUse)?;
        Ok((stats, file))
    }

    fn stop_handler(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.stop_evt.signal();
        if let Some(h) = self.handler.take() {
            let _ = h.join();
        }
    }

    /// Releases all memory and stops the handler (after any failure).
    pub fn abort(&mut self) {
        self.shared.abort();
        self.stop_handler();
    }
}

impl Drop for ArmedSnapshot {
    fn drop(&mut self) {
        if self.handler.is_some() {
            self.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory_file::MemoryFile;
    use crate::write_protect::HostRange;
    use std::sync::atomic::AtomicU32;

    const MIB: usize = 1 << 20;

    use crate::test_util::Anon;

    /// Stops and joins the writer threads when dropped (also when an
    /// assertion fails), before the mapping they write goes away.
    struct Writers(Arc<AtomicBool>, Vec<std::thread::JoinHandle<()>>);
    impl Drop for Writers {
        fn drop(&mut self) {
            self.0.store(true, Ordering::SeqCst);
            for w in self.1.drain(..) {
                let _ = w.join();
            }
        }
    }

    fn stamp(page: usize, gen: u32) -> u64 {
        ((page as u64) << 32) | gen as u64
    }

    /// Writers keep stamping pages through all three phases; the snapshot
    /// must equal memory exactly as it was at the freeze.
    #[test]
    fn snapshot_is_exact_under_concurrent_writes() {
        let len = 32 * MIB;
        let mem = Anon::new(len);
        let pages = len / 4096;
        // Half the pages populated with generation 1; the rest never touched.
        for p in 0..pages / 2 {
            // SAFETY: inside the mapping.
            unsafe { *((mem.addr + p * 4096) as *mut u64) = stamp(p, 1) };
        }
        let wp = Arc::new(
            WriteProtector::new(&[HostRange {
                addr: mem.addr,
                len,
            }])
            .expect("uffd (root, Linux >= 6.4)"),
        );
        let tracker = Tracker::new(
            wp,
            vec![GuestRegion {
                gpa: 0,
                host: mem.addr,
                len,
            }],
        );
        let paused = Arc::new(AtomicBool::new(false));
        let parked = Arc::new(AtomicU32::new(0));
        let quit = Arc::new(AtomicBool::new(false));
        let mut writers = Writers(quit.clone(), vec![]);
        for w in 0..2usize {
            let (paused, parked, quit, base) =
                (paused.clone(), parked.clone(), quit.clone(), mem.addr);
            writers.1.push(std::thread::spawn(move || {
                let mut gen = 2u32;
                let mut is_parked = false;
                while !quit.load(Ordering::SeqCst) {
                    for p in (w..pages).step_by(7) {
                        while paused.load(Ordering::SeqCst) {
                            if !is_parked {
                                parked.fetch_add(1, Ordering::SeqCst);
                                is_parked = true;
                            }
                            std::hint::spin_loop();
                        }
                        if is_parked {
                            parked.fetch_sub(1, Ordering::SeqCst);
                            is_parked = false;
                        }
                        // SAFETY: inside the mapping (kept alive until join).
                        unsafe { *((base + p * 4096 + 8 * w) as *mut u64) = stamp(p, gen) };
                    }
                    gen += 1;
                }
            }));
        }
        let mut armed = tracker.arm().unwrap();
        std::thread::sleep(Duration::from_millis(20));
        // "Pause the vCPUs".
        paused.store(true, Ordering::SeqCst);
        while parked.load(Ordering::SeqCst) < 2 {
            std::hint::spin_loop();
        }
        let mut expected = vec![0u8; len];
        // SAFETY: reading the mapping (reads never fault on write-protect).
        expected.copy_from_slice(unsafe { std::slice::from_raw_parts(mem.addr as *const u8, len) });
        let path = std::env::temp_dir().join(format!("snapvm-live-{}", std::process::id()));
        armed
            .freeze(MemoryFileWriter::create(&path, &[(0, len as u64)]).unwrap())
            .unwrap();
        paused.store(false, Ordering::SeqCst);
        // A "device" writing guest memory from the kernel (read(2) into the
        // mapping, as KVM or a DMA-like path would): the write faults into
        // the handler too, so the snapshot keeps the page's old content.
        // A page no writer touches and nothing populated (WP_UNPOPULATED).
        let dev_page = pages - 3;
        assert!(dev_page % 7 > 1 && dev_page >= pages / 2);
        let (rfd, wfd) = {
            let mut fds = [0i32; 2];
            // SAFETY: pipe(2) fills two descriptors.
            assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
            (fds[0], fds[1])
        };
        let payload = [0x5au8; 4096];
        // SAFETY: writes from a valid buffer to our pipe.
        assert_eq!(
            unsafe { libc::write(wfd, payload.as_ptr().cast(), 4096) },
            4096
        );
        let dev_addr = mem.addr + dev_page * 4096;
        let device = std::thread::spawn(move || {
            // SAFETY: reads into a page of the live mapping (joined below).
            unsafe { libc::read(rfd, dev_addr as *mut libc::c_void, 4096) }
        });
        let (stats, file) = armed.stream(&|_, _| {}).unwrap();
        assert_eq!(device.join().unwrap(), 4096);
        // SAFETY: closing our own pipe.
        unsafe {
            libc::close(rfd);
            libc::close(wfd);
        }
        // SAFETY: reading the mapping.
        assert_eq!(
            unsafe { *(dev_addr as *const u8) },
            0x5a,
            "the device write landed"
        );
        file.finish().unwrap();
        drop(writers);
        assert!(
            stats.faults > 0,
            "writers faulted into the handler: {stats:?}"
        );
        assert_eq!(stats.pages, pages as u64);
        let m = MemoryFile::open(&path).unwrap();
        m.verify_all().unwrap();
        let got = std::fs::read(&path).unwrap();
        for p in 0..pages {
            let (a, b) = (
                &got[p * 4096..(p + 1) * 4096],
                &expected[p * 4096..(p + 1) * 4096],
            );
            assert!(a == b, "page {p} differs from the freeze instant");
        }
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn coalescing() {
        assert_eq!(
            ranges(vec![8192, 4096, 4096, 16384]),
            vec![(4096, 8192), (16384, 4096)]
        );
    }
}
