//! virtio-blk: read, write, flush and get-id over a [`BlockBackend`],
//! served on a worker thread woken by the queue's ioeventfd.
//!
//! The guest is untrusted: every descriptor is checked (direction, length,
//! address inside guest memory, chain length bounded by the queue size) and a
//! bad request gets an error status; it never touches host memory outside
//! the guest or stops the device.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::mmio::VirtioDevice;
use super::{QueueSnapshot, VirtioInterrupt};
use crate::persist::Persist;

/// Virtio device type of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Queue size offered.
pub const QUEUE_SIZE: u16 = 128;
/// Largest data transfer accepted in one request.
pub const MAX_REQUEST_BYTES: u64 = 4 << 20;

const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

const VIRTIO_BLK_T_IN: u32 = 0;
const VIRTIO_BLK_T_OUT: u32 = 1;
const VIRTIO_BLK_T_FLUSH: u32 = 4;
const VIRTIO_BLK_T_GET_ID: u32 = 8;

/// Request status: success.
pub const VIRTIO_BLK_S_OK: u8 = 0;
/// Request status: I/O error (also: malformed request).
pub const VIRTIO_BLK_S_IOERR: u8 = 1;
/// Request status: unsupported request type.
pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

const ID_BYTES: usize = 20;

/// The storage behind a virtio-blk device.
pub trait BlockBackend: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes completed writes durable.
    fn flush(&self) -> io::Result<()>;
    /// Writes cached metadata to the host (no fsync), so the image stays
    /// consistent if the VMM process dies; called after each batch of
    /// writes.
    fn write_back(&self) -> io::Result<()> {
        Ok(())
    }
}

/// Serves requests of one queue.
pub struct RequestHandler {
    backend: Arc<dyn BlockBackend>,
    readonly: bool,
    id: [u8; ID_BYTES],
}

/// Why a request failed (kept for logging; the guest only sees the status).
#[derive(Debug, PartialEq, Eq)]
enum Bad {
    Malformed(&'static str),
    Io,
    Unsupported(u32),
}

impl RequestHandler {
    /// Creates a handler; `id` is returned by GET_ID (truncated to 20 bytes).
    pub fn new(backend: Arc<dyn BlockBackend>, readonly: bool, id: &str) -> Self {
        let mut b = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        b[..n].copy_from_slice(&id.as_bytes()[..n]);
        Self {
            backend,
            readonly,
            id: b,
        }
    }

    /// Processes every available request; returns whether the driver
    /// should be interrupted.
    pub fn process_queue(&self, queue: &mut Queue, mem: &GuestMemoryMmap) -> bool {
        let mut done = Vec::new();
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            // The chain iterator stops at loops (TTL = queue size), indexes
            // beyond the table and unreadable descriptors.
            let descs: Vec<Descriptor> = chain.take(QUEUE_SIZE as usize + 1).collect();
            let len = self.handle(&descs, mem);
            done.push((head, len));
        }
        if done.is_empty() {
            return false;
        }
        // Image metadata reaches the host before the guest sees completion.
        if !self.readonly {
            if let Err(e) = self.backend.write_back() {
                tracing::warn!("virtio-blk: cannot write image metadata back: {e}");
            }
        }
        for (head, len) in done {
            if let Err(e) = queue.add_used(mem, head, len) {
                tracing::warn!("virtio-blk: cannot complete request {head}: {e:?}");
            }
        }
        queue.needs_notification(mem).unwrap_or(true)
    }

    /// Handles one request; returns the number of bytes written into
    /// device-writable buffers (the used length).
    fn handle(&self, descs: &[Descriptor], mem: &GuestMemoryMmap) -> u32 {
        // A chain whose last descriptor still points on was cut short (a
        // loop, or an index beyond the table): there is no status to write.
        let Some(status) = descs
            .last()
            .filter(|d| d.is_write_only() && d.len() >= 1 && !d.has_next())
        else {
            tracing::debug!("virtio-blk: request without a status descriptor");
            return 0;
        };
        let (code, written) = match self.execute(descs, mem) {
            Ok(written) => (VIRTIO_BLK_S_OK, written),
            Err(bad) => {
                tracing::debug!("virtio-blk: request failed: {bad:?}");
                let code = match bad {
                    Bad::Unsupported(_) => VIRTIO_BLK_S_UNSUPP,
                    _ => VIRTIO_BLK_S_IOERR,
                };
                (code, 0)
            }
        };
        if mem.write_obj(code, status.addr()).is_err() {
            return 0;
        }
        written + 1
    }

