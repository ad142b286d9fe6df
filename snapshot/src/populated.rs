//! Which 2 MiB extents of guest RAM were never touched, so that a live
//! snapshot can leave them unprotected (snapshot/src/live/mod.rs).
//!
//! A page of private anonymous memory that was never populated reads as
//! zeroes. Write-protecting it takes UFFD_FEATURE_WP_UNPOPULATED, which
//! fills each empty 2 MiB extent with a page table of markers: on these
//! machines ~4 ms per GiB of empty memory to protect, and the extent stays
//! on 4 KiB page tables afterwards, so the guest's first touch there cannot
//! get a huge page and an apply moves and frees those tables entry by entry
//! (~1.2 ms per GiB; docs/kvm-backend.md). Instead, a snapshot records an
//! extent that is still empty at its instant as zeroes (a hole in
//! memory.bin) and never protects it: whatever the guest writes there
//! afterwards is after the instant.
//!
//! Two read-only kernel interfaces:
//! - the PAGEMAP_SCAN ioctl on /proc/self/pagemap (Linux 6.7): the ranges
//!   holding a present or swapped-out page, in one call (~75 us for 4 GiB
//!   of huge pages here, ~8 us for 2 GiB of empty memory);
//! - /proc/self/maps: whether a range is private anonymous memory. Nothing
//!   else qualifies: an unpopulated page of a private file mapping (a
//!   clone's first memory, snapshot/src/shared_memory.rs) reads as the
//!   file, and shared memory can be populated through another mapping.
//!
//! When either is missing or fails, nothing is skipped: all memory is
//! protected as before. Written on libc: no crate wraps PAGEMAP_SCAN, and
//! the procfs crate would add a dependency tree for one check of the maps
//! file's permission and inode fields.

use std::fs::File;
use std::os::fd::AsRawFd;

/// The granularity: a huge page, the unit of a page table.
pub const EXTENT: usize = 2 << 20;

/// Runs of memory: (address, length) pairs.
pub type Runs = Vec<(usize, usize)>;

/// The most untouched runs a snapshot leaves unprotected per region: each
/// costs a scan of ~5 us in the pause ([`PageScanner::recheck`]). Smaller
/// runs beyond these are protected as before (a few us per extent, before
/// the pause).
pub const MAX_RUNS: usize = 16;

/// `PAGE_IS_PRESENT` and `PAGE_IS_SWAPPED` of include/uapi/linux/fs.h.
const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_SWAPPED: u64 = 1 << 4;

/// `struct page_region` of include/uapi/linux/fs.h.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// `struct pm_scan_arg` of include/uapi/linux/fs.h.
#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `PAGEMAP_SCAN`: `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: libc::c_ulong = (3 << 30)
    | ((std::mem::size_of::<PmScanArg>() as libc::c_ulong) << 16)
    | ((b'f' as libc::c_ulong) << 8)
    | 16;

/// This process's /proc/self/pagemap, for PAGEMAP_SCAN.
pub struct PageScanner {
    pagemap: File,
}

impl PageScanner {
    /// Opens /proc/self/pagemap and checks that the kernel has
    /// PAGEMAP_SCAN; `None` otherwise (the reason is logged).
    pub fn open() -> Option<Self> {
        let pagemap = match File::open("/proc/self/pagemap") {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!("cannot open /proc/self/pagemap ({e}): all memory is protected");
                return None;
            }
        };
        let s = Self { pagemap };
        // An empty range: only whether the ioctl exists.
        match s.populated(0, 0) {
            Ok(_) => Some(s),
            Err(e) => {
                tracing::debug!("no PAGEMAP_SCAN ({e}): all memory is protected");
                None
            }
        }
    }

    /// The ranges of `[start, end)` (page aligned) that hold a present or
    /// swapped-out page, as sorted, disjoint (start, end) pairs.
    pub fn populated(&self, start: usize, end: usize) -> std::io::Result<Vec<(usize, usize)>> {
        let mut out: Vec<(usize, usize)> = Vec::new();
        let mut buf = vec![PageRegion::default(); 512];
        let mut at = start as u64;
        loop {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                start: at,
                end: end as u64,
                vec: buf.as_mut_ptr() as u64,
                vec_len: buf.len() as u64,
                category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                ..Default::default()
            };
            // SAFETY: `arg` is a valid pm_scan_arg whose `vec` points to
            // `buf.len()` writable page_region entries, alive for the call;
            // the kernel only reads page tables for the range.
            let n = unsafe { libc::ioctl(self.pagemap.as_raw_fd(), PAGEMAP_SCAN, &mut arg) };
            if n < 0 {
                return Err(std::io::Error::last_os_error());
            }
            for r in &buf[..(n as usize).min(buf.len())] {
                let (s, e) = (r.start as usize, r.end as usize);
                match out.last_mut() {
                    Some(last) if last.1 == s => last.1 = e,
                    _ => out.push((s, e)),
                }
            }
            // The walk stops early only when `buf` is full.
            if arg.walk_end >= end as u64 || arg.walk_end <= at {
                break;
            }
            at = arg.walk_end;
        }
        Ok(out)
    }

    /// The runs of whole [`EXTENT`]s of `[start, start + len)` that hold no
    /// page, as (address, length): empty when the range is not private
    /// anonymous memory or cannot be scanned.
    pub fn untouched(&self, start: usize, len: usize) -> Vec<(usize, usize)> {
        match private_anonymous(start, len) {
            Ok(true) => {}
            Ok(false) => return Vec::new(),
            Err(e) => {
                tracing::debug!("cannot read /proc/self/maps ({e}): all memory is protected");
                return Vec::new();
            }
        }
        match self.populated(start, start + len) {
            Ok(p) => largest(empty_runs(start, len, &p), MAX_RUNS),
            Err(e) => {
                tracing::debug!("PAGEMAP_SCAN failed ({e}): all memory is protected");
                Vec::new()
            }
        }
    }

    /// Splits runs returned by [`PageScanner::untouched`] into the extents
    /// that hold a page by now and those still empty, each as runs. This
    /// runs in the snapshot's pause: one scan per run, each over memory
    /// that was empty (a scan over the populated memory between runs
    /// would cost more). When a scan fails, its run counts as touched.
    pub fn recheck(&self, runs: &[(usize, usize)]) -> (Runs, Runs) {
        let (mut touched, mut empty) = (Vec::new(), Vec::new());
        for &(start, len) in runs {
            match self.populated(start, start + len) {
                Ok(p) if p.is_empty() => empty.push((start, len)),
                Ok(p) => {
                    let e = empty_runs(start, len, &p);
                    touched.extend(complement(start, len, &e));
                    empty.extend(e);
                }
                Err(_) => touched.push((start, len)),
            }
        }
        (touched, empty)
    }
}

