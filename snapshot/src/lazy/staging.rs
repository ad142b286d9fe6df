//! Where a chunk goes before it is placed in guest RAM, and the move that
//! places it whole (UFFDIO_MOVE, which the userfaultfd crate lacks).

use std::os::fd::RawFd;

use crate::memory_file::CHUNK_SIZE;

/// `UFFD_FEATURE_MOVE` (Linux 6.8); the userfaultfd crate has no name for
/// it, nor a call for the ioctl below.
pub(super) const UFFD_FEATURE_MOVE: u64 = 1 << 16;
/// `UFFDIO_MOVE`: `_IOWR(0xAA, 0x05, struct uffdio_move)` (40 bytes).
const UFFDIO_MOVE: libc::c_ulong = 0xC028_AA05;

/// `struct uffdio_move` from linux/userfaultfd.h.
#[repr(C)]
struct UffdioMove {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    moved: i64,
}

/// Moves the pages of `[src, src + len)` to `[dst, dst + len)` (a range
/// registered with `uffd` and not populated) and wakes threads waiting on
/// it. Whole 2 MiB huge pages move as they are.
pub(super) fn uffd_move(uffd: RawFd, dst: usize, src: usize, len: usize) -> std::io::Result<()> {
    let mut done = 0usize;
    while done < len {
        let mut m = UffdioMove {
            dst: (dst + done) as u64,
            src: (src + done) as u64,
            len: (len - done) as u64,
            mode: 0,
            moved: 0,
        };
        // SAFETY: UFFDIO_MOVE reads and writes only the struct passed; the
        // kernel checks both ranges against this process's mappings.
        let rc = unsafe { libc::ioctl(uffd, UFFDIO_MOVE, &mut m as *mut UffdioMove) };
        if rc == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        // EAGAIN: moved part of it (or raced with a fault); go on from there.
        if e.raw_os_error() != Some(libc::EAGAIN) {
            return Err(e);
        }
        if m.moved > 0 {
            done += m.moved as usize;
        }
    }
    Ok(())
}

/// A 2 MiB-aligned private area a chunk is read into before it is moved
/// into guest RAM; advised for huge pages.
pub(super) struct Staging {
    map: usize,
    map_len: usize,
    pub(super) addr: usize,
}

impl Staging {
    pub(super) fn new() -> std::io::Result<Self> {
        let len = CHUNK_SIZE as usize;
        let map_len = 2 * len;
        // SAFETY: a fresh anonymous mapping with no address hint; checked.
        let map = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if map == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let addr = (map as usize).next_multiple_of(len);
        // SAFETY: advisory, inside the mapping just created.
        unsafe { libc::madvise(addr as *mut _, len, libc::MADV_HUGEPAGE) };
        Ok(Self {
            map: map as usize,
            map_len,
            addr,
        })
    }

    /// The first `len` bytes (at most 2 MiB), populated as they are written.
    pub(super) fn buf(&mut self, len: usize) -> &mut [u8] {
        // SAFETY: inside our own mapping, which lives as long as `self`;
        // the exclusive borrow of `self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.addr as *mut u8, len) }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // SAFETY: the mapping created in `new`, used by nobody else.
        unsafe { libc::munmap(self.map as *mut _, self.map_len) };
    }
}
