//! The guest memory an apply replaces: moved out of the way in O(1), freed
//! later, and (as a debug aid) poisoned and checked for writes after it
//! left guest RAM.

use std::path::Path;

/// The byte the debug aid [`super::LazyOptions::check_old_memory`] fills
/// the memory an apply replaced with, right after the apply (on a
/// background thread); the memory is kept for a second before it is freed,
/// and then any page that no longer holds only the poison is reported (a
/// line per apply goes to the report file). Nothing may touch that memory
/// once it has left guest RAM (KVM no longer maps it): a changed page is a
/// write through a stale translation, and a guest that reads through one
/// sees the poison (e.g. 0xabab in a 16-bit index).
pub const POISON: u8 = 0xab;

/// Guest memory moved out of the way by [`replace_mapping`]; unmapped on
/// drop.
pub(super) struct OldMemory {
    addr: usize,
    len: usize,
    /// Guest-physical address of the region (for the report).
    pub(super) gpa: u64,
}

impl OldMemory {
    pub(super) fn poison(&self) {
        if self.len == 0 {
            return;
        }
        // SAFETY: the old pages, mapped writable at `addr` for `len` bytes
        // until this value is dropped; nothing else refers to them.
        unsafe { std::ptr::write_bytes(self.addr as *mut u8, POISON, self.len) };
    }

    /// Pages that no longer hold only the poison; a report line.
    fn changes(&self) -> String {
        let now: &[u8] = if self.len == 0 {
            &[]
        } else {
            // SAFETY: as in poison; only read.
            unsafe { std::slice::from_raw_parts(self.addr as *const u8, self.len) }
        };
        let changed: Vec<u64> = now
            .chunks(4096)
            .enumerate()
            .filter(|(_, p)| p.iter().any(|b| *b != POISON))
            .map(|(i, _)| self.gpa + (i as u64) * 4096)
            .collect();
        let first: Vec<String> = changed.iter().take(8).map(|g| format!("{g:#x}")).collect();
        format!(
            "region {:#x}+{:#x}: {} page(s) changed after the move; first: [{}]",
            self.gpa,
            self.len,
            changed.len(),
            first.join(", ")
        )
    }
}

impl Drop for OldMemory {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        // SAFETY: the old pages, moved out of guest RAM by replace_mapping;
        // nothing refers to this range.
        unsafe { libc::munmap(self.addr as *mut _, self.len) };
    }
}

/// Gives `[host, host + len)` fresh, empty memory in O(1): the old pages
/// are moved away with mremap (whole page tables at a time), to be freed
/// later (see [`LazyLoader::free_old_memory`]), where MADV_DONTNEED would
/// free them page by page while the guest waits.
///
/// Guest RAM is never unmapped, not even for an instant: with a plain move
/// and a MAP_FIXED mapping after it, another thread's mmap (a thread
/// stack, a large allocation) could land in the hole and then be
/// overwritten. So the pages leave with MREMAP_DONTUNMAP, which keeps the
/// guest RAM mapping in place, empty; a MAP_FIXED mapping then replaces
/// that one in a single step, which also frees the page tables the move
/// left behind (a huge page can only be moved in where there are none).
pub(super) fn replace_mapping(host: usize, len: usize, huge: bool) -> std::io::Result<OldMemory> {
    let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    // SAFETY: reserves a fresh address range (no access) for the old pages.
    let scratch = unsafe { libc::mmap(std::ptr::null_mut(), len, libc::PROT_NONE, anon, -1, 0) };
    if scratch == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: moves the guest RAM pages (one VMA: the region; see below
    // for several) onto the
    // scratch range, which it replaces atomically; the guest RAM range
    // stays mapped. The guest is not running and no thread touches guest
    // memory meanwhile.
    let moved = unsafe {
        libc::mremap(
            host as *mut _,
            len,
            len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED | libc::MREMAP_DONTUNMAP,
            scratch,
        )
    };
    let old = if moved == libc::MAP_FAILED {
        let e = std::io::Error::last_os_error();
        // SAFETY: our own scratch reservation.
        unsafe { libc::munmap(scratch, len) };
        // EFAULT: the range is several mappings (a clone's memory: extents
        // of a shared file between anonymous holes), which mremap cannot
        // move at once. The fresh mapping below then replaces them all in
        // one step, freeing the old pages on the spot.
        if e.raw_os_error() != Some(libc::EFAULT) {
            return Err(e);
        }
        OldMemory {
            addr: 0,
            len: 0,
            gpa: 0,
        }
    } else {
        OldMemory {
            addr: moved as usize,
            len,
            gpa: 0,
        }
    };
    // SAFETY: replaces the (now empty) guest RAM mapping with a fresh one
    // at the same address, atomically; the VMM and KVM keep using it.
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
    let advice = if huge {
        libc::MADV_HUGEPAGE
    } else {
        libc::MADV_NOHUGEPAGE
    };
    // SAFETY: advisory, on the range just mapped.
    unsafe { libc::madvise(host as *mut _, len, advice) };
    Ok(old)
}

/// Appends what [`OldMemory::changes`] found to `path`.
pub(super) fn report_changes(old: &[OldMemory], path: &Path) {
    use std::io::Write;
    for o in old {
        let line = o.changes();
        if !line.contains(": 0 page(s)") {
            tracing::error!("old guest memory changed after an apply: {line}");
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path);
        if let Ok(mut f) = file {
            let _ = writeln!(f, "pid {} {line}", std::process::id());
        }
    }
}
