//! Helpers for snapvm's end-to-end tests: find the `snapvm` binary and the
//! test guest, run commands with a deadline, and read the guest's serial
//! protocol (guest-images/README.md).

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub mod netns;
pub mod vmfiles;

/// The `snapvm` binary: `$SNAPVM_BIN`, or the one cargo built next to this
/// test executable (`cargo build` the workspace first; `.ci/run` does).
pub fn snapvm_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("SNAPVM_BIN") {
        return p.into();
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>/snapvm
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("test binary lives in target/<profile>/deps");
    let bin = dir.join("snapvm");
    assert!(
        bin.exists(),
        "{} not found: build it first (cargo build --workspace, same profile) or set SNAPVM_BIN",
        bin.display()
    );
    bin
}

/// The built test guest.
pub fn testguest() -> PathBuf {
    guest_images::testguest_path().to_path_buf()
}

/// A finished command.
#[derive(Debug)]
pub struct Finished {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything on stdout.
    pub stdout: String,
    /// Everything on stderr.
    pub stderr: String,
}

impl Finished {
    /// The exit code (panics if killed by a signal).
    pub fn code(&self) -> i32 {
        self.status
            .code()
            .unwrap_or_else(|| panic!("killed by a signal: {self:?}"))
    }

    /// Lines of stdout starting with `prefix`.
    pub fn lines_with(&self, prefix: &str) -> Vec<&str> {
        self.stdout
            .lines()
            .filter(|l| l.starts_with(prefix))
            .collect()
    }
}

/// Runs `cmd` to completion with stdin closed, killing it after `timeout`.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Finished {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let out = drain(child.stdout.take().expect("stdout"));
    let err = drain(child.stderr.take().expect("stderr"));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{cmd:?} did not finish in {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                out.recv().unwrap_or_default(),
                err.recv().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Finished {
        status,
        stdout: out.recv().unwrap_or_default(),
        stderr: err.recv().unwrap_or_default(),
    }
}

fn drain(mut r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut s = String::new();
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        s.push_str(&String::from_utf8_lossy(&buf));
        let _ = tx.send(s);
    });
    rx
}

/// `snapvm run` on the test guest with `cmdline`, `vcpus` and `memory`.
pub fn run_guest(cmdline: &str, vcpus: u32, memory: &str, timeout: Duration) -> Finished {
    run_with_timeout(
        Command::new(snapvm_bin())
            .arg("run")
            .arg("--kernel")
            .arg(testguest())
            .args(["--cmdline", cmdline])
            .args(["--vcpus", &vcpus.to_string()])
            .args(["--memory", memory]),
        timeout,
    )
}

/// A child whose stdout is read line by line.
pub struct Watched {
    /// The process.
    pub child: Child,
    lines: mpsc::Receiver<String>,
    /// Lines seen so far.
    pub seen: Vec<String>,
}

impl Watched {
    /// Starts `cmd` with piped stdout and stdin closed.
    pub fn spawn(cmd: &mut Command) -> Self {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                match line {
                    Ok(l) => {
                        if tx.send(l).is_err() {
                            break;
                        }
                    }
                    Err(_) => break,
                }
            }
        });
        Self {
            child,
            lines: rx,
            seen: Vec::new(),
        }
    }

    /// Waits for a line starting with `prefix`; returns it, or None on
    /// timeout or end of output.
    pub fn wait_for(&mut self, prefix: &str, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self.lines.recv_timeout(left) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.starts_with(prefix) {
                        return Some(l);
                    }
                }
                Err(_) => return None,
            }
        }
    }

    /// Sends `sig` to the child.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, sig) };
    }

    /// Waits up to `timeout` for the child to exit; kills it otherwise.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything the child wrote to stderr (after it exited).
    pub fn stderr(&mut self) -> String {
        let mut s = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = e.read_to_string(&mut s);
        }
        s
    }
}

/// Parses `key=value` fields of a protocol line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// A VM directory for tests, stopped and removed when dropped.
pub struct TestVm {
    /// The VM directory.
    pub dir: PathBuf,
    /// A scratch directory holding it (and whatever the test adds).
    pub root: PathBuf,
}

/// Runs `snapvm ARGS` to completion (60 s at most).
pub fn snapvm(args: &[&str]) -> Finished {
    run_with_timeout(
        Command::new(snapvm_bin()).args(args),
        Duration::from_secs(120),
    )
}

