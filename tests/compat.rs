//! Compatibility: snapshots written by earlier releases keep loading. Each
//! fixture in tests/fixtures/ is a VM directory written by an old snapvm
//! (tests/fixtures/README.md says which and how); today's snapvm must list
//! it, start from and apply each of its snapshots, and the self-verifying
//! guest must pass its memory and disk checks after each.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use snapvm_tests::vmfiles::qemu_img_check;
use snapvm_tests::TestVm;

const T: Duration = Duration::from_secs(120);

/// Unpacks fixture `name` into a scratch directory; the VM directory is
/// `<scratch>/<top directory of the archive>`.
fn unpack(name: &str, top: &str) -> TestVm {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name);
    let root = std::env::temp_dir().join(format!("snapvm-t-compat-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let st = Command::new("tar")
        .arg("-xJf")
        .arg(&fixture)
        .arg("-C")
        .arg(&root)
        .status()
        .unwrap();
    assert!(st.success(), "cannot unpack {}", fixture.display());
    TestVm {
        dir: root.join(top),
        root,
    }
}

fn id_of(vm: &TestVm, name: &str) -> String {
    vm.tree()["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no snapshot {name}"))["id"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Waits for a verified diskstamp pass and a memstamp pass after `mark`,
/// without a reboot in between.
fn verifies(vm: &TestVm, mark: usize) {
    let out = vm.wait_serial(mark, "workload=diskstamp gen=", 1, T);
    vm.wait_serial(mark, "vcpu=1 gen=", 1, T);
    assert!(!out.contains("READY"), "the guest rebooted: {out}");
}

/// Snapshots written with state.bin format version 1 (snapvm ff8343b):
/// running, paused and powered-off ones.
#[test]
fn snapshots_of_format_v1_start_apply_and_verify() {
    let vm = unpack("snapshots-v1.tar.xz", "v1-fixture");
    let tree = vm.tree();
    let names: Vec<&str> = tree["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["running-v1", "paused-v1", "off-v1"]);
    let (running, paused, off) = (
        id_of(&vm, "running-v1"),
        id_of(&vm, "paused-v1"),
        id_of(&vm, "off-v1"),
    );
    assert_eq!(tree["now"], off.as_str());

    // start --from a running snapshot: the guest continues and verifies.
    let mark = vm.serial().len();
    let r = vm.ok2(&["start"], &["--from", "running-v1"]);
    assert!(r.stdout.contains("running"), "{r:?}");
    verifies(&vm, mark);

    // In place: the paused snapshot leaves the VM paused; it continues
    // verified once resumed.
    let r = vm.ok2(&["snapshot", "apply"], &["paused-v1"]);
    assert!(r.stdout.contains("the VM is paused"), "{r:?}");
    assert_eq!(vm.status()["state"], "paused");
    let mark = vm.serial().len();
    vm.ok(&["resume"]);
    verifies(&vm, mark);
    vm.apply_and_verify(&running, &[], T);
    assert_eq!(vm.tree()["now"], running.as_str());

    // A new snapshot on top of an old one, and back to the old one.
    let fresh = vm.take("after-upgrade");
    vm.apply_and_verify(&running[..8], &[], T);
    vm.apply_and_verify(&fresh, &[], T);

    // start --from a paused snapshot, after a stop.
    vm.ok(&["stop"]);
    let r = vm.ok2(&["start"], &["--from", &paused]);
    assert!(r.stdout.contains("paused"), "{r:?}");
    let mark = vm.serial().len();
    vm.ok(&["resume"]);
    verifies(&vm, mark);

    // The powered-off snapshot turns the VM off, with its configuration.
    let r = vm.ok2(&["snapshot", "apply"], &["off-v1"]);
    assert!(r.stdout.contains("the VM is stopped"), "{r:?}");
    assert_eq!(vm.status()["state"], "stopped");
    assert_eq!(vm.tree()["now"], off.as_str());
    qemu_img_check(&vm.dir);
}
