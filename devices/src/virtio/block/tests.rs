//! virtio-blk's queue with hand-built descriptor chains over a RAM disk:
//! requests, refusals of malformed chains, and a fuzzed queue.

use super::*;
use vm_memory::GuestAddress;

/// A RAM-backed disk.
struct MemDisk(Mutex<Vec<u8>>);
impl BlockBackend for MemDisk {
    fn size(&self) -> u64 {
        self.0.lock().unwrap().len() as u64
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let d = self.0.lock().unwrap();
        buf.copy_from_slice(&d[off as usize..off as usize + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], off: u64) -> io::Result<()> {
        let mut d = self.0.lock().unwrap();
        d[off as usize..off as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x2000;
const USED: u64 = 0x3000;
const QSIZE: u16 = 16;
const MEM: usize = 0x10_0000;
const NEXT: u16 = 1;
const WRITE: u16 = 2;

/// A split queue laid out by hand in a small fake guest memory.
struct Rig {
    mem: GuestMemoryMmap,
    queue: Queue,
    handler: RequestHandler,
    disk: Arc<MemDisk>,
    avail_idx: u16,
}

impl Rig {
    fn new(readonly: bool) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
        let mut queue = Queue::new(QSIZE).unwrap();
        queue.set_size(QSIZE);
        queue.set_desc_table_address(Some(DESC as u32), Some(0));
        queue.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        queue.set_used_ring_address(Some(USED as u32), Some(0));
        queue.set_ready(true);
        assert!(queue.is_valid(&mem));
        let disk = Arc::new(MemDisk(Mutex::new(
            (0..64 * 512).map(|i| (i / 512) as u8).collect(),
        )));
        Self {
            mem,
            queue,
            handler: RequestHandler::new(disk.clone(), readonly, "snapvm-test"),
            disk,
            avail_idx: 0,
        }
    }

    fn set_desc(&self, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let a = DESC + i as u64 * 16;
        self.mem.write_obj(addr, GuestAddress(a)).unwrap();
        self.mem.write_obj(len, GuestAddress(a + 8)).unwrap();
        self.mem.write_obj(flags, GuestAddress(a + 12)).unwrap();
        self.mem.write_obj(next, GuestAddress(a + 14)).unwrap();
    }

    fn header(&self, at: u64, kind: u32, sector: u64) {
        self.mem.write_obj(kind, GuestAddress(at)).unwrap();
        self.mem.write_obj(sector, GuestAddress(at + 8)).unwrap();
    }

    /// Publishes chain `head` and runs the device; returns (status byte
    /// at `status_at`, used length).
    fn submit(&mut self, head: u16, status_at: u64) -> (u8, u32) {
        self.mem.write_obj(0xffu8, GuestAddress(status_at)).unwrap();
        let slot = self.avail_idx % QSIZE;
        self.mem
            .write_obj(head, GuestAddress(AVAIL + 4 + 2 * slot as u64))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
        assert!(self.handler.process_queue(&mut self.queue, &self.mem));
        let used_idx: u16 = self.mem.read_obj(GuestAddress(USED + 2)).unwrap();
        assert_eq!(used_idx, self.avail_idx, "every request is completed");
        let e = USED + 4 + 8 * ((used_idx.wrapping_sub(1)) % QSIZE) as u64;
        let id: u32 = self.mem.read_obj(GuestAddress(e)).unwrap();
        assert_eq!(id, head as u32);
        let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).unwrap();
        (self.mem.read_obj(GuestAddress(status_at)).unwrap(), len)
    }

    /// A well-formed read of `sectors` sectors at `sector` into 0x8000.
    fn good_read(&mut self, sector: u64) -> (u8, u32) {
        self.header(0x4000, VIRTIO_BLK_T_IN, sector);
        self.set_desc(0, 0x4000, 16, NEXT, 1);
        self.set_desc(1, 0x8000, 512, NEXT | WRITE, 2);
        self.set_desc(2, 0x5000, 1, WRITE, 0);
        self.submit(0, 0x5000)
    }
}

#[test]
fn read_write_flush_and_id() {
    let mut r = Rig::new(false);
    assert_eq!(r.good_read(3), (VIRTIO_BLK_S_OK, 513));
    let mut b = [0u8; 512];
    r.mem.read_slice(&mut b, GuestAddress(0x8000)).unwrap();
    assert_eq!(b, [3u8; 512]);

    r.mem
        .write_slice(&[0xab; 1024], GuestAddress(0x9000))
        .unwrap();
    r.header(0x4000, VIRTIO_BLK_T_OUT, 10);
    r.set_desc(0, 0x4000, 16, NEXT, 1);
    r.set_desc(1, 0x9000, 1024, NEXT, 2);
    r.set_desc(2, 0x5000, 1, WRITE, 0);
    assert_eq!(r.submit(0, 0x5000), (VIRTIO_BLK_S_OK, 1));
    assert_eq!(
        &r.disk.0.lock().unwrap()[10 * 512..12 * 512],
        &[0xab; 1024][..]
    );

    r.header(0x4000, VIRTIO_BLK_T_FLUSH, 0);
    r.set_desc(0, 0x4000, 16, NEXT, 2);
    assert_eq!(r.submit(0, 0x5000).0, VIRTIO_BLK_S_OK);

    r.header(0x4000, VIRTIO_BLK_T_GET_ID, 0);
    r.set_desc(0, 0x4000, 16, NEXT, 1);
    r.set_desc(1, 0xa000, 20, NEXT | WRITE, 2);
    assert_eq!(r.submit(0, 0x5000).0, VIRTIO_BLK_S_OK);
    let mut id = [0u8; 11];
    r.mem.read_slice(&mut id, GuestAddress(0xa000)).unwrap();
    assert_eq!(&id, b"snapvm-test");
}

#[test]
fn malformed_chains_get_errors_and_the_device_keeps_serving() {
    let mut r = Rig::new(false);
    // Data buffer outside guest memory.
    r.header(0x4000, VIRTIO_BLK_T_IN, 0);
    r.set_desc(0, 0x4000, 16, NEXT, 1);
    r.set_desc(1, MEM as u64 - 256, 512, NEXT | WRITE, 2);
    r.set_desc(2, 0x5000, 1, WRITE, 0);
    assert_eq!(r.submit(0, 0x5000).0, VIRTIO_BLK_S_IOERR);
    assert_eq!(r.good_read(1).0, VIRTIO_BLK_S_OK);

    // Wrong direction: a read into a device-readable buffer.
    r.set_desc(1, 0x8000, 512, NEXT, 2);
    r.header(0x4000, VIRTIO_BLK_T_IN, 0);
    assert_eq!(r.submit(0, 0x5000).0, VIRTIO_BLK_S_IOERR);
    assert_eq!(r.good_read(2).0, VIRTIO_BLK_S_OK);

    // A loop: 0 -> 1 -> 0 ... never reaches a status descriptor.
    r.set_desc(0, 0x4000, 16, NEXT, 1);
    r.set_desc(1, 0x8000, 512, NEXT | WRITE, 0);
    let (status, len) = r.submit(0, 0x5000);
    assert_eq!(
        (status, len),
        (0xff, 0),
        "no status can be written, but the chain completes"
    );
    assert_eq!(r.good_read(4).0, VIRTIO_BLK_S_OK);

    // Next index beyond the table.
    r.set_desc(0, 0x4000, 16, NEXT, 1);
    r.set_desc(1, 0x8000, 512, NEXT | WRITE, 200);
    assert_eq!(r.submit(0, 0x5000), (0xff, 0));
    assert_eq!(r.good_read(5).0, VIRTIO_BLK_S_OK);

    // Oversized: more than MAX_REQUEST_BYTES.
    r.header(0x4000, VIRTIO_BLK_T_IN, 0);
    r.set_desc(0, 0x4000, 16, NEXT, 1);
    r.set_desc(1, 0x8000, (MAX_REQUEST_BYTES + 512) as u32, NEXT | WRITE, 2);
    r.set_desc(2, 0x5000, 1, WRITE, 0);
    assert_eq!(r.submit(0, 0x5000).0, VIRTIO_BLK_S_IOERR);

    // Beyond the end of the disk.
    assert_eq!(r.good_read(64).0, VIRTIO_BLK_S_IOERR);
    assert_eq!(r.good_read(u64::MAX / 256).0, VIRTIO_BLK_S_IOERR);

    // Header outside memory; unknown request type.
    r.set_desc(0, u64::MAX - 8, 16, NEXT, 1);
    r.set_desc(1, 0x8000, 512, NEXT | WRITE, 2);
    assert_eq!(r.submit(0, 0x5000).0, VIRTIO_BLK_S_IOERR);
    r.header(0x4000, 99, 0);
    r.set_desc(0, 0x4000, 16, NEXT, 1);
    assert_eq!(r.submit(0, 0x5000).0, VIRTIO_BLK_S_UNSUPP);

    // Still serving, and the disk only changed where it was written.
    assert_eq!(r.good_read(7), (VIRTIO_BLK_S_OK, 513));
    let d = r.disk.0.lock().unwrap();
    assert!(d
        .chunks(512)
        .enumerate()
        .all(|(i, s)| s.iter().all(|b| *b == i as u8)));
}

#[test]
fn readonly_disk_refuses_writes() {
    let mut r = Rig::new(true);
    r.header(0x4000, VIRTIO_BLK_T_OUT, 0);
    r.set_desc(0, 0x4000, 16, NEXT, 1);
    r.set_desc(1, 0x9000, 512, NEXT, 2);
    r.set_desc(2, 0x5000, 1, WRITE, 0);
    assert_eq!(r.submit(0, 0x5000).0, VIRTIO_BLK_S_IOERR);
    assert_eq!(r.disk.0.lock().unwrap()[0], 0);
}

/// Random descriptor tables, avail rings and request headers: every
/// request completes with a status or is refused, the disk is only
/// written where a well-formed write says, and the device goes on.
#[test]
fn fuzz_queue() {
    fuzzing::run("virtio-blk queue", 600, 1024, |u| {
        let mut r = Rig::new(u.arbitrary()?);
        for i in 0..QSIZE {
            r.set_desc(
                i,
                fuzzing::guest_addr(u, MEM as u64)?,
                {
                    let any: u32 = u.arbitrary()?;
                    *u.choose(&[0, 1, 16, 512, 4096, u32::MAX, any])?
                },
                u.arbitrary::<u16>()? & 0x7,
                u.int_in_range(0..=QSIZE + 2)?,
            );
        }
        for at in [0x4000u64, 0x6000] {
            r.header(at, u.int_in_range(0..=12)?, u.arbitrary()?);
        }
        let n = u.int_in_range(0..=QSIZE + 4)?;
        for _ in 0..n {
            let slot = r.avail_idx % QSIZE;
            let head: u16 = u.int_in_range(0..=QSIZE + 2)?;
            r.mem
                .write_obj(head, GuestAddress(AVAIL + 4 + 2 * slot as u64))
                .unwrap();
            r.avail_idx = r.avail_idx.wrapping_add(1);
        }
        if u.arbitrary()? {
            r.avail_idx = u.arbitrary()?;
        }
        r.mem
            .write_obj(r.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
        r.handler.process_queue(&mut r.queue, &r.mem);
        Ok(())
    });
    // And a fresh queue still serves a good request.
    let mut r = Rig::new(false);
    assert_eq!(r.good_read(3).0, VIRTIO_BLK_S_OK);
}
