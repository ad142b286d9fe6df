//! virtio-net over a TAP device (tap.rs): receive, transmit and control
//! queues served on a worker thread woken by the queues' ioeventfds and the
//! tap. The MAC is configuration; the link is always up. After a restore
//! the device asks the guest to announce itself (VIRTIO_NET_F_GUEST_ANNOUNCE)
//! so peers and bridges relearn where it is.
//!
//! The guest is untrusted: every chain is checked (direction, length,
//! address inside guest memory, chain length bounded by the queue size); a
//! bad chain is completed without data and the device keeps serving.
//! Frames that arrive while the guest has posted no receive buffer wait in
//! the tap (one is held); frames larger than the buffer offered are dropped.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK, VIRTIO_NET_ERR, VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_F_GUEST_CSUM,
    VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_OK,
    VIRTIO_NET_S_ANNOUNCE, VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::mmio::VirtioDevice;
use super::tap::{Tap, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, VNET_HDR_LEN};
use super::{QueueSnapshot, VirtioInterrupt};
use crate::persist::Persist;

/// Virtio device type of a network device.
pub const VIRTIO_ID_NET: u32 = 1;
/// Queue size offered (receive, transmit, control).
pub const QUEUE_SIZE: u16 = 256;
/// Largest frame with its header: a 64 KiB segmentation-offloaded frame.
pub const MAX_FRAME: usize = 65536 + VNET_HDR_LEN;

const RX: usize = 0;
const TX: usize = 1;
const CTRL: usize = 2;

const fn bit(f: u32) -> u64 {
    1 << f
}

/// The guest-side offloads and the tap flags each needs.
const GUEST_OFFLOADS: [(u32, u32); 3] = [
    (VIRTIO_NET_F_GUEST_CSUM, TUN_F_CSUM),
    (VIRTIO_NET_F_GUEST_TSO4, TUN_F_TSO4),
    (VIRTIO_NET_F_GUEST_TSO6, TUN_F_TSO6),
];

/// The tap side of a network device, behind a trait so the queues can be
/// tested without a tap.
pub trait NetBackend: Send + Sync + AsRawFd {
    /// Reads one frame (with its virtio-net header); WouldBlock when none.
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes one frame (with its virtio-net header).
    fn write_frame(&self, frame: &[u8]) -> io::Result<usize>;
    /// Sets the offloads the guest takes (TUN_F_* flags).
    fn set_offload(&self, flags: u32) -> io::Result<()>;
}

impl NetBackend for Tap {
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        Tap::read_frame(self, buf)
    }
    fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        Tap::write_frame(self, frame)
    }
    fn set_offload(&self, flags: u32) -> io::Result<()> {
        Tap::set_offload(self, flags).map_err(io::Error::other)
    }
}

/// Frame counters (for logs and tests).
#[derive(Debug, Default)]
pub struct NetCounters {
    /// Frames to the guest.
    pub rx_frames: AtomicU64,
    /// Frames from the guest.
    pub tx_frames: AtomicU64,
    /// Frames dropped: too large for the buffer, or a malformed chain.
    pub dropped: AtomicU64,
}

/// What a restore leaves for the next activation.
#[derive(Default)]
struct Pending {
    announce: bool,
}

/// Serves the three queues.
struct Handler {
    backend: Arc<dyn NetBackend>,
    mem: GuestMemoryMmap,
    irq: Arc<VirtioInterrupt>,
    status: Arc<Mutex<u16>>,
    counters: Arc<NetCounters>,
    /// A frame read from the tap that found no receive buffer yet.
    held: Option<Vec<u8>>,
    buf: Vec<u8>,
}

/// Whether the driver asked for no interrupts on `q` (VRING_AVAIL_F_NO_INTERRUPT
/// in the available ring's flags; without EVENT_IDX, which this device does
/// not offer). virtio-queue's `needs_notification` does not look at the
/// flag; a polling driver sets it, and each interrupt is an injection the
/// guest neither wants nor handles cheaply.
fn no_interrupt(q: &Queue, mem: &GuestMemoryMmap) -> bool {
    use vm_memory::GuestAddress;
    mem.read_obj::<u16>(GuestAddress(q.avail_ring()))
        .is_ok_and(|flags| u32::from(flags) & VRING_AVAIL_F_NO_INTERRUPT != 0)
}

