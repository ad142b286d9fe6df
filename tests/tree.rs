//! The snapshot tree: apply (revert) in place, branches and "Now",
//! --save-current, powered-off snapshots, bad references.

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use snapvm_tests::{run_with_timeout, snapvm_bin, TestVm};

const T: Duration = Duration::from_secs(120);
const LAB: &str = "workload=memstamp disk=1 blocks=512 mem_mib=32 passes=0 rate=50";

fn take(vm: &TestVm, name: &str) -> String {
    vm.take(name)
}

fn apply_and_verify(vm: &TestVm, snap: &str, extra: &[&str]) -> String {
    vm.apply_and_verify(snap, extra, T)
}

fn parent_of(tree: &Value, id: &str) -> Value {
    tree["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .map(|s| s["parent"].clone())
        .unwrap_or_else(|| panic!("{id} not in {tree}"))
}

#[test]
fn lab_session_with_branches() {
    let vm = TestVm::create("lab", LAB, "128M", 3, 8);
    vm.ok(&["start"]);
    vm.wait_serial(0, "workload=diskstamp gen=1", 1, T);
    let a = take(&vm, "A");
    std::thread::sleep(Duration::from_millis(700));
    let b = take(&vm, "B");
    let t = vm.tree();
    assert_eq!(parent_of(&t, &b), Value::from(a.clone()));
    assert_eq!(t["now"], b);

    apply_and_verify(&vm, "A", &[]);
    assert_eq!(vm.tree()["now"], a, "Now moved under A");
    std::thread::sleep(Duration::from_millis(500));
    let c = take(&vm, "C");
    let t = vm.tree();
    assert_eq!(
        parent_of(&t, &c),
        Value::from(a.clone()),
        "C starts a branch from A"
    );
    assert_eq!(t["snapshots"].as_array().unwrap().len(), 3);

    apply_and_verify(&vm, &b, &[]);
    assert_eq!(vm.tree()["now"], b);
    apply_and_verify(&vm, &c[..8], &[]);
    assert_eq!(vm.tree()["now"], c);

    // --save-current keeps the pre-apply state reachable.
    let out = apply_and_verify(&vm, "A", &["--save-current", "kept"]);
    assert!(out.contains("saved the current state as snapshot"), "{out}");
    let t = vm.tree();
    let kept = t["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "kept")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        parent_of(&t, &kept),
        Value::from(c.clone()),
        "saved under the old Now"
    );
    assert_eq!(t["now"], a);
    apply_and_verify(&vm, "kept", &[]);

    let text = vm.ok2(&["snapshot", "list"], &["--tree"]).stdout;
    assert!(text.contains("Now"), "{text}");
    assert_eq!(text.lines().count(), 5, "4 snapshots and Now: {text}");
    assert_eq!(vm.serial().matches("TESTGUEST FAIL").count(), 0);
}

#[test]
fn powered_off_snapshot_applies_off_and_bad_references_are_refused() {
    let vm = TestVm::create(
        "applyoff",
        "workload=memstamp mem_mib=8 passes=0 rate=20",
        "64M",
        2,
        1,
    );
    let off = {
        let r = vm.ok2(&["snapshot", "create"], &["--name", "dup"]);
        r.stdout.split_whitespace().nth(1).unwrap().to_string()
    };
    // A VMM whose snapshots stream slowly, to catch one in progress.
    let r = run_with_timeout(
        Command::new(snapvm_bin())
            .env("SNAPVM_TEST_STREAM_DELAY_MS", "40")
            .arg("start")
            .arg(&vm.dir),
        T,
    );
    assert_eq!(r.code(), 0, "{r:?}");
    vm.wait_serial(0, "TESTGUEST PASS", 1, T);
    take(&vm, "dup");

    let r = vm.cli2(&["snapshot", "apply"], &["nonexistent"]);
    assert_eq!(r.code(), 1);
    assert!(
        r.stderr.contains("no snapshot matches 'nonexistent'"),
        "{r:?}"
    );
    let r = vm.cli2(&["snapshot", "apply"], &["dup"]);
    assert_eq!(r.code(), 1);
    assert!(
        r.stderr.contains("ambiguous") && r.stderr.contains(&off),
        "{r:?}"
    );

    // Apply while another job runs: refused, nothing changes.
    vm.ok2(&["snapshot", "create"], &["--no-wait", "--name", "slow"]);
    let r = vm.cli2(&["snapshot", "apply"], &[&off]);
    assert_eq!(r.code(), 1, "{r:?}");
    assert!(r.stderr.contains("is still running"), "{r:?}");
    assert_eq!(vm.status()["state"], "running");
    let deadline = std::time::Instant::now() + T;
    while !vm.tree()["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["name"] == "slow")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "slow snapshot never finished"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    // A powered-off snapshot applied to a running VM leaves it off.
    let r = vm.ok2(&["snapshot", "apply"], &[&off]);
    assert!(r.stdout.contains("the VM is stopped"), "{r:?}");
    assert_eq!(vm.status()["state"], "stopped");
    assert_eq!(vm.tree()["now"], off);
}

#[test]
fn export_is_a_standalone_vm_that_verifies() {
    let vm = TestVm::create("export", LAB, "128M", 3, 8);
    vm.ok(&["start"]);
    vm.wait_serial(0, "workload=diskstamp gen=1", 1, T);
    let id = take(&vm, "to-export");
    let dest = vm.root.join("exported");
    let r = vm.ok2(
        &["snapshot", "export"],
        &["to-export", dest.to_str().unwrap()],
    );
    assert!(r.stdout.contains("--from"), "{r:?}");
    let again = vm.cli2(
        &["snapshot", "export"],
        &["to-export", dest.to_str().unwrap()],
    );
    assert_eq!(again.code(), 1);
    assert!(again.stderr.contains("already holds a VM"), "{again:?}");
    vm.ok(&["stop"]);

    // The flattened disk reads like the snapshot's layer chain.
    let layer = vm.dir.join(
        vm.tree()["snapshots"][0]["disks"][0]["layer"]
            .as_str()
            .unwrap(),
    );
    let c = run_with_timeout(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw"])
            .arg(dest.join("disks/disk0.raw"))
            .arg(&layer),
        T,
    );
    assert_eq!(c.code(), 0, "{c:?}");

    // Nothing of the original is needed any more.
    std::fs::remove_dir_all(&vm.dir).unwrap();
    let exported = TestVm {
        dir: dest.clone(),
        root: vm.root.join("exported-root"),
    };
    exported.ok2(&["start"], &["--from", &id[..8]]);
    exported.wait_serial(0, "workload=diskstamp gen=", 1, T);
    exported.wait_serial(0, "vcpu=1 gen=", 1, T);
    exported.ok(&["stop"]);
}

/// Apply loads memory lazily; a snapshot taken right after, while pages are
/// still arriving, must hold exactly the applied state, and applying again
/// in the middle of a load must work.
#[test]
fn snapshot_and_apply_during_a_lazy_load() {
    let vm = TestVm::create(
        "lazy",
        "workload=memstamp disk=1 blocks=512 mem_mib=256 passes=0 rate=100",
        "384M",
        3,
        8,
    );
    vm.ok(&["start"]);
    vm.wait_serial(0, "vcpu=1 gen=2", 1, T);
    let a = take(&vm, "A");
    std::thread::sleep(Duration::from_millis(300));
    let b = take(&vm, "B");
    // Apply A and, at once, snapshot (load still in progress) and apply B.
    vm.ok2(&["snapshot", "apply"], &[&a]);
    let c = take(&vm, "C-during-load");
    vm.ok2(&["snapshot", "apply"], &[&b]);
    vm.ok2(&["snapshot", "apply"], &[&a]);
    vm.ok2(&["snapshot", "apply"], &[&c]);
    // The load runs on in the background and status says so until done.
    let deadline = std::time::Instant::now() + T;
    while !vm.status()["memory_load"].is_null() {
        assert!(
            std::time::Instant::now() < deadline,
            "the memory load never completed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mark = vm.serial().len();
    vm.wait_serial(mark, "workload=diskstamp gen=", 1, T);
    vm.wait_serial(mark, "vcpu=2 gen=", 2, T);
    assert_eq!(vm.serial().matches("TESTGUEST FAIL").count(), 0);
    let log = std::fs::read_to_string(vm.dir.join("logs/vmm.log")).unwrap();
    assert!(log.contains("lazy memory load complete"), "{log}");
}

/// Round after round: apply, take a snapshot while that apply's memory
/// still loads, apply the new snapshot as soon as it is written; the guest
/// verifies memory and disk every time. This is the lab pattern that broke
/// on the kvm_pvm backend while vCPU threads floated between host CPUs and
/// guest RAM was on huge pages (about one round in eight: the guest read
/// and wrote pages the apply had replaced), before the fixes listed in
/// vmm/src/machine/backend_quirks.rs; `SNAPVM_TEST_PIN_VCPUS=off|on|auto`
/// and `SNAPVM_TEST_HUGE_PAGES=on|off|auto` choose the configuration.
#[test]
fn snapshots_taken_during_a_lazy_load_apply_and_verify_round_after_round() {
    let vm = TestVm::create("lazyrounds", LAB, "128M", 3, 8);
    let toml = vm.dir.join("vm.toml");
    let mut text = std::fs::read_to_string(&toml).unwrap();
    for (key, var) in [
        ("pin_vcpus", "SNAPVM_TEST_PIN_VCPUS"),
        ("huge_pages", "SNAPVM_TEST_HUGE_PAGES"),
    ] {
        let value = std::env::var(var).unwrap_or_else(|_| "auto".into());
        text = text.replace(
            &format!("{key} = \"auto\""),
            &format!("{key} = \"{value}\""),
        );
    }
    std::fs::write(&toml, text).unwrap();
    vm.ok(&["start"]);
    vm.wait_serial(0, "workload=diskstamp gen=1", 1, T);
    let base = take(&vm, "base");
    for round in 0..10u64 {
        vm.ok2(&["snapshot", "apply"], &[&base]);
        // Somewhere in the load (128 MiB take 2-4 s in a debug build).
        std::thread::sleep(Duration::from_millis(150 * round));
        let s = take(&vm, &format!("round{round}"));
        apply_and_verify(&vm, &s, &[]);
        vm.ok2(&["snapshot", "delete"], &[&s]);
    }
    assert_eq!(vm.serial().matches("TESTGUEST FAIL").count(), 0);
}

/// A chunk of memory.bin that fails its checksum while memory loads lazily
/// after an apply stops the VM with the reason, rather than letting the
/// guest run on wrong memory.
#[test]
fn corrupt_memory_found_during_a_lazy_load_stops_the_vm() {
    let vm = TestVm::create(
        "lazycorrupt",
        "workload=memstamp mem_mib=32 passes=0 rate=50",
        "128M",
        2,
        0,
    );
    vm.ok(&["start"]);
    vm.wait_serial(0, "TESTGUEST PASS", 1, T);
    let a = take(&vm, "A");
    // 100 MiB in: past what the guest uses, so the prefetch finds it.
    let mem = vm.dir.join("snapshots").join(&a).join("memory.bin");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&mem)
            .unwrap();
        let mut b = [0u8; 1];
        f.read_exact_at(&mut b, 100 << 20).unwrap();
        f.write_all_at(&[b[0] ^ 0xff], 100 << 20).unwrap();
    }
    // The apply itself may finish before the load reaches the chunk.
    let _ = vm.cli2(&["snapshot", "apply"], &[&a]);
    let deadline = std::time::Instant::now() + T;
    while vm.status()["state"] != "stopped" {
        assert!(
            std::time::Instant::now() < deadline,
            "the VM kept running on corrupt memory"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let outcome = vm.status()["last_exit"]["outcome"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        outcome.contains("could not be loaded")
            && outcome.contains("memory.bin")
            && outcome.contains("checksum mismatch")
            && outcome.matches("memory.bin").count() == 1,
        "{outcome}"
    );
}

#[test]
fn an_apply_that_fails_midway_stops_the_vm_instead_of_resuming_it() {
    let vm = TestVm::create("applyfail", LAB, "128M", 2, 64);
    vm.ok(&["start"]);
    vm.wait_serial(0, "workload=diskstamp gen=", 1, T);
    let a = take(&vm, "A");
    let b = take(&vm, "B");
    // B's vCPU 1 gets a CR0 with paging on and protection off, which KVM
    // refuses; the file stays well-formed (its checksum is redone), so the
    // apply only fails once it is loading vCPU state, after guest memory
    // was replaced.
    let state = vm.dir.join("snapshots").join(&b).join("state.bin");
    // state.bin (docs/formats.md): a list of component states; the vCPUs'
    // is the one with id "vcpus".
    let (version, payload) = snapshot::state_file::read(&state, 2).unwrap();
    assert_eq!(version, 2);
    let mut v: Value = snapshot::state_file::decode(&state, &payload).unwrap();
    let vcpus = v["components"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|c| c["id"] == "vcpus")
        .unwrap();
    const CR0_OFFSET: usize = 8 * 24 + 2 * 16; // kvm_sregs: 8 segments, 2 tables
    let cr0 = &mut vcpus["state"][1]["sregs"][CR0_OFFSET];
    let bit0 = cr0.as_u64().unwrap();
    assert_eq!(bit0 & 1, 1, "the guest runs in protected mode");
    *cr0 = Value::from(bit0 & !1);
    snapshot::state_file::write(&state, version, &v).unwrap();

    let r = vm.cli2(&["snapshot", "apply"], &[&b]);
    assert_ne!(r.code(), 0, "{r:?}");
    assert!(r.stderr.contains("special registers"), "{r:?}");
    let deadline = std::time::Instant::now() + T;
    while vm.status()["state"] != "stopped" {
        assert!(
            std::time::Instant::now() < deadline,
            "the VM was left to resume on a half-applied state: {}",
            vm.status()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let outcome = vm.status()["last_exit"]["outcome"].to_string();
    assert!(
        outcome.contains("stopped rather than resumed on a mix of two states")
            && outcome.contains("special registers"),
        "{outcome}"
    );
    // Nothing else is lost: "Now" still hangs under the snapshot it was
    // last at, and a good snapshot applies and verifies.
    assert_eq!(vm.tree()["now"], b);
    let mark = vm.serial().len();
    vm.ok2(&["snapshot", "apply"], &[&a]);
    let out = vm.wait_serial(mark, "workload=diskstamp gen=", 2, T);
    assert!(!out.contains("FAIL"), "{out}");
}
