//! Lazy memory loading for instant reverts: guest memory is registered
//! with a userfaultfd in missing-page mode and filled on demand from
//! memory.bin, a 2 MiB chunk at a time (checksum verified), while a
//! background pass prefetches the rest. When every chunk is in, the range
//! goes back to write-protect tracking for live snapshots.
//!
//! A chunk is read into a 2 MiB-aligned staging area, which the kernel
//! backs with a transparent huge page, and moved into guest RAM whole
//! (UFFDIO_MOVE), so guest RAM stays on huge pages after a load. With
//! UFFDIO_COPY it would be left on 4 KiB pages, and the next apply would
//! pay for that in KVM: its mapping teardown and the freeing of the old
//! pages cost ~70-90 ms per GiB of 4 KiB pages on these machines, against
//! a few ms on huge pages. Kernels without UFFDIO_MOVE (before 6.8) get
//! the copy.
//!
//! Chunks that hold only zeroes are not placed by the prefetch: once the
//! load completes they read as zeroes anyway (fresh memory), and the
//! kernel gives them a huge page when the guest first touches them. A
//! guest touch during the load gets a zeroed huge page moved in.
//!
//! One thread serves faults and prefetches, so a chunk is never loaded
//! twice; it never takes a lock a vCPU or device thread holds.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use userfaultfd::{Event, FeatureFlags, RegisterMode, Uffd, UffdBuilder};

use crate::live::GuestRegion;
use crate::memory_file::{MemoryFile, CHUNK_SIZE};
use crate::write_protect::WriteProtector;

/// Errors starting a lazy load.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    /// The userfaultfd could not be set up.
    #[error("cannot set up lazy memory loading: {0}")]
    Uffd(String),
}

/// `UFFD_FEATURE_MOVE` (Linux 6.8); the userfaultfd crate has no name for
/// it, nor a call for the ioctl below.
const UFFD_FEATURE_MOVE: u64 = 1 << 16;
/// `UFFDIO_MOVE`: `_IOWR(0xAA, 0x05, struct uffdio_move)` (40 bytes).
const UFFDIO_MOVE: libc::c_ulong = 0xC028_AA05;

/// `struct uffdio_move` from linux/userfaultfd.h.
#[repr(C)]
struct UffdioMove {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    moved: i64,
}

/// Moves the pages of `[src, src + len)` to `[dst, dst + len)` (a range
/// registered with `uffd` and not populated) and wakes threads waiting on
/// it. Whole 2 MiB huge pages move as they are.
fn uffd_move(uffd: RawFd, dst: usize, src: usize, len: usize) -> std::io::Result<()> {
    let mut done = 0usize;
    while done < len {
        let mut m = UffdioMove {
            dst: (dst + done) as u64,
            src: (src + done) as u64,
            len: (len - done) as u64,
            mode: 0,
            moved: 0,
        };
        // SAFETY: UFFDIO_MOVE reads and writes only the struct passed; the
        // kernel checks both ranges against this process's mappings.
        let rc = unsafe { libc::ioctl(uffd, UFFDIO_MOVE, &mut m as *mut UffdioMove) };
        if rc == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        // EAGAIN: moved part of it (or raced with a fault); go on from there.
        if e.raw_os_error() != Some(libc::EAGAIN) {
            return Err(e);
        }
        if m.moved > 0 {
            done += m.moved as usize;
        }
    }
    Ok(())
}

/// A 2 MiB-aligned private area a chunk is read into before it is moved
/// into guest RAM; advised for huge pages.
struct Staging {
    map: usize,
    map_len: usize,
    addr: usize,
}

impl Staging {
    fn new() -> std::io::Result<Self> {
        let len = CHUNK_SIZE as usize;
        let map_len = 2 * len;
        // SAFETY: a fresh anonymous mapping with no address hint; checked.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let addr = (map as usize).next_multiple_of(len);
        // SAFETY: advisory, inside the mapping just created.
        unsafe { libc::madvise(addr as *mut _, len, libc::MADV_HUGEPAGE) };
        Ok(Self {
            map: map as usize,
            map_len,
            addr,
        })
    }