/// Whether a chain's descriptors are all in guest memory and of the
/// expected direction, the chain ends, and it is not longer than the queue.
fn chain_ok(descs: &[Descriptor], writable: bool, mem: &GuestMemoryMmap) -> bool {
    use vm_memory::{GuestAddress, GuestMemoryBackend};
    !descs.is_empty()
        && descs.len() <= QUEUE_SIZE as usize
        && !descs.last().is_some_and(|d| d.has_next())
        && descs.iter().all(|d| {
            d.is_write_only() == writable
                && mem.check_range(GuestAddress(d.addr().0), d.len() as usize)
        })
}

impl Handler {
    /// Sends every frame the guest queued; returns whether to interrupt.
    /// The guest need not notify while the queue is being drained: frames
    /// it adds meanwhile are picked up before notifications are back on.
    fn transmit(&mut self, q: &mut Queue) -> bool {
        let _ = q.disable_notification(&self.mem);
        let (mut signal, _) = self.transmit_batch(q);
        // enable_notification says whether the avail index moved past what
        // was taken; a batch that takes nothing (an avail index more than a
        // queue ahead, which virtio-queue refuses to walk) would make that
        // true forever: the queue then waits for the guest to reset it.
        while q.enable_notification(&self.mem).unwrap_or(false) {
            let _ = q.disable_notification(&self.mem);
            let (more, taken) = self.transmit_batch(q);
            signal |= more;
            if taken == 0 {
                tracing::debug!("virtio-net: the transmit queue's avail index is invalid");
                break;
            }
        }
        signal
    }

    /// Sends the frames queued now; returns whether to interrupt and how
    /// many chains it took.
    fn transmit_batch(&mut self, q: &mut Queue) -> (bool, usize) {
        let mut done = Vec::new();
        while let Some(chain) = q.pop_descriptor_chain(&self.mem) {
            let head = chain.head_index();
            let descs: Vec<Descriptor> = chain.take(QUEUE_SIZE as usize + 1).collect();
            let total: usize = descs.iter().map(|d| d.len() as usize).sum();
            if !chain_ok(&descs, false, &self.mem) || total <= VNET_HDR_LEN || total > MAX_FRAME {
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                done.push(head);
                continue;
            }
            let mut frame = Vec::with_capacity(total);
            for d in &descs {
                let start = frame.len();
                frame.resize(start + d.len() as usize, 0);
                if self.mem.read_slice(&mut frame[start..], d.addr()).is_err() {
                    frame.clear();
                    break;
                }
            }
            match frame.is_empty() {
                true => {
                    self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                }
                false => match self.backend.write_frame(&frame) {
                    Ok(_) => {
                        self.counters.tx_frames.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        // As on a cable: the frame is lost, the queue goes on.
                        tracing::debug!("virtio-net: frame to the tap lost: {e}");
                        self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                },
            }
            done.push(head);
        }
        let taken = done.len();
        (self.complete(q, done.into_iter().map(|h| (h, 0))), taken)
    }

    /// Moves frames from the tap into receive buffers while both last;
    /// returns whether to interrupt, and whether it stopped for lack of
    /// buffers (then the tap is not polled until the guest posts more).
    fn receive(&mut self, q: &mut Queue) -> (bool, bool) {
        let mut done = Vec::new();
        let mut starved = false;
        loop {
            let frame_len = match self.held.take() {
                Some(f) => {
                    let n = f.len();
                    self.buf[..n].copy_from_slice(&f);
                    n
                }
                None => match self.backend.read_frame(&mut self.buf) {
                    Ok(0) => break,
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        tracing::debug!("virtio-net: reading the tap: {e}");
                        break;
                    }
                },
            };
            let Some(chain) = q.pop_descriptor_chain(&self.mem) else {
                self.held = Some(self.buf[..frame_len].to_vec());
                starved = true;
                break;
            };
            let head = chain.head_index();
            let descs: Vec<Descriptor> = chain.take(QUEUE_SIZE as usize + 1).collect();
            let room: usize = descs.iter().map(|d| d.len() as usize).sum();
            if !chain_ok(&descs, true, &self.mem) || room < frame_len {
                // Too small, or malformed: the frame is dropped and the
                // buffer goes back empty.
                self.counters.dropped.fetch_add(1, Ordering::Relaxed);
                done.push((head, 0));
                continue;
            }
            // num_buffers (bytes 10-11 of the header) is 1: no merging.
            if frame_len >= VNET_HDR_LEN {
                self.buf[10..12].copy_from_slice(&1u16.to_le_bytes());
            }
            let mut off = 0;
            for d in &descs {
                if off == frame_len {
                    break;
                }
                let n = (d.len() as usize).min(frame_len - off);
                if self
                    .mem
                    .write_slice(&self.buf[off..off + n], d.addr())
                    .is_err()
                {
                    break;
                }
                off += n;
            }
            self.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
            done.push((head, off as u32));
        }
        (self.complete(q, done.into_iter()), starved)
    }

