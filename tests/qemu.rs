//! The same test guest boots under QEMU (the side-by-side reference), which
//! checks that it is a standard PVH kernel rather than something only snapvm
//! can start.

use std::process::Command;
use std::time::Duration;

use snapvm_tests::{field, run_with_timeout, testguest};

fn qemu(cmdline: &str, smp: u32) -> snapvm_tests::Finished {
    run_with_timeout(
        Command::new("qemu-system-x86_64")
            .args(["-accel", "kvm", "-cpu", "qemu64,-cx16", "-M", "microvm"])
            .args(["-m", "256M", "-smp", &smp.to_string()])
            .args([
                "-nodefaults",
                "-no-user-config",
                "-nographic",
                "-serial",
                "stdio",
            ])
            .args(["-device", "isa-debug-exit,iobase=0x501,iosize=1"])
            .arg("-kernel")
            .arg(testguest())
            .args(["-append", cmdline]),
        Duration::from_secs(60),
    )
}

#[test]
fn test_guest_boots_under_qemu() {
    let r = qemu("workload=memstamp mem_mib=16 passes=2", 1);
    let ready = r.lines_with("TESTGUEST READY");
    assert_eq!(ready.len(), 1, "{r:?}");
    assert_eq!(field(ready[0], "vcpus"), Some("1"));
    assert_eq!(r.lines_with("TESTGUEST PASS").len(), 2, "{r:?}");
    // isa-debug-exit: QEMU exits with (status << 1) | 1.
    assert_eq!(r.code(), 1, "guest status 0: {r:?}");
}

#[test]
fn test_guest_starts_its_aps_under_qemu() {
    // microvm has no MP table: the vCPU count comes from the command line.
    let r = qemu("workload=memstamp mem_mib=16 passes=1 vcpus=2", 2);
    let ready = r.lines_with("TESTGUEST READY");
    assert_eq!(ready.len(), 1, "{r:?}");
    assert_eq!(field(ready[0], "vcpus"), Some("2"));
    assert_eq!(r.lines_with("TESTGUEST PASS").len(), 2, "{r:?}");
    assert_eq!(r.code(), 1, "{r:?}");
}