    /// The first `len` bytes (at most 2 MiB), populated as they are written.
    fn buf(&mut self, len: usize) -> &mut [u8] {
        // SAFETY: inside our own mapping, which lives as long as `self`;
        // the exclusive borrow of `self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.addr as *mut u8, len) }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // SAFETY: the mapping created in `new`, used by nobody else.
        unsafe { libc::munmap(self.map as *mut _, self.map_len) };
    }
}

/// Where a chunk stands.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Not read yet.
    Pending,
    /// All zeroes, nothing placed: reads as zeroes once the load is over,
    /// but a fault on it during the load still needs an answer.
    Zero,
    /// In guest memory.
    Placed,
}

struct Shared {
    uffd: Uffd,
    /// Whether UFFDIO_MOVE is available (else chunks are copied).
    can_move: bool,
    file: MemoryFile,
    regions: Vec<GuestRegion>,
    /// (host address, gpa, len) of every chunk, in file order.
    chunks: Vec<(usize, u64, usize)>,
    state: Mutex<Vec<ChunkState>>,
    done_chunks: AtomicU64,
    error: Mutex<Option<String>>,
    on_error: Box<dyn Fn(&str) + Send + Sync>,
    stop: AtomicBool,
    /// Whether the background prefetch may run (faults are always served).
    prefetch: AtomicBool,
    /// Stop without loading the rest (the memory is about to be replaced).
    abandon: AtomicBool,
    finished: Mutex<bool>,
    finished_cv: Condvar,
}

/// A lazy load in progress.
pub struct LazyLoader {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    started: Instant,
    /// The memory the load replaced, freed by [`LazyLoader::free_old_memory`].
    old: Vec<OldMemory>,
}

impl Shared {
    fn chunk_of(&self, addr: usize) -> Option<usize> {
        self.chunks
            .iter()
            .position(|(h, _, len)| addr >= *h && addr < h + len)
    }

    /// Places the `len` bytes in `staging` at `host` (guest RAM registered
    /// with our userfaultfd, not populated in that range).
    fn place(
        &self,
        staging: &mut Staging,
        host: usize,
        gpa: u64,
        len: usize,
    ) -> Result<(), String> {
        let placed = if self.can_move {
            uffd_move(self.uffd.as_raw_fd(), host, staging.addr, len)
        } else {
            // SAFETY: `host..host+len` is guest RAM registered with this
            // userfaultfd in missing mode and still unpopulated (each chunk
            // is placed once, by this thread only); the source is staging.
            unsafe {
                self.uffd
                    .copy(staging.addr as *const _, host as *mut _, len, true)
            }
            .map(|_| ())
            .map_err(|e| std::io::Error::other(e.to_string()))
        };
        placed.map_err(|e| {
            format!(
                "cannot place memory from {} at {gpa:#x}: {e}",
                self.file.path().display()
            )
        })
    }

    /// Reads chunk `i` (verified) into `staging`; with `check_zero`,
    /// whether it is all zeroes (a fault needs the chunk placed anyway, so
    /// it skips the 2 MiB scan).
    fn read(&self, i: usize, staging: &mut Staging, check_zero: bool) -> Result<bool, String> {
        let (_, gpa, len) = self.chunks[i];
        let b = staging.buf(len);
        self.file
            .read_verified(i, gpa, b)
            .map_err(|e| e.to_string())?;
        Ok(check_zero && b.iter().all(|x| *x == 0))
    }