    /// Serves control commands; only the announce acknowledgement exists.
    fn control(&mut self, q: &mut Queue) -> bool {
        let mut done = Vec::new();
        while let Some(chain) = q.pop_descriptor_chain(&self.mem) {
            let head = chain.head_index();
            let descs: Vec<Descriptor> = chain.take(QUEUE_SIZE as usize + 1).collect();
            let ack = descs
                .last()
                .filter(|d| d.is_write_only() && d.len() >= 1 && !d.has_next());
            let mut hdr = [0u8; 2];
            let ok = descs.len() >= 2
                && !descs[0].is_write_only()
                && self.mem.read_slice(&mut hdr, descs[0].addr()).is_ok();
            let reply = if ok
                && hdr[0] as u32 == VIRTIO_NET_CTRL_ANNOUNCE
                && hdr[1] as u32 == VIRTIO_NET_CTRL_ANNOUNCE_ACK
            {
                *self.status.lock().unwrap_or_else(|e| e.into_inner()) &=
                    !(VIRTIO_NET_S_ANNOUNCE as u16);
                VIRTIO_NET_OK
            } else {
                VIRTIO_NET_ERR
            };
            let written = match ack {
                Some(a) if self.mem.write_obj(reply as u8, a.addr()).is_ok() => 1,
                _ => 0,
            };
            done.push((head, written));
        }
        self.complete(q, done.into_iter())
    }

    fn complete(&self, q: &mut Queue, done: impl Iterator<Item = (u16, u32)>) -> bool {
        let mut any = false;
        for (head, len) in done {
            any = true;
            if let Err(e) = q.add_used(&self.mem, head, len) {
                tracing::warn!("virtio-net: cannot complete chain {head}: {e:?}");
            }
        }
        any && q.needs_notification(&self.mem).unwrap_or(true) && !no_interrupt(q, &self.mem)
    }
}

/// The queues a worker serves, shared with the device for quiescing.
struct Active {
    queues: Mutex<Vec<Queue>>,
    paused: AtomicBool,
    resumed: Condvar,
}

struct Worker {
    thread: JoinHandle<()>,
    kill: EventFd,
    active: Arc<Active>,
    notify: Vec<EventFd>,
}

/// A virtio-net device.
pub struct Net {
    backend: Arc<dyn NetBackend>,
    mac: [u8; 6],
    /// Guest-side offloads the tap can do.
    offloads: u64,
    status: Arc<Mutex<u16>>,
    acked: u64,
    pending: Pending,
    counters: Arc<NetCounters>,
    worker: Option<Worker>,
}

