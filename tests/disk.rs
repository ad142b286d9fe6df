//! Disks: virtio-blk over raw images and qcow2 layer chains, checked by the
//! guest (diskstamp) and by qemu-img.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use snapvm_tests::{field, run_with_timeout, snapvm_bin, testguest, Finished};

const T: Duration = Duration::from_secs(120);
const BLOCKS: u32 = 384;
const PASSES: u32 = 2;

struct TempDir(PathBuf);
impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("snapvm-disk-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn snapvm(args: &[&str]) -> Finished {
    run_with_timeout(Command::new(snapvm_bin()).args(args), T)
}

fn diskstamp(disk: &str, extra: &str) -> Finished {
    run_with_timeout(
        Command::new(snapvm_bin())
            .arg("run")
            .arg("--kernel")
            .arg(testguest())
            .args([
                "--cmdline",
                &format!("workload=diskstamp blocks={BLOCKS} passes={PASSES} seed=9 {extra}"),
            ])
            .args(["--vcpus", "2", "--memory", "128M", "--disk", disk]),
        T,
    )
}

fn assert_diskstamp_passed(r: &Finished) {
    assert_eq!(r.code(), 0, "{r:?}");
    assert!(r.lines_with("TESTGUEST FAIL").is_empty(), "{r:?}");
    let passes = r.lines_with("TESTGUEST PASS");
    assert_eq!(passes.len(), PASSES as usize, "{r:?}");
    for (i, l) in passes.iter().enumerate() {
        assert_eq!(field(l, "workload"), Some("diskstamp"));
        assert_eq!(field(l, "gen"), Some((i + 1).to_string().as_str()));
        assert_eq!(field(l, "blocks"), Some(BLOCKS.to_string().as_str()));
    }
}

fn qemu_img(args: &[&str]) -> Finished {
    run_with_timeout(Command::new("qemu-img").args(args), T)
}

fn raw_zero_disk(path: &Path, mib: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(mib << 20).unwrap();
}

#[test]
fn diskstamp_on_a_raw_disk() {
    let d = TempDir::new("raw");
    let raw = d.join("disk.raw");
    raw_zero_disk(&raw, 4);
    assert_diskstamp_passed(&diskstamp(raw.to_str().unwrap(), ""));
    // The data is on the file: every stamped block is non-zero, the rest zero.
    let data = std::fs::read(&raw).unwrap();
    let stamped = BLOCKS as usize * 4096;
    assert!(data[..stamped]
        .chunks(4096)
        .all(|b| b.iter().any(|x| *x != 0)));
    assert!(data[stamped..].iter().all(|x| *x == 0));
}

#[test]
fn diskstamp_on_a_three_layer_qcow2_chain() {
    let d = TempDir::new("chain");
    let base = d.join("base.raw");
    raw_zero_disk(&base, 4);
    std::fs::create_dir_all(d.join("layers")).unwrap();
    let mid = d.join("layers/mid.qcow2");
    let top = d.join("top.qcow2");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    assert_eq!(snapvm(&["disk", "overlay", &s(&base), &s(&mid)]).code(), 0);
    assert_eq!(snapvm(&["disk", "overlay", &s(&mid), &s(&top)]).code(), 0);

    let info = qemu_img(&["info", "--backing-chain", &s(&top)]);
    assert_eq!(info.code(), 0, "{info:?}");
    assert_eq!(info.stdout.matches("image: ").count(), 3, "{info:?}");
    assert!(
        info.stdout.contains("backing file: layers/mid.qcow2"),
        "relative path: {info:?}"
    );
    assert!(
        info.stdout.contains("backing file: ../base.raw"),
        "relative path: {info:?}"
    );
    assert!(info.stdout.contains("backing file format: raw"), "{info:?}");

    let base_before = std::fs::read(&base).unwrap();
    let mid_before = std::fs::read(&mid).unwrap();
    assert_diskstamp_passed(&diskstamp(&s(&top), ""));

    // Writes landed only in the top layer.
    assert_eq!(
        std::fs::read(&base).unwrap(),
        base_before,
        "base layer changed"
    );
    assert_eq!(
        std::fs::read(&mid).unwrap(),
        mid_before,
        "middle layer changed"
    );
    for layer in [&mid, &top] {
        let c = qemu_img(&["check", &s(layer)]);
        assert_eq!(c.code(), 0, "qemu-img check {}: {c:?}", layer.display());
        assert!(c.stdout.contains("No errors were found"), "{c:?}");
    }
    let t = qemu_img(&["compare", &s(&mid), &s(&base)]);
    assert_eq!(t.code(), 0, "lower layers read the same: {t:?}");

    // QEMU reads exactly what the guest wrote through snapvm: the same
    // deterministic workload on a raw disk gives identical contents.
    let raw = d.join("same.raw");
    raw_zero_disk(&raw, 4);
    assert_diskstamp_passed(&diskstamp(&s(&raw), ""));
    let c = qemu_img(&["compare", &s(&top), &s(&raw)]);
    assert_eq!(c.code(), 0, "qemu-img compare top vs raw: {c:?}");
    assert!(c.stdout.contains("Images are identical"), "{c:?}");
}