impl TestVm {
    /// Creates a VM directory running the test guest with `cmdline`;
    /// `disk_mib` > 0 adds a zeroed raw disk.
    pub fn create(tag: &str, cmdline: &str, memory: &str, vcpus: u32, disk_mib: u64) -> Self {
        let root = std::env::temp_dir().join(format!("snapvm-t-{tag}-{}", std::process::id()));
        Self::create_in(&root, cmdline, memory, vcpus, disk_mib)
    }

    /// [`TestVm::create`] in a given scratch directory.
    pub fn create_in(
        root: &std::path::Path,
        cmdline: &str,
        memory: &str,
        vcpus: u32,
        disk_mib: u64,
    ) -> Self {
        Self::create_with(root, cmdline, memory, vcpus, disk_mib, &[])
    }

    /// [`TestVm::create_in`] with more `snapvm create` options.
    pub fn create_with(
        root: &std::path::Path,
        cmdline: &str,
        memory: &str,
        vcpus: u32,
        disk_mib: u64,
        extra: &[&str],
    ) -> Self {
        let _ = std::fs::remove_dir_all(root);
        std::fs::create_dir_all(root).unwrap();
        let dir = root.join("vm");
        let guest = testguest();
        let vc = vcpus.to_string();
        let mut args = vec![
            "create",
            dir.to_str().unwrap(),
            "--kernel",
            guest.to_str().unwrap(),
            "--cmdline",
            cmdline,
            "--memory",
            memory,
            "--vcpus",
            &vc,
        ];
        let disk = root.join("disk.raw");
        let disk_s = disk.to_str().unwrap().to_string();
        if disk_mib > 0 {
            std::fs::File::create(&disk)
                .unwrap()
                .set_len(disk_mib << 20)
                .unwrap();
            args.extend(["--disk", &disk_s]);
        }
        args.extend_from_slice(extra);
        let r = snapvm(&args);
        assert_eq!(r.code(), 0, "{r:?}");
        Self {
            dir,
            root: root.to_path_buf(),
        }
    }

    /// Runs `snapvm ARGS VMDIR`.
    pub fn cli(&self, args: &[&str]) -> Finished {
        let mut v = args.to_vec();
        let d = self.dir.to_str().unwrap().to_string();
        v.push(&d);
        snapvm(&v)
    }

    /// Runs `snapvm ARGS VMDIR` and asserts it succeeded.
    pub fn ok(&self, args: &[&str]) -> Finished {
        let r = self.cli(args);
        assert_eq!(r.code(), 0, "snapvm {args:?}: {r:?}");
        r
    }

    /// Runs `snapvm ARGS VMDIR MORE` and asserts it succeeded.
    pub fn ok2(&self, args: &[&str], more: &[&str]) -> Finished {
        let r = self.cli2(args, more);
        assert_eq!(r.code(), 0, "snapvm {args:?} {more:?}: {r:?}");
        r
    }

    /// Runs `snapvm ARGS VMDIR MORE`.
    pub fn cli2(&self, args: &[&str], more: &[&str]) -> Finished {
        let mut v = args.to_vec();
        let d = self.dir.to_str().unwrap().to_string();
        v.push(&d);
        v.extend_from_slice(more);
        snapvm(&v)
    }

    /// `snapvm status --json`.
    pub fn status(&self) -> serde_json::Value {
        let r = self.cli(&["status", "--json"]);
        assert_eq!(r.code(), 0, "{r:?}");
        serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {r:?}"))
    }

    /// The guest's console output so far.
    pub fn serial(&self) -> String {
        std::fs::read_to_string(self.dir.join("logs/serial.log")).unwrap_or_default()
    }

