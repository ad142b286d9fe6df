//! virtio-net's queues with hand-built descriptor chains and a fake tap:
//! frames both ways, the announce acknowledgement, and what a hostile
//! guest's chains do (nothing but an empty completion).

use std::collections::VecDeque;

use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::*;
use crate::irq::IrqLine;

/// A tap that records frames written and hands out queued ones.
struct FakeTap {
    fd: EventFd,
    to_guest: Mutex<VecDeque<Vec<u8>>>,
    from_guest: Mutex<Vec<Vec<u8>>>,
    offload: Mutex<Option<u32>>,
}

impl AsRawFd for FakeTap {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.fd.as_raw_fd()
    }
}

impl NetBackend for FakeTap {
    fn read_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self.to_guest.lock().unwrap().pop_front() {
            Some(f) => {
                buf[..f.len()].copy_from_slice(&f);
                Ok(f.len())
            }
            None => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
    fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        self.from_guest.lock().unwrap().push(frame.to_vec());
        Ok(frame.len())
    }
    fn set_offload(&self, flags: u32) -> io::Result<()> {
        *self.offload.lock().unwrap() = Some(flags);
        Ok(())
    }
}

const MEM: usize = 0x20_0000;
const QSIZE: u16 = 16;
const NEXT: u16 = 1;
const WRITE: u16 = 2;

/// A queue laid out by hand at `base` (descriptors, avail, used).
struct Q {
    base: u64,
    queue: Queue,
    avail_idx: u16,
}

impl Q {
    fn new(mem: &GuestMemoryMmap, base: u64) -> Self {
        let mut queue = Queue::new(QSIZE).unwrap();
        queue.set_size(QSIZE);
        queue.set_desc_table_address(Some(base as u32), Some(0));
        queue.set_avail_ring_address(Some((base + 0x1000) as u32), Some(0));
        queue.set_used_ring_address(Some((base + 0x2000) as u32), Some(0));
        queue.set_ready(true);
        assert!(queue.is_valid(mem));
        Self {
            base,
            queue,
            avail_idx: 0,
        }
    }

    fn desc(&self, mem: &GuestMemoryMmap, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let a = self.base + i as u64 * 16;
        mem.write_obj(addr, GuestAddress(a)).unwrap();
        mem.write_obj(len, GuestAddress(a + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(a + 12)).unwrap();
        mem.write_obj(next, GuestAddress(a + 14)).unwrap();
    }

    fn publish(&mut self, mem: &GuestMemoryMmap, head: u16) {
        let slot = self.avail_idx % QSIZE;
        mem.write_obj(head, GuestAddress(self.base + 0x1000 + 4 + 2 * slot as u64))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        mem.write_obj(self.avail_idx, GuestAddress(self.base + 0x1000 + 2))
            .unwrap();
    }

    /// (head, len) of the last used entry, and the used index.
    fn last_used(&self, mem: &GuestMemoryMmap) -> (u16, (u32, u32)) {
        let idx: u16 = mem.read_obj(GuestAddress(self.base + 0x2000 + 2)).unwrap();
        let e = self.base + 0x2000 + 4 + 8 * ((idx.wrapping_sub(1)) % QSIZE) as u64;
        let id: u32 = mem.read_obj(GuestAddress(e)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(e + 4)).unwrap();
        (idx, (id, len))
    }
}

struct Rig {
    mem: GuestMemoryMmap,
    tap: Arc<FakeTap>,
    handler: Handler,
    rx: Q,
    tx: Q,
    ctrl: Q,
}

impl Rig {
    fn new() -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
        let tap = Arc::new(FakeTap {
            fd: EventFd::new(EFD_NONBLOCK).unwrap(),
            to_guest: Mutex::new(VecDeque::new()),
            from_guest: Mutex::new(Vec::new()),
            offload: Mutex::new(None),
        });
        let handler = Handler {
            backend: tap.clone(),
            mem: mem.clone(),
            irq: Arc::new(VirtioInterrupt::new(IrqLine::new().unwrap())),
            status: Arc::new(Mutex::new(VIRTIO_NET_S_LINK_UP as u16)),
            counters: Arc::new(NetCounters::default()),
            held: None,
            buf: vec![0; MAX_FRAME],
        };
        Self {
            rx: Q::new(&mem, 0x10000),
            tx: Q::new(&mem, 0x20000),
            ctrl: Q::new(&mem, 0x30000),
            mem,
            tap,
            handler,
        }
    }
}

fn frame(len: usize, fill: u8) -> Vec<u8> {
    let mut f = vec![fill; len];
    f[..VNET_HDR_LEN].fill(0);
    f
}

