//! Tests of the lazy loader on real userfaultfd-registered memory.

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
        LazyOptions {
            huge_pages: true,
            check_old_memory: None,
        },
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
        LazyOptions {
            huge_pages: huge,
            check_old_memory: None,
        },
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
    let thp =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
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
