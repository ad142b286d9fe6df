//! A hostile guest (the test guest's workload=hostile, guest-images/README.md):
//! every vCPU writes garbage to the virtio-mmio registers of a disk, a
//! read-only disk and a network adapter, sets queues up and hands them
//! descriptor chains pointing outside guest memory, storms notifications,
//! and writes random values to the serial, i8042 and generation ports.
//! The VMM must not crash, must keep answering its API, must take live
//! snapshots and continue from them, and the guest must reach its end.
//!
//! SNAPVM_HOSTILE_SEED and SNAPVM_HOSTILE_SECONDS choose another run (the
//! defaults are fixed, so CI repeats the same attack); a failure prints
//! the seed.

use std::time::{Duration, Instant};

use snapvm_tests::netns::Netns;
use snapvm_tests::vmfiles::qemu_img_check;
use snapvm_tests::{snapvm, TestVm};

const T: Duration = Duration::from_secs(120);

fn env_u64(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// `snapvm status --json` answers (within the CLI's own deadline).
fn api_answers(vm: &TestVm, context: &str) -> serde_json::Value {
    let r = vm.cli(&["status", "--json"]);
    assert_eq!(
        r.code(),
        0,
        "{context}: status did not answer: {r:?}\nvmm.log:\n{}",
        vm.vmm_log_tail(30)
    );
    serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{context}: {e}: {r:?}"))
}

/// Polls the API and takes a live snapshot every few seconds until the
/// guest's attack is over (the VM stops with the guest's exit); returns
/// the snapshots taken.
fn ride_out(vm: &TestVm, seconds: u64, context: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(seconds) + T;
    let mut snaps = Vec::new();
    let mut next_snap = Instant::now() + Duration::from_secs(2);
    let mut polls = 0u32;
    loop {
        let st = api_answers(vm, context);
        polls += 1;
        if st["state"] == "stopped" {
            break;
        }
        // "stopping": the guest has exited and the VMM is closing down.
        assert!(
            st["state"] == "running" || st["state"] == "stopping",
            "{context}: {st}"
        );
        if Instant::now() >= next_snap {
            let r = vm.cli2(&["snapshot", "create"], &["--name", "under-attack"]);
            // The guest may end between the status and the snapshot: then
            // the snapshot fails or is of a VM that is off (not kept).
            if r.code() == 0 && !r.stdout.contains("VM off") {
                snaps.push(r.stdout.split_whitespace().nth(1).unwrap().to_string());
            } else if r.code() != 0 {
                assert!(
                    api_answers(vm, context)["state"] != "running",
                    "{context}: a live snapshot of a running hostile guest failed: {r:?}\nvmm.log:\n{}",
                    vm.vmm_log_tail(30)
                );
            }
            next_snap = Instant::now() + Duration::from_secs(3);
        }
        assert!(
            Instant::now() < deadline,
            "{context}: the guest's {seconds} s attack did not end\n{}",
            vm.serial()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "{context}: the API answered {polls} polls, {} live snapshots",
        snaps.len()
    );
    snaps
}

/// The guest finished its attack and exited normally; the VMM logged no
/// panic.
fn guest_finished(vm: &TestVm, from: usize, context: &str) {
    let serial = vm.serial();
    let tail = serial.get(from..).unwrap_or("");
    assert!(
        !tail.contains("TESTGUEST FAIL"),
        "{context}: the guest found its memory changed by a device:\n{tail}"
    );
    assert!(
        tail.contains("TESTGUEST HOSTILE done") && tail.contains("TESTGUEST DONE status=0"),
        "{context}: the guest did not finish:\n{tail}\nvmm.log:\n{}",
        vm.vmm_log_tail(40)
    );
    let st = api_answers(vm, context);
    assert_eq!(
        st["last_exit"]["outcome"], "the guest exited with status 0",
        "{context}: {st}"
    );
    let log = std::fs::read_to_string(vm.dir.join("logs/vmm.log")).unwrap_or_default();
    assert!(!log.contains("panicked"), "{context}: vmm.log:\n{log}");
}

#[test]
fn a_hostile_guest_neither_crashes_nor_stalls_the_vmm() {
    let seed = env_u64("SNAPVM_HOSTILE_SEED", 21);
    let seconds = env_u64("SNAPVM_HOSTILE_SECONDS", 12);
    let context = format!("hostile guest, seed {seed} (SNAPVM_HOSTILE_SEED={seed} replays it)");
    eprintln!("{context}, {seconds} s");

    let ns = Netns::new("hostile");
    ns.bridge("br0", "10.93.0.1/24");
    ns.tap("tap0", "br0");
    let vm = TestVm::create(
        "hostile",
        &format!("workload=hostile seconds={seconds} seed={seed}"),
        "256M",
        4,
        32,
    );
    let ro = vm.root.join("readonly.raw");
    std::fs::File::create(&ro)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    vm.ok2(&["disk", "attach"], &[ro.to_str().unwrap(), "--readonly"]);
    vm.ok2(&["net", "attach"], &["--tap", "tap0"]);
    let dir = vm.dir.to_str().unwrap().to_string();

    let r = ns.snapvm(&["start", &dir]);
    assert_eq!(r.code(), 0, "{r:?}");
    let start = vm.wait_serial(0, "TESTGUEST HOSTILE start", 1, T);
    assert!(
        start.contains("devices=3"),
        "{context}: the guest attacks all three devices: {start}"
    );
    let snaps = ride_out(&vm, seconds, &context);
    guest_finished(&vm, 0, &context);
    assert!(
        !snaps.is_empty(),
        "{context}: no live snapshot was taken during the attack"
    );

    // Continue from the middle of the attack: device states saved while
    // the guest was writing garbage restore, and the attack goes on to its
    // end from there.
    let mid = &snaps[snaps.len() / 2];
    let mark = vm.serial().len();
    let r = ns.snapvm(&["start", &dir, "--from", mid]);
    assert_eq!(r.code(), 0, "{context}: start --from {mid}: {r:?}");
    ride_out(&vm, seconds, &context);
    guest_finished(&vm, mark, &format!("{context}, from snapshot {mid}"));
    assert!(
        !vm.serial()[mark..].contains("TESTGUEST READY"),
        "continued, not rebooted"
    );

    qemu_img_check(&vm.dir);
    let r = snapvm(&["snapshot", "list", &dir]);
    assert_eq!(r.code(), 0, "{r:?}");
    drop(ns);
}