#[test]
fn frames_go_both_ways() {
    let mut r = Rig::new();
    // Transmit: header and frame split over two descriptors.
    let f = frame(100, 0xaa);
    r.mem.write_slice(&f, GuestAddress(0x40000)).unwrap();
    r.tx.desc(&r.mem, 0, 0x40000, 12, NEXT, 1);
    r.tx.desc(&r.mem, 1, 0x4000c, 88, 0, 0);
    r.tx.publish(&r.mem, 0);
    assert!(r.handler.transmit(&mut r.tx.queue));
    assert_eq!(*r.tap.from_guest.lock().unwrap(), vec![f]);
    assert_eq!(r.tx.last_used(&r.mem), (1, (0, 0)));

    // Receive: a frame waits until the guest posts a buffer.
    let g = frame(200, 0x55);
    r.tap.to_guest.lock().unwrap().push_back(g.clone());
    let (signal, starved) = r.handler.receive(&mut r.rx.queue);
    assert!(!signal && starved, "held, no buffer yet");
    r.rx.desc(&r.mem, 0, 0x50000, 1526, WRITE, 0);
    r.rx.publish(&r.mem, 0);
    let (signal, starved) = r.handler.receive(&mut r.rx.queue);
    assert!(signal && !starved);
    assert_eq!(r.rx.last_used(&r.mem), (1, (0, 200)));
    let mut got = vec![0u8; 200];
    r.mem.read_slice(&mut got, GuestAddress(0x50000)).unwrap();
    assert_eq!(&got[12..], &g[12..]);
    assert_eq!(&got[10..12], &1u16.to_le_bytes(), "num_buffers");
}

#[test]
fn the_announce_is_acknowledged_through_the_control_queue() {
    let mut r = Rig::new();
    *r.handler.status.lock().unwrap() |= VIRTIO_NET_S_ANNOUNCE as u16;
    r.mem
        .write_slice(
            &[
                VIRTIO_NET_CTRL_ANNOUNCE as u8,
                VIRTIO_NET_CTRL_ANNOUNCE_ACK as u8,
            ],
            GuestAddress(0x60000),
        )
        .unwrap();
    r.ctrl.desc(&r.mem, 0, 0x60000, 2, NEXT, 1);
    r.ctrl.desc(&r.mem, 1, 0x60010, 1, WRITE, 0);
    r.ctrl.publish(&r.mem, 0);
    assert!(r.handler.control(&mut r.ctrl.queue));
    let ack: u8 = r.mem.read_obj(GuestAddress(0x60010)).unwrap();
    assert_eq!(ack as u32, VIRTIO_NET_OK);
    assert_eq!(
        *r.handler.status.lock().unwrap(),
        VIRTIO_NET_S_LINK_UP as u16
    );
    // An unknown command is refused, and the device goes on.
    r.mem.write_slice(&[9, 9], GuestAddress(0x60000)).unwrap();
    r.ctrl.publish(&r.mem, 0);
    r.handler.control(&mut r.ctrl.queue);
    let ack: u8 = r.mem.read_obj(GuestAddress(0x60010)).unwrap();
    assert_eq!(ack as u32, VIRTIO_NET_ERR);
}

#[test]
fn hostile_chains_are_completed_empty_and_the_device_keeps_serving() {
    let mut r = Rig::new();
    // Transmit: outside memory, a loop, a write-only buffer, too large.
    for (i, (addr, len, flags, next)) in [
        (MEM as u64 - 10, 100u32, 0u16, 0u16),
        (0x40000, 50, NEXT, 1),
        (0x40000, 50, WRITE, 0),
        (0x40000, (MAX_FRAME + 1) as u32, 0, 0),
    ]
    .into_iter()
    .enumerate()
    {
        if i == 1 {
            // 0 -> 1 -> 0 ...
            r.tx.desc(&r.mem, 1, 0x40100, 50, NEXT, 0);
        }
        r.tx.desc(&r.mem, 0, addr, len, flags, next);
        r.tx.publish(&r.mem, 0);
        r.handler.transmit(&mut r.tx.queue);
        assert_eq!(r.tx.last_used(&r.mem).1, (0, 0), "case {i}");
    }
    assert!(r.tap.from_guest.lock().unwrap().is_empty());
    assert_eq!(r.handler.counters.dropped.load(Ordering::Relaxed), 4);

    // Receive: a buffer too small, one outside memory, a read-only one.
    for (i, (addr, len, flags)) in [
        (0x50000u64, 64u32, WRITE),
        (MEM as u64 - 10, 1526, WRITE),
        (0x50000, 1526, 0),
    ]
    .into_iter()
    .enumerate()
    {
        r.tap.to_guest.lock().unwrap().push_back(frame(200, 1));
        r.rx.desc(&r.mem, 0, addr, len, flags, 0);
        r.rx.publish(&r.mem, 0);
        r.handler.receive(&mut r.rx.queue);
        assert_eq!(r.rx.last_used(&r.mem).1, (0, 0), "case {i}");
    }
    // Still serving.
    let f = frame(80, 7);
    r.tap.to_guest.lock().unwrap().push_back(f);
    r.rx.desc(&r.mem, 0, 0x50000, 1526, WRITE, 0);
    r.rx.publish(&r.mem, 0);
    r.handler.receive(&mut r.rx.queue);
    assert_eq!(r.rx.last_used(&r.mem).1, (0, 80));
}

