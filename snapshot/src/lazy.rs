//! Lazy memory loading for instant reverts: guest memory is registered
//! with a userfaultfd in missing-page mode and filled on demand from
//! memory.bin, a 2 MiB chunk at a time (checksum verified), while a
//! background pass prefetches the rest. When every chunk is in, the range
//! goes back to write-protect tracking for live snapshots.
//!
//! One thread serves faults and prefetches, so a chunk is never loaded
//! twice; it never takes a lock a vCPU or device thread holds.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use userfaultfd::{Event, RegisterMode, Uffd, UffdBuilder};

use crate::live::GuestRegion;
use crate::memory_file::{MemoryFile, CHUNK_SIZE, PAGE_SIZE};
use crate::write_protect::WriteProtector;

/// Errors starting a lazy load.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    /// The userfaultfd could not be set up.
    #[error("cannot set up lazy memory loading: {0}")]
    Uffd(String),
}

struct Shared {
    uffd: Uffd,
    file: MemoryFile,
    regions: Vec<GuestRegion>,
    /// (host address, gpa, len) of every chunk, in file order.
    chunks: Vec<(usize, u64, usize)>,
    loaded: Mutex<Vec<bool>>,
    done_chunks: AtomicU64,
    error: Mutex<Option<String>>,
    on_error: Box<dyn Fn(&str) + Send + Sync>,
    stop: AtomicBool,
    finished: Mutex<bool>,
    finished_cv: Condvar,
}

/// A lazy load in progress.
pub struct LazyLoader {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    started: Instant,
}

impl Shared {
    fn chunk_of(&self, addr: usize) -> Option<usize> {
        self.chunks
            .iter()
            .position(|(h, _, len)| addr >= *h && addr < h + len)
    }

    /// Loads chunk `i` (verified) into guest memory and wakes waiters.
    fn load(&self, i: usize, buf: &mut [u8]) -> Result<(), String> {
        let (host, gpa, len) = self.chunks[i];
        let b = &mut buf[..len];
        self.file
            .read_verified(i, gpa, b)
            .map_err(|e| e.to_string())?;
        let page = PAGE_SIZE as usize;
        let mut off = 0;
        while off < len {
            let zero = b[off..off + page].iter().all(|x| *x == 0);
            let mut end = off + page;
            while end < len && b[end..end + page].iter().all(|x| *x == 0) == zero {
                end += page;
            }
            let dst = (host + off) as *mut libc::c_void;
            // SAFETY: `dst..dst+len` is inside a guest RAM mapping registered
            // with this userfaultfd in missing mode, still unpopulated (each
            // chunk is loaded once, by this thread only); the source is our
            // own buffer.
            let r = unsafe {
                if zero {
                    self.uffd.zeropage(dst, end - off, true)
                } else {
                    self.uffd
                        .copy(b[off..].as_ptr().cast(), dst, end - off, true)
                }
            };
            if let Err(e) = r {
                return Err(format!(
                    "cannot place memory at {:#x}: {e}",
                    gpa + off as u64
                ));
            }
            off = end;
        }
        Ok(())
    }

    fn ensure(&self, i: usize, buf: &mut [u8]) {
        let mut loaded = self.loaded.lock().unwrap_or_else(|e| e.into_inner());
        if loaded[i] {
            return;
        }
        if let Err(e) = self.load(i, buf) {
            tracing::error!("lazy memory load: {e}");
            // Release any thread waiting on the chunk (zeroes where
            // nothing was placed; the caller stops the VM anyway).
            let (host, _, len) = self.chunks[i];
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
        loaded[i] = true;
        self.done_chunks.fetch_add(1, Ordering::AcqRel);
    }

    fn run(&self, wp: &WriteProtector) {
        let mut buf = vec![0u8; CHUNK_SIZE as usize];
        let mut next = 0;
        loop {
            // Faults first, then one chunk of prefetch.
            let mut pfd = libc::pollfd {
                fd: self.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let timeout = if next < self.chunks.len() { 0 } else { 100 };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, timeout) };
            while let Ok(Some(ev)) = self.uffd.read_event() {
                if let Event::Pagefault { addr, .. } = ev {
                    match self.chunk_of(addr as usize) {
                        Some(i) => self.ensure(i, &mut buf),
                        None => {
                            tracing::error!("lazy load: fault outside guest memory at {addr:?}")
                        }
                    }
                }
            }
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            if next < self.chunks.len() {
                self.ensure(next, &mut buf);
                next += 1;
                continue;
            }
            break;
        }
        // Everything is in (or we were told to stop after loading it all):
        // back to write-protect tracking.
        while next < self.chunks.len() {
            self.ensure(next, &mut buf);
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

/// Gives `[host, host + len)` fresh, empty memory in O(1): the old pages
/// are moved away with mremap (whole page tables at a time) and freed by a
/// background thread, where MADV_DONTNEED would free them page by page
/// while the guest waits.
fn replace_mapping(host: usize, len: usize) -> std::io::Result<()> {
    let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    // SAFETY: reserves a fresh address range (no access) for the old pages.
    let scratch = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_NONE, anon, -1, 0) };
    if scratch == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: moves the guest RAM pages (one VMA: the region) onto the
    // scratch range, which it replaces; the guest is not running and no
    // thread touches guest memory meanwhile.
    let moved = unsafe {
        libc::mremap(
            host as *mut _,
            len,
            len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            scratch,
        )
    };
    if moved == libc::MAP_FAILED {
        let e = std::io::Error::last_os_error();
        // SAFETY: our own scratch reservation.
        unsafe { libc::munmap(scratch, len) };
        return Err(e);
    }
    // SAFETY: maps fresh zero memory at the guest RAM address the VMM and
    // KVM already use (the range is now unmapped).
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
    // SAFETY: advisory, on the range just mapped.
    unsafe { libc::madvise(host as *mut _, len, libc::MADV_HUGEPAGE) };
    let old = moved as usize;
    std::thread::spawn(move || {
        // SAFETY: the old pages, moved out of guest RAM above; nothing
        // refers to this range.
        unsafe { libc::munmap(old as *mut _, len) };
    });
    Ok(())
}

impl LazyLoader {
    /// Drops the current content of `regions` and starts filling them from
    /// `file` on demand. `wp` (the regions' write-protect registration) is
    /// suspended until the load completes. The caller keeps the guest from
    /// running until this returns. `on_error` is called (from the loader
    /// thread) with the first chunk that cannot be loaded, e.g. one that
    /// fails its checksum; that chunk reads as zeroes.
    pub fn start(
        regions: &[GuestRegion],
        file: MemoryFile,
        wp: Arc<WriteProtector>,
        on_error: Box<dyn Fn(&str) + Send + Sync>,
    ) -> Result<Self, LazyError> {
        let err = |e: String| LazyError::Uffd(e);
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()
            .map_err(|e| err(e.to_string()))?;
        // Fresh memory first: the old pages leave with their write-protect
        // state, so unregistering has nothing left to walk.
        for r in regions {
            replace_mapping(r.host, r.len)
                .map_err(|e| err(format!("cannot replace guest memory: {e}")))?;
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
            file,
            regions: regions.to_vec(),
            chunks,
            loaded: Mutex::new(vec![false; n]),
            done_chunks: AtomicU64::new(0),
            error: Mutex::new(None),
            on_error,
            stop: AtomicBool::new(false),
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
        })
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
        )
        .unwrap();
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
}
