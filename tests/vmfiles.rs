//! What a VM directory holds and what names it, for tests that interrupt
//! snapvm (kill -9) and check nothing is left behind: the files vm.toml and
//! tree.json name, qemu-img's view of backing chains, and a seeded
//! generator for the instants and operations those tests choose.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::{snapvm_bin, TestVm};

const T: Duration = Duration::from_secs(120);

/// xorshift64*: small, seeded, good enough to spread instants.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// The seed of a randomized test: `$SNAPVM_TEST_SEED`, or a new one.
pub fn seed() -> u64 {
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

/// The layers vm.toml names (its disks' base and current files).
pub fn toml_paths(vm: &TestVm) -> Vec<PathBuf> {
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

/// tree.json as stored (an empty object when there is none).
pub fn tree_file(vm: &TestVm) -> Value {
    serde_json::from_str(
        &std::fs::read_to_string(vm.dir.join("snapshots/tree.json"))
            .unwrap_or_else(|_| "{}".into()),
    )
    .unwrap()
}

/// The files of `image`'s backing chain (qemu-img's view).
pub fn chain(image: &Path) -> Vec<PathBuf> {
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

/// Checks the VM directory holds exactly what its metadata names, and
/// runs `qemu-img check` on each qcow2 file but a running VM's working
/// layers (its VMM is writing them: a reader without the VMM's cached
/// metadata may see a cluster whose refcount is not written yet).
pub fn exactly_what_is_named(vm: &TestVm, context: &str) {
    let live: BTreeSet<PathBuf> = if vm.status()["state"] == "stopped" {
        BTreeSet::new()
    } else {
        toml_paths(vm)
            .iter()
            .filter_map(|p| std::fs::canonicalize(p).ok())
            .collect()
    };
    let t = tree_file(vm);
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
    // No snapshots/ directory before the first snapshot.
    let dirs: BTreeSet<String> = std::fs::read_dir(vm.dir.join("snapshots"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().is_dir())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        dirs, ids,
        "{context}: snapshots/ holds other directories than the tree names"
    );
    for p in present.difference(&live) {
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

/// How many files in the VM's disks/ have `layer` as their backing file.
fn layers_on(vm: &TestVm, layer: &Path) -> usize {
    let Ok(layer) = std::fs::canonicalize(vm.dir.join(layer)) else {
        return 0;
    };
    std::fs::read_dir(vm.dir.join("disks"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "qcow2"))
        .filter(|e| chain(&e.path()).get(1) == Some(&layer))
        .count()
}

/// Waits until no merge runs and none waits but for layers that several
/// layers stand on (those stay until only one does).
pub fn merges_done(vm: &TestVm) {
    let deadline = Instant::now() + T;
    loop {
        let st = vm.status();
        let m = &st["merges"];
        if m["job"].is_null()
            && m["in_progress"].is_null()
            && m["waiting"].as_array().is_none_or(|w| {
                w.iter()
                    .all(|l| layers_on(vm, Path::new(l.as_str().unwrap_or(""))) >= 2)
            })
        {
            return;
        }
        assert!(Instant::now() < deadline, "merges did not finish: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Starts `snapvm ARGS` in the background, quiet.
fn spawn_cli<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> std::process::Child {
    Command::new(snapvm_bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Runs `snapvm ARGS` and kills that CLI process (-9) after `delay`.
pub fn kill_cli_after<S: AsRef<std::ffi::OsStr>>(args: &[S], delay: Duration) {
    let mut cli = spawn_cli(args);
    std::thread::sleep(delay);
    let _ = cli.kill();
    let _ = cli.wait();
}

/// Runs `snapvm ARGS` and kills the VMM (-9) after `delay`.
pub fn kill_vmm_during(vm: &TestVm, args: &[&str], delay: Duration) {
    let pid = vm.status()["pid"].as_i64().unwrap() as i32;
    let mut cli = spawn_cli(args);
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

/// `qemu-img check` on every qcow2 file in the VM's disks/ directory.
pub fn qemu_img_check(dir: &Path) {
    for e in std::fs::read_dir(dir.join("disks")).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x == "qcow2") {
            let out = Command::new("qemu-img")
                .args(["check", "-U"])
                .arg(e.path())
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "qemu-img check {}: {}{}",
                e.path().display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// The SHA-256 of a file, as `sha256sum` prints it.
pub fn sha256(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}
