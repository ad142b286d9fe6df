//! Bad input to `snapvm run`: one line naming the problem, a non-zero exit,
//! never a panic.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use snapvm_tests::{run_with_timeout, snapvm_bin, testguest, Finished};

const T: Duration = Duration::from_secs(30);

fn snapvm(args: &[&str]) -> Finished {
    run_with_timeout(Command::new(snapvm_bin()).args(args), T)
}

fn guest() -> String {
    testguest().display().to_string()
}

/// Exactly one stderr line, starting "snapvm: error:" and containing `what`.
fn assert_one_line_error(r: &Finished, what: &str) {
    assert_ne!(r.code(), 0, "{r:?}");
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "expected one line: {r:?}");
    assert!(lines[0].starts_with("snapvm: error: "), "{r:?}");
    assert!(lines[0].contains(what), "expected '{what}' in: {r:?}");
    assert!(!r.stderr.contains("panicked") && !r.stderr.contains("RUST_BACKTRACE"));
    assert!(r.stdout.is_empty(), "no guest ran: {r:?}");
}

struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("snapvm-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    fn path(&self) -> &Path {
        &self.0
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn missing_kernel() {
    let r = snapvm(&["run", "--kernel", "/nonexistent/vmlinux"]);
    assert_one_line_error(&r, "cannot open kernel /nonexistent/vmlinux: No such file");
}

#[test]
fn unreadable_kernel() {
    let r = snapvm(&["run", "--kernel", "/"]);
    assert_one_line_error(&r, "cannot open kernel /");
}

#[test]
fn kernel_that_is_neither_elf_nor_bzimage() {
    let d = TempDir::new("notakernel");
    let k = d.path().join("kernel.txt");
    std::fs::write(&k, "just some text, certainly not a kernel\n".repeat(100)).unwrap();
    let r = snapvm(&["run", "--kernel", k.to_str().unwrap()]);
    assert_one_line_error(&r, "is neither an ELF (vmlinux, PVH) nor a bzImage");
}

#[test]
fn elf_without_pvh_note() {
    // Any host ELF binary lacks the PVH note.
    let r = snapvm(&["run", "--kernel", "/bin/true"]);
    assert_ne!(r.code(), 0);
    assert!(r.stderr.starts_with("snapvm: error: "), "{r:?}");
    assert_eq!(r.stderr.lines().count(), 1, "{r:?}");
}

#[test]
fn zero_memory() {
    let r = snapvm(&["run", "--kernel", &guest(), "--memory", "0"]);
    assert_one_line_error(&r, "memory size 0 bytes is too small");
}

#[test]
fn memory_larger_than_can_be_mapped() {
    let r = snapvm(&["run", "--kernel", &guest(), "--memory", "100T"]);
    assert_one_line_error(&r, "bytes");
    assert!(
        r.stderr.contains("cannot map") || r.stderr.contains("does not fit"),
        "{r:?}"
    );
}

#[test]
fn malformed_memory_size() {
    let r = snapvm(&["run", "--kernel", &guest(), "--memory", "12QB"]);
    assert_one_line_error(&r, "invalid size '12QB'");
}

#[test]
fn zero_vcpus() {
    let r = snapvm(&["run", "--kernel", &guest(), "--vcpus", "0"]);
    assert_one_line_error(&r, "--vcpus must be at least 1");
}

#[test]
fn too_many_vcpus() {
    let r = snapvm(&["run", "--kernel", &guest(), "--vcpus", "4096"]);
    assert_one_line_error(&r, "--vcpus 4096 is above the limit");
}

#[test]
fn missing_initrd() {
    let r = snapvm(&[
        "run",
        "--kernel",
        &guest(),
        "--initrd",
        "/nonexistent/initrd",
    ]);
    assert_one_line_error(&r, "cannot read initrd /nonexistent/initrd");
}

#[test]
fn kvm_device_missing() {
    let r = run_with_timeout(
        Command::new(snapvm_bin())
            .env("SNAPVM_KVM_DEVICE", "/nonexistent/kvm")
            .args(["run", "--kernel", &guest()]),
        T,
    );
    assert_one_line_error(&r, "/nonexistent/kvm does not exist");
    assert!(r.stderr.contains("modprobe"), "says how to fix it: {r:?}");
}

#[test]
fn kvm_device_not_accessible() {
    // As an unprivileged user /dev/kvm (mode 0600, root) is not accessible.
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        // Already unprivileged: run directly.
        if std::fs::File::open("/dev/kvm").is_ok() {
            eprintln!("skipping: this user can open /dev/kvm");
            return;
        }
        let r = snapvm(&["run", "--kernel", &guest()]);
        assert_one_line_error(&r, "is not accessible");
        return;
    }
    let d = TempDir::new("nokvm");
    let bin = d.path().join("snapvm");
    let kernel = d.path().join("testguest.elf");
    std::fs::copy(snapvm_bin(), &bin).unwrap();
    std::fs::copy(testguest(), &kernel).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o644)).unwrap();
    let r = run_with_timeout(
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(&bin)
            .args(["run", "--kernel"])
            .arg(&kernel),
        T,
    );
    assert_one_line_error(&r, "/dev/kvm is not accessible");
    assert!(
        r.stderr.contains("usermod -aG kvm"),
        "says how to fix it: {r:?}"
    );
}

#[test]
fn unknown_option_is_a_usage_error() {
    let r = snapvm(&["run", "--kernel", &guest(), "--frobnicate"]);
    assert_eq!(r.code(), 2);
    assert!(r.stderr.contains("--frobnicate"), "{r:?}");
}