    fn execute(&self, descs: &[Descriptor], mem: &GuestMemoryMmap) -> Result<u32, Bad> {
        if descs.len() < 2 {
            return Err(Bad::Malformed("chain too short"));
        }
        if descs.len() > QUEUE_SIZE as usize {
            return Err(Bad::Malformed("chain longer than the queue"));
        }
        let header = descs[0];
        if header.is_write_only() || header.len() < 16 {
            return Err(Bad::Malformed("bad header descriptor"));
        }
        let mut h = [0u8; 16];
        mem.read_slice(&mut h, header.addr())
            .map_err(|_| Bad::Malformed("header outside guest memory"))?;
        let kind = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let sector = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
        let data = &descs[1..descs.len() - 1];
        match kind {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                let reading = kind == VIRTIO_BLK_T_IN;
                if data.iter().any(|d| d.is_write_only() != reading) {
                    return Err(Bad::Malformed("data descriptor has the wrong direction"));
                }
                let total: u64 = data.iter().map(|d| d.len() as u64).sum();
                if total == 0 || !total.is_multiple_of(SECTOR_SIZE) || total > MAX_REQUEST_BYTES {
                    return Err(Bad::Malformed("bad data length"));
                }
                let start = sector
                    .checked_mul(SECTOR_SIZE)
                    .ok_or(Bad::Malformed("sector overflows"))?;
                if start
                    .checked_add(total)
                    .is_none_or(|end| end > self.backend.size())
                {
                    return Err(Bad::Malformed("beyond the end of the disk"));
                }
                if !reading && self.readonly {
                    return Err(Bad::Io);
                }
                let mut offset = start;
                for d in data {
                    let mut buf = vec![0u8; d.len() as usize];
                    let io_err = |e: io::Error| {
                        tracing::warn!("virtio-blk: I/O error at byte {offset}: {e}");
                        Bad::Io
                    };
                    if reading {
                        self.backend.read_at(&mut buf, offset).map_err(io_err)?;
                        mem.write_slice(&buf, d.addr())
                            .map_err(|_| Bad::Malformed("buffer outside guest memory"))?;
                    } else {
                        mem.read_slice(&mut buf, d.addr())
                            .map_err(|_| Bad::Malformed("buffer outside guest memory"))?;
                        self.backend.write_at(&buf, offset).map_err(io_err)?;
                    }
                    offset += d.len() as u64;
                }
                Ok(if reading { total as u32 } else { 0 })
            }
            VIRTIO_BLK_T_FLUSH => {
                self.backend.flush().map_err(|e| {
                    tracing::warn!("virtio-blk: flush failed: {e}");
                    Bad::Io
                })?;
                Ok(0)
            }
            VIRTIO_BLK_T_GET_ID => {
                let d = data.first().ok_or(Bad::Malformed("no id buffer"))?;
                if !d.is_write_only() {
                    return Err(Bad::Malformed("id buffer not writable"));
                }
                let n = (d.len() as usize).min(ID_BYTES);
                mem.write_slice(&self.id[..n], d.addr())
                    .map_err(|_| Bad::Malformed("id buffer outside guest memory"))?;
                Ok(n as u32)
            }
            other => Err(Bad::Unsupported(other)),
        }
    }
}

/// The queue a worker serves, shared with the device for quiescing.
struct Active {
    queue: Mutex<Queue>,
    paused: AtomicBool,
    resumed: Condvar,
}

struct Worker {
    thread: JoinHandle<()>,
    kill: EventFd,
    active: Arc<Active>,
    notify: EventFd,
}

/// A virtio-blk device.
pub struct Block {
    handler: Arc<RequestHandler>,
    readonly: bool,
    worker: Option<Worker>,
}

impl Block {
    /// Creates a block device over `backend`.
    pub fn new(backend: Arc<dyn BlockBackend>, readonly: bool, id: &str) -> Self {
        Self {
            handler: Arc::new(RequestHandler::new(backend, readonly, id)),
            readonly,
            worker: None,
        }
    }

