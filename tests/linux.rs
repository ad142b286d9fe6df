//! A real Linux guest (guest-images/linux) boots under snapvm, uses its
//! virtio disk and resets through the i8042. Slow under the emulating KVM
//! backend (~15-20 s), so this is the only Linux test of the foundation.

use std::process::Command;
use std::time::Duration;

use snapvm_tests::{linux_dir, run_with_timeout, snapvm_bin, LINUX_CMDLINE};

#[test]
fn linux_boots_writes_its_disk_and_resets() {
    let dir = linux_dir();
    let tmp = std::env::temp_dir().join(format!("snapvm-linux-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let disk = tmp.join("disk.ext4");
    std::fs::copy(dir.join("disk.ext4"), &disk).unwrap();

    let r = run_with_timeout(
        Command::new(snapvm_bin())
            .arg("run")
            .arg("--kernel")
            .arg(dir.join("vmlinux"))
            .arg("--initrd")
            .arg(dir.join("initramfs.cpio"))
            .arg("--disk")
            .arg(&disk)
            .args([
                "--vcpus",
                "2",
                "--memory",
                "256M",
                "--cmdline",
                LINUX_CMDLINE,
            ]),
        Duration::from_secs(180),
    );
    assert_eq!(r.code(), 0, "reset through the i8042 exits 0: {r:?}");
    assert!(r.stdout.contains("SNAPVM-LINUX init"), "{r:?}");
    assert!(r.stdout.contains("cpus=2"), "both vCPUs came up: {r:?}");
    let ok = r
        .lines_with("SNAPVM-LINUX OK")
        .first()
        .map(|l| l.to_string())
        .unwrap_or_else(|| panic!("no OK marker: {r:?}"));
    let stamp = ok.split_whitespace().last().unwrap().to_string();

    // The file really is on the disk image.
    let cat = run_with_timeout(
        Command::new("debugfs")
            .args(["-R", "cat /hello.txt"])
            .arg(&disk),
        Duration::from_secs(30),
    );
    assert_eq!(cat.stdout.trim(), stamp, "{cat:?}");
    let fsck = run_with_timeout(
        Command::new("e2fsck").args(["-fn"]).arg(&disk),
        Duration::from_secs(30),
    );
    assert_eq!(fsck.code(), 0, "clean filesystem after unmount: {fsck:?}");
    let _ = std::fs::remove_dir_all(&tmp);
}