    /// Brings chunk `i` in. `needed`: a thread waits on it, so even a chunk
    /// of zeroes must be placed.
    fn ensure(&self, i: usize, needed: bool, staging: &mut Staging) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (host, gpa, len) = self.chunks[i];
        let result = match state[i] {
            ChunkState::Placed => return,
            ChunkState::Zero if !needed => return,
            ChunkState::Zero => {
                staging.buf(len).fill(0);
                self.place(staging, host, gpa, len)
            }
            ChunkState::Pending => match self.read(i, staging, !needed) {
                Ok(true) => {
                    state[i] = ChunkState::Zero;
                    self.done_chunks.fetch_add(1, Ordering::AcqRel);
                    return;
                }
                Ok(_) => self.place(staging, host, gpa, len),
                Err(e) => Err(e),
            },
        };
        if let Err(e) = result {
            tracing::error!("lazy memory load: {e}");
            // Release any thread waiting on the chunk (zeroes where
            // nothing was placed; the caller stops the VM anyway).
            // SAFETY: the chunk lies in guest RAM registered with this
            // userfaultfd; pages already placed make the call fail, which
            // changes nothing.
            let _ = unsafe { self.uffd.zeropage(host as *mut _, len, true) };
            let first = {
                let mut err = self.error.lock().unwrap_or_else(|e| e.into_inner());
                let first = err.is_none();
                err.get_or_insert(e.clone());
                first
            };
            if first {
                (self.on_error)(&e);
            }
        }
        if state[i] == ChunkState::Pending {
            self.done_chunks.fetch_add(1, Ordering::AcqRel);
        }
        state[i] = ChunkState::Placed;
    }

    fn run(&self, wp: &WriteProtector) {
        let mut staging = match Staging::new() {
            Ok(s) => s,
            Err(e) => {
                // Nothing can be loaded: fail the VM, and release its
                // threads with zeroes.
                let e = format!(
                    "cannot map a staging buffer to load {}: {e}",
                    self.file.path().display()
                );
                self.error
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(e.clone());
                (self.on_error)(&e);
                for r in &self.regions {
                    let _ = self.uffd.unregister(r.host as *mut _, r.len);
                }
                let _ = wp.reregister();
                *self.finished.lock().unwrap_or_else(|e| e.into_inner()) = true;
                self.finished_cv.notify_all();
                return;
            }
        };
        let mut next = 0;
        loop {
            // Faults first, then one chunk of prefetch.
            let mut pfd = libc::pollfd {
                fd: self.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let prefetching = self.prefetch.load(Ordering::Acquire);
            let timeout = if prefetching { 0 } else { 5 };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, timeout) };
            while let Ok(Some(ev)) = self.uffd.read_event() {
                if let Event::Pagefault { addr, .. } = ev {
                    match self.chunk_of(addr as usize) {
                        Some(i) => self.ensure(i, true, &mut staging),
                        None => {
                            tracing::error!("lazy load: fault outside guest memory at {addr:?}")
                        }
                    }
                }
            }
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            if !prefetching {
                continue;
            }
            if next < self.chunks.len() {
                self.ensure(next, false, &mut staging);
                next += 1;
                continue;
            }
            break;
        }
        // Everything is in (or we were told to stop after loading it all):
        // back to write-protect tracking. Unregistering wakes any thread
        // still waiting on a chunk of zeroes; it then reads fresh memory.
        while next < self.chunks.len() && !self.abandon.load(Ordering::Acquire) {
            self.ensure(next, false, &mut staging);
            next += 1;
        }
        for r in &self.regions {
            if let Err(e) = self.uffd.unregister(r.host as *mut _, r.len) {
                tracing::error!("lazy load: cannot unregister {:#x}: {e}", r.host);
            }
        }
        if let Err(e) = wp.reregister() {
            tracing::error!("lazy load: cannot re-enable write tracking: {e}");
            self.error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert(e.to_string());
        }
        *self.finished.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.finished_cv.notify_all();
    }
}

/// Debug aid: when set to a file path, the memory an apply replaces is
/// filled with [`POISON`] right after the apply (on a background thread) and kept for a
/// second before it is freed; then any page that no longer holds only the
/// poison is reported (a line per apply goes to that file). Nothing may
/// touch that memory once it has left guest RAM (KVM no longer maps it): a
/// changed page is a write through a stale translation, and a guest that
/// reads through one sees the poison (e.g. 0xabab in a 16-bit index).
pub const CHECK_OLD_MEMORY_ENV: &str = "SNAPVM_DEBUG_CHECK_OLD_MEMORY";
/// The byte [`CHECK_OLD_MEMORY_ENV`] fills old memory with.
pub const POISON: u8 = 0xab;

/// Guest memory moved out of the way by [`replace_mapping`]; unmapped on
/// drop.
struct OldMemory {
    addr: usize,
    len: usize,
    /// Guest-physical address of the region (for [`CHECK_OLD_MEMORY_ENV`]).
    gpa: u64,
}

