//! Deleting snapshots and subtrees, with disk layers merged in the
//! background while the guest runs, and merges interrupted at every step.
//!
//! After every delete, every remaining snapshot must still hold exactly
//! what it held (its disk is compared with an export taken before any
//! delete), must apply and verify (the guest checks memory and disk
//! against each other), and every layer must pass `qemu-img check`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use snapvm_tests::{mount_tmpfs, run_with_timeout, snapvm_bin, Finished, TestVm, Unmount};

const T: Duration = Duration::from_secs(120);
/// memstamp on vCPUs 1-2, diskstamp on vCPU 0 over 4 MiB of the disk.
const LAB: &str = "workload=memstamp disk=1 blocks=1024 mem_mib=32 passes=0 rate=50";

fn ids(tree: &Value) -> Vec<String> {
    tree["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect()
}

fn snap<'a>(tree: &'a Value, id: &str) -> &'a Value {
    tree["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("{id} not in {tree}"))
}

/// Exported disks of each snapshot, taken before any delete.
struct Exports(HashMap<String, PathBuf>);

impl Exports {
    fn take(vm: &TestVm, ids: &[&str]) -> Self {
        let mut m = HashMap::new();
        for id in ids {
            let dest = vm.root.join(format!("export-{}", &id[..8]));
            vm.ok2(&["snapshot", "export"], &[id, dest.to_str().unwrap()]);
            let disk = std::fs::read_dir(dest.join("disks"))
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .next()
                .unwrap();
            m.insert(id.to_string(), disk);
        }
        Self(m)
    }
}

fn qemu_img(args: &[&str], files: &[&PathBuf]) -> Finished {
    let mut c = Command::new("qemu-img");
    c.args(args);
    for f in files {
        c.arg(f);
    }
    run_with_timeout(&mut c, T)
}

/// Every layer in disks/ passes `qemu-img check`; every remaining
/// snapshot's disk reads exactly like its export; nothing waits for a merge.
fn check_layers(vm: &TestVm, exports: &Exports) {
    // The working layer of a running guest changes under qemu-img's feet.
    let running = vm.status()["state"] == "running";
    if running {
        vm.ok(&["pause"]);
    }
    for e in std::fs::read_dir(vm.dir.join("disks")).unwrap().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "qcow2") {
            let r = qemu_img(&["check", "-q"], &[&p]);
            assert_eq!(r.code(), 0, "qemu-img check {}: {r:?}", p.display());
        }
    }
    let tree = vm.tree();
    for id in ids(&tree) {
        let Some(exported) = exports.0.get(&id) else {
            continue;
        };
        let layer = vm
            .dir
            .join(snap(&tree, &id)["disks"][0]["layer"].as_str().unwrap());
        let r = qemu_img(&["compare", "-f", "raw"], &[exported, &layer]);
        assert_eq!(
            r.code(),
            0,
            "snapshot {id}'s disk changed ({}): {r:?}",
            layer.display()
        );
    }
    if running {
        vm.ok(&["resume"]);
    }
}

