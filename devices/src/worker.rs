//! Device worker threads and the host CPUs they run on.
//!
//! A device starts its worker when the driver activates it, that is on the
//! vCPU thread that wrote DRIVER_OK. A thread inherits its creator's CPU
//! affinity, so where the VMM pins vCPU threads to one host CPU each
//! (docs/kvm-backend.md), a worker would be stuck on its vCPU's CPU and
//! wait for that vCPU's time slice on every request: a ping round trip went
//! from 0.1 ms to 4 ms at the 99th percentile. Workers therefore set their
//! own affinity to the set the VMM gives here (the CPUs left free by vCPUs,
//! or all it may use) before they serve anything.
//!
//! Written on libc like the vCPU pinning in vmm/src/machine/backend_quirks.rs.

use std::io;
use std::sync::Mutex;
use std::thread::JoinHandle;

static WORKER_CPUS: Mutex<Option<Vec<usize>>> = Mutex::new(None);

/// Sets the host CPUs device workers started from now on run on; `None`
/// leaves them the affinity of the thread that starts them.
pub fn set_worker_cpus(cpus: Option<Vec<usize>>) {
    *WORKER_CPUS.lock().unwrap_or_else(|e| e.into_inner()) = cpus;
}

/// The host CPUs device workers run on, if set.
pub fn worker_cpus() -> Option<Vec<usize>> {
    WORKER_CPUS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
}

fn set_current_affinity(cpus: &[usize]) -> io::Result<()> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus.iter().filter(|&&c| c < libc::CPU_SETSIZE as usize) {
        // SAFETY: `c` is below CPU_SETSIZE, inside the set.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: `set` is a valid cpu_set_t of the size passed; 0 is this thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Starts device worker `name` running `f` on the worker CPUs.
pub fn spawn<F>(name: &str, f: F) -> io::Result<JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    let cpus = worker_cpus();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            if let Some(cpus) = cpus.filter(|c| !c.is_empty()) {
                if let Err(e) = set_current_affinity(&cpus) {
                    tracing::warn!("device worker: cannot run on CPUs {cpus:?}: {e}");
                }
            }
            f()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn current() -> Vec<usize> {
        // SAFETY: an all-zero cpu_set_t is a valid empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid cpu_set_t of the size passed.
        let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
        assert_eq!(rc, 0);
        (0..libc::CPU_SETSIZE as usize)
            // SAFETY: `i` is below CPU_SETSIZE.
            .filter(|&i| unsafe { libc::CPU_ISSET(i, &set) })
            .collect()
    }

    #[test]
    fn a_worker_started_from_a_pinned_thread_runs_on_the_worker_cpus() {
        let all = current();
        let (first, last) = (all[0], *all.last().unwrap());
        set_worker_cpus(Some(all.clone()));
        let seen = std::thread::spawn(move || {
            // A thread pinned to one CPU, like a vCPU, starts the worker.
            set_current_affinity(&[first]).unwrap();
            let w = spawn("test-worker", move || {
                assert_eq!(current().last().copied(), Some(last));
            })
            .unwrap();
            w.join().is_ok()
        })
        .join()
        .unwrap();
        set_worker_cpus(None);
        assert!(seen, "the worker ran on {all:?}");
    }
}
