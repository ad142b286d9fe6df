//! Scheduling priority for threads that vCPUs wait on.
//!
//! A vCPU that writes a write-protected page during a live snapshot stops
//! until the fault handler has copied the page and released it. On a host
//! with fewer CPUs than busy threads (2 here: two vCPUs running the guest,
//! the snapshot writer, the handler), the handler woken by a fault often
//! waited behind a vCPU thread or the writer for its turn on a CPU: at
//! 1 GiB under memstamp a fault took 21 us at p50 and ~130 us at p99, and
//! with real-time priority 17 us and 60-70 us (nearly all of it in the
//! release ioctl, whose KVM side flushes the TLB of every running vCPU). It is safe for this thread: it sleeps in poll until a fault
//! comes and does a bounded amount of work per fault (one page), and the
//! kernel's real-time throttling caps it in any case.
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
}