impl Net {
    /// A device with address `mac` over `backend`. Guest-side offloads
    /// (checksum, TSO) are offered only if the backend takes them.
    pub fn new(backend: Arc<dyn NetBackend>, mac: [u8; 6]) -> Self {
        let all = GUEST_OFFLOADS.iter().fold(0, |f, (_, t)| f | t);
        let offloads = match backend.set_offload(all) {
            Ok(()) => GUEST_OFFLOADS.iter().fold(0, |f, (v, _)| f | bit(*v)),
            Err(e) => {
                tracing::info!("virtio-net: the tap takes no offloads ({e}); none offered");
                0
            }
        };
        // Nothing is offloaded until the guest says what it takes.
        let _ = backend.set_offload(0);
        Self {
            backend,
            mac,
            offloads,
            status: Arc::new(Mutex::new(VIRTIO_NET_S_LINK_UP as u16)),
            acked: 0,
            pending: Pending::default(),
            counters: Arc::new(NetCounters::default()),
            worker: None,
        }
    }

    /// The frame counters.
    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    fn stop_worker(&mut self) {
        if let Some(w) = self.worker.take() {
            let _ = w.kill.write(1);
            w.active.resumed.notify_all();
            let _ = w.thread.join();
        }
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        self.stop_worker();
    }
}

