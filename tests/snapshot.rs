//! Live snapshots: taken while the guest runs (paused only briefly), exact
//! (the self-verifying guest continues after a restore), in every power
//! state, and safe when things go wrong.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use snapvm_tests::{mount_tmpfs, resize_tmpfs, run_with_timeout, snapvm, TestVm, Unmount};

const T: Duration = Duration::from_secs(120);

/// Takes a snapshot and returns (id, pause in µs).
fn take(vm: &TestVm, name: &str) -> (String, u64) {
    let r = vm.cli2(&["snapshot", "create"], &["--name", name]);
    assert_eq!(r.code(), 0, "{r:?}");
    let line = r
        .stdout
        .lines()
        .find(|l| l.starts_with("snapshot "))
        .unwrap_or_else(|| panic!("{r:?}"));
    let id = line.split_whitespace().nth(1).unwrap().to_string();
    let pause: u64 = line
        .split("paused ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no pause in {line}"));
    (id, pause)
}

fn snapshot_meta(vm: &TestVm, id: &str) -> Value {
    vm.tree()["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("{id} not in the tree"))
}

fn pass_count(s: &str, pattern: &str) -> usize {
    s.lines().filter(|l| l.contains(pattern)).count()
}

#[test]
fn live_snapshot_mid_pass_restores_exactly_in_a_new_vm() {
    let vm = TestVm::create(
        "live",
        "workload=memstamp mem_mib=256 passes=0 rate=200",
        "384M",
        2,
        0,
    );
    vm.ok(&["start"]);
    vm.wait_serial(0, "TESTGUEST PASS", 2, T);
    let (id, pause) = take(&vm, "mid-pass");
    assert!(pause > 0);
    let meta = snapshot_meta(&vm, &id);
    assert_eq!(meta["power_state"], "running");
    assert_eq!(meta["pause_us"], pause);
    assert!(
        meta["memory_bytes"].as_u64().unwrap() >= 200 << 20,
        "{meta}"
    );
    let sdir = vm.dir.join("snapshots").join(&id);
    for f in ["vm.toml", "state.bin", "memory.bin"] {
        assert!(sdir.join(f).is_file(), "{f}");
    }

    // The original keeps running and verifying.
    let mark = vm.serial().len();
    vm.wait_serial(mark, "TESTGUEST PASS", 4, T);
    assert_eq!(vm.status()["state"], "running");

    // The snapshot continues in a new VM, from the middle of its pass.
    let copy = vm.copy_to(&vm.root.join("copy"));
    let r = copy.cli2(&["start"], &["--from", &id]);
    assert_eq!(r.code(), 0, "{r:?}");
    let out = copy.wait_serial(0, "TESTGUEST PASS", 6, T);
    assert!(!out.contains("READY"), "restored, not rebooted: {out}");
    let tree = copy.tree();
    assert_eq!(tree["now"], id, "Now hangs under the restored snapshot");
    // Still verifying in the original too.
    let mark = vm.serial().len();
    vm.wait_serial(mark, "TESTGUEST PASS", 2, T);
}

/// A snapshot taken during the guest's first pass over its memory, when
/// most of it was never touched: those extents are recorded as zeroes and
/// not write-protected, and what the guest writes there after the instant
/// must not reach the snapshot. The first pass expects zeroes ahead of it
/// and its own stamps behind it, so the guest checks both after the apply.
#[test]
fn a_snapshot_in_the_first_pass_keeps_untouched_memory_zero() {
    let vm = TestVm::create(
        "firstpass",
        "workload=memstamp mem_mib=256 passes=0 rate=20",
        "320M",
        2,
        0,
    );
    vm.ok(&["start"]);
    vm.wait_serial(0, "TESTGUEST READY", 1, T);
    std::thread::sleep(Duration::from_millis(1500));
    let (id, _) = take(&vm, "first-pass");
    let log = std::fs::read_to_string(vm.dir.join("logs/vmm.log")).unwrap();
    let line = log
        .lines()
        .find(|l| l.contains(&format!("snapshot {id}: memory out")))
        .unwrap_or_else(|| panic!("no statistics line for {id}:\n{log}"));
    let never: u64 = line
        .split(" pages never touched")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    // 128 MiB per vCPU at 20 MiB/s: most of the 256 MiB is still ahead.
    assert!(never >= (64 << 20) / 4096, "{line}");
    // The first pass completes: the untouched memory is written now.
    let mark = vm.serial().len();
    vm.wait_serial(mark, "gen=1 ", 2, T);
    // Back to the instant: the guest goes on with its first pass and
    // finds zeroes ahead of it, then completes passes over all of it.
    let mark = vm.serial().len();
    let r = vm.cli2(&["snapshot", "apply"], &[&id]);
    assert_eq!(r.code(), 0, "{r:?}");
    let out = vm.wait_serial(mark, "TESTGUEST PASS vcpu=", 4, T);
    assert!(out.contains("gen=1 "), "the first pass went on: {out}");
    assert!(!out.contains("READY"), "not rebooted: {out}");
}

#[test]
fn ten_snapshots_in_a_row_each_restores() {
    let vm = TestVm::create(
        "ten",
        "workload=memstamp mem_mib=64 passes=0 rate=100",
        "128M",
        2,
        0,
    );
    vm.ok(&["start"]);
    vm.wait_serial(0, "TESTGUEST PASS", 2, T);
    let mut ids = vec![];
    for i in 0..10 {
        let (id, _) = take(&vm, &format!("s{i}"));
        ids.push(id);
        std::thread::sleep(Duration::from_millis(150));
    }
    let tree = vm.tree();
    let snaps = tree["snapshots"].as_array().unwrap();
    assert_eq!(snaps.len(), 10);
    for w in snaps.windows(2) {
        assert_eq!(w[1]["parent"], w[0]["id"], "a chain");
    }
    let mark = vm.serial().len();
    vm.wait_serial(mark, "TESTGUEST PASS", 2, T);
    vm.ok(&["stop"]);
    for id in &ids {
        let mark = vm.serial().len();
        let r = vm.cli2(&["start"], &["--from", id]);
        assert_eq!(r.code(), 0, "{id}: {r:?}");
        vm.wait_serial(mark, "TESTGUEST PASS", 2, T);
        vm.ok(&["stop"]);
    }
}

#[test]
fn disk_and_memory_agree_after_restore() {
    let vm = TestVm::create(
        "diskmem",
        "workload=memstamp disk=1 blocks=1024 mem_mib=64 passes=0 rate=100",
        "128M",
        3,
        8,
    );
    vm.ok(&["start"]);
    vm.wait_serial(0, "workload=diskstamp gen=1", 1, T);
    let mut ids = vec![];
    for i in 0..3 {
        ids.push(take(&vm, &format!("d{i}")).0);
        std::thread::sleep(Duration::from_millis(300));
    }
    vm.ok(&["stop"]);
    // Every frozen disk layer and the chain on top of it stays valid.
    for s in vm.tree()["snapshots"].as_array().unwrap() {
        let layer = vm.dir.join(s["disks"][0]["layer"].as_str().unwrap());
        let c = run_with_timeout(Command::new("qemu-img").arg("check").arg(&layer), T);
        assert!(
            c.code() == 0 || layer.extension().is_some_and(|e| e == "raw"),
            "{c:?}"
        );
    }
    for id in &ids {
        let mark = vm.serial().len();
        vm.ok2(&["start"], &["--from", id]);
        // Disk passes verify every block against the generations kept in
        // guest memory: disk and memory are from the same instant.
        let out = vm.wait_serial(mark, "workload=diskstamp gen=", 2, T);
        assert!(
            pass_count(&out, "vcpu=1 gen=") + pass_count(&out, "vcpu=2 gen=") >= 1,
            "{out}"
        );
        vm.ok(&["stop"]);
    }
}

#[test]
fn paused_and_powered_off_snapshots_restore_their_power_state() {
    let vm = TestVm::create(
        "power",
        "workload=memstamp mem_mib=16 passes=0 rate=20",
        "64M",
        2,
        1,
    );
    vm.ok(&["start"]);
    vm.wait_serial(0, "TESTGUEST PASS", 1, T);
    vm.ok(&["pause"]);
    let (paused_id, _) = take(&vm, "paused");
    assert_eq!(vm.status()["state"], "paused", "a paused VM stays paused");
    assert_eq!(snapshot_meta(&vm, &paused_id)["power_state"], "paused");
    vm.ok(&["stop"]);

    let off_id = {
        let r = vm.ok2(&["snapshot", "create"], &["--name", "off"]);
        assert!(r.stdout.contains("VM off"), "{r:?}");
        r.stdout.split_whitespace().nth(1).unwrap().to_string()
    };
    let off = snapshot_meta(&vm, &off_id);
    assert_eq!(off["power_state"], "off");
    assert!(!vm
        .dir
        .join("snapshots")
        .join(&off_id)
        .join("memory.bin")
        .exists());

    // Paused snapshot -> paused VM, which runs on when resumed.
    let mark = vm.serial().len();
    vm.ok2(&["start"], &["--from", &paused_id]);
    assert_eq!(vm.status()["state"], "paused");
    vm.ok(&["resume"]);
    vm.wait_serial(mark, "TESTGUEST PASS", 2, T);
    vm.ok(&["stop"]);

    // Powered-off snapshot -> the VM stays off; a start boots it.
    let r = vm.cli2(&["start"], &["--from", &off_id]);
    assert_eq!(r.code(), 0, "{r:?}");
    assert_eq!(vm.status()["state"], "stopped");
    assert_eq!(vm.tree()["now"], off_id);
    let mark = vm.serial().len();
    vm.ok(&["start"]);
    vm.wait_serial(mark, "TESTGUEST READY", 1, T);
}

/// Restoring a snapshot whose files were damaged fails with an error naming
/// the file, and changes nothing.
#[test]
fn corrupt_snapshot_files_are_refused() {
    let vm = TestVm::create(
        "corrupt",
        "workload=memstamp mem_mib=8 passes=0 rate=20",
        "64M",
        1,
        1,
    );
    vm.ok(&["start"]);
    vm.wait_serial(0, "TESTGUEST PASS", 1, T);
    let (id, _) = take(&vm, "victim");
    vm.ok(&["stop"]);
    let sdir = vm.dir.join("snapshots").join(&id);
    let toml_before = std::fs::read(vm.dir.join("vm.toml")).unwrap();
    let disks_before = std::fs::read_dir(vm.dir.join("disks")).unwrap().count();
    let mem = sdir.join("memory.bin");
    let state = sdir.join("state.bin");
    let mem_good = std::fs::read(&mem).unwrap();
    let state_good = std::fs::read(&state).unwrap();
    // The first non-zero byte of memory (page data of the guest image).
    let data_at = mem_good.iter().position(|b| *b != 0).unwrap();
    let n = mem_good.len();
    let cases: Vec<(&Path, Vec<u8>, &str)> = vec![
        (
            &mem,
            {
                let mut m = mem_good.clone();
                m[data_at] ^= 0x40;
                m
            },
            "corrupt memory data",
        ),
        (&mem, mem_good[..n - 100].to_vec(), "memory.bin"),
        (
            &mem,
            {
                let mut m = mem_good.clone();
                m[n - 24] = 7;
                m
            },
            "unsupported memory file version 7",
        ),
        (
            &state,
            {
                let mut s = state_good.clone();
                let k = s.len() - 10;
                s[k] ^= 1;
                s
            },
            "checksum mismatch",
        ),
        (
            &state,
            state_good[..state_good.len() / 2].to_vec(),
            "truncated state file",
        ),
        (
            &state,
            {
                let mut s = state_good.clone();
                s[8] = 9;
                s
            },
            "unsupported state file version 9",
        ),
    ];
    for (file, data, want) in cases {
        std::fs::write(file, &data).unwrap();
        let r = vm.cli2(&["start"], &["--from", &id]);
        assert_eq!(r.code(), 1, "{want}: {r:?}");
        assert!(r.stderr.contains(want), "expected '{want}': {r:?}");
        assert!(
            r.stderr
                .contains(&*file.file_name().unwrap().to_string_lossy()),
            "{r:?}"
        );
        assert_eq!(
            std::fs::read(vm.dir.join("vm.toml")).unwrap(),
            toml_before,
            "vm.toml unchanged"
        );
        assert_eq!(
            std::fs::read_dir(vm.dir.join("disks")).unwrap().count(),
            disks_before
        );
        assert_eq!(vm.status()["state"], "stopped");
        std::fs::write(&mem, &mem_good).unwrap();
        std::fs::write(&state, &state_good).unwrap();
    }
    // Intact again: it restores.
    let mark = vm.serial().len();
    vm.ok2(&["start"], &["--from", &id]);
    vm.wait_serial(mark, "TESTGUEST PASS", 1, T);
}

#[test]
fn full_disk_fails_the_snapshot_not_the_vm() {
    let root = std::env::temp_dir().join(format!("snapvm-t-full-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    assert!(mount_tmpfs(&root, "48M"), "mounting a tmpfs needs root");
    let _guard = Unmount(root.clone());
    let vm = TestVm::create_in(
        &root,
        "workload=memstamp mem_mib=96 passes=0 rate=100",
        "160M",
        2,
        1,
    );
    vm.ok(&["start"]);
    vm.wait_serial(0, "TESTGUEST PASS", 2, T);
    let r = vm.cli(&["snapshot", "create"]);
    assert_eq!(r.code(), 1, "{r:?}");
    assert!(r.stderr.contains("No space left on device"), "{r:?}");
    // The VM runs on, nothing half-done is visible, the disk chain is valid.
    assert_eq!(vm.status()["state"], "running");
    let mark = vm.serial().len();
    vm.wait_serial(mark, "TESTGUEST PASS", 2, T);
    assert_eq!(vm.tree()["snapshots"].as_array().unwrap().len(), 0);
    let leftovers: Vec<_> = std::fs::read_dir(vm.dir.join("snapshots"))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().is_dir())
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    for layer in vm.status()["disks"][0]["layers"].as_array().unwrap() {
        let p = layer.as_str().unwrap();
        if p.ends_with(".qcow2") {
            let c = run_with_timeout(Command::new("qemu-img").args(["check", p]), T);
            assert_eq!(c.code(), 0, "{c:?}");
        }
    }
    // With room again, a later snapshot works.
    resize_tmpfs(&root, "512M");
    let (id, _) = take(&vm, "after-full");
    assert_eq!(vm.tree()["snapshots"][0]["id"], id);
}

#[test]
fn kill_9_while_streaming_leaves_no_half_snapshot() {
    let vm = TestVm::create(
        "kill9",
        "workload=memstamp mem_mib=64 passes=0 rate=50",
        "128M",
        2,
        1,
    );
    let r = run_with_timeout(
        Command::new(snapvm_tests::snapvm_bin())
            .env("SNAPVM_TEST_STREAM_DELAY_MS", "40")
            .arg("start")
            .arg(&vm.dir),
        T,
    );
    assert_eq!(r.code(), 0, "{r:?}");
    vm.wait_serial(0, "TESTGUEST PASS", 1, T);
    let pid = vm.status()["pid"].as_i64().unwrap() as i32;
    let r = vm.cli2(&["snapshot", "create"], &["--no-wait"]);
    assert_eq!(r.code(), 0, "{r:?}");
    assert!(
        r.stdout.starts_with("snapshot job "),
        "says what the id is: {r:?}"
    );
    let job = r.stdout.split_whitespace().nth(2).unwrap_or("").to_string();
    // Wait until streaming is under way.
    let deadline = Instant::now() + T;
    loop {
        let j = snapvm(&["status", "--json", vm.dir.to_str().unwrap()]);
        assert_eq!(j.code(), 0);
        let partial = std::fs::read_dir(vm.dir.join("snapshots"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .any(|e| e.file_name().to_string_lossy().ends_with(".partial"))
            })
            .unwrap_or(false);
        if partial {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "job {job} never started streaming"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: kill(2) on the VMM under test.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = Instant::now() + T;
    while vm.status()["state"] != "stopped" {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        vm.tree()["snapshots"].as_array().unwrap().len(),
        0,
        "never shown as complete"
    );
    // The next start cleans up; the disk chain is valid; snapshots work.
    vm.ok(&["start"]);
    let log = std::fs::read_to_string(vm.dir.join("logs/vmm.log")).unwrap();
    assert!(log.contains("incomplete snapshot"), "{log}");
    let partial = std::fs::read_dir(vm.dir.join("snapshots"))
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().ends_with(".partial"));
    assert!(!partial);
    for layer in vm.status()["disks"][0]["layers"].as_array().unwrap() {
        let p = layer.as_str().unwrap();
        if p.ends_with(".qcow2") {
            let c = run_with_timeout(Command::new("qemu-img").args(["check", p]), T);
            assert_eq!(c.code(), 0, "{c:?}");
        }
    }
    vm.wait_serial(0, "TESTGUEST READY", 2, T);
    let (id, _) = take(&vm, "after-crash");
    assert_eq!(vm.tree()["snapshots"][0]["id"], id);
}
