//! Guest-memory write protection with userfaultfd.
//!
//! Guest RAM is registered in write-protect mode when the VM is created. The
//! userfaultfd is created *without* "user mode only", because the writes that
//! matter come from KVM on behalf of the guest (kernel-mode accesses), and it
//! asks for `UFFD_FEATURE_WP_UNPOPULATED` so that pages the guest never
//! touched are protected too.

use std::os::fd::{AsRawFd, RawFd};

use userfaultfd::{FeatureFlags, IoctlFlags, RegisterMode, Uffd, UffdBuilder};

/// `UFFD_FEATURE_WP_UNPOPULATED` (Linux 6.4); the crate has no name for it.
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;

/// Errors of write-protect tracking.
#[derive(Debug, thiserror::Error)]
pub enum WriteProtectError {
    /// The userfaultfd could not be created or lacks a required feature.
    #[error(
        "cannot create a write-protect userfaultfd (needs Linux >= 6.4 with \
         UFFD_FEATURE_PAGEFAULT_FLAG_WP and WP_UNPOPULATED, and permission for \
         kernel-mode faults, e.g. root or vm.unprivileged_userfaultfd=1): {0}"
    )]
    Create(userfaultfd::Error),
    /// Registering a memory range failed.
    #[error("cannot register guest memory {addr:#x}+{len:#x} for write-protect: {source}")]
    Register {
        /// Host address of the range.
        addr: usize,
        /// Length of the range.
        len: usize,
        /// The underlying error.
        source: userfaultfd::Error,
    },
    /// The kernel accepted the range but not the write-protect ioctl.
    #[error("guest memory {addr:#x}+{len:#x} does not support UFFDIO_WRITEPROTECT")]
    NoWriteProtect {
        /// Host address of the range.
        addr: usize,
        /// Length of the range.
        len: usize,
    },
    /// (Un)protecting a range failed.
    #[error("cannot change write protection of {addr:#x}+{len:#x}: {source}")]
    Protect {
        /// Host address of the range.
        addr: usize,
        /// Length of the range.
        len: usize,
        /// The underlying error.
        source: userfaultfd::Error,
    },
}

/// A host memory range (address, length) registered for write tracking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostRange {
    /// Start address in this process.
    pub addr: usize,
    /// Length in bytes.
    pub len: usize,
}

/// Guest memory registered with a write-protect userfaultfd.
pub struct WriteProtector {
    uffd: Uffd,
    ranges: Vec<HostRange>,
}

impl WriteProtector {
    /// Creates the userfaultfd and registers every range in write-protect
    /// mode. Nothing is protected yet.
    pub fn new(ranges: &[HostRange]) -> Result<Self, WriteProtectError> {
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .require_features(
                FeatureFlags::PAGEFAULT_FLAG_WP
                    | FeatureFlags::from_bits_retain(UFFD_FEATURE_WP_UNPOPULATED),
            )
            .create()
            .map_err(WriteProtectError::Create)?;
        for r in ranges {
            let ioctls = uffd
                .register_with_mode(r.addr as *mut _, r.len, RegisterMode::WRITE_PROTECT)
                .map_err(|source| WriteProtectError::Register {
                    addr: r.addr,
                    len: r.len,
                    source,
                })?;
            if !ioctls.contains(IoctlFlags::WRITE_PROTECT) {
                return Err(WriteProtectError::NoWriteProtect {
                    addr: r.addr,
                    len: r.len,
                });
            }
        }
        Ok(Self {
            uffd,
            ranges: ranges.to_vec(),
        })
    }

    /// Stops tracking the ranges (a lazy memory load registers them with
    /// its own userfaultfd meanwhile).
    pub fn unregister(&self) -> Result<(), WriteProtectError> {
        for r in &self.ranges {
            self.uffd
                .unregister(r.addr as *mut _, r.len)
                .map_err(|source| WriteProtectError::Register {
                    addr: r.addr,
                    len: r.len,
                    source,
                })?;
        }
        Ok(())
    }

    /// Registers the ranges again after [`WriteProtector::unregister`].
    pub fn reregister(&self) -> Result<(), WriteProtectError> {
        for r in &self.ranges {
            self.uffd
                .register_with_mode(r.addr as *mut _, r.len, RegisterMode::WRITE_PROTECT)
                .map_err(|source| WriteProtectError::Register {
                    addr: r.addr,
                    len: r.len,
                    source,
                })?;
        }
        Ok(())
    }

    /// The registered ranges.
    pub fn ranges(&self) -> &[HostRange] {
        &self.ranges
    }

    /// The userfaultfd (for a fault-handler thread).
    pub fn uffd(&self) -> &Uffd {
        &self.uffd
    }

    /// Write-protects `[addr, addr + len)`.
    pub fn protect(&self, addr: usize, len: usize) -> Result<(), WriteProtectError> {
        self.uffd
            .write_protect(addr as *mut _, len)
            .map_err(|source| WriteProtectError::Protect { addr, len, source })
    }

    /// Removes write protection from `[addr, addr + len)` and wakes writers
    /// waiting on it.
    pub fn unprotect(&self, addr: usize, len: usize) -> Result<(), WriteProtectError> {
        self.uffd
            .remove_write_protection(addr as *mut _, len, true)
            .map_err(|source| WriteProtectError::Protect { addr, len, source })
    }
}

impl AsRawFd for WriteProtector {
    fn as_raw_fd(&self) -> RawFd {
        self.uffd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use userfaultfd::Event;

    use crate::test_util::Anon;

    /// A write to a protected page, including one never touched before,
    /// blocks until the handler has seen it and lifted the protection.
    #[test]
    fn protected_writes_fault_to_the_handler() {
        let mem = Anon::new(4 * 4096);
        let wp = Arc::new(
            WriteProtector::new(&[HostRange {
                addr: mem.addr,
                len: mem.len,
            }])
            .expect("userfaultfd write-protect (run as root on Linux >= 6.4)"),
        );
        // Page 0 populated, page 2 never touched.
        // SAFETY: inside the live mapping.
        unsafe { *(mem.addr as *mut u8) = 1 };
        wp.protect(mem.addr, mem.len).unwrap();

        let handled = Arc::new(AtomicBool::new(false));
        let (wp2, handled2) = (wp.clone(), handled.clone());
        let handler = std::thread::spawn(move || {
            let mut faults = vec![];
            while faults.len() < 2 {
                let mut pfd = libc::pollfd {
                    fd: wp2.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                unsafe { libc::poll(&mut pfd, 1, 5000) };
                if let Some(Event::Pagefault { addr, .. }) = wp2.uffd().read_event().unwrap() {
                    let page = addr as usize & !4095;
                    faults.push(page);
                    handled2.store(true, Ordering::SeqCst);
                    wp2.unprotect(page, 4096).unwrap();
                }
            }
            faults
        });
        let addr = mem.addr;
        let writer = std::thread::spawn(move || {
            // SAFETY: inside the live mapping (kept alive until join).
            unsafe {
                *(addr as *mut u8) = 2;
                *((addr + 2 * 4096) as *mut u8) = 3;
            }
        });
        writer.join().unwrap();
        assert!(handled.load(Ordering::SeqCst));
        let mut faults = handler.join().unwrap();
        faults.sort();
        assert_eq!(faults, vec![mem.addr, mem.addr + 2 * 4096]);
        // SAFETY: inside the live mapping.
        unsafe {
            assert_eq!(*(mem.addr as *const u8), 2);
            assert_eq!(*((mem.addr + 2 * 4096) as *const u8), 3);
        }
    }
}
