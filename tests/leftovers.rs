//! kill -9 at many instants of snapshot create, apply and delete (with its
//! merge), and of export and clone: afterwards the VM directory holds
//! exactly the files vm.toml and tree.json name (and the layers those stand
//! on), qemu-img check is clean, and the guest verifies after an apply.
//! The instants come from a seeded generator; a failure prints the seed
//! (SNAPVM_TEST_SEED replays it).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use snapvm_tests::{snapvm_bin, TestVm};

const T: Duration = Duration::from_secs(120);
const GUEST: &str = "workload=memstamp disk=1 blocks=256 mem_mib=16 passes=0 rate=50";

/// xorshift64*: small, seeded, good enough to spread instants.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn seed() -> u64 {
    std::env::var("SNAPVM_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
                | 1
        })
}

fn toml_paths(vm: &TestVm) -> Vec<PathBuf> {
    std::fs::read_to_string(vm.dir.join("vm.toml"))
        .unwrap()
        .lines()
        .filter_map(|l| {
            let (k, v) = l.split_once('=')?;
            matches!(k.trim(), "base" | "current").then(|| v.trim().trim_matches('"').into())
        })
        .map(|p: PathBuf| vm.dir.join(p))
        .collect()
}

fn tree(vm: &TestVm) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(vm.dir.join("snapshots/tree.json"))
            .unwrap_or_else(|_| "{}".into()),
    )
    .unwrap()
}

/// The files of `image`'s backing chain (qemu-img's view).
fn chain(image: &Path) -> Vec<PathBuf> {
    let out = Command::new("qemu-img")
        .args(["info", "--backing-chain", "--output=json", "-U"])
        .arg(image)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "qemu-img info {}: {out:?}",
        image.display()
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|i| std::fs::canonicalize(i["filename"].as_str().unwrap()).unwrap())
        .collect()
}

/// Checks the VM directory holds exactly what its metadata names.
fn exactly_what_is_named(vm: &TestVm, context: &str) {
    let t = tree(vm);
    let mut tops: Vec<PathBuf> = toml_paths(vm);
    let mut ids = BTreeSet::new();
    for s in t["snapshots"].as_array().cloned().unwrap_or_default() {
        ids.insert(s["id"].as_str().unwrap().to_string());
        for d in s["disks"].as_array().unwrap() {
            tops.push(vm.dir.join(d["layer"].as_str().unwrap()));
        }
    }
    for r in t["retired"].as_array().cloned().unwrap_or_default() {
        tops.push(vm.dir.join(r.as_str().unwrap()));
    }
    let mut expected = BTreeSet::new();
    for top in &tops {
        expected.extend(chain(top));
    }
    let disks = std::fs::canonicalize(vm.dir.join("disks")).unwrap();
    let present: BTreeSet<PathBuf> = std::fs::read_dir(&disks)
        .unwrap()
        .flatten()
        .map(|e| std::fs::canonicalize(e.path()).unwrap())
        .collect();
    let expected: BTreeSet<PathBuf> = expected
        .into_iter()
        .filter(|p| p.starts_with(&disks))
        .collect();
    assert_eq!(
        present, expected,
        "{context}: disks/ holds other files than the metadata names"
    );
    let dirs: BTreeSet<String> = std::fs::read_dir(vm.dir.join("snapshots"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        dirs, ids,
        "{context}: snapshots/ holds other directories than the tree names"
    );
    for p in &present {
        if p.extension().is_some_and(|x| x == "qcow2") {
            let out = Command::new("qemu-img")
                .args(["check", "-U"])
                .arg(p)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{context}: qemu-img check {}: {out:?}",
                p.display()
            );
        }
    }
}

