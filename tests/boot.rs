//! Booting the test guest through `snapvm run`.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use snapvm_tests::{field, run_guest, snapvm_bin, testguest, Watched};

const T: Duration = Duration::from_secs(60);

/// Checks a finished memstamp run: every vCPU passed every generation.
fn assert_memstamp(vcpus: u32, passes: u32, mem_mib: u32) {
    let r = run_guest(
        &format!("workload=memstamp mem_mib={mem_mib} passes={passes} seed=7"),
        vcpus,
        "256M",
        T,
    );
    assert_eq!(r.code(), 0, "memstamp must verify: {r:?}");
    assert!(r.lines_with("TESTGUEST FAIL").is_empty(), "{r:?}");
    let ready = r.lines_with("TESTGUEST READY");
    assert_eq!(ready.len(), 1, "{r:?}");
    assert_eq!(field(ready[0], "vcpus"), Some(vcpus.to_string().as_str()));
    let mut seen = BTreeSet::new();
    let mut pages = 0u64;
    for l in r.lines_with("TESTGUEST PASS") {
        let v: u32 = field(l, "vcpu").unwrap().parse().unwrap();
        let g: u32 = field(l, "gen").unwrap().parse().unwrap();
        if g == 1 {
            pages += field(l, "pages").unwrap().parse::<u64>().unwrap();
        }
        assert!(seen.insert((v, g)), "duplicate PASS {l}");
    }
    let want: BTreeSet<_> = (0..vcpus)
        .flat_map(|v| (1..=passes).map(move |g| (v, g)))
        .collect();
    assert_eq!(seen, want, "{r:?}");
    assert_eq!(
        pages,
        mem_mib as u64 * 256,
        "the vCPUs cover the whole area"
    );
    assert_eq!(r.lines_with("TESTGUEST DONE status=0").len(), 1);
}

#[test]
fn memstamp_passes_on_one_vcpu() {
    assert_memstamp(1, 3, 64);
}

#[test]
fn memstamp_passes_on_two_vcpus() {
    assert_memstamp(2, 3, 128);
}

#[test]
fn idle_reaches_ready_and_ctrl_c_stops_cleanly() {
    let mut w = Watched::spawn(
        Command::new(snapvm_bin())
            .arg("run")
            .arg("--kernel")
            .arg(testguest())
            .args(["--cmdline", "workload=idle", "--vcpus", "2"]),
    );
    let ready = w.wait_for("TESTGUEST READY", T).expect("READY line");
    assert_eq!(field(&ready, "vcpus"), Some("2"));
    assert_eq!(field(&ready, "workload"), Some("idle"));
    // An idle guest keeps running until told otherwise.
    assert!(
        w.wait(Duration::from_millis(300)).is_none(),
        "an idle guest must not exit by itself"
    );
}

#[test]
fn ctrl_c_stops_a_running_guest() {
    let mut w = Watched::spawn(
        Command::new(snapvm_bin())
            .arg("run")
            .arg("--kernel")
            .arg(testguest())
            .args(["--cmdline", "workload=idle", "--vcpus", "2"]),
    );
    w.wait_for("TESTGUEST READY", T).expect("READY line");
    w.signal(libc::SIGINT);
    let status = w
        .wait(Duration::from_secs(10))
        .expect("snapvm stops on SIGINT");
    assert_eq!(status.code(), Some(130));
    let err = w.stderr();
    assert!(err.contains("stopped by signal 2"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn guest_crash_is_reported_with_nonzero_status() {
    let r = run_guest("workload=crash", 2, "64M", T);
    assert_eq!(r.code(), 3, "{r:?}");
    let fail = r.lines_with("TESTGUEST FAIL");
    assert_eq!(fail.len(), 1, "{r:?}");
    assert_eq!(field(fail[0], "exception"), Some("14(#PF)"));
    assert_eq!(field(fail[0], "cr2"), Some("0x7fff00000000"));
    assert_eq!(field(fail[0], "cpl"), Some("3"));
    assert!(r.stderr.contains("guest exited with status 3"), "{r:?}");
}

#[test]
fn int3_and_fwait_in_ring0_are_recovered() {
    let r = run_guest("workload=emulation", 1, "64M", T);
    assert_eq!(r.code(), 0, "{r:?}");
    let pass = r.lines_with("TESTGUEST PASS");
    assert_eq!(pass.len(), 1, "{r:?}");
    assert_eq!(
        field(pass[0], "breakpoints"),
        Some("1"),
        "#BP reached the guest once"
    );
}

#[test]
fn emulation_failure_reports_rip_and_bytes() {
    let r = run_guest("workload=emulation probe=cmpxchg16b", 1, "64M", T);
    assert_eq!(r.code(), 1, "{r:?}");
    let err: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(err.len(), 1, "one line: {r:?}");
    assert!(
        err[0].starts_with("snapvm: error: vCPU 0: KVM cannot emulate"),
        "{r:?}"
    );
    assert!(err[0].contains("rip 0x"), "{r:?}");
    // lock cmpxchg16b (%rsi)
    assert!(err[0].contains("bytes f0 48 0f c7 0e"), "{r:?}");
}

#[test]
fn bad_guest_arguments_fail_in_the_guest() {
    let r = run_guest("workload=memstamp mem_mib=1024", 1, "64M", T);
    assert_eq!(r.code(), 2, "{r:?}");
    assert!(r.stdout.contains("does not fit"), "{r:?}");
}
