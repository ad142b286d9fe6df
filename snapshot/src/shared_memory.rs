//! A snapshot's memory staged once on tmpfs, for many VMs to map privately
//! (clones): reads share the staged pages, a write copies only the page
//! written. memory.bin itself cannot serve: a private mapping of a file on
//! a disk file system is not memory userfaultfd can write-protect, and a
//! clone must be able to take live snapshots too; a tmpfs (shmem) mapping
//! is.
//!
//! The staged file has memory.bin's page layout (file offset = guest
//! address), with only the non-zero pages allocated. Every chunk is
//! verified against memory.bin's checksums while it is copied. Staging runs
//! under an exclusive lock on `<file>.lock`, into a temporary file renamed
//! into place, so clones starting together stage it once and a crash
//! leaves no half file under the final name.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::memory_file::{MemoryFile, MemoryFileError, CHUNK_SIZE, PAGE_SIZE};

/// Errors staging a snapshot's memory.
#[derive(Debug, thiserror::Error)]
pub enum SharedMemoryError {
    /// memory.bin is unreadable or corrupt.
    #[error(transparent)]
    Source(#[from] MemoryFileError),
    /// The staging directory is not on tmpfs.
    #[error("{0} is not on tmpfs: clones share memory through a tmpfs file (set SNAPVM_SHARED_DIR to a directory under /dev/shm)")]
    NotTmpfs(PathBuf),
    /// The staging directory or file could not be written.
    #[error("cannot {what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl Fn(std::io::Error) -> SharedMemoryError + 'a {
    move |source| SharedMemoryError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Where the memory of snapshot `id` (stored in `memory_bin`) is staged
/// under `dir`: one file per snapshot file (its device and inode tell two
/// copies of a VM directory apart).
pub fn staged_path(dir: &Path, id: &str, memory_bin: &Path) -> Result<PathBuf, SharedMemoryError> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(memory_bin).map_err(io("read", memory_bin))?;
    Ok(dir.join(format!("{id}-{:x}-{:x}.mem", m.dev(), m.ino())))
}

/// Whether `dir` is on tmpfs (shmem), the only file memory a private
/// mapping of which userfaultfd can write-protect.
pub fn on_tmpfs(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    const TMPFS_MAGIC: libc::c_long = 0x0102_1994;
    let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: an all-zero statfs is a valid buffer for statfs to fill.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` a valid statfs.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as libc::c_long == TMPFS_MAGIC }
}

/// Stages `memory_bin` at `dest` unless it is there already; returns
/// whether it staged it (false: another clone did earlier).
pub fn stage(memory_bin: &Path, dest: &Path) -> Result<bool, SharedMemoryError> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io("create", dir))?;
    if !on_tmpfs(dir) {
        return Err(SharedMemoryError::NotTmpfs(dir.to_path_buf()));
    }
    let lock_path = dest.with_extension("lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(io("open", &lock_path))?;
    // SAFETY: flock on a descriptor we own; released when `lock` closes.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
        return Err(io("lock", &lock_path)(std::io::Error::last_os_error()));
    }
    if dest.exists() {
        return Ok(false);
    }
    let source = MemoryFile::open(memory_bin)?;
    let tmp = dest.with_extension("partial");
    let out = File::create(&tmp).map_err(io("create", &tmp))?;
    let result = (|| {
        let end = source
            .regions()
            .iter()
            .map(|&(start, size)| start + size)
            .max()
            .unwrap_or(0);
        out.set_len(end).map_err(io("size", &tmp))?;
        let mut buf = vec![0u8; CHUNK_SIZE as usize];
        for (i, (gpa, len)) in source.chunks().into_iter().enumerate() {
            let chunk = &mut buf[..len as usize];
            source.read_verified(i, gpa, chunk)?;
            for (p, page) in chunk.chunks(PAGE_SIZE as usize).enumerate() {
                if page.iter().any(|b| *b != 0) {
                    out.write_all_at(page, gpa + p as u64 * PAGE_SIZE)
                        .map_err(io("write", &tmp))?;
                }
            }
        }
        std::fs::rename(&tmp, dest).map_err(io("rename into place", dest))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map(|()| true)
}

/// Holes shorter than this between two data extents are mapped with them
/// (fewer mappings; a hole page costs a page only if something reads it).
const HOLE_MERGE: u64 = 1 << 20;

/// The data extents of `file` within `[start, end)` (SEEK_DATA/SEEK_HOLE),
/// neighbours closer than [`HOLE_MERGE`] joined.
fn data_extents(file: &File, start: u64, end: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let fd = file.as_raw_fd();
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut at = start;
    while at < end {
        // SAFETY: lseek on a descriptor we own.
        let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data past `at`
            }
            return Err(e);
        }
        let data = data as u64;
        if data >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        if hole < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let hole = (hole as u64).min(end);
        match out.last_mut() {
            Some(last) if data - last.1 < HOLE_MERGE => last.1 = hole,
            _ => out.push((data, hole)),
        }
        at = hole;
    }
    Ok(out)
}

/// Maps `staged` privately over guest RAM: within each region, every
/// extent of the staged file that holds data becomes a copy-on-write view
/// of it at the same guest address; holes stay anonymous memory (a read
/// of a tmpfs hole through a mapping would allocate a page in the shared
/// file, and a live snapshot reads every page). The write-protect
/// registration (for the VM's own live snapshots) is dropped around the
/// switch and made again. Guest memory must be unused and still empty (a
/// VM just created: vCPUs paused, KVM's memslots removed).
pub fn map_private(
    staged: &Path,
    regions: &[crate::live::GuestRegion],
    wp: &crate::write_protect::WriteProtector,
) -> Result<(), SharedMemoryError> {
    let file = File::open(staged).map_err(io("open", staged))?;
    let wp_err = |e: crate::write_protect::WriteProtectError| SharedMemoryError::Io {
        what: "register the mapping of",
        path: staged.to_path_buf(),
        source: std::io::Error::other(e.to_string()),
    };
    wp.unregister().map_err(wp_err)?;
    for r in regions {
        let extents = data_extents(&file, r.gpa, r.gpa + r.len as u64)
            .map_err(io("find the data of", staged))?;
        for (a, b) in extents {
            let offset = libc::off_t::try_from(a)
                .map_err(|_| io("map", staged)(std::io::Error::from_raw_os_error(libc::EINVAL)))?;
            let host = r.host + (a - r.gpa) as usize;
            // SAFETY: replaces part of the VM's own guest RAM range
            // (MAP_FIXED inside its existing anonymous mapping), which
            // nothing uses while the VM is paused and out of KVM.
            let p = unsafe {
                libc::mmap(
                    host as *mut libc::c_void,
                    (b - a) as usize,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_FIXED | libc::MAP_NORESERVE,
                    file.as_raw_fd(),
                    offset,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(io("map", staged)(std::io::Error::last_os_error()));
            }
        }
    }
    wp.reregister().map_err(wp_err)
}

/// Removes the staged memory of every snapshot `id` under `dir` (when the
/// snapshot is deleted).
pub fn remove_staged(dir: &Path, id: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        if name.to_string_lossy().starts_with(&format!("{id}-")) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory_file::{MemoryFileWriter, Region};

    #[test]
    fn staging_copies_the_pages_once_and_refuses_a_corrupt_file() {
        let t = crate::test_util::Tmp::new("shared-memory");
        let bin = t.0.join("memory.bin");
        let regions: [Region; 1] = [(0, 4 << 20)];
        let w = MemoryFileWriter::create(&bin, &regions).unwrap();
        w.write_at(&[7u8; 4096], 8192).unwrap();
        w.write_at(&[9u8; 4096], 3 << 20).unwrap();
        w.finish().unwrap();

        let shm = std::path::PathBuf::from(format!("/dev/shm/snapvm-test-{}", std::process::id()));
        let dest = staged_path(&shm, "abc", &bin).unwrap();
        assert!(matches!(
            stage(&bin, &t.0.join("not-tmpfs").join("x.mem")),
            Err(SharedMemoryError::NotTmpfs(_))
        ));
        assert!(stage(&bin, &dest).unwrap());
        assert!(!stage(&bin, &dest).unwrap(), "staged once");
        let staged = std::fs::read(&dest).unwrap();
        assert_eq!(staged.len(), 4 << 20);
        assert!(staged[8192..12288].iter().all(|b| *b == 7));
        assert!(staged[3 << 20..(3 << 20) + 4096].iter().all(|b| *b == 9));
        assert!(staged[..8192].iter().all(|b| *b == 0));
        let f = File::open(&dest).unwrap();
        assert_eq!(
            data_extents(&f, 0, 4 << 20).unwrap(),
            [(8192, 12288), (3 << 20, (3 << 20) + 4096)],
            "holes between pages further apart than a MiB stay holes"
        );
        remove_staged(dest.parent().unwrap(), "abc");
        assert!(!dest.exists());

        // A flipped byte in the page data: refused, nothing staged.
        let f = std::fs::OpenOptions::new().write(true).open(&bin).unwrap();
        f.write_all_at(&[1], 8200).unwrap();
        let e = stage(&bin, &dest).unwrap_err().to_string();
        assert!(e.contains("chunk 0"), "{e}");
        assert!(!dest.exists() && !dest.with_extension("partial").exists());
        let _ = std::fs::remove_dir_all(&shm);
    }
}