/// Whether `[start, start + len)` lies entirely in private anonymous
/// mappings (no file, not shared), per /proc/self/maps.
pub fn private_anonymous(start: usize, len: usize) -> std::io::Result<bool> {
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    Ok(covered_by_private_anonymous(&maps, start, start + len))
}

/// [`private_anonymous`] on the text of a maps file. Each line reads
/// `start-end perms offset dev inode [path]`.
fn covered_by_private_anonymous(maps: &str, start: usize, end: usize) -> bool {
    let mut at = start;
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (Some(range), Some(perms), Some(_), Some(_), Some(inode)) =
            (f.next(), f.next(), f.next(), f.next(), f.next())
        else {
            continue;
        };
        let path = f.next().unwrap_or("");
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16)) else {
            continue;
        };
        if b <= at || a >= end {
            continue;
        }
        let anonymous = perms.as_bytes().get(3) == Some(&b'p')
            && inode == "0"
            && (path.is_empty() || path.starts_with('['));
        if a > at || !anonymous {
            return false;
        }
        at = b;
        if at >= end {
            return true;
        }
    }
    at >= end
}

/// The whole [`EXTENT`]-aligned extents of `[start, start + len)` that no
/// range of `populated` (sorted (start, end) pairs) touches, merged into
/// (address, length) runs.
pub fn empty_runs(start: usize, len: usize, populated: &[(usize, usize)]) -> Vec<(usize, usize)> {
    let end = start + len;
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut e = start.next_multiple_of(EXTENT);
    let mut p = populated.iter().peekable();
    while e + EXTENT <= end {
        while p.peek().is_some_and(|r| r.1 <= e) {
            p.next();
        }
        let touched = p.peek().is_some_and(|r| r.0 < e + EXTENT);
        if !touched {
            match runs.last_mut() {
                Some(last) if last.0 + last.1 == e => last.1 += EXTENT,
                _ => runs.push((e, EXTENT)),
            }
        }
        e += EXTENT;
    }
    runs
}

/// The `n` longest of `runs`, in address order.
fn largest(mut runs: Runs, n: usize) -> Runs {
    if runs.len() > n {
        runs.sort_unstable_by_key(|r| std::cmp::Reverse(r.1));
        runs.truncate(n);
        runs.sort_unstable();
    }
    runs
}

