//! The snapvm snapshot engine, independent of KVM where possible.
//!
//! So far: guest-memory write tracking with userfaultfd write-protect
//! ([`write_protect`]), registered when a VM is created so that live
//! snapshots can protect memory without re-registering it.

pub mod atomic_file;
pub mod chunk_crc;
pub mod collapse;
pub mod disk;
pub mod lazy;
pub mod live;
pub mod memory_file;
pub mod merge;
pub mod populated;
pub mod priority;
pub mod qcow2_header;
pub mod shared_memory;
pub mod state_file;
pub mod tree;
pub mod write_protect;

/// Test helpers shared by this crate's unit tests.
#[cfg(test)]
pub(crate) mod test_util {
    use std::path::PathBuf;

    /// A scratch directory, removed on drop.
    pub struct Tmp(pub PathBuf);

    impl Tmp {
        /// Creates an empty scratch directory named after `tag`, this
        /// process and this thread.
        pub fn new(tag: &str) -> Self {
            let p = std::env::temp_dir().join(format!(
                "snapvm-{tag}-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            Self(p)
        }
    }

    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// An anonymous private mapping, unmapped on drop.
    pub struct Anon {
        /// Start address.
        pub addr: usize,
        /// Length in bytes.
        pub len: usize,
    }

    impl Anon {
        /// Maps `len` bytes.
        pub fn new(len: usize) -> Self {
            // SAFETY: anonymous private mapping with no address hint; the
            // result is checked before use and unmapped in Drop.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            Self {
                addr: p as usize,
                len,
            }
        }
    }

    impl Drop for Anon {
        fn drop(&mut self) {
            // SAFETY: unmapping the mapping created in `new`.
            unsafe { libc::munmap(self.addr as *mut _, self.len) };
        }
    }
}