fn poll(fds: &[(i32, bool)]) -> io::Result<Vec<bool>> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&(fd, on)| libc::pollfd {
            fd: if on { fd } else { -1 },
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

fn worker_loop(mut h: Handler, active: Arc<Active>, notify: Vec<EventFd>, kill: EventFd) {
    let tap = h.backend.as_raw_fd();
    let mut starved = false;
    loop {
        let fds = [
            (kill.as_raw_fd(), true),
            (notify[RX].as_raw_fd(), true),
            (notify[TX].as_raw_fd(), true),
            (notify[CTRL].as_raw_fd(), true),
            // No receive buffer: leave frames in the tap until the guest
            // posts some (its notification wakes this loop).
            (tap, !starved),
        ];
        let ready = match poll(&fds) {
            Ok(r) => r,
            Err(e) => {
                tracing::error!("virtio-net worker: {e}");
                return;
            }
        };
        if ready[0] {
            return;
        }
        for (i, n) in notify.iter().enumerate() {
            if ready[i + 1] {
                let _ = n.read();
            }
        }
        let mut qs = active.queues.lock().unwrap_or_else(|e| e.into_inner());
        while active.paused.load(Ordering::SeqCst) {
            qs = active.resumed.wait(qs).unwrap_or_else(|e| e.into_inner());
            if kill.read().is_ok() {
                return;
            }
        }
        let mut signal = h.transmit(&mut qs[TX]);
        signal |= h.control(&mut qs[CTRL]);
        let (rx_signal, rx_starved) = h.receive(&mut qs[RX]);
        starved = rx_starved;
        if signal || rx_signal {
            h.irq.signal_used_queue();
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        bit(VIRTIO_NET_F_MAC)
            | bit(VIRTIO_NET_F_STATUS)
            | bit(VIRTIO_NET_F_CTRL_VQ)
            | bit(VIRTIO_NET_F_GUEST_ANNOUNCE)
            | bit(VIRTIO_NET_F_CSUM)
            | bit(VIRTIO_NET_F_HOST_TSO4)
            | bit(VIRTIO_NET_F_HOST_TSO6)
            | self.offloads
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // mac[6] @0, status (u16) @6.
        let mut cfg = [0u8; 8];
        cfg[..6].copy_from_slice(&self.mac);
        let status = *self.status.lock().unwrap_or_else(|e| e.into_inner());
        cfg[6..8].copy_from_slice(&status.to_le_bytes());
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
        features: u64,
        queues: Vec<Queue>,
        notify: Vec<EventFd>,
        irq: Arc<VirtioInterrupt>,
    ) -> io::Result<()> {
        self.stop_worker();
        if queues.len() != 3 || notify.len() != 3 {
            return Err(io::Error::other("virtio-net needs 3 queues"));
        }
        self.acked = features;
        let tap_flags = GUEST_OFFLOADS
            .iter()
            .filter(|(f, _)| features & bit(*f) != 0)
            .fold(0, |acc, (_, t)| acc | t);
        if let Err(e) = self.backend.set_offload(tap_flags) {
            tracing::warn!("virtio-net: cannot set the tap's offloads to {tap_flags:#x}: {e}");
        }
        let kill = EventFd::new(EFD_NONBLOCK)?;
        let active = Arc::new(Active {
            queues: Mutex::new(queues),
            paused: AtomicBool::new(false),
            resumed: Condvar::new(),
        });
        let handler = Handler {
            backend: self.backend.clone(),
            mem,
            irq: irq.clone(),
            status: self.status.clone(),
            counters: self.counters.clone(),
            held: None,
            buf: vec![0; MAX_FRAME],
        };
        let worker_notify = notify
            .iter()
            .map(|e| e.try_clone())
            .collect::<io::Result<Vec<_>>>()?;
        let (a, k) = (active.clone(), kill.try_clone()?);
        let thread = crate::worker::spawn("virtio-net", move || {
            worker_loop(handler, a, worker_notify, k)
        })?;
        self.worker = Some(Worker {
            thread,
            kill,
            active,
            notify,
        });
        if std::mem::take(&mut self.pending.announce)
            && features & bit(VIRTIO_NET_F_GUEST_ANNOUNCE) != 0
        {
            *self.status.lock().unwrap_or_else(|e| e.into_inner()) |= VIRTIO_NET_S_ANNOUNCE as u16;
            irq.signal_config_change();
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.stop_worker();
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = VIRTIO_NET_S_LINK_UP as u16;
        self.acked = 0;
    }

    fn quiesce(&mut self) {
        if let Some(w) = &self.worker {
            w.active.paused.store(true, Ordering::SeqCst);
            // Taking the lock waits for the batch in flight: a frame the
            // guest queued is on the wire, or still in its queue.
            drop(w.active.queues.lock().unwrap_or_else(|e| e.into_inner()));
        }
    }

    fn unquiesce(&mut self) {
        if let Some(w) = &self.worker {
            w.active.paused.store(false, Ordering::SeqCst);
            w.active.resumed.notify_all();
            for n in &w.notify {
                let _ = n.write(1);
            }
        }
    }

    fn queue_states(&self) -> Vec<QueueSnapshot> {
        match &self.worker {
            Some(w) => w
                .active
                .queues
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|q| q.state().into())
                .collect(),
            None => vec![],
        }
    }
}

/// The device's state as saved in a snapshot: its address (the guest knows
/// it) and the features it took.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetState {
    /// MAC address.
    pub mac: [u8; 6],
    /// Features the driver accepted.
    pub acked_features: u64,
}

/// `52:54:00:12:34:56`.
pub fn mac_text(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Persist for Net {
    type State = NetState;
    type Error = std::convert::Infallible;
    const KIND: &'static str = "virtio-net";
    const VERSION: u32 = 1;

    fn save(&self) -> Result<NetState, Self::Error> {
        Ok(NetState {
            mac: self.mac,
            acked_features: self.acked,
        })
    }

    /// Any saved adapter fits: the MAC is the adapter's configuration (a
    /// clone's adapters get new ones), not state.
    fn check(&self, _state: &NetState) -> Result<(), Self::Error> {
        Ok(())
    }

    /// The guest will be asked to announce itself once the transport
    /// activates the device again (if it took GUEST_ANNOUNCE). A saved MAC
    /// other than this adapter's (a clone) is replaced by the adapter's:
    /// the guest reads it from the configuration, and the generation
    /// change tells it to (devices/src/generation.rs).
    fn restore(&mut self, state: NetState) -> Result<(), Self::Error> {
        if state.mac != self.mac {
            tracing::info!(
                "virtio-net: the snapshot's MAC {} continues as {}",
                mac_text(&state.mac),
                mac_text(&self.mac)
            );
        }
        self.pending.announce = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
