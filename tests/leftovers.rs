//! kill -9 at many instants of snapshot create, apply and delete (with its
//! merge), and of export and clone: afterwards the VM directory holds
//! exactly the files vm.toml and tree.json name (and the layers those stand
//! on), qemu-img check is clean, and the guest verifies after an apply.
//! The instants come from a seeded generator; a failure prints the seed
//! (SNAPVM_TEST_SEED replays it).

use std::path::{Path, PathBuf};
use std::time::Duration;

use snapvm_tests::vmfiles::{
    exactly_what_is_named, kill_cli_after, kill_vmm_during, merges_done, seed, Rng,
};
use snapvm_tests::TestVm;

const T: Duration = Duration::from_secs(120);
const GUEST: &str = "workload=memstamp disk=1 blocks=256 mem_mib=16 passes=0 rate=50";
const MEMORY_ONLY: &str = "workload=memstamp mem_mib=16 passes=0 rate=50";

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
    kill_cli_after(&args, delay);
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

    // Clones are made by the CLI: killed at any instant, each clone is
    // whole (it starts) or absent, the source holds what it names, and the
    // next clone to the same place cleans up and succeeds.
    let base_dest = vm.root.join("c");
    let clone_args = |n: &str| {
        [
            "snapshot".to_string(),
            "clone".into(),
            d.clone(),
            base.clone(),
            base_dest.to_str().unwrap().into(),
            "--count".into(),
            n.into(),
        ]
    };
    let delay = Duration::from_millis(rng.below(300));
    kill_cli_after(&clone_args("3"), delay);
    let ctx = format!("clone killed after {delay:?}, seed {seed}");
    exactly_what_is_named(&vm, &ctx);
    for i in 1..=3 {
        // Its own root: dropping it removes the clone, not the source.
        let dir = PathBuf::from(format!("{}-{i}", base_dest.display()));
        let c = TestVm {
            root: dir.clone(),
            dir,
        };
        if c.dir.join("vm.toml").exists() {
            c.ok(&["start"]);
            assert_eq!(c.status()["state"], "running", "{ctx}: clone {i}");
            c.ok(&["stop"]);
        } else {
            assert!(!c.dir.exists(), "{ctx}: clone {i} is half there");
        }
    }
    let args = clone_args("3");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = snapvm_tests::snapvm(&args);
    assert_eq!(r.code(), 0, "{ctx}: the clone after it: {r:?}");
    for i in 1..=3 {
        let staging = PathBuf::from(format!("{}-{i}.partial", base_dest.display()));
        assert!(!staging.exists(), "{ctx}: {} is left", staging.display());
    }
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
    // The guest verifies memory but leaves its disk alone: a guest writing
    // to a full disk sees I/O errors and stops, which is right but not what
    // this test is about (the apply's and the export's own files are).
    let vm = TestVm::create_in(&root, MEMORY_ONLY, "96M", 2, 8);
    vm.ok(&["start"]);
    vm.wait_serial(0, "vcpu=1 gen=", 1, T);
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
    vm.wait_serial(mark, "vcpu=1 gen=", 1, T);
    assert_eq!(
        std::fs::read(vm.dir.join("snapshots/tree.json")).unwrap(),
        tree_before
    );
    assert_eq!(std::fs::read(vm.dir.join("vm.toml")).unwrap(), toml_before);
    exactly_what_is_named(&vm, "after the refused apply and export");

    // With room again both work.
    std::fs::remove_file(filler).unwrap();
    let mark = vm.serial().len();
    vm.ok2(&["snapshot", "apply"], &[&snap]);
    assert_eq!(vm.status()["pid"], pid, "applied in the same VMM");
    let out = vm.wait_serial(mark, "vcpu=1 gen=", 1, T);
    assert!(!out.contains("READY"), "not rebooted: {out}");
    let r = vm.cli2(&["snapshot", "export"], &[&snap, dest.to_str().unwrap()]);
    assert_eq!(r.code(), 0, "{r:?}");
}
