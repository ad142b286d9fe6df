//! Clones: one snapshot becomes five VMs that run at the same time, each
//! with its own MAC and generation, sharing the snapshot's disk layers and
//! memory until they write; the snapshot stays while they read it. Each
//! clone runs in a network namespace of its own (its guest keeps the
//! source's address), with its tap and the host-side address there.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use snapvm_tests::netns::Netns;
use snapvm_tests::vmfiles::{qemu_img_check, sha256};
use snapvm_tests::{field, snapvm, TestVm};

const T: Duration = Duration::from_secs(180);
/// One vCPU alternating disk and memory passes over a small area, and a
/// large read-only area (keep_mib) as guests have kernel text and page
/// cache: what clones share.
const GUEST: &str =
    "workload=memstamp disk=1 blocks=64 mem_mib=8 passes=0 rate=20 keep_mib=96 ip=10.96.0.2/24";

/// Host memory a VMM process holds for itself alone (its private pages).
fn private_kib(pid: u64) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    s.lines()
        .filter(|l| l.starts_with("Private_Clean:") || l.starts_with("Private_Dirty:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

fn rss_kib(pid: u64) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap();
    s.lines()
        .find(|l| l.starts_with("Rss:"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap()
}

/// Allocated KiB of the files staged for clones under `dir`.
fn staged_kib(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|it| {
            it.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.blocks() / 2)
                .sum()
        })
        .unwrap_or(0)
}

fn generation_of(line: &str, key: &str) -> String {
    field(line, key)
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
        .to_string()
}

#[test]
fn five_clones_run_together_verify_and_share_what_they_do_not_write() {
    let shared = PathBuf::from(format!("/dev/shm/snapvm-t-clone-{}", std::process::id()));
    std::env::set_var("SNAPVM_SHARED_DIR", &shared);
    let ns0 = Netns::new("clsrc");
    let root = std::env::temp_dir().join(format!("snapvm-t-clone-{}", std::process::id()));
    let src = TestVm::create_with(
        &root.join("src"),
        GUEST,
        "256M",
        1,
        8,
        &["--net", "tap=src0,mac=52:54:00:96:00:02"],
    );
    let r = ns0.snapvm(&["start", src.dir.to_str().unwrap()]);
    assert_eq!(r.code(), 0, "{r:?}");
    let ready = src.wait_serial(0, "TESTGUEST READY", 1, T);
    let src_gen = generation_of(ready.lines().next().unwrap(), "generation");
    src.wait_serial(0, "workload=diskstamp gen=", 1, T);
    let snap = src.take("golden");
    let tree = src.tree();
    let frozen = src.dir.join(
        tree["snapshots"][0]["disks"][0]["layer"]
            .as_str()
            .expect("a frozen layer"),
    );
    let frozen_sum = sha256(&frozen);
    let src_pid = src.status()["pid"].as_u64().unwrap();
    let src_rss = rss_kib(src_pid);

    // Five clones; each gets tap cl<N> and a new MAC.
    let base = root.join("c");
    let r = snapvm(&[
        "snapshot",
        "clone",
        src.dir.to_str().unwrap(),
        &snap,
        base.to_str().unwrap(),
        "--count",
        "5",
        "--tap",
        "cl{n}",
    ]);
    assert_eq!(r.code(), 0, "{r:?}");
    let clones: Vec<TestVm> = (1..=5)
        .map(|i| TestVm {
            dir: PathBuf::from(format!("{}-{i}", base.display())),
            root: root.join(format!("unused-{i}")),
        })
        .collect();
    let macs: Vec<String> = clones
        .iter()
        .map(|c| c.status()["nets"][0]["mac"].as_str().unwrap().to_string())
        .collect();
    for (i, m) in macs.iter().enumerate() {
        assert_ne!(m, "52:54:00:96:00:02");
        assert!(!macs[..i].contains(m), "MACs differ: {macs:?}");
    }
    let tree = src.tree();
    assert_eq!(
        tree["snapshots"][0]["clones"].as_array().map(Vec::len),
        Some(5),
        "the snapshot lists its clones: {tree}"
    );

    // The memory all five share, staged when they were made.
    let staged_files: Vec<PathBuf> = std::fs::read_dir(&shared)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "mem"))
        .collect();
    assert_eq!(staged_files.len(), 1, "{staged_files:?}");
    let staged_sum = sha256(&staged_files[0]);

    // All five run at once, each in a namespace of its own.
    let spaces: Vec<Netns> = (1..=5).map(|i| Netns::new(&format!("cl{i}"))).collect();
    for (i, (c, ns)) in clones.iter().zip(&spaces).enumerate() {
        let r = ns.snapvm(&["start", c.dir.to_str().unwrap()]);
        assert_eq!(r.code(), 0, "{r:?}");
        ns.ip(&[
            "addr",
            "add",
            "10.96.0.1/24",
            "dev",
            &format!("cl{}", i + 1),
        ]);
    }
    let mut gens = Vec::new();
    for (c, mac) in clones.iter().zip(&macs) {
        let out = c.wait_serial(0, &format!("TESTGUEST NET mac={mac}"), 1, T);
        assert!(
            !out.contains("TESTGUEST READY"),
            "continued, not booted: {out}"
        );
        let g = out
            .lines()
            .find(|l| l.starts_with("TESTGUEST GENERATION"))
            .unwrap_or_else(|| panic!("no generation change: {out}"));
        assert_eq!(generation_of(g, "old"), src_gen);
        gens.push(generation_of(g, "new"));
        c.wait_serial(0, "workload=diskstamp gen=", 2, T);
        c.wait_serial(0, "vcpu=0 gen=", 1, T);
        c.wait_serial(0, "workload=keep", 1, T);
    }
    for (i, g) in gens.iter().enumerate() {
        assert_ne!(*g, src_gen);
        assert!(!gens[..i].contains(g), "generations differ: {gens:?}");
    }
    for (ns, mac) in spaces.iter().zip(&macs) {
        assert_eq!(ns.ping("10.96.0.2", 3, "0.2"), 3);
        assert_eq!(ns.neighbour("10.96.0.2").as_deref(), Some(mac.as_str()));
    }

    // Host memory: what the clones hold privately, plus the staged copy
    // of the snapshot's memory they all map, next to one VM's.
    let private: u64 = clones
        .iter()
        .map(|c| private_kib(c.status()["pid"].as_u64().unwrap()))
        .sum();
    let staged = staged_kib(&shared);
    let ratio = (private + staged) as f64 / src_rss as f64;
    eprintln!(
        "five clones: {private} KiB private + {staged} KiB staged = {:.2} x the source's {src_rss} KiB",
        ratio
    );
    assert!(
        ratio < 2.5,
        "five clones take {ratio:.2} times one VM's memory ({private} KiB private, {staged} KiB staged, source {src_rss} KiB)"
    );

    // What they share is as it was: each one's writes went to its own
    // overlay and its own copies of pages, which no other VM maps.
    assert_eq!(
        sha256(&staged_files[0]),
        staged_sum,
        "no clone wrote the shared memory"
    );
    assert_eq!(
        sha256(&frozen),
        frozen_sum,
        "no clone wrote the snapshot's layer"
    );

    // A snapshot and an apply inside a clone verify, and the generation
    // moves on.
    let c1 = &clones[0];
    let inner = c1.take("inner");
    let mark = c1.serial().len();
    let r = c1.ok2(&["snapshot", "apply"], &[&inner]);
    assert!(r.stdout.contains("the VM is running"), "{r:?}");
    let out = c1.wait_serial(mark, "workload=diskstamp gen=", 1, T);
    c1.wait_serial(mark, "TESTGUEST GENERATION", 1, T);
    assert!(!out.contains("READY"), "{out}");

    // The source snapshot stays while clones read it.
    let r = src.cli2(&["snapshot", "delete"], &[&snap]);
    assert_ne!(r.code(), 0, "{r:?}");
    assert!(
        r.stderr.contains("clones") && r.stderr.contains("c-3"),
        "{r:?}"
    );
    // c-1 is made standalone, the others deleted.
    c1.ok(&["stop"]);
    c1.ok(&["clone", "detach"]);
    for c in &clones[1..] {
        c.ok(&["stop"]);
        std::fs::remove_dir_all(&c.dir).unwrap();
    }
    src.ok2(&["snapshot", "delete"], &[&snap]);
    assert_eq!(
        sha256(&frozen),
        frozen_sum,
        "no clone wrote the snapshot's layer"
    );
    qemu_img_check(&src.dir);
    qemu_img_check(&c1.dir);
    for e in std::fs::read_dir(c1.dir.join("disks")).unwrap().flatten() {
        let chain = Command::new("qemu-img")
            .args(["info", "--backing-chain"])
            .arg(e.path())
            .output()
            .unwrap();
        let chain = String::from_utf8_lossy(&chain.stdout);
        assert!(
            !chain.contains(src.dir.to_str().unwrap()),
            "the detached clone reads nothing of the source: {chain}"
        );
    }
    drop(clones);
    drop(src);
    let _ = std::fs::remove_dir_all(&root);
    let _ = std::fs::remove_dir_all(&shared);
    drop(spaces);
    drop(ns0);
}

