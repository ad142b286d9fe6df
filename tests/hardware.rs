//! Hardware that changes: memory, vCPUs and disks are changed while the VM
//! is off, snapshots keep the hardware they were taken with, and an apply
//! brings it back in place (the VMM rebuilds its VM, the guest verifies
//! memory and disks). Independent disks are never forked nor rewound; only
//! whether they are attached is captured.

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use snapvm_tests::TestVm;

const T: Duration = Duration::from_secs(120);
const GUEST: &str = "workload=memstamp disk=1 blocks=64 mem_mib=32 passes=0 rate=50";
const MARK: &[u8] = b"written after snapshot A";

fn disk_names(status: &Value) -> Vec<String> {
    status["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap().to_string())
        .collect()
}

fn zeroed(path: &Path, mib: u64) {
    std::fs::File::create(path)
        .unwrap()
        .set_len(mib << 20)
        .unwrap();
}

fn qemu_img_check(vm: &TestVm) {
    for e in std::fs::read_dir(vm.dir.join("disks")).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x == "qcow2") {
            let out = Command::new("qemu-img")
                .arg("check")
                .arg(e.path())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "qemu-img check {}: {}",
                e.path().display(),
                String::from_utf8_lossy(&out.stdout)
            );
        }
    }
}

/// Applies `snap` in place and waits until the guest verified memory on
/// `vcpu` and its disks after it, without a reboot.
fn apply_and_verify(vm: &TestVm, snap: &str, vcpu: u32) -> String {
    let pid = vm.status()["pid"].clone();
    let mark = vm.serial().len();
    let r = vm.ok2(&["snapshot", "apply"], &[snap]);
    assert!(r.stdout.contains("the VM is running"), "{r:?}");
    assert_eq!(vm.status()["pid"], pid, "applied inside the same VMM");
    let out = vm.wait_serial(mark, "workload=diskstamp gen=", 2, T);
    vm.wait_serial(mark, &format!("vcpu={vcpu} gen="), 1, T);
    assert!(!out.contains("READY"), "not rebooted: {out}");
    out
}

#[test]
fn apply_brings_back_the_hardware_of_its_snapshot() {
    let vm = TestVm::create("hw", &format!("{GUEST} disks=1"), "512M", 2, 8);
    // An independent disk, attached from the start: the guest (disks=1)
    // never touches it; the host writes it.
    let results = vm.root.join("results.raw");
    zeroed(&results, 4);
    let r = vm.ok2(
        &["disk", "attach"],
        &[
            results.to_str().unwrap(),
            "--name",
            "results",
            "--independent",
        ],
    );
    assert!(r.stdout.contains("independent"), "{r:?}");
    vm.ok(&["start"]);
    vm.wait_serial(0, "workload=diskstamp gen=", 1, T);
    vm.wait_serial(0, "vcpu=1 gen=", 1, T);
    let r = vm.ok2(&["snapshot", "create"], &["--name", "A"]);
    assert!(
        r.stdout
            .contains("disk results is independent: its data is not captured"),
        "{r:?}"
    );
    let a = r.stdout.split_whitespace().nth(1).unwrap().to_string();
    let in_vm = vm.dir.join("disks/results.raw");
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&in_vm)
        .unwrap();
    file.write_all_at(MARK, 0).unwrap();
    file.sync_all().unwrap();

    // Off: 1 GiB, 1 vCPU, a second stamped disk, the independent disk
    // detached. Changing memory while running is refused.
    let r = vm.cli2(&["config"], &["--memory", "1G"]);
    assert_eq!(r.code(), 1, "{r:?}");
    assert!(r.stderr.contains("is running"), "{r:?}");
    vm.ok(&["stop"]);
    vm.ok2(
        &["config"],
        &[
            "--memory",
            "1G",
            "--vcpus",
            "1",
            "--cmdline",
            &format!("{GUEST} disks=2 adopt=1"),
        ],
    );
    let disk1 = vm.root.join("disk1.raw");
    zeroed(&disk1, 8);
    vm.ok2(&["disk", "attach"], &[disk1.to_str().unwrap()]);
    vm.ok2(&["disk", "detach"], &["results"]);
    let shown: Value = serde_json::from_str(&vm.ok2(&["config"], &["--json"]).stdout).unwrap();
    assert_eq!(shown["memory_bytes"], 1u64 << 30);
    assert_eq!(shown["vcpus"], 1);
    assert_eq!(disk_names(&shown), ["disk0", "disk1"]);

    // A fresh boot on the new hardware stamps both disks on one vCPU (disk0
    // as the earlier run left it: adopt=1).
    let mark = vm.serial().len();
    vm.ok(&["start"]);
    let out = vm.wait_serial(mark, "disk=1", 1, T);
    assert!(out.contains("READY vcpus=1"), "{out}");
    vm.wait_serial(mark, "vcpu=0 gen=", 1, T);
    let b = vm.take("B");
    let show: Value = serde_json::from_str(&vm.ok2(&["snapshot", "show"], &[&a]).stdout).unwrap();
    let diffs = show["differences"].to_string();
    assert!(
        diffs.contains("memory: 512M, now 1G") && diffs.contains("vCPUs: 2, now 1"),
        "{show}"
    );
    assert_eq!(show["not_captured"], serde_json::json!(["results"]));
    qemu_img_check(&vm);

    // Apply A: 512 MiB, 2 vCPUs, disk0 and the independent disk again,
    // with what the host wrote after A (never rewound).
    apply_and_verify(&vm, &a, 1);
    let st = vm.status();
    assert_eq!(st["memory_bytes"], 512u64 << 20, "{st}");
    assert_eq!(st["vcpus"], 2, "{st}");
    assert_eq!(disk_names(&st), ["disk0", "results"]);
    assert_eq!(st["disks"][1]["independent"], true);
    let mut back = vec![0u8; MARK.len()];
    std::fs::File::open(&in_vm)
        .unwrap()
        .read_exact_at(&mut back, 0)
        .unwrap();
    assert_eq!(back, MARK, "the independent disk was not rewound");
    let cfg = std::fs::read_to_string(vm.dir.join("vm.toml")).unwrap();
    assert!(cfg.contains("memory = \"512M\""), "{cfg}");
    qemu_img_check(&vm);

    // Apply B: the newer hardware again, the independent disk detached.
    apply_and_verify(&vm, &b, 0);
    let st = vm.status();
    assert_eq!(st["memory_bytes"], 1u64 << 30, "{st}");
    assert_eq!(st["vcpus"], 1, "{st}");
    assert_eq!(disk_names(&st), ["disk0", "disk1"]);
    assert!(in_vm.is_file(), "a detached disk's file stays");
    // And A once more, from B's hardware, then a snapshot there.
    apply_and_verify(&vm, &a, 1);
    vm.take("C");
    qemu_img_check(&vm);

    // A disk detached by command stays in the snapshots that have it:
    // applying B to the VM, off and without disk1, brings disk1 back.
    vm.ok(&["stop"]);
    let r = vm.cli2(&["disk", "detach"], &["disk1"]);
    assert_eq!(r.code(), 1, "A's hardware has no disk1: {r:?}");
    vm.ok2(&["disk", "detach"], &["results"]);
    let mark = vm.serial().len();
    let r = vm.ok2(&["snapshot", "apply"], &[&b]);
    assert!(r.stdout.contains("the VM is running"), "{r:?}");
    assert_eq!(disk_names(&vm.status()), ["disk0", "disk1"]);
    let out = vm.wait_serial(mark, "disk=1", 1, T);
    assert!(!out.contains("READY"), "continued, not rebooted: {out}");
    qemu_img_check(&vm);
}

