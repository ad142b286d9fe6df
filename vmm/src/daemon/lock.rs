//! The lock of a VM directory (run/lock): one VMM per VM, and no start
//! while the CLI works on the files of a VM that is off. flock(2) dies
//! with its holder, so a killed VMM leaves no stale lock.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;

use super::DaemonError;
use crate::vmdir::VmDir;

/// Takes the VM's lock; fails if a live VMM holds it.
pub fn take(dir: &VmDir) -> Result<File, DaemonError> {
    let path = dir.lock_file();
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(super::io_err("open", &path))?;
    // `is_running` probes the lock with a brief shared lock: retry for a
    // moment so such a probe is not mistaken for a running VMM.
    let mut rc = -1;
    for _ in 0..20 {
        // SAFETY: flock on a descriptor we own; no memory is involved.
        rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    if rc != 0 {
        let pid = std::fs::read_to_string(dir.pid_file()).unwrap_or_else(|_| "unknown".into());
        return Err(DaemonError::AlreadyRunning {
            dir: dir.root().display().to_string(),
            pid: pid.trim().to_string(),
        });
    }
    Ok(f)
}

/// Takes the lock of a VM that is off, for work on its files (merges) that
/// must not overlap a start; fails if the VM runs.
pub fn lock_stopped(dir: &VmDir) -> Result<File, DaemonError> {
    std::fs::create_dir_all(dir.run_dir()).map_err(super::io_err("create", &dir.run_dir()))?;
    take(dir)
}

/// Whether a live VMM holds the VM's lock.
pub fn is_running(dir: &VmDir) -> bool {
    let Ok(f) = File::open(dir.lock_file()) else {
        return false;
    };
    // SAFETY: flock on a descriptor we own.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
    rc != 0
}