impl OldMemory {
    fn poison(&self) {
        // SAFETY: the old pages, mapped writable at `addr` for `len` bytes
        // until this value is dropped; nothing else refers to them.
        unsafe { std::ptr::write_bytes(self.addr as *mut u8, POISON, self.len) };
    }

    /// Pages that no longer hold only the poison; a report line.
    fn changes(&self) -> String {
        // SAFETY: as in poison; only read.
        let now = unsafe { std::slice::from_raw_parts(self.addr as *const u8, self.len) };
        let changed: Vec<u64> = now
            .chunks(4096)
            .enumerate()
            .filter(|(_, p)| p.iter().any(|b| *b != POISON))
            .map(|(i, _)| self.gpa + (i as u64) * 4096)
            .collect();
        let first: Vec<String> = changed.iter().take(8).map(|g| format!("{g:#x}")).collect();
        format!(
            "region {:#x}+{:#x}: {} page(s) changed after the move; first: [{}]",
            self.gpa,
            self.len,
            changed.len(),
            first.join(", ")
        )
    }
}

impl Drop for OldMemory {
    fn drop(&mut self) {
        // SAFETY: the old pages, moved out of guest RAM by replace_mapping;
        // nothing refers to this range.
        unsafe { libc::munmap(self.addr as *mut _, self.len) };
    }
}

