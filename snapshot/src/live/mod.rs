//! Live memory snapshots with userfaultfd write-protection.
//!
//! Three phases, so that the guest's pause does not grow with memory size:
//!
//! 1. [`Tracker::arm`] (guest running): write-protect all guest memory
//!    but the 2 MiB extents never touched (snapshot/src/populated.rs). A
//!    handler thread serves write faults in *window* mode: it notes the page
//!    and releases it at once (nothing is copied yet).
//! 2. [`ArmedSnapshot::freeze`] (guest paused, devices quiesced): re-protect
//!    only the pages written since phase 1, protect the untouched extents
//!    the guest populated meanwhile, record the still empty ones as zeroes,
//!    and switch the handler to *copy* mode. This is the snapshot instant.
//! 3. [`ArmedSnapshot::stream`] (guest running): a writer streams every page
//!    to memory.bin while the handler serves write faults first. Each page
//!    is claimed exactly once (an atomic bit), copied, and only then
//!    released. All-zero pages are not written (holes). At the end the
//!    huge pages the faults split are collapsed again
//!    (snapshot/src/collapse.rs).
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
use crate::populated;
use crate::write_protect::{WriteProtectError, WriteProtector};

mod check;
mod untouched;

use self::untouched::Untouched;

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
    /// Pages of extents empty at the instant: zeroes, never protected.
    #[serde(default)]
    pub empty_pages: u64,
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
    /// Extents split by write faults and put back on huge pages after.
    #[serde(default)]
    pub collapsed_extents: u64,
    /// Time that took.
    #[serde(default)]
    pub collapse_us: u64,
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
    /// Extents in which the handler released single pages, splitting
    /// their huge page (duplicates are removed at the end).
    split: Mutex<Vec<usize>>,
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

    /// Claims the `n` pages from `idx` on for nobody (their content at the
    /// instant is known: zeroes) and counts them done. Only in the pause,
    /// before the handler or writer claims anything: whole words are
    /// simply stored.
    fn claim_empty(&self, mut idx: u64, n: u64) {
        let end = idx + n;
        while idx < end {
            let bit = idx % 64;
            let take = (64 - bit).min(end - idx);
            let word = &self.claimed[(idx / 64) as usize];
            if take == 64 {
                word.store(u64::MAX, Ordering::Release);
            } else {
                word.fetch_or(((1u64 << take) - 1) << bit, Ordering::AcqRel);
            }
            idx += take;
        }
        self.done.fetch_add(n, Ordering::AcqRel);
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

    /// Notes that releasing `page` alone split its extent's huge page.
    fn note_split(&self, page: usize) {
        let e = page & !(populated::EXTENT - 1);
        let mut split = self.split.lock().unwrap_or_else(|e| e.into_inner());
        if split.last() != Some(&e) {
            split.push(e);
        }
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
                self.note_split(page);
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
                        self.note_split(page);
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
    /// The untouched extents left unprotected until the freeze.
    untouched: Option<Untouched>,
    empty_pages: u64,
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
            split: Mutex::new(Vec::new()),
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
            untouched: None,
            empty_pages: 0,
            check: None,
        };
        let t0 = Instant::now();
        match Untouched::protect_rest(&self.wp, &self.regions) {
            Ok(u) => armed.untouched = Some(u),
            Err(e) => {
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
        if let Some(mut u) = self.untouched.take() {
            self.empty_pages = u.settle(&self.shared)?;
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
        // The faults are over: their extents go back on huge pages, while
        // memory.bin's writeback goes on.
        let t = Instant::now();
        let mut split = std::mem::take(&mut *s.split.lock().unwrap_or_else(|e| e.into_inner()));
        split.sort_unstable();
        split.dedup();
        split.retain(|&e| {
            s.regions
                .iter()
                .any(|r| e >= r.host && e + populated::EXTENT <= r.host + r.len)
        });
        let collapsed = crate::collapse::collapse(&split);
        let collapse_us = t.elapsed().as_micros() as u64;
        tracing::debug!(
            "live snapshot: {} split extents back on huge pages in {collapse_us} us ({} refused)",
            collapsed.extents,
            collapsed.refused
        );
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
            empty_pages: self.empty_pages,
            window_pages: self.window_pages,
            faults: lat.len() as u64,
            fault_p50_us: pct(0.5),
            fault_p99_us: pct(0.99),
            stream_us,
            collapsed_extents: collapsed.extents,
            collapse_us,
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
mod tests;