/// The parts of `[start, start + len)` outside `runs` (sorted, disjoint,
/// inside the range), as (address, length).
pub fn complement(start: usize, len: usize, runs: &[(usize, usize)]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut at = start;
    for &(a, l) in runs {
        if a > at {
            out.push((at, a - at));
        }
        at = a + l;
    }
    if at < start + len {
        out.push((at, start + len - at));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{Anon, Tmp};

    const MIB: usize = 1 << 20;

    #[test]
    fn empty_runs_take_only_whole_untouched_extents() {
        // [1, 13) MiB holds the whole extents at 2, 4, 6, 8 and 10 MiB; a
        // page at 4 MiB + 4 KiB and the last page below 8 MiB touch two.
        let populated = [(4 * MIB + 4096, 4 * MIB + 8192), (8 * MIB - 4096, 8 * MIB)];
        assert_eq!(
            empty_runs(MIB, 12 * MIB, &populated),
            vec![(2 * MIB, 2 * MIB), (8 * MIB, 4 * MIB)]
        );
        assert_eq!(empty_runs(MIB, 12 * MIB, &[(0, 20 * MIB)]), vec![]);
        assert_eq!(empty_runs(MIB, 2 * MIB, &[]), vec![], "no whole extent");
    }

    #[test]
    fn only_the_longest_runs_are_kept() {
        let runs = vec![(0, 2), (10, 8), (20, 2), (30, 4)];
        assert_eq!(largest(runs.clone(), 2), vec![(10, 8), (30, 4)]);
        assert_eq!(largest(runs.clone(), 4), runs);
    }

    #[test]
    fn complement_is_what_the_runs_leave() {
        let runs = [(2 * MIB, 2 * MIB), (8 * MIB, 4 * MIB)];
        assert_eq!(
            complement(MIB, 12 * MIB, &runs),
            vec![(MIB, MIB), (4 * MIB, 4 * MIB), (12 * MIB, MIB)]
        );
        assert_eq!(complement(MIB, 12 * MIB, &[]), vec![(MIB, 12 * MIB)]);
        assert_eq!(complement(2 * MIB, 2 * MIB, &[(2 * MIB, 2 * MIB)]), vec![]);
    }

    #[test]
    fn only_private_anonymous_mappings_qualify() {
        let maps = "\
1000-3000 rw-p 00000000 00:00 0 
3000-5000 rw-p 00000000 00:00 0                          [anon:guest]
5000-6000 rw-p 00000000 fe:01 1234                       /tmp/memory.bin
6000-7000 rw-s 00000000 00:01 77                         /memfd:ram (deleted)
8000-9000 rw-p 00000000 00:00 0 
";
        let anon = |a, b| covered_by_private_anonymous(maps, a, b);
        assert!(anon(0x1000, 0x5000), "two adjacent anonymous mappings");
        assert!(anon(0x2000, 0x3000));
        assert!(!anon(0x4000, 0x5800), "a private file mapping");
        assert!(!anon(0x6000, 0x7000), "shared memory");
        assert!(!anon(0x8000, 0xa000), "runs past the last mapping");
        assert!(!anon(0x7000, 0x9000), "a hole");
        assert!(!anon(0x0, 0x2000), "starts before the first mapping");
    }

    #[test]
    fn the_scanner_finds_touched_extents_and_leaves_the_rest() {
        let Some(scanner) = PageScanner::open() else {
            panic!("PAGEMAP_SCAN (Linux >= 6.7) is needed on these machines");
        };
        let mem = Anon::new(32 * MIB);
        assert!(private_anonymous(mem.addr, mem.len).unwrap());
        let start = mem.addr.next_multiple_of(EXTENT);
        // SAFETY: inside the mapping.
        unsafe { *((start + 5 * MIB) as *mut u8) = 1 };
        let populated = scanner.populated(mem.addr, mem.addr + mem.len).unwrap();
        assert!(
            populated
                .iter()
                .any(|r| r.0 <= start + 5 * MIB && r.1 > start + 5 * MIB),
            "{populated:x?}"
        );
        let untouched = scanner.untouched(mem.addr, mem.len);
        let covers = |a: usize| untouched.iter().any(|r| r.0 <= a && a < r.0 + r.1);
        assert!(!covers(start + 4 * MIB), "the touched extent is protected");
        assert!(covers(start) && covers(start + 8 * MIB), "{untouched:x?}");
        // Touched since: a recheck moves that extent over.
        // SAFETY: inside the mapping.
        unsafe { *((start + 8 * MIB) as *mut u8) = 1 };
        let (touched, empty) = scanner.recheck(&[(start, 4 * MIB), (start + 6 * MIB, 10 * MIB)]);
        assert_eq!(touched, vec![(start + 8 * MIB, 2 * MIB)]);
        assert_eq!(
            empty,
            vec![
                (start, 4 * MIB),
                (start + 6 * MIB, 2 * MIB),
                (start + 10 * MIB, 6 * MIB)
            ]
        );
    }

    #[test]
    fn file_and_shared_mappings_are_never_skipped() {
        let tmp = Tmp::new("populated");
        let path = tmp.0.join("f");
        std::fs::write(&path, vec![7u8; 4 * MIB]).unwrap();
        let f = File::open(&path).unwrap();
        let scanner = PageScanner::open().expect("PAGEMAP_SCAN");
        for (flags, fd) in [
            (libc::MAP_PRIVATE, f.as_raw_fd()),
            (libc::MAP_SHARED | libc::MAP_ANONYMOUS, -1),
        ] {
            // SAFETY: a fresh mapping, checked, unmapped below.
            let p =
                unsafe { libc::mmap(std::ptr::null_mut(), 4 * MIB, libc::PROT_READ, flags, fd, 0) };
            assert_ne!(p, libc::MAP_FAILED);
            assert!(!private_anonymous(p as usize, 4 * MIB).unwrap());
            assert_eq!(scanner.untouched(p as usize, 4 * MIB), vec![]);
            // SAFETY: our own mapping.
            unsafe { libc::munmap(p, 4 * MIB) };
        }
    }
}