/// Gives `[host, host + len)` fresh, empty memory in O(1): the old pages
/// are moved away with mremap (whole page tables at a time), to be freed
/// later (see [`LazyLoader::free_old_memory`]), where MADV_DONTNEED would
/// free them page by page while the guest waits.
///
/// Guest RAM is never unmapped, not even for an instant: with a plain move
/// and a MAP_FIXED mapping after it, another thread's mmap (a thread
/// stack, a large allocation) could land in the hole and then be
/// overwritten. So the pages leave with MREMAP_DONTUNMAP, which keeps the
/// guest RAM mapping in place, empty; a MAP_FIXED mapping then replaces
/// that one in a single step, which also frees the page tables the move
/// left behind (a huge page can only be moved in where there are none).
fn replace_mapping(host: usize, len: usize, huge: bool) -> std::io::Result<OldMemory> {
    let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    // SAFETY: reserves a fresh address range (no access) for the old pages.
    let scratch = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_NONE, anon, -1, 0) };
    if scratch == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: moves the guest RAM pages (one VMA: the region) onto the
    // scratch range, which it replaces atomically; the guest RAM range
    // stays mapped. The guest is not running and no thread touches guest
    // memory meanwhile.
    let moved = unsafe {
        libc::mremap(
            host as *mut _,
            len,
            len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED | libc::MREMAP_DONTUNMAP,
            scratch,
        )
    };
    if moved == libc::MAP_FAILED {
        let e = std::io::Error::last_os_error();
        // SAFETY: our own scratch reservation.
        unsafe { libc::munmap(scratch, len) };
        return Err(e);
    }
    let old = OldMemory {
        addr: moved as usize,
        len,
        gpa: 0,
    };
    // SAFETY: replaces the (now empty) guest RAM mapping with a fresh one
    // at the same address, atomically; the VMM and KVM keep using it.
    let fresh = unsafe {
        libc::mmap(
            host as *mut _,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            anon | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    if fresh == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let advice = if huge {
        libc::MADV_HUGEPAGE
    } else {
        libc::MADV_NOHUGEPAGE
    };
    // SAFETY: advisory, on the range just mapped.
    unsafe { libc::madvise(host as *mut _, len, advice) };
    Ok(old)
}

impl LazyLoader {
    /// Drops the current content of `regions` and starts filling them from
    /// `file` on demand. `wp` (the regions' write-protect registration) is
    /// suspended until the load completes. The caller keeps the guest from
    /// running until this returns. Only faults are served until
    /// [`LazyLoader::start_prefetch`]. `on_error` is called (from the loader
    /// thread) with the first chunk that cannot be loaded, e.g. one that
    /// fails its checksum; that chunk reads as zeroes. With `huge_pages`
    /// false, guest RAM stays on 4 KiB pages (chunks are copied in, and the
    /// fresh memory is advised against huge pages).
    pub fn start(
        regions: &[GuestRegion],
        file: MemoryFile,
        wp: Arc<WriteProtector>,
        on_error: Box<dyn Fn(&str) + Send + Sync>,
        huge_pages: bool,
    ) -> Result<Self, LazyError> {
        let err = |e: String| LazyError::Uffd(e);
        let builder = |features: u64| {
            UffdBuilder::new()
                .close_on_exec(true)
                .non_blocking(true)
                .user_mode_only(false)
                .require_features(FeatureFlags::from_bits_retain(features))
                .create()
        };
        let (uffd, can_move) = match builder(UFFD_FEATURE_MOVE) {
            Ok(u) if huge_pages => (u, true),
            Ok(_) => (builder(0).map_err(|e| err(e.to_string()))?, false),
            Err(e) => {
                tracing::info!("no UFFDIO_MOVE ({e}); memory is copied in on 4 KiB pages");
                (builder(0).map_err(|e| err(e.to_string()))?, false)
            }
        };
        // Fresh memory first: the old pages leave with their write-protect
        // state, so unregistering has nothing left to walk.
        let mut old = Vec::new();
        for r in regions {
            let mut o = replace_mapping(r.host, r.len, huge_pages)
                .map_err(|e| err(format!("cannot replace guest memory: {e}")))?;
            o.gpa = r.gpa;
            old.push(o);
        }
        wp.unregister().map_err(|e| err(e.to_string()))?;
        let mut chunks = Vec::new();
        for r in regions {
            if let Err(e) = uffd.register_with_mode(r.host as *mut _, r.len, RegisterMode::MISSING)
            {
                let _ = wp.reregister();
                return Err(err(e.to_string()));
            }
            let mut off = 0;
            while off < r.len {
                let len = (CHUNK_SIZE as usize).min(r.len - off);
                chunks.push((r.host + off, r.gpa + off as u64, len));
                off += len;
            }
        }
        let n = chunks.len();
        let shared = Arc::new(Shared {
            uffd,
            can_move,
            file,
            regions: regions.to_vec(),
            chunks,
            state: Mutex::new(vec![ChunkState::Pending; n]),
            done_chunks: AtomicU64::new(0),
            error: Mutex::new(None),
            on_error,
            stop: AtomicBool::new(false),
            prefetch: AtomicBool::new(false),
            abandon: AtomicBool::new(false),
            finished: Mutex::new(false),
            finished_cv: Condvar::new(),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("lazy-load".into())
            .spawn(move || s.run(&wp))
            .map_err(|e| err(e.to_string()))?;
        Ok(Self {
            shared,
            thread: Some(thread),
            started: Instant::now(),
            old,
        })
    }

    /// Lets the background prefetch begin (until then only faults are
    /// served). An apply calls it once the vCPU state is loaded, so the
    /// pages that load touches (KVM maps the kvmclock page) never wait
    /// behind a prefetched chunk.
    pub fn start_prefetch(&self) {
        self.shared.prefetch.store(true, Ordering::Release);
    }

    /// Frees the memory this load replaced, on a background thread. Call
    /// it once the vCPUs' state is loaded: while pages are being freed the
    /// kernel makes KVM wait before it maps a page for its own use (the
    /// kvmclock page, set by the vCPU state load), so freeing 4 KiB pages
    /// during that load stalled an apply by ~70 ms per GiB.
    pub fn free_old_memory(&mut self) {
        let old = std::mem::take(&mut self.old);
        if std::env::var_os(CHECK_OLD_MEMORY_ENV).is_some() {
            std::thread::spawn(move || {
                old.iter().for_each(OldMemory::poison);
                std::thread::sleep(std::time::Duration::from_secs(1));
                report_old_memory_changes(&old);
            });
        } else if !old.is_empty() {
            std::thread::spawn(move || drop(old));
        }
    }

    /// (chunks loaded, chunks in all).
    pub fn progress(&self) -> (u64, u64) {
        (
            self.shared.done_chunks.load(Ordering::Acquire),
            self.shared.chunks.len() as u64,
        )
    }

    /// Whether every chunk is in and tracking is back.
    pub fn finished(&self) -> bool {
        *self
            .shared
            .finished
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for the load to complete (loading the rest at full speed);
    /// returns the first error and how long the whole load took.
    pub fn finish(mut self) -> Result<std::time::Duration, String> {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        match self
            .shared
            .error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            Some(e) => Err(e),
            None => Ok(self.started.elapsed()),
        }
    }
}

/// Appends what [`OldMemory::changes`] found to the file named by
/// [`CHECK_OLD_MEMORY_ENV`].
fn report_old_memory_changes(old: &[OldMemory]) {
    use std::io::Write;
    let Some(path) = std::env::var_os(CHECK_OLD_MEMORY_ENV) else {
        return;
    };
    for o in old {
        let line = o.changes();
        if !line.contains(": 0 page(s)") {
            tracing::error!("old guest memory changed after an apply: {line}");
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path);
        if let Ok(mut f) = file {
            let _ = writeln!(f, "pid {} {line}", std::process::id());
        }
    }
}

impl LazyLoader {
    /// Stops the load without bringing in the rest, for an apply that is
    /// about to replace guest memory anyway (the vCPUs and devices must be
    /// stopped: what was not loaded reads as zeroes from here on).
    pub fn abandon(self) {
        self.shared.abandon.store(true, Ordering::Release);
    }
}

impl Drop for LazyLoader {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory_file::MemoryFileWriter;
    use crate::test_util::Anon;
    use crate::write_protect::HostRange;

    #[test]
    fn memory_appears_on_access_and_prefetch_completes() {
        let len = 8 << 20;
        let mem = Anon::new(len);
        let path = std::env::temp_dir().join(format!("snapvm-lazy-{}", std::process::id()));
        let w = MemoryFileWriter::create(&path, &[(0, len as u64)]).unwrap();
        for p in (0..len / 4096).step_by(3) {
            w.write_at(&[(p % 251) as u8 + 1; 4096], (p * 4096) as u64)
                .unwrap();
        }
        w.finish().unwrap();
        // Old content that must disappear.
        // SAFETY: inside the mapping.
        unsafe { std::ptr::write_bytes(mem.addr as *mut u8, 0xee, len) };
        let wp = Arc::new(
            WriteProtector::new(&[HostRange {
                addr: mem.addr,
                len,
            }])
            .unwrap(),
        );
        let regions = [GuestRegion {
            gpa: 0,
            host: mem.addr,
            len,
        }];
        let loader = LazyLoader::start(
            &regions,
            MemoryFile::open(&path).unwrap(),
            wp.clone(),
            Box::new(|e| panic!("{e}")),
            true,
        )
        .unwrap();
        loader.start_prefetch();
        // Another thread touches memory at once (like a vCPU).
        let addr = mem.addr;
        let reader = std::thread::spawn(move || {
            // SAFETY: inside the mapping (joined before it is dropped).
            unsafe { *((addr + 3 * 4096 * 100) as *const u8) }
        });
        assert_eq!(reader.join().unwrap(), (300 % 251) as u8 + 1);
        loader.finish().unwrap();
        for p in 0..len / 4096 {
            // SAFETY: inside the mapping.
            let b = unsafe { *((mem.addr + p * 4096 + 17) as *const u8) };
            let want = if p % 3 == 0 { (p % 251) as u8 + 1 } else { 0 };
            assert_eq!(b, want, "page {p}");
        }
        // Write tracking is back: protecting works again.
        wp.protect(mem.addr, len).unwrap();
        wp.unprotect(mem.addr, len).unwrap();
        std::fs::remove_file(&path).unwrap();
    }

    /// `len` bytes of anonymous memory at a 2 MiB boundary, advised for
    /// huge pages, like guest RAM; the address and the mapping.
    fn guest_like(len: usize) -> (usize, Anon) {
        let map = Anon::new(len + CHUNK_SIZE as usize);
        let addr = map.addr.next_multiple_of(CHUNK_SIZE as usize);
        // SAFETY: advisory, inside the mapping.
        unsafe { libc::madvise(addr as *mut _, len, libc::MADV_HUGEPAGE) };
        (addr, map)
    }

    fn start_load(addr: usize, len: usize, file: &std::path::Path) -> LazyLoader {
        start_load_with(addr, len, file, true)
    }

    fn start_load_with(addr: usize, len: usize, file: &std::path::Path, huge: bool) -> LazyLoader {
        let wp = Arc::new(WriteProtector::new(&[HostRange { addr, len }]).unwrap());
        let regions = [GuestRegion {
            gpa: 0,
            host: addr,
            len,
        }];
        LazyLoader::start(
            &regions,
            MemoryFile::open(file).unwrap(),
            wp,
            Box::new(|e| panic!("{e}")),
            huge,
        )
        .unwrap()
    }

    /// (AnonHugePages in KiB, VmFlags) of the mapping holding `addr`, from
    /// /proc/self/smaps.
    fn smaps_of(addr: usize) -> (usize, String) {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        let (mut huge_kib, mut flags) = (None, None);
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((lo, hi)) = range.split_once('-') {
                    if let (Ok(lo), Ok(hi)) =
                        (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                    {
                        inside = lo <= addr && addr < hi;
                        continue;
                    }
                }
            }
            if inside {
                if let Some(v) = line.strip_prefix("AnonHugePages:") {
                    huge_kib = v.trim().trim_end_matches(" kB").parse::<usize>().ok();
                }
                if let Some(v) = line.strip_prefix("VmFlags:") {
                    flags = Some(v.trim().to_string());
                }
            }
        }
        (
            huge_kib.expect("the mapping in smaps"),
            flags.expect("the mapping's flags in smaps"),
        )
    }

    #[test]
    fn loaded_memory_stays_on_small_pages_when_asked() {
        let tmp = crate::test_util::Tmp::new("lazy-4k");
        let len = 8 << 20;
        let path = memory_file(&tmp, "m.bin", len, |p| (p % 5) as u8 + 1);
        let (addr, _map) = guest_like(len);
        let loader = start_load_with(addr, len, &path, false);
        assert!(!loader.shared.can_move, "small pages are copied in");
        loader.finish().unwrap();
        for p in [0, 1, 511, 512, 2047] {
            assert_eq!(byte(addr + 4096 * p), (p % 5) as u8 + 1, "page {p}");
        }
        let (huge_kib, flags) = smaps_of(addr);
        assert_eq!(huge_kib, 0, "huge pages after a 4 KiB load");
        assert!(flags.split(' ').any(|f| f == "nh"), "not advised: {flags}");
    }

    /// A memory file of `len` bytes whose page `p` holds `f(p)` (0: hole).
    fn memory_file(
        tmp: &crate::test_util::Tmp,
        name: &str,
        len: usize,
        f: impl Fn(usize) -> u8,
    ) -> std::path::PathBuf {
        let path = tmp.0.join(name);
        let w = MemoryFileWriter::create(&path, &[(0, len as u64)]).unwrap();
        for p in 0..len / 4096 {
            let v = f(p);
            if v != 0 {
                w.write_at(&[v; 4096], (p * 4096) as u64).unwrap();
            }
        }
        w.finish().unwrap();
        path
    }

    fn byte(addr: usize) -> u8 {
        // SAFETY: callers pass addresses inside a live test mapping.
        unsafe { std::ptr::read_volatile(addr as *const u8) }
    }

    #[test]
    fn chunks_of_zeroes_read_as_zeroes_and_keep_writes_made_during_the_load() {
        let tmp = crate::test_util::Tmp::new("lazy-zero");
        let chunk = CHUNK_SIZE as usize;
        let len = 4 * chunk;
        // Data in chunks 0 and 2; chunks 1 and 3 are holes in the file.
        let path = memory_file(&tmp, "m.bin", len, |p| {
            if (p * 4096 / chunk).is_multiple_of(2) {
                (p % 200) as u8 + 1
            } else {
                0
            }
        });
        let (addr, _map) = guest_like(len);
        // SAFETY: inside the mapping; old content that must disappear.
        unsafe { std::ptr::write_bytes(addr as *mut u8, 0xee, len) };
        let loader = start_load(addr, len, &path);
        loader.start_prefetch();
        // Like a vCPU: reads a chunk of zeroes and writes into another,
        // while the prefetch may or may not have passed them.
        let w = std::thread::spawn(move || {
            let read = byte(addr + chunk + 4096 * 7 + 5);
            // SAFETY: inside the mapping (joined before it is dropped).
            unsafe { std::ptr::write_volatile((addr + 3 * chunk + 4096 * 9) as *mut u8, 0x5a) };
            read
        });
        assert_eq!(w.join().unwrap(), 0);
        loader.finish().unwrap();
        for p in 0..len / 4096 {
            let at = addr + p * 4096;
            let want = if (p * 4096 / chunk).is_multiple_of(2) {
                (p % 200) as u8 + 1
            } else {
                0
            };
            assert_eq!(byte(at + 1), want, "page {p}");
            let first = if at == addr + 3 * chunk + 4096 * 9 {
                0x5a
            } else {
                want
            };
            assert_eq!(byte(at), first, "page {p}, first byte");
        }
    }

    #[test]
    fn a_load_abandoned_for_another_leaves_only_the_other() {
        let tmp = crate::test_util::Tmp::new("lazy-abandon");
        let len = 16 << 20;
        let a = memory_file(&tmp, "a.bin", len, |_| 1);
        let b = memory_file(&tmp, "b.bin", len, |p| if p % 2 == 0 { 2 } else { 0 });
        let (addr, _map) = guest_like(len);
        let first = start_load(addr, len, &a);
        assert_eq!(byte(addr + 5 * 4096), 1);
        first.abandon();
        let second = start_load(addr, len, &b);
        second.finish().unwrap();
        for p in 0..len / 4096 {
            assert_eq!(
                byte(addr + p * 4096 + 3),
                if p % 2 == 0 { 2 } else { 0 },
                "page {p}"
            );
        }
    }

    #[test]
    fn loaded_memory_stays_on_huge_pages() {
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
            .unwrap_or_default();
        if thp.contains("[never]") || thp.is_empty() {
            eprintln!("transparent huge pages are off here; nothing to check");
            return;
        }
        let tmp = crate::test_util::Tmp::new("lazy-thp");
        let len = 8 << 20;
        let path = memory_file(&tmp, "m.bin", len, |p| (p % 7) as u8 + 1);
        let (addr, _map) = guest_like(len);
        let loader = start_load(addr, len, &path);
        if !loader.shared.can_move {
            eprintln!("no UFFDIO_MOVE on this kernel; memory is copied in on 4 KiB pages");
            return;
        }
        loader.finish().unwrap();
        assert_eq!(byte(addr + 4096 * 3), 4);
        let (huge_kib, _) = smaps_of(addr);
        assert!(
            huge_kib >= 2048,
            "no huge page after the load: {huge_kib} KiB"
        );
    }

    #[test]
    fn guest_memory_stays_mapped_while_it_is_replaced() {
        let len = 256 << 20;
        let (addr, _map) = guest_like(len);
        // SAFETY: inside the mapping.
        unsafe { std::ptr::write_bytes(addr as *mut u8, 1, len) };
        // Another thread maps and unmaps memory all the time, as malloc
        // does for a new thread's arena: nothing it gets may lie inside
        // guest memory.
        let stop = Arc::new(AtomicBool::new(false));
        let racer = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut inside = 0;
                while !stop.load(Ordering::Relaxed) {
                    let m = Anon::new(64 << 20);
                    if m.addr + m.len > addr && m.addr < addr + len {
                        inside += 1;
                    }
                }
                inside
            })
        };
        for _ in 0..100 {
            let old = replace_mapping(addr, len, true).unwrap();
            assert_eq!(byte(addr + 4096), 0, "fresh memory");
            // SAFETY: inside the mapping.
            unsafe { std::ptr::write_bytes(addr as *mut u8, 1, 8 << 20) };
            drop(old);
        }
        stop.store(true, Ordering::Relaxed);
        assert_eq!(
            racer.join().unwrap(),
            0,
            "a mapping landed inside guest memory"
        );
    }
}