#[test]
fn readonly_disk_refuses_guest_writes() {
    let d = TempDir::new("ro");
    let raw = d.join("disk.raw");
    raw_zero_disk(&raw, 4);
    let r = diskstamp(&format!("{},readonly", raw.display()), "");
    assert_eq!(r.code(), 1, "{r:?}");
    assert!(
        r.stdout
            .contains("TESTGUEST FAIL workload=diskstamp request failed"),
        "{r:?}"
    );
    assert!(std::fs::read(&raw).unwrap().iter().all(|x| *x == 0));
}

fn assert_one_line_error(r: &Finished, what: &[&str]) {
    assert_ne!(r.code(), 0, "{r:?}");
    let lines: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{r:?}");
    assert!(lines[0].starts_with("snapvm: error: "), "{r:?}");
    for w in what {
        assert!(lines[0].contains(w), "expected '{w}' in {r:?}");
    }
    assert!(r.stdout.is_empty(), "{r:?}");
}

#[test]
fn missing_disk_file() {
    let r = diskstamp("/nonexistent/disk.qcow2", "");
    assert_one_line_error(&r, &["cannot open disk /nonexistent/disk.qcow2"]);
}

#[test]
fn disk_that_is_not_raw_or_qcow2() {
    let d = TempDir::new("vmdk");
    let p = d.join("disk.vmdk");
    let mut data = b"KDMV\x01\0\0\0".to_vec();
    data.resize(65536, 0);
    std::fs::write(&p, data).unwrap();
    let r = diskstamp(p.to_str().unwrap(), "");
    assert_one_line_error(&r, &["disk.vmdk", "VMDK", "raw and qcow2"]);
    let odd = d.join("odd.img");
    std::fs::write(&odd, vec![1u8; 1000]).unwrap();
    let r = diskstamp(odd.to_str().unwrap(), "");
    assert_one_line_error(&r, &["odd.img", "multiple of 512"]);
}

#[test]
fn qcow2_with_missing_backing_file() {
    let d = TempDir::new("nobacking");
    let base = d.join("base.raw");
    raw_zero_disk(&base, 1);
    let top = d.join("top.qcow2");
    assert_eq!(
        snapvm(&[
            "disk",
            "overlay",
            base.to_str().unwrap(),
            top.to_str().unwrap()
        ])
        .code(),
        0
    );
    std::fs::remove_file(&base).unwrap();
    let r = diskstamp(top.to_str().unwrap(), "");
    assert_one_line_error(&r, &["backing file", "base.raw", "top.qcow2", "missing"]);
}

#[test]
fn bad_disk_option() {
    let r = diskstamp("/tmp/x.raw,writeback", "");
    assert_one_line_error(&r, &["invalid disk option 'writeback'"]);
}

#[test]
fn overlay_never_overwrites() {
    let d = TempDir::new("nooverwrite");
    let base = d.join("base.raw");
    raw_zero_disk(&base, 1);
    let r = snapvm(&[
        "disk",
        "overlay",
        base.to_str().unwrap(),
        base.to_str().unwrap(),
    ]);
    assert_one_line_error(&r, &["already exists"]);
}

#[test]
fn qcow2_stays_consistent_when_the_vmm_is_killed_mid_write() {
    let d = TempDir::new("kill");
    let base = d.join("base.raw");
    raw_zero_disk(&base, 4);
    let top = d.join("top.qcow2");
    let s = |p: &Path| p.to_str().unwrap().to_string();
    assert_eq!(snapvm(&["disk", "overlay", &s(&base), &s(&top)]).code(), 0);
    let mut w = snapvm_tests::Watched::spawn(
        Command::new(snapvm_bin())
            .arg("run")
            .arg("--kernel")
            .arg(testguest())
            .args([
                "--cmdline",
                "workload=diskstamp blocks=1000 passes=0 seed=3",
            ])
            .args(["--memory", "64M", "--disk", &s(&top)]),
    );
    w.wait_for("TESTGUEST PASS", T)
        .expect("a first diskstamp pass");
    std::thread::sleep(Duration::from_millis(150));
    w.signal(libc::SIGKILL);
    w.wait(T);
    let c = qemu_img(&["check", &s(&top)]);
    assert_eq!(c.code(), 0, "qemu-img check after kill -9: {c:?}");
}
