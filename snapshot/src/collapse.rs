//! Puts the 2 MiB extents of guest RAM that a live snapshot split back on
//! huge pages.
//!
//! A write fault during a snapshot releases one 4 KiB page of a huge page
//! (snapshot/src/live/mod.rs), and the kernel splits that huge page's
//! mapping to do it. The extent then stays on 4 KiB mappings, in the host
//! and in KVM, until something collapses it: the next apply pays for every
//! small mapping when KVM lets go of guest memory (at 4 GiB with memstamp
//! over half of it, 3-6 ms against ~1 ms, docs/kvm-backend.md). Once the
//! snapshot's memory is out, MADV_COLLAPSE (Linux 6.1) copies each split
//! extent into a fresh huge page, as khugepaged would much later.
//!
//! Best effort: an extent the kernel will not collapse now (pages in use,
//! twice; no huge page free) stays as it is; the guest never notices either way.

/// The extent size: a huge page.
pub use crate::populated::EXTENT;

/// Figures of one pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Collapsed {
    /// Extents now on a huge page.
    pub extents: u64,
    /// Extents the kernel refused (left on 4 KiB mappings).
    pub refused: u64,
}

/// Collapses each extent of `extents` (EXTENT-aligned host addresses of
/// guest RAM mappings, sorted).
pub fn collapse(extents: &[usize]) -> Collapsed {
    let mut c = Collapsed::default();
    for &e in extents {
        // SAFETY: advice on whole extents of guest RAM, which the VM keeps
        // mapped for longer than any snapshot; MADV_COLLAPSE never changes
        // what the memory holds.
        let advise =
            || unsafe { libc::madvise(e as *mut libc::c_void, EXTENT, libc::MADV_COLLAPSE) };
        let mut rc = advise();
        if rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EAGAIN) {
            // A page was busy for a moment (e.g. not on an LRU list yet).
            rc = advise();
        }
        if rc == 0 {
            c.extents += 1;
        } else {
            if c.refused == 0 {
                tracing::debug!(
                    "MADV_COLLAPSE refused {e:#x}: {}",
                    std::io::Error::last_os_error()
                );
            }
            c.refused += 1;
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AnonHugePages of the mapping holding `addr` (/proc/self/smaps),
    /// in KiB.
    fn anon_huge_kib(addr: usize) -> u64 {
        let s = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut inside = false;
        for l in s.lines() {
            if let Some((a, rest)) = l.split_once('-') {
                if let (Ok(a), Some(b)) = (usize::from_str_radix(a, 16), rest.split(' ').next()) {
                    if let Ok(b) = usize::from_str_radix(b, 16) {
                        inside = a <= addr && addr < b;
                        continue;
                    }
                }
            }
            if inside {
                if let Some(v) = l.strip_prefix("AnonHugePages:") {
                    return v.trim().trim_end_matches("kB").trim().parse().unwrap();
                }
            }
        }
        panic!("no mapping at {addr:#x}")
    }

    #[test]
    fn a_split_extent_goes_back_on_a_huge_page_with_its_content() {
        let mem = crate::test_util::Anon::new(4 * EXTENT);
        let e = (mem.addr + 4096).next_multiple_of(EXTENT);
        // SAFETY: protection, advice and writes inside the mapping. The
        // inaccessible first and last pages keep the kernel from merging
        // the mapping with a neighbour, whose huge pages smaps would count.
        unsafe {
            libc::mprotect(mem.addr as *mut _, 4096, libc::PROT_NONE);
            libc::mprotect((mem.addr + mem.len - 4096) as *mut _, 4096, libc::PROT_NONE);
            libc::madvise(e as *mut _, EXTENT, libc::MADV_NOHUGEPAGE);
            for p in (0..EXTENT).step_by(4096) {
                *((e + p) as *mut u64) = p as u64;
            }
            libc::madvise(e as *mut _, EXTENT, libc::MADV_HUGEPAGE);
        }
        assert_eq!(anon_huge_kib(e), 0, "4 KiB pages");
        // A huge page may be missing for a moment while the host compacts
        // memory (seen right after a build): a few tries.
        let mut tries = 0;
        while collapse(&[e]).extents == 0 {
            tries += 1;
            assert!(
                tries < 10,
                "MADV_COLLAPSE refused: {}",
                std::io::Error::last_os_error()
            );
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        assert_eq!(anon_huge_kib(e), 2048, "one huge page");
        for p in (0..EXTENT).step_by(4096) {
            // SAFETY: inside the mapping.
            assert_eq!(unsafe { *((e + p) as *const u64) }, p as u64);
        }
    }
}