#[test]
fn offloads_follow_the_tap_and_the_state_names_the_mac() {
    let tap = Arc::new(FakeTap {
        fd: EventFd::new(EFD_NONBLOCK).unwrap(),
        to_guest: Mutex::new(VecDeque::new()),
        from_guest: Mutex::new(Vec::new()),
        offload: Mutex::new(None),
    });
    let mac = [0x52, 0x54, 0, 1, 2, 3];
    let mut net = Net::new(tap.clone(), mac);
    assert_ne!(net.features() & bit(VIRTIO_NET_F_GUEST_CSUM), 0);
    assert_eq!(
        *tap.offload.lock().unwrap(),
        Some(0),
        "nothing until the driver says"
    );
    let mut cfg = [0u8; 8];
    net.read_config(0, &mut cfg);
    assert_eq!(&cfg[..6], &mac);
    let s = net.save().unwrap();
    assert_eq!(s.mac, mac);
    // A clone's adapter: the saved MAC is not this one; the adapter keeps
    // its own.
    let mut other = s.clone();
    other.mac[5] = 9;
    net.check(&other).unwrap();
    net.restore(other).unwrap();
    net.read_config(0, &mut cfg);
    assert_eq!(&cfg[..6], &mac);
}

/// Found by `fuzz_queues`: an avail index more than a queue ahead of the
/// device used to spin the transmit loop forever (virtio-queue refuses to
/// walk it, so nothing was taken and the index still looked new). Now the
/// queue stops until the guest resets it, and the other queues go on.
#[test]
fn an_avail_index_a_queue_ahead_does_not_spin_the_transmit_loop() {
    let mut r = Rig::new();
    r.tx.avail_idx = QSIZE + 5;
    r.tx.publish(&r.mem, 0);
    assert!(!r.handler.transmit(&mut r.tx.queue));
    assert!(r.tap.from_guest.lock().unwrap().is_empty());
    // Receiving still works.
    r.rx.desc(&r.mem, 0, 0x50000, 2048, WRITE, 0);
    r.rx.publish(&r.mem, 0);
    r.tap.to_guest.lock().unwrap().push_back(frame(100, 7));
    assert!(r.handler.receive(&mut r.rx.queue).0);
}

/// Random descriptor tables and avail rings on all three queues, frames of
/// any size from the tap: nothing panics and the device goes on.
#[test]
fn fuzz_queues() {
    fuzzing::run("virtio-net queues", 500, 2048, |u| {
        let mut r = Rig::new();
        for q in [&mut r.rx, &mut r.tx, &mut r.ctrl] {
            for i in 0..QSIZE {
                q.desc(
                    &r.mem,
                    i,
                    fuzzing::guest_addr(u, MEM as u64)?,
                    {
                        let any: u32 = u.arbitrary()?;
                        *u.choose(&[0, 1, 12, 64, 1526, 65550, u32::MAX, any])?
                    },
                    u.arbitrary::<u16>()? & 0x7,
                    u.int_in_range(0..=QSIZE + 2)?,
                );
            }
            for _ in 0..u.int_in_range(0..=QSIZE + 4)? {
                q.publish(&r.mem, u.int_in_range(0..=QSIZE + 2)?);
            }
        }
        for _ in 0..u.int_in_range(0..=4)? {
            let len = u.int_in_range(0..=MAX_FRAME)?;
            r.tap
                .to_guest
                .lock()
                .unwrap()
                .push_back(vec![u.arbitrary()?; len]);
        }
        r.handler.transmit(&mut r.tx.queue);
        r.handler.receive(&mut r.rx.queue);
        r.handler.control(&mut r.ctrl.queue);
        Ok(())
    });
}