/// Waits until no merge runs and none waits.
fn merges_done(vm: &TestVm) {
    let deadline = Instant::now() + T;
    loop {
        let st = vm.status();
        let m = &st["merges"];
        if m["job"].is_null()
            && m["in_progress"].is_null()
            && m["waiting"].as_array().is_none_or(|w| w.is_empty())
        {
            return;
        }
        assert!(Instant::now() < deadline, "merges did not finish: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `snapvm ARGS` and kills the VMM (-9) after `delay`.
fn kill_vmm_during(vm: &TestVm, args: &[&str], delay: Duration) {
    let pid = vm.status()["pid"].as_i64().unwrap() as i32;
    let mut cli = Command::new(snapvm_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(delay);
    // SAFETY: kill(2) on the VMM's pid, a process this test started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let _ = cli.wait();
    let deadline = Instant::now() + T;
    while vm.status()["state"] != "stopped" {
        assert!(Instant::now() < deadline, "the VMM did not die");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Starts the VM and applies `snap`; the guest verifies after it.
fn restart_and_verify(vm: &TestVm, snap: &str, context: &str) {
    vm.ok(&["start", "--paused"]);
    merges_done(vm);
    exactly_what_is_named(vm, context);
    vm.apply_and_verify(snap, &[], T);
}

#[test]
fn kill_9_at_any_instant_leaves_only_what_is_named() {
    let seed = seed();
    eprintln!("seed {seed} (SNAPVM_TEST_SEED={seed} replays it)");
    let mut rng = Rng(seed);
    let vm = TestVm::create("leftovers", GUEST, "128M", 2, 16);
    vm.ok(&["start"]);
    vm.wait_serial(0, "workload=diskstamp gen=", 1, T);
    let base = vm.take("base");
    let d = vm.dir.to_str().unwrap().to_string();
    for round in 0..6 {
        let ms = |rng: &mut Rng| Duration::from_millis(rng.below(400));
        // A live snapshot, killed.
        let delay = ms(&mut rng);
        let ctx = format!("round {round}, snapshot create killed after {delay:?}, seed {seed}");
        kill_vmm_during(&vm, &["snapshot", "create", &d, "--name", "k"], delay);
        restart_and_verify(&vm, &base, &ctx);
        // An apply, killed.
        let extra = vm.take(&format!("a{round}"));
        let delay = ms(&mut rng);
        let ctx = format!("round {round}, apply killed after {delay:?}, seed {seed}");
        kill_vmm_during(&vm, &["snapshot", "apply", &d, &extra], delay);
        restart_and_verify(&vm, &base, &ctx);
        // A delete (and its merge into the running VM), killed.
        let victim = vm.take(&format!("d{round}"));
        vm.take(&format!("e{round}"));
        let delay = ms(&mut rng);
        let ctx = format!("round {round}, delete killed after {delay:?}, seed {seed}");
        kill_vmm_during(&vm, &["snapshot", "delete", &d, &victim], delay);
        restart_and_verify(&vm, &base, &ctx);
    }
    // Export runs in the CLI: killed, the next export to the same place
    // cleans up and succeeds.
    let dest = vm.root.join("exported");
    let args = ["snapshot", "export", &d, &base, dest.to_str().unwrap()];
    let delay = Duration::from_millis(rng.below(300));
    let mut cli = Command::new(snapvm_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(delay);
    let _ = cli.kill();
    let _ = cli.wait();
    let _ = std::fs::remove_dir_all(&dest);
    let r = snapvm_tests::snapvm(&args);
    assert_eq!(
        r.code(),
        0,
        "export after one killed after {delay:?}: {r:?}"
    );
    assert!(
        !dest.with_extension("partial").exists(),
        "export left its staging directory"
    );
}

/// Fills the file system of `dir` with a file (until ENOSPC).
fn fill(dir: &Path) -> PathBuf {
    use std::io::Write;
    let p = dir.join("filler");
    let mut f = std::fs::File::create(&p).unwrap();
    let block = vec![0x55u8; 1 << 16];
    while f.write_all(&block).is_ok() {}
    let _ = f.sync_all();
    p
}

#[test]
fn full_disk_fails_apply_and_export_and_changes_nothing() {
    use snapvm_tests::{mount_tmpfs, Unmount};
    let root = std::env::temp_dir().join(format!("snapvm-t-fullapply-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    assert!(mount_tmpfs(&root, "96M"), "mounting a tmpfs needs root");
    let _guard = Unmount(root.clone());
    let vm = TestVm::create_in(&root, GUEST, "96M", 2, 8);
    vm.ok(&["start"]);
    vm.wait_serial(0, "workload=diskstamp gen=", 1, T);
    let snap = vm.take("before-full");
    let filler = fill(&root);
    let tree_before = std::fs::read(vm.dir.join("snapshots/tree.json")).unwrap();
    let toml_before = std::fs::read(vm.dir.join("vm.toml")).unwrap();
    let pid = vm.status()["pid"].clone();

    let r = vm.cli2(&["snapshot", "apply"], &[&snap]);
    assert_ne!(r.code(), 0, "{r:?}");
    assert!(r.stderr.contains("No space left on device"), "{r:?}");
    let dest = root.join("exported");
    let r = vm.cli2(&["snapshot", "export"], &[&snap, dest.to_str().unwrap()]);
    assert_ne!(r.code(), 0, "{r:?}");
    assert!(r.stderr.contains("No space left on device"), "{r:?}");
    assert!(!dest.exists() && !dest.with_extension("partial").exists());

    // Nothing changed: same VMM, running and verifying, same metadata.
    assert_eq!(vm.status()["pid"], pid);
    assert_eq!(vm.status()["state"], "running");
    let mark = vm.serial().len();
    vm.wait_serial(mark, "workload=diskstamp gen=", 1, T);
    assert_eq!(
        std::fs::read(vm.dir.join("snapshots/tree.json")).unwrap(),
        tree_before
    );
    assert_eq!(std::fs::read(vm.dir.join("vm.toml")).unwrap(), toml_before);
    exactly_what_is_named(&vm, "after the refused apply and export");

    // With room again both work.
    std::fs::remove_file(filler).unwrap();
    vm.apply_and_verify(&snap, &[], T);
    let r = vm.cli2(&["snapshot", "export"], &[&snap, dest.to_str().unwrap()]);
    assert_eq!(r.code(), 0, "{r:?}");
}
