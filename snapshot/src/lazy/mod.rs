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

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use userfaultfd::{Event, FeatureFlags, RegisterMode, Uffd, UffdBuilder};

use crate::live::GuestRegion;
use crate::memory_file::{MemoryFile, MemoryFileError, CHUNK_SIZE};
use crate::write_protect::{WriteProtectError, WriteProtector};

use self::old_memory::{replace_mapping, OldMemory};
use self::staging::{uffd_move, Staging, UFFD_FEATURE_MOVE};

mod old_memory;
mod staging;

pub use self::old_memory::POISON;

/// Errors of a lazy load: setting it up, or loading a chunk.
#[derive(Debug, thiserror::Error)]
pub enum LazyError {
    /// No userfaultfd.
    #[error("cannot set up lazy memory loading: cannot create a userfaultfd: {0}")]
    Create(userfaultfd::Error),
    /// Guest memory could not be given fresh pages.
    #[error("cannot set up lazy memory loading: cannot replace guest memory: {0}")]
    Replace(std::io::Error),
    /// Write tracking could not be suspended.
    #[error("cannot set up lazy memory loading: {0}")]
    Suspend(WriteProtectError),
    /// Guest memory could not be registered for missing-page faults.
    #[error(
        "cannot set up lazy memory loading: cannot register guest memory at {addr:#x}: {source}"
    )]
    Register {
        /// Host address of the region.
        addr: usize,
        /// The error.
        source: userfaultfd::Error,
    },
    /// The loader thread or its buffer could not be created.
    #[error("cannot set up lazy memory loading: {what}: {source}")]
    Resources {
        /// What was missing.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// A chunk could not be read (or failed its checksum); names the file.
    #[error(transparent)]
    Read(#[from] MemoryFileError),
    /// A chunk could not be placed in guest memory.
    #[error("cannot place memory from {path} at {gpa:#x}: {source}")]
    Place {
        /// memory.bin.
        path: PathBuf,
        /// Guest-physical address of the chunk.
        gpa: u64,
        /// The OS error.
        source: std::io::Error,
    },
    /// Write tracking could not be re-enabled after the load.
    #[error("cannot re-enable write tracking after the memory load: {0}")]
    Reregister(WriteProtectError),
}

/// How a lazy load places memory, and its debug aid.
#[derive(Debug, Clone, Default)]
pub struct LazyOptions {
    /// Keep guest RAM on huge pages (chunks are moved in whole); with
    /// false it stays on 4 KiB pages (chunks are copied in, and the fresh
    /// memory is advised against huge pages).
    pub huge_pages: bool,
    /// Debug aid: poison the replaced memory and report to this file any
    /// page written after it left guest RAM (see [`POISON`]).
    pub check_old_memory: Option<PathBuf>,
}

/// Called with the first chunk that cannot be loaded.
pub type OnError = Box<dyn Fn(Arc<LazyError>) + Send + Sync>;

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
    error: Mutex<Option<Arc<LazyError>>>,
    on_error: OnError,
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
    /// Where [`LazyOptions::check_old_memory`] reports.
    check_old_memory: Option<PathBuf>,
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
    ) -> Result<(), LazyError> {
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
        placed.map_err(|source| LazyError::Place {
            path: self.file.path().to_path_buf(),
            gpa,
            source,
        })
    }

    /// Reads chunk `i` (verified) into `staging`; with `check_zero`,
    /// whether it is all zeroes (a fault needs the chunk placed anyway, so
    /// it skips the 2 MiB scan).
    fn read(&self, i: usize, staging: &mut Staging, check_zero: bool) -> Result<bool, LazyError> {
        let (_, gpa, len) = self.chunks[i];
        let b = staging.buf(len);
        self.file.read_verified(i, gpa, b)?;
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
            self.record(e);
        }
        if state[i] == ChunkState::Pending {
            self.done_chunks.fetch_add(1, Ordering::AcqRel);
        }
        state[i] = ChunkState::Placed;
    }

    /// Keeps the first error and reports it.
    fn record(&self, e: LazyError) {
        let first = {
            let mut err = self.error.lock().unwrap_or_else(|e| e.into_inner());
            if err.is_some() {
                None
            } else {
                let e = Arc::new(e);
                *err = Some(e.clone());
                Some(e)
            }
        };
        if let Some(e) = first {
            (self.on_error)(e);
        }
    }

    fn run(&self, wp: &WriteProtector) {
        let mut staging = match Staging::new() {
            Ok(s) => s,
            Err(source) => {
                // Nothing can be loaded: fail the VM, and release its
                // threads with zeroes.
                self.record(LazyError::Resources {
                    what: "cannot map a staging buffer",
                    source,
                });
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
            self.record(LazyError::Reregister(e));
        }
        *self.finished.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.finished_cv.notify_all();
    }
}

impl LazyLoader {
    /// Drops the current content of `regions` and starts filling them from
    /// `file` on demand. `wp` (the regions' write-protect registration) is
    /// suspended until the load completes. The caller keeps the guest from
    /// running until this returns. Only faults are served until
    /// [`LazyLoader::start_prefetch`]. `on_error` is called (from the loader
    /// thread) with the first chunk that cannot be loaded, e.g. one that
    /// fails its checksum; that chunk reads as zeroes. `options` says how
    /// memory is placed ([`LazyOptions`]).
    pub fn start(
        regions: &[GuestRegion],
        file: MemoryFile,
        wp: Arc<WriteProtector>,
        on_error: OnError,
        options: LazyOptions,
    ) -> Result<Self, LazyError> {
        let huge_pages = options.huge_pages;
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
            Ok(_) => (builder(0).map_err(LazyError::Create)?, false),
            Err(e) => {
                tracing::info!("no UFFDIO_MOVE ({e}); memory is copied in on 4 KiB pages");
                (builder(0).map_err(LazyError::Create)?, false)
            }
        };
        // Fresh memory first: the old pages leave with their write-protect
        // state, so unregistering has nothing left to walk.
        let mut old = Vec::new();
        for r in regions {
            let mut o = replace_mapping(r.host, r.len, huge_pages).map_err(LazyError::Replace)?;
            o.gpa = r.gpa;
            old.push(o);
        }
        wp.unregister().map_err(LazyError::Suspend)?;
        let mut chunks = Vec::new();
        for r in regions {
            if let Err(source) =
                uffd.register_with_mode(r.host as *mut _, r.len, RegisterMode::MISSING)
            {
                let _ = wp.reregister();
                return Err(LazyError::Register {
                    addr: r.host,
                    source,
                });
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
            .map_err(|source| LazyError::Resources {
                what: "cannot start the loader thread",
                source,
            })?;
        Ok(Self {
            shared,
            thread: Some(thread),
            started: Instant::now(),
            old,
            check_old_memory: options.check_old_memory,
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
        if let Some(report) = self.check_old_memory.clone() {
            std::thread::spawn(move || {
                old.iter().for_each(OldMemory::poison);
                std::thread::sleep(std::time::Duration::from_secs(1));
                old_memory::report_changes(&old, &report);
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

    /// The first chunk that could not be loaded so far, if any.
    pub fn error(&self) -> Option<Arc<LazyError>> {
        self.shared
            .error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
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
    pub fn finish(mut self) -> Result<std::time::Duration, Arc<LazyError>> {
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
mod tests;