    /// The last `n` lines of the VMM's log.
    pub fn vmm_log_tail(&self, n: usize) -> String {
        let log = std::fs::read_to_string(self.dir.join("logs/vmm.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Waits until the console shows `count` lines containing `pattern`
    /// after byte offset `from`; panics on a FAIL line or timeout.
    pub fn wait_serial(
        &self,
        from: usize,
        pattern: &str,
        count: usize,
        timeout: Duration,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.serial();
            let tail = s.get(from..).unwrap_or("");
            assert!(
                !tail.contains("TESTGUEST FAIL"),
                "guest failed:\n{tail}\nvmm.log (end):\n{}",
                self.vmm_log_tail(40)
            );
            // Complete lines only: the guest may be in the middle of one.
            let complete = &tail[..tail.rfind('\n').map_or(0, |i| i + 1)];
            if complete.lines().filter(|l| l.contains(pattern)).count() >= count {
                return complete.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no {count} x '{pattern}' within {timeout:?}:\n{tail}\nvmm.log:\n{}",
                std::fs::read_to_string(self.dir.join("logs/vmm.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Takes a snapshot named `name`; returns its id.
    pub fn take(&self, name: &str) -> String {
        let r = self.ok2(&["snapshot", "create"], &["--name", name]);
        r.stdout.split_whitespace().nth(1).unwrap().to_string()
    }

    /// Applies `snap` to the running VM (with `extra` options) and checks
    /// that the guest verifies memory and disk after it: a diskstamp pass
    /// checks every block against generations kept in memory, a memstamp
    /// pass on vCPU 1 every page. Returns the command's output.
    pub fn apply_and_verify(&self, snap: &str, extra: &[&str], timeout: Duration) -> String {
        let pid = self.status()["pid"].clone();
        let mark = self.serial().len();
        let mut more = vec![snap];
        more.extend_from_slice(extra);
        let r = self.cli2(&["snapshot", "apply"], &more);
        assert_eq!(
            r.code(),
            0,
            "{r:?}\nvmm.log:\n{}",
            std::fs::read_to_string(self.dir.join("logs/vmm.log")).unwrap_or_default()
        );
        assert!(r.stdout.contains("the VM is running"), "{r:?}");
        assert_eq!(self.status()["pid"], pid, "applied inside the same VMM");
        let out = self.wait_serial(mark, "workload=diskstamp gen=", 1, timeout);
        self.wait_serial(mark, "vcpu=1 gen=", 1, timeout);
        assert!(!out.contains("READY"), "not rebooted: {out}");
        r.stdout
    }

    /// The snapshot tree (`snapshot list --json`).
    pub fn tree(&self) -> serde_json::Value {
        let r = self.cli(&["snapshot", "list", "--json"]);
        assert_eq!(r.code(), 0, "{r:?}");
        serde_json::from_str(&r.stdout).unwrap()
    }

    /// Copies the whole VM directory to `dest` (a new VM with the same
    /// snapshots), without its runtime files.
    pub fn copy_to(&self, dest: &std::path::Path) -> TestVm {
        let _ = std::fs::remove_dir_all(dest);
        std::fs::create_dir_all(dest).unwrap();
        let st = Command::new("cp")
            .arg("-a")
            .arg(&self.dir)
            .arg(dest.join("vm"))
            .status()
            .unwrap();
        assert!(st.success());
        let _ = std::fs::remove_dir_all(dest.join("vm/run"));
        let _ = std::fs::remove_file(dest.join("vm/logs/serial.log"));
        TestVm {
            dir: dest.join("vm"),
            root: dest.to_path_buf(),
        }
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        let _ = snapvm(&["stop", "--force", self.dir.to_str().unwrap()]);
        // A failed test keeps its VM directory (logs, snapshots) for a
        // post-mortem; SNAPVM_KEEP_TEST_DIRS=1 keeps every one.
        if std::thread::panicking() {
            eprintln!("kept the test VM directory {}", self.root.display());
        } else if std::env::var_os("SNAPVM_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

/// Mounts a tmpfs of `size` (e.g. "48M") on `dir` (needs root).
pub fn mount_tmpfs(dir: &std::path::Path, size: &str) -> bool {
    std::fs::create_dir_all(dir).unwrap();
    Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Changes the size of the tmpfs on `dir`.
pub fn resize_tmpfs(dir: &std::path::Path, size: &str) {
    let st = Command::new("mount")
        .args(["-o", &format!("remount,size={size}")])
        .arg(dir)
        .status()
        .unwrap();
    assert!(st.success(), "remount {} size={size}", dir.display());
}

/// Stops the VM in `<dir>/vm`, unmounts the tmpfs on `dir` and removes `dir`
/// when dropped.
pub struct Unmount(pub std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = snapvm(&["stop", "--force", self.0.join("vm").to_str().unwrap()]);
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        // The mount point itself (empty once unmounted; a tmpfs keeps
        // nothing for a post-mortem anyway).
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Command line that lets Linux boot under the emulating backend
/// (docs/kvm-backend.md, "Linux guests here").
pub const LINUX_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 noxsave nofsgsbase noinvpcid \
     clearcpuid=popcnt,smap,rdtscp,erms,fsrm percpu_alloc=page rodata=off quiet";

/// The built Linux guest (vmlinux, initramfs.cpio, disk.ext4).
pub fn linux_dir() -> PathBuf {
    let dir = std::env::var_os("SNAPVM_LINUX_GUEST")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/linux-guest/out")
        });
    for f in ["vmlinux", "initramfs.cpio", "disk.ext4"] {
        assert!(
            dir.join(f).exists(),
            "{} missing: run guest-images/linux/build.sh first (scripts/test does)",
            dir.join(f).display()
        );
    }
    dir
}