#[test]
fn hardware_changes_are_checked_and_change_nothing_when_refused() {
    let vm = TestVm::create("hwbad", "workload=idle", "64M", 1, 4);
    let before = std::fs::read(vm.dir.join("vm.toml")).unwrap();
    let disk0 = vm.dir.join("disks/disk0.raw");
    let disk0 = disk0.to_str().unwrap();
    let cases: [(&[&str], &[&str], &str); 8] = [
        (&["config"], &["--memory", "1K"], "too small"),
        (&["config"], &["--memory", "1M"], "too small"),
        (&["config"], &["--vcpus", "0"], "at least 1"),
        (&["config"], &["--vcpus", "255"], "above the limit of 254"),
        (&["config"], &["--kernel", "/nonexistent"], "/nonexistent"),
        (
            &["disk", "detach"],
            &["nope"],
            "has no disk 'nope' (its disks: disk0)",
        ),
        (
            &["disk", "attach"],
            &[disk0],
            "already attached as disk disk0",
        ),
        (
            &["disk", "attach"],
            &["/nonexistent.raw"],
            "/nonexistent.raw",
        ),
    ];
    for (cmd, more, want) in cases {
        let r = vm.cli2(cmd, more);
        assert_eq!(r.code(), 1, "{cmd:?} {more:?}: {r:?}");
        assert!(
            r.stderr.contains(want),
            "{more:?}: expected {want:?}: {r:?}"
        );
        assert_eq!(r.stderr.trim().lines().count(), 1, "one line: {r:?}");
        assert_eq!(
            std::fs::read(vm.dir.join("vm.toml")).unwrap(),
            before,
            "{cmd:?} {more:?} changed vm.toml"
        );
    }
    // `create` refuses what `start` would.
    let r = snapvm_tests::snapvm(&[
        "create",
        vm.root.join("other").to_str().unwrap(),
        "--kernel",
        snapvm_tests::testguest().to_str().unwrap(),
        "--memory",
        "1K",
    ]);
    assert_eq!(r.code(), 1, "{r:?}");
    assert!(r.stderr.contains("too small"), "{r:?}");
    assert!(!vm.root.join("other").exists());
}
