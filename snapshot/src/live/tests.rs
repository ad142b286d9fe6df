//! Unit tests of the live snapshot (snapshot/src/live/mod.rs).
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

/// A tracker over all of `mem` (guest-physical 0 up).
fn tracker_of(mem: &Anon) -> Tracker {
    let wp = Arc::new(
        WriteProtector::new(&[HostRange {
            addr: mem.addr,
            len: mem.len,
        }])
        .expect("uffd (root, Linux >= 6.4)"),
    );
    Tracker::new(
        wp,
        vec![GuestRegion {
            gpa: 0,
            host: mem.addr,
            len: mem.len,
        }],
    )
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
    let tracker = tracker_of(&mem);
    let paused = Arc::new(AtomicBool::new(false));
    let parked = Arc::new(AtomicU32::new(0));
    let quit = Arc::new(AtomicBool::new(false));
    let mut writers = Writers(quit.clone(), vec![]);
    for w in 0..2usize {
        let (paused, parked, quit, base) = (paused.clone(), parked.clone(), quit.clone(), mem.addr);
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

/// Extents the guest never touched are not protected: one still empty at
/// the freeze is zeroes in memory.bin and is written after it without a
/// fault; one first written between arm and freeze is protected at the
/// freeze and keeps its content from the instant.
#[test]
fn untouched_extents_are_zero_at_the_instant_and_never_fault() {
    let len = 32 * MIB;
    let mem = Anon::new(len);
    let extent = crate::populated::EXTENT;
    let start = mem.addr.next_multiple_of(extent);
    let (a, b, c) = (start, start + 3 * extent, start + 5 * extent);
    let put = |addr: usize, v: u64| {
        // SAFETY: inside the mapping, which outlives the test body.
        unsafe { *(addr as *mut u64) = v }
    };
    put(a, 1);
    let tracker = tracker_of(&mem);
    let mut armed = tracker.arm().unwrap();
    put(b, 2);
    let tmp = crate::test_util::Tmp::new("live-untouched");
    let path = tmp.0.join("memory.bin");
    armed
        .freeze(MemoryFileWriter::create(&path, &[(0, len as u64)]).unwrap())
        .unwrap();
    put(c, 3);
    put(b, 4);
    put(a, 5);
    let (stats, file) = armed.stream(&|_, _| {}).unwrap();
    file.finish().unwrap();
    let whole = (start..)
        .step_by(extent)
        .take_while(|e| e + extent <= mem.addr + len)
        .count() as u64;
    assert_eq!(
        stats.empty_pages,
        (whole - 2) * (extent as u64 / PAGE_SIZE),
        "every whole extent but a and b: {stats:?}"
    );
    assert_eq!(stats.faults, 2, "a and b fault, c does not: {stats:?}");
    MemoryFile::open(&path).unwrap().verify_all().unwrap();
    let got = std::fs::read(&path).unwrap();
    let word = |addr: usize| {
        let off = addr - mem.addr;
        u64::from_ne_bytes(got[off..off + 8].try_into().unwrap())
    };
    assert_eq!(
        (word(a), word(b), word(c)),
        (1, 2, 0),
        "memory at the freeze"
    );
    // SAFETY: reading the mapping.
    // (Their extents were split by the faults and collapsed since.)
    // SAFETY: reading the mapping.
    let now = unsafe { (*(a as *const u64), *(b as *const u64), *(c as *const u64)) };
    assert_eq!(now, (5, 4, 3), "the later writes landed");
}