#[test]
fn clones_of_missing_things_fail_clearly() {
    let vm = TestVm::create("clbad", "workload=idle", "64M", 1, 4);
    vm.ok(&["start"]);
    let snap = vm.take("base");
    let dest = vm.root.join("x");
    // Bad arguments change nothing.
    let r = vm.cli2(&["snapshot", "clone"], &["nope", dest.to_str().unwrap()]);
    assert_ne!(r.code(), 0);
    assert!(r.stderr.contains("nope"), "{r:?}");
    let r = vm.cli2(
        &["snapshot", "clone"],
        &[&snap, dest.to_str().unwrap(), "--count", "0"],
    );
    assert_ne!(r.code(), 0);
    assert!(r.stderr.contains("--count"), "{r:?}");
    assert!(!dest.exists());

    // A clone of a running snapshot whose source then vanishes: its start
    // names the missing file.
    let moved = vm.root.join("moved");
    vm.ok2(&["snapshot", "clone"], &[&snap, dest.to_str().unwrap()]);
    vm.ok(&["stop"]);
    std::fs::rename(&vm.dir, &moved).unwrap();
    let r = snapvm(&["start", dest.to_str().unwrap()]);
    assert_ne!(r.code(), 0, "{r:?}");
    assert!(
        r.stderr.contains("no longer exists") && r.stderr.contains("moved or was deleted"),
        "{r:?}"
    );
    assert!(!dest.join("run/api.sock").exists(), "no VMM left running");
    std::fs::rename(&moved, &vm.dir).unwrap();
    let r = snapvm(&["start", dest.to_str().unwrap()]);
    assert_eq!(r.code(), 0, "{r:?}");
    let _ = snapvm(&["stop", "--force", dest.to_str().unwrap()]);
}
