//! Scheduling priority for threads that vCPUs wait on, and for a live
//! snapshot's writer.
//!
//! A vCPU that writes a write-protected page during a live snapshot stops
//! until the fault handler has copied the page and released it. On a host
//! with fewer CPUs than busy threads (2 here: two vCPUs running the guest,
//! the snapshot writer, the handler), the handler woken by a fault often
//! waited behind a vCPU thread or the writer for its turn on a CPU: at
//! 1 GiB under memstamp a fault took 21 us at p50 and ~130 us at p99, and
//! with real-time priority 17 us and 60-70 us (nearly all of it in the
//! release ioctl, whose KVM side flushes the TLB of every running vCPU).
//! Real-time priority is safe for this thread: it sleeps in poll until a
//! fault comes and does a bounded amount of work per fault (one page), and
//! the kernel's real-time throttling caps it in any case.
//!
//! Written on libc: the thread-priority crates wrap these same two calls.

/// Gives the calling thread the lowest real-time priority (SCHED_FIFO 1),
/// so it runs ahead of the vCPU and worker threads. Without the privilege
/// (no CAP_SYS_NICE, RLIMIT_RTPRIO 0) the thread keeps its normal priority;
/// that is logged, not an error.
pub fn run_ahead_of_vcpus(what: &str) -> bool {
    let param = libc::sched_param { sched_priority: 1 };
    // SAFETY: pid 0 is the calling thread; `param` is a valid sched_param.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if rc != 0 {
        tracing::debug!(
            "{what}: keeps normal priority (SCHED_FIFO refused: {})",
            std::io::Error::last_os_error()
        );
        return false;
    }
    true
}

/// The nice value a live snapshot's writer streams at.
///
/// At the default (0) the writer shared two host CPUs with two vCPU
/// threads running the guest flat out and got about a third of them:
/// memory.bin streamed at ~850 MiB/s where dd writes ~1100. At -10 it
/// streamed at ~1550 MiB/s and the guest ran as fast during the snapshot
/// as before (memstamp during/before 0.85 against 0.82), since a shorter
/// stream also means fewer copy-before-write faults (1 GiB, `snapvm bench
/// snapshot --delete-files`, same session).
pub const WRITER_NICE: i32 = -10;

/// A nice value for the calling thread while this lives; the previous one
/// back when dropped.
pub struct Nice {
    previous: Option<i32>,
    /// Not Send: the value belongs to the thread that made the guard.
    _thread: std::marker::PhantomData<*const ()>,
}

impl Nice {
    /// Sets the calling thread's nice value to `nice`. Without the
    /// privilege to raise it (no CAP_SYS_NICE, RLIMIT_NICE) the thread
    /// keeps its own; that is logged, not an error.
    pub fn new(nice: i32, what: &str) -> Self {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() } as libc::id_t;
        // getpriority may return -1 as a value: errno tells.
        // SAFETY: errno is this thread's own.
        unsafe { *libc::__errno_location() = 0 };
        // SAFETY: PRIO_PROCESS with a thread id names this thread.
        let old = unsafe { libc::getpriority(libc::PRIO_PROCESS, tid) };
        // SAFETY: as above.
        if old == -1 && unsafe { *libc::__errno_location() } != 0 {
            return Self::unchanged(what);
        }
        // SAFETY: as above.
        if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) } != 0 {
            return Self::unchanged(what);
        }
        Self {
            previous: Some(old),
            _thread: std::marker::PhantomData,
        }
    }

    fn unchanged(what: &str) -> Self {
        tracing::debug!(
            "{what}: keeps its nice value ({})",
            std::io::Error::last_os_error()
        );
        Self {
            previous: None,
            _thread: std::marker::PhantomData,
        }
    }
}

impl Drop for Nice {
    fn drop(&mut self) {
        if let Some(old) = self.previous {
            // SAFETY: as in `new`, for the same thread (the guard is not Send).
            let tid = unsafe { libc::gettid() } as libc::id_t;
            // SAFETY: as above.
            if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, old) } != 0 {
                tracing::error!(
                    "cannot give a thread its nice value {old} back: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_gets_real_time_priority_where_allowed() {
        let (got, policy) = std::thread::spawn(|| {
            let got = run_ahead_of_vcpus("test");
            // SAFETY: querying the calling thread's policy.
            (got, unsafe { libc::sched_getscheduler(0) })
        })
        .join()
        .unwrap();
        // As root (CI) the call succeeds; either way the answer tells the truth.
        assert_eq!(got, policy == libc::SCHED_FIFO);
        // SAFETY: as above, for this thread, which was not changed.
        assert_ne!(unsafe { libc::sched_getscheduler(0) }, libc::SCHED_FIFO);
    }

    fn own_nice() -> i32 {
        // SAFETY: this thread's own priority.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
    }

    #[test]
    fn a_nice_value_lasts_as_long_as_its_guard() {
        std::thread::spawn(|| {
            let before = own_nice();
            let guard = Nice::new(WRITER_NICE, "test");
            if guard.previous.is_some() {
                assert_eq!(own_nice(), WRITER_NICE);
            } else {
                assert_eq!(own_nice(), before);
            }
            drop(guard);
            assert_eq!(own_nice(), before);
        })
        .join()
        .unwrap();
    }
}