    fn stop_worker(&mut self) {
        if let Some(w) = self.worker.take() {
            // Kill first: a quiesced worker wakes, sees it, and exits
            // without serving another batch.
            let _ = w.kill.write(1);
            w.active.resumed.notify_all();
            let _ = w.thread.join();
        }
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

fn wait_readable(fds: &[i32]) -> io::Result<Vec<bool>> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    loop {
        // SAFETY: `p` is a valid array of pollfd of the given length.
        let r = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, -1) };
        if r >= 0 {
            return Ok(p.iter().map(|x| x.revents & libc::POLLIN != 0).collect());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn worker_loop(
    handler: Arc<RequestHandler>,
    active: Arc<Active>,
    mem: GuestMemoryMmap,
    notify: EventFd,
    kill: EventFd,
    irq: Arc<VirtioInterrupt>,
) {
    loop {
        let ready = match wait_readable(&[notify.as_raw_fd(), kill.as_raw_fd()]) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("virtio-blk worker: {e}");
                return;
            }
        };
        if ready[1] {
            return;
        }
        let _ = notify.read();
        let mut q = active.queue.lock().unwrap_or_else(|e| e.into_inner());
        while active.paused.load(Ordering::SeqCst) {
            q = active.resumed.wait(q).unwrap_or_else(|e| e.into_inner());
            if kill.read().is_ok() {
                return;
            }
        }
        if handler.process_queue(&mut q, &mem) {
            irq.signal_used_queue();
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_BLK_F_SEG_MAX | VIRTIO_BLK_F_FLUSH;
        if self.readonly {
            f |= VIRTIO_BLK_F_RO;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // capacity (u64, sectors) @0, size_max (u32) @8, seg_max (u32) @12.
        let mut cfg = [0u8; 16];
        cfg[..8].copy_from_slice(&(self.handler.backend.size() / SECTOR_SIZE).to_le_bytes());
        cfg[12..16].copy_from_slice(&(QUEUE_SIZE as u32 - 2).to_le_bytes());
        data.fill(0);
        let start = offset as usize;
        if start < cfg.len() {
            let n = data.len().min(cfg.len() - start);
            data[..n].copy_from_slice(&cfg[start..start + n]);
        }
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        _features: u64,
        queues: Vec<Queue>,
        notify: Vec<EventFd>,
        irq: Arc<VirtioInterrupt>,
    ) -> io::Result<()> {
        self.stop_worker();
        let queue = queues
            .into_iter()
            .next()
            .ok_or_else(|| io::Error::other("virtio-blk needs one queue"))?;
        let notify = notify
            .into_iter()
            .next()
            .ok_or_else(|| io::Error::other("virtio-blk needs one notifier"))?;
        let kill = EventFd::new(EFD_NONBLOCK)?;
        let active = Arc::new(Active {
            queue: Mutex::new(queue),
            paused: AtomicBool::new(false),
            resumed: Condvar::new(),
        });
        let (handler, a, n, k) = (
            self.handler.clone(),
            active.clone(),
            notify.try_clone()?,
            kill.try_clone()?,
        );
        let thread = crate::worker::spawn("virtio-blk", move || {
            worker_loop(handler, a, mem, n, k, irq)
        })?;
        self.worker = Some(Worker {
            thread,
            kill,
            active,
            notify,
        });
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
    }

    fn quiesce(&mut self) {
        if let Some(w) = &self.worker {
            w.active.paused.store(true, Ordering::SeqCst);
            // Taking the lock waits for the request batch in flight.
            drop(w.active.queue.lock().unwrap_or_else(|e| e.into_inner()));
        }
    }

    fn queue_states(&self) -> Vec<QueueSnapshot> {
        match &self.worker {
            Some(w) => vec![w
                .active
                .queue
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .state()
                .into()],
            None => vec![],
        }
    }

    fn unquiesce(&mut self) {
        if let Some(w) = &self.worker {
            w.active.paused.store(false, Ordering::SeqCst);
            w.active.resumed.notify_all();
            // Requests queued while quiesced.
            let _ = w.notify.write(1);
        }
    }
}

/// What the guest was told about the disk (its configuration space), as
/// saved in a snapshot: a restore onto a disk that differs is refused
/// rather than let the guest run on a disk that changed under it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BlockState {
    /// Capacity in 512-byte sectors.
    pub capacity_sectors: u64,
    /// Whether the device was read-only.
    pub readonly: bool,
}

/// A restore onto a disk that differs from the saved one.
#[derive(Debug, thiserror::Error)]
#[error("the snapshot's disk had {saved_sectors} sectors{}, this one has {sectors}{}",
    if *.saved_readonly { " (read-only)" } else { "" },
    if *.readonly { " (read-only)" } else { "" })]
pub struct BlockMismatch {
    /// Capacity saved.
    pub saved_sectors: u64,
    /// Read-only saved.
    pub saved_readonly: bool,
    /// Capacity now.
    pub sectors: u64,
    /// Read-only now.
    pub readonly: bool,
}

impl Persist for Block {
    type State = BlockState;
    type Error = BlockMismatch;
    const KIND: &'static str = "virtio-blk";
    const VERSION: u32 = 1;

    fn save(&self) -> Result<BlockState, BlockMismatch> {
        Ok(BlockState {
            capacity_sectors: self.handler.backend.size() / SECTOR_SIZE,
            readonly: self.readonly,
        })
    }

    /// The disk must be the one the guest knew.
    fn check(&self, state: &BlockState) -> Result<(), BlockMismatch> {
        let now = self.save()?;
        if now != *state {
            return Err(BlockMismatch {
                saved_sectors: state.capacity_sectors,
                saved_readonly: state.readonly,
                sectors: now.capacity_sectors,
                readonly: now.readonly,
            });
        }
        Ok(())
    }

    /// Checks that the disk is the one the guest knew; the queues are the
    /// transport's to restore.
    fn restore(&mut self, state: BlockState) -> Result<(), BlockMismatch> {
        self.check(&state)
    }
}

#[cfg(test)]
mod tests;