/// Waits until no merge runs or waits (nothing retired, no journal).
fn wait_merged(vm: &TestVm) {
    let deadline = Instant::now() + T;
    loop {
        let t = vm.tree();
        let idle = vm.status()["merges"]["job"].is_null();
        if idle && t.get("merge").is_none() && t.get("retired").is_none() {
            return;
        }
        assert!(Instant::now() < deadline, "merges never finished: {t}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Applies every remaining snapshot (each is verified by the guest).
fn apply_all(vm: &TestVm) {
    let tree = vm.tree();
    for id in ids(&tree) {
        if snap(&tree, &id)["power_state"] == "paused" {
            let mark = vm.serial().len();
            let r = vm.ok2(&["snapshot", "apply"], &[&id]);
            assert!(r.stdout.contains("the VM is paused"), "{r:?}");
            vm.ok(&["resume"]);
            vm.wait_serial(mark, "workload=diskstamp gen=", 1, T);
            vm.wait_serial(mark, "vcpu=1 gen=", 1, T);
        } else {
            vm.apply_and_verify(&id, &[], T);
        }
    }
}

fn delete(vm: &TestVm, what: &[&str]) -> String {
    let r = vm.ok2(&["snapshot", "delete"], what);
    r.stdout
}

fn pause_a_little() {
    std::thread::sleep(Duration::from_millis(600));
}

#[test]
fn deletes_in_chains_and_branches_keep_everything_else_intact() {
    let vm = TestVm::create("mergelab", LAB, "128M", 3, 8);
    vm.ok(&["start"]);
    vm.wait_serial(0, "workload=diskstamp gen=1", 1, T);
    let a = vm.take("A");
    pause_a_little();
    let b = vm.take("B");
    pause_a_little();
    let c = vm.take("C");
    pause_a_little();
    let d = vm.take("D");
    vm.apply_and_verify(&b, &[], T);
    pause_a_little();
    let e = vm.take("E");
    pause_a_little();
    // A - B - C - D
    //      \- E - Now
    let exports = Exports::take(&vm, &[&a, &b, &c, &d, &e]);
    check_layers(&vm, &exports);

    // The middle of a chain: D now hangs under B.
    let out = delete(&vm, &[&c]);
    assert!(
        out.contains("deleted snapshot") && out.contains("merged 1"),
        "{out}"
    );
    let t = vm.tree();
    assert_eq!(ids(&t), [a.clone(), b.clone(), d.clone(), e.clone()]);
    assert_eq!(snap(&t, &d)["parent"], b.as_str());
    assert!(!vm.root.join("vm/snapshots").join(&c).exists());
    check_layers(&vm, &exports);

    // A leaf away from Now: its layer has nothing on it and goes.
    let before = std::fs::read_dir(vm.dir.join("disks")).unwrap().count();
    let out = delete(&vm, &[&d]);
    assert!(out.contains("removed 1"), "{out}");
    assert_eq!(
        std::fs::read_dir(vm.dir.join("disks")).unwrap().count(),
        before - 1
    );
    check_layers(&vm, &exports);
    apply_all(&vm);
    check_layers(&vm, &exports);

    // The parent of Now: its layer merges into the running VM's working
    // layer while the guest keeps writing it; Now moves to B.
    vm.apply_and_verify(&e, &[], T);
    pause_a_little();
    let mark = vm.serial().len();
    let out = delete(&vm, &[&e]);
    assert!(out.contains("merged 1"), "{out}");
    assert_eq!(vm.tree()["now"], b.as_str());
    vm.wait_serial(mark, "workload=diskstamp gen=", 2, T);
    vm.wait_serial(mark, "vcpu=1 gen=", 2, T);
    check_layers(&vm, &exports);
    // What the guest wrote before and during the merge is still there:
    // a snapshot now and its apply verify against the guest's memory.
    let f = vm.take("F");
    vm.apply_and_verify(&f, &[], T);
    apply_all(&vm);
    check_layers(&vm, &exports);

    // A subtree while Now is elsewhere: B and F go, A stays.
    vm.apply_and_verify(&a, &[], T);
    pause_a_little();
    let g = vm.take("G");
    let out = delete(&vm, &["--subtree", &b]);
    assert!(out.contains(&b) && out.contains(&f), "{out}");
    let t = vm.tree();
    assert_eq!(ids(&t), [a.clone(), g.clone()]);
    assert_eq!(t["now"], g.as_str());
    check_layers(&vm, &exports);
    apply_all(&vm);

    // Everything but one: Now keeps running on top of A's layer.
    vm.apply_and_verify(&g, &[], T);
    pause_a_little();
    let h = vm.take("H");
    delete(&vm, &[&g]);
    delete(&vm, &[&h]);
    let t = vm.tree();
    assert_eq!(ids(&t).as_slice(), std::slice::from_ref(&a));
    assert_eq!(t["now"], a.as_str());
    wait_merged(&vm);
    // A's layer is the base image; on it only the working layer remains.
    let files: Vec<_> = std::fs::read_dir(vm.dir.join("disks"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(files.len(), 2, "base + working layer: {files:?}");
    check_layers(&vm, &exports);
    apply_all(&vm);
    assert_eq!(vm.serial().matches("TESTGUEST FAIL").count(), 0);

    // Powered off, the merge runs in the CLI.
    let i = vm.take("I");
    pause_a_little();
    let j = vm.take("J");
    vm.ok(&["stop"]);
    let out = delete(&vm, &[&i]);
    assert!(out.contains("merged 1"), "{out}");
    // (A fresh boot would find the disk already stamped: continue from J.)
    let mark = vm.serial().len();
    vm.ok2(&["snapshot", "apply"], &[&j]);
    vm.wait_serial(mark, "workload=diskstamp gen=", 1, T);
    vm.wait_serial(mark, "vcpu=1 gen=", 1, T);
    check_layers(&vm, &exports);
    apply_all(&vm);
}

fn vmm_pid(vm: &TestVm) -> i64 {
    vm.status()["pid"].as_i64().expect("the VMM runs")
}

fn start_with(vm: &TestVm, env: &[(&str, &str)]) {
    let mut c = Command::new(snapvm_bin());
    for (k, v) in env {
        c.env(k, v);
    }
    let r = run_with_timeout(c.arg("start").arg(&vm.dir), T);
    assert_eq!(r.code(), 0, "{r:?}");
}

/// A merge that runs out of space fails with a clear error and changes
/// nothing any snapshot reads; with room again it completes.
#[test]
fn full_disk_fails_the_merge_not_the_chain() {
    let root = std::env::temp_dir().join(format!("snapvm-t-mergefull-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    assert!(mount_tmpfs(&root, "768M"), "mounting a tmpfs needs root");
    let _guard = Unmount(root.clone());
    let vm = TestVm::create_in(&root, LAB, "128M", 3, 8);
    // A piece every 1.5 s: the disk is full long before the merge could end
    // (with 300 ms, a loaded machine once saw the merge finish first).
    let (vm, [a, b, c], exports) =
        build_chain(vm, &[("SNAPVM_TEST_MERGE_DELAY_MS", "1500")], false);
    // Paused, so that the guest's own writes do not meet the full disk.
    // D's layer holds what the guest wrote since C; the new working layer
    // holds nothing yet, so merging D's layer into it needs room.
    vm.ok(&["pause"]);
    let d = vm.take("D");
    let del = Command::new(snapvm_bin())
        .args(["snapshot", "delete"])
        .arg(&vm.dir)
        .arg(&d)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Fill the disk while the merge is between pieces.
    std::thread::sleep(Duration::from_millis(150));
    let _ = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "status=none"])
        .arg(format!("of={}", root.join("filler").display()))
        .stderr(std::process::Stdio::null())
        .status();
    let out = del.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("No space left on device"), "{stderr}");
    std::fs::remove_file(root.join("filler")).unwrap();
    let t = vm.tree();
    assert_eq!(ids(&t), [a.clone(), b.clone(), c.clone()]);
    assert!(t["retired"].as_array().is_some_and(|r| r.len() == 1), "{t}");
    check_layers(&vm, &exports);
    // Any later job (here an apply) lets the merge run again.
    apply_all(&vm);
    wait_merged(&vm);
    check_layers(&vm, &exports);
    apply_all(&vm);
}

/// A - B - C - Now, with B's layer holding a full diskstamp pass. With
/// `small_c`, the guest is paused between B and C, so C's layer is empty.
fn chain(tag: &str, env: &[(&str, &str)], small_c: bool) -> (TestVm, [String; 3], Exports) {
    build_chain(TestVm::create(tag, LAB, "128M", 3, 8), env, small_c)
}

fn build_chain(vm: TestVm, env: &[(&str, &str)], small_c: bool) -> (TestVm, [String; 3], Exports) {
    start_with(&vm, env);
    vm.wait_serial(0, "workload=diskstamp gen=1", 1, T);
    let a = vm.take("A");
    let mark = vm.serial().len();
    vm.wait_serial(mark, "workload=diskstamp gen=", 1, T);
    if small_c {
        vm.ok(&["pause"]);
    }
    let b = vm.take("B");
    if !small_c {
        vm.wait_serial(vm.serial().len(), "workload=diskstamp gen=", 1, T);
    }
    let c = vm.take("C");
    if small_c {
        vm.ok(&["resume"]);
    }
    let exports = Exports::take(&vm, &[&a, &b, &c]);
    (vm, [a, b, c], exports)
}

/// After a crash: start again (the merge is finished or redone), then
/// every snapshot applies and verifies and every layer is clean.
fn recovers(vm: &TestVm, exports: &Exports) {
    let deadline = Instant::now() + T;
    while vm.status()["state"] != "stopped" {
        assert!(Instant::now() < deadline, "the VMM did not go away");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Paused: a fresh boot of the guest would find its disk stamped.
    vm.ok2(&["start"], &["--paused"]);
    wait_merged(vm);
    let log = std::fs::read_to_string(vm.dir.join("logs/vmm.log")).unwrap_or_default();
    check_layers(vm, exports);
    apply_all(vm);
    check_layers(vm, exports);
    assert_eq!(vm.serial().matches("TESTGUEST FAIL").count(), 0, "{log}");
}

/// Live merges (into the running VM's working layer) aborted at each step,
/// as kill -9 would: copying, after journaling the switch, with the new
/// header half written.
#[test]
fn live_merge_interrupted_at_every_step() {
    for step in ["copying:2", "switching", "torn"] {
        let (vm, [a, b, c], exports) = chain(
            &format!("mergecrash-{}", step.replace(':', "")),
            &[("SNAPVM_TEST_MERGE_CRASH", step)],
            false,
        );
        // C is the parent of Now: its layer merges into the working layer.
        let r = vm.cli2(&["snapshot", "delete"], &[&c]);
        assert_ne!(r.code(), 0, "{step}: the VMM should have died: {r:?}");
        let t = vm.tree();
        assert_eq!(ids(&t), [a.clone(), b.clone()], "{step}");
        if step != "copying:2" {
            assert!(t["merge"]["phase"]["switching"].is_object(), "{step}: {t}");
        }
        recovers(&vm, &exports);
    }
}

/// A merge of a big layer into a small child (copied into the parent,
/// then renamed over the child) run by the CLI with the VM off, aborted
/// before and after the rename.
#[test]
fn offline_merge_interrupted_before_and_after_the_rename() {
    for step in ["renaming", "renamed"] {
        let (vm, [a, b, c], exports) =
            chain(&format!("mergeoff-{}", step.replace(':', "")), &[], true);
        vm.ok(&["stop"]);
        let r = run_with_timeout(
            Command::new(snapvm_bin())
                .env("SNAPVM_TEST_MERGE_CRASH", step)
                .args(["snapshot", "delete"])
                .arg(&vm.dir)
                .arg(&b),
            T,
        );
        assert!(
            !r.status.success() && r.stderr.contains("aborting at merge step"),
            "{step}: the CLI should have died: {r:?}"
        );
        let t = vm.tree();
        assert_eq!(ids(&t), [a.clone(), c.clone()], "{step}");
        assert_eq!(t["merge"]["direction"], "into-parent", "{step}: {t}");
        assert_eq!(t["merge"]["phase"], "renaming", "{step}: {t}");
        recovers(&vm, &exports);
    }
}

/// kill -9 of the VMM at several instants of a rate-limited live merge;
/// `status` shows the merge while it runs.
#[test]
fn kill_9_during_a_live_merge() {
    for (i, after) in [150u64, 450].into_iter().enumerate() {
        let (vm, [a, b, c], exports) = chain(
            &format!("mergekill{i}"),
            &[("SNAPVM_TEST_MERGE_DELAY_MS", "150")],
            false,
        );
        let out = vm.ok2(&["snapshot", "delete"], &["--no-wait", &c]).stdout;
        assert!(out.contains("runs in the background"), "{out}");
        std::thread::sleep(Duration::from_millis(after));
        if i == 0 {
            let s = vm.ok(&["status"]).stdout;
            assert!(s.contains("merge in progress"), "{s}");
        }
        kill_9(vmm_pid(&vm));
        assert_eq!(ids(&vm.tree()), [a.clone(), b.clone()]);
        recovers(&vm, &exports);
    }
}

/// A snapshot or apply while a merge runs interrupts the merge (the chain
/// intact), and the merge continues after it.
#[test]
fn snapshot_and_apply_during_a_merge() {
    let (vm, [a, b, c], exports) = chain(
        "mergeinterrupt",
        &[("SNAPVM_TEST_MERGE_DELAY_MS", "200")],
        false,
    );
    vm.ok2(&["snapshot", "delete"], &["--no-wait", &c]);
    std::thread::sleep(Duration::from_millis(250));
    let d = vm.take("D-during-merge");
    assert!(
        std::fs::read_to_string(vm.dir.join("logs/vmm.log"))
            .unwrap()
            .contains("merge interrupted"),
        "the snapshot interrupted the merge"
    );
    vm.apply_and_verify(&b, &[], T);
    wait_merged(&vm);
    assert_eq!(ids(&vm.tree()), [a.clone(), b.clone(), d.clone()]);
    check_layers(&vm, &exports);
    apply_all(&vm);
    check_layers(&vm, &exports);
}

/// A retired layer with two layers on it waits (and is shown waiting)
/// until one of them goes; then it merges.
#[test]
fn a_layer_with_two_children_waits_for_one() {
    let (vm, [a, b, c], mut exports) = chain("mergewait", &[], false);
    vm.apply_and_verify(&b, &[], T);
    pause_a_little();
    let e = vm.take("E");
    pause_a_little();
    exports.0.extend(Exports::take(&vm, &[&e]).0);
    // B's layer has C's and E's layers on it.
    let out = delete(&vm, &[&b]);
    assert!(
        out.contains("merged 0") && out.contains("1 layer(s) wait"),
        "{out}"
    );
    let list = vm.ok2(&["snapshot", "list"], &[]).stdout;
    assert!(list.contains("waits for a merge"), "{list}");
    let st = vm.ok(&["status"]).stdout;
    assert!(st.contains("waiting for a merge"), "{st}");
    check_layers(&vm, &exports);
    // Without C, C's layer goes and B's layer merges with E's.
    let out = delete(&vm, &[&c]);
    assert!(
        out.contains("merged 1") && out.contains("removed 1"),
        "{out}"
    );
    assert!(vm.tree().get("retired").is_none());
    assert_eq!(ids(&vm.tree()), [a.clone(), e.clone()]);
    check_layers(&vm, &exports);
    apply_all(&vm);
}

fn kill_9(pid: i64) {
    let st = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

#[test]
fn bad_deletes_are_refused() {
    let (vm, [a, _, _], _) = chain("mergebad", &[("SNAPVM_TEST_STREAM_DELAY_MS", "40")], false);
    let r = vm.cli2(&["snapshot", "delete"], &["nonexistent"]);
    assert_eq!(r.code(), 1);
    assert!(
        r.stderr.contains("no snapshot matches 'nonexistent'"),
        "{r:?}"
    );
    // While an apply runs (slowed by saving the current state first).
    let mut apply = Command::new(snapvm_bin());
    apply
        .args(["snapshot", "apply"])
        .arg(&vm.dir)
        .args([&a, "--save-current"]);
    let mut child = apply
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + T;
    while !jobs_running(&vm) {
        assert!(Instant::now() < deadline, "the apply job never showed up");
        std::thread::sleep(Duration::from_millis(20));
    }
    let r = vm.cli2(&["snapshot", "delete"], &[&a]);
    assert_eq!(r.code(), 1, "{r:?}");
    assert!(
        r.stderr.contains("snapshot-apply job") && r.stderr.contains("still running"),
        "{r:?}"
    );
    assert!(child.wait().unwrap().success());
    assert!(ids(&vm.tree()).contains(&a), "nothing was deleted");
}

/// Whether the VMM has an apply job running.
fn jobs_running(vm: &TestVm) -> bool {
    let sock = vm.dir.join("run/api.sock");
    let out = Command::new("curl")
        .args(["-s", "--unix-socket"])
        .arg(&sock)
        .arg("http://localhost/jobs")
        .output()
        .unwrap();
    let jobs: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    jobs.as_array()
        .into_iter()
        .flatten()
        .any(|j| j["kind"] == "snapshot-apply" && j["state"] == "running")
}
