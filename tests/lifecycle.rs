//! VM directories and the control plane: lifecycle through the CLI and
//! through raw HTTP on the API socket, one VMM per VM, crash recovery, the
//! console, and bad input.

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use snapvm_tests::{run_with_timeout, snapvm_bin, testguest, Finished};

const T: Duration = Duration::from_secs(60);

struct Vm {
    dir: PathBuf,
    root: PathBuf,
}

impl Vm {
    /// A fresh VM directory running the test guest's idle workload.
    fn create(tag: &str, cmdline: &str) -> Self {
        let root = std::env::temp_dir().join(format!("snapvm-lc-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let disk = root.join("d.raw");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let dir = root.join("vm");
        let r = snapvm(&[
            "create",
            dir.to_str().unwrap(),
            "--kernel",
            testguest().to_str().unwrap(),
            "--cmdline",
            cmdline,
            "--memory",
            "64M",
            "--vcpus",
            "2",
            "--disk",
            disk.to_str().unwrap(),
        ]);
        assert_eq!(r.code(), 0, "{r:?}");
        Self { dir, root }
    }

    fn cli(&self, args: &[&str]) -> Finished {
        let mut v = args.to_vec();
        let d = self.dir.to_str().unwrap().to_string();
        v.push(&d);
        snapvm(&v)
    }

    fn status(&self) -> Value {
        let r = self.cli(&["status", "--json"]);
        assert_eq!(r.code(), 0, "{r:?}");
        serde_json::from_str(&r.stdout).unwrap_or_else(|e| panic!("{e}: {r:?}"))
    }

    fn api(&self) -> PathBuf {
        self.dir.join("run/api.sock")
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = snapvm(&["stop", "--force", self.dir.to_str().unwrap()]);
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn snapvm(args: &[&str]) -> Finished {
    run_with_timeout(Command::new(snapvm_bin()).args(args), T)
}

/// One raw HTTP/1.1 request on a Unix socket (no snapvm code involved).
fn http(sock: &Path, method: &str, path: &str, body: &str) -> (u16, Value) {
    let mut s = UnixStream::connect(sock).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    let status: u16 = resp.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("");
    let v = serde_json::from_str(body).unwrap_or(Value::Null);
    (status, v)
}

fn pid_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

fn wait_gone(pid: i32) {
    let deadline = Instant::now() + T;
    while pid_alive(pid) {
        // Reaped by init once its parent (snapvm start) is gone; a zombie
        // still answers kill(0), so also accept the zombie state.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.split_whitespace().nth(2) == Some("Z") {
            return;
        }
        assert!(Instant::now() < deadline, "pid {pid} did not exit");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn lifecycle_through_the_cli() {
    let vm = Vm::create("cli", "workload=idle");
    assert_eq!(vm.status()["state"], "stopped");
    let r = vm.cli(&["start"]);
    assert_eq!(r.code(), 0, "{r:?}");
    assert!(r.stdout.contains("started vm"), "{r:?}");

    let s = vm.status();
    assert_eq!(s["state"], "running");
    assert_eq!(s["vcpus"], 2);
    assert_eq!(s["memory_bytes"], 64 << 20);
    let pid = s["pid"].as_i64().unwrap() as i32;
    assert!(pid_alive(pid));
    let pidfile: i32 = std::fs::read_to_string(vm.dir.join("run/pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(pid, pidfile, "status --json matches reality");
    let layers = s["disks"][0]["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 1);
    assert!(Path::new(layers[0].as_str().unwrap()).is_file());
    assert!(s["uptime_s"].as_f64().unwrap() >= 0.0);

    let mode = std::fs::metadata(vm.api()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "API socket mode");

    assert_eq!(vm.cli(&["pause"]).code(), 0);
    assert_eq!(vm.status()["state"], "paused");
    let again = vm.cli(&["pause"]);
    assert_eq!(again.code(), 1);
    assert!(again.stderr.contains("already paused"), "{again:?}");
    assert_eq!(vm.cli(&["resume"]).code(), 0);
    assert_eq!(vm.status()["state"], "running");
    let again = vm.cli(&["resume"]);
    assert!(again.stderr.contains("already running"), "{again:?}");

    let list = snapvm(&["list", vm.root.to_str().unwrap(), "--json"]);
    let list: Value = serde_json::from_str(&list.stdout).unwrap();
    assert_eq!(list[0]["state"], "running");

    assert_eq!(vm.cli(&["stop"]).code(), 0);
    wait_gone(pid);
    assert_eq!(vm.status()["state"], "stopped");
    assert!(!vm.api().exists(), "socket removed on stop");
    assert!(!vm.dir.join("run/pid").exists());
    let serial = std::fs::read_to_string(vm.dir.join("logs/serial.log")).unwrap();
    assert!(serial.contains("TESTGUEST READY vcpus=2"), "{serial}");
    assert!(vm.dir.join("logs/vmm.log").is_file());

    // Operations that do not fit a stopped VM.
    for op in ["pause", "resume", "stop", "console"] {
        let r = vm.cli(&[op]);
        assert_eq!(r.code(), 1, "{op}: {r:?}");
        assert!(r.stderr.contains("is not running"), "{op}: {r:?}");
    }
}

#[test]
fn lifecycle_through_raw_http() {
    let vm = Vm::create("http", "workload=idle");
    assert_eq!(vm.cli(&["start", "--paused"]).code(), 0);
    let (st, v) = http(&vm.api(), "GET", "/vm", "");
    assert_eq!((st, v["state"].as_str()), (200, Some("paused")));
    let (st, v) = http(&vm.api(), "PUT", "/vm/state", r#"{"state":"running"}"#);
    assert_eq!((st, v["state"].as_str()), (200, Some("running")));
    let (st, v) = http(&vm.api(), "PUT", "/vm/state", r#"{"state":"running"}"#);
    assert_eq!(st, 409);
    assert!(v["error"].as_str().unwrap().contains("already running"));
    let (st, v) = http(&vm.api(), "PUT", "/vm/state", r#"{"state":"#);
    assert_eq!(st, 400);
    assert!(v["error"].as_str().unwrap().contains("not valid JSON"));
    let (st, v) = http(&vm.api(), "PUT", "/vm/state", r#"{"state":"flying"}"#);
    assert_eq!(st, 400, "{v}");
    let (st, _) = http(&vm.api(), "PUT", "/vm/state", r#"{"colour":"red"}"#);
    assert_eq!(st, 400);
    let (st, v) = http(&vm.api(), "GET", "/nope", "");
    assert_eq!(st, 404);
    assert!(v["error"].is_string());
    let (st, _) = http(&vm.api(), "DELETE", "/vm", "");
    assert_eq!(st, 405);
    let (st, v) = http(&vm.api(), "GET", "/jobs", "");
    assert_eq!((st, v.as_array().map(Vec::len)), (200, Some(0)));
    let (st, _) = http(&vm.api(), "GET", "/jobs/0000", "");
    assert_eq!(st, 404);
    let pid = http(&vm.api(), "GET", "/vm", "").1["pid"].as_i64().unwrap() as i32;
    let (st, _) = http(&vm.api(), "PUT", "/vm/state", r#"{"state":"stopped"}"#);
    assert_eq!(st, 200);
    wait_gone(pid);
    assert_eq!(vm.status()["state"], "stopped");
}

#[test]
fn one_vmm_per_vm_and_recovery_after_kill_9() {
    let vm = Vm::create("single", "workload=idle");
    // Two concurrent starts: exactly one wins.
    let spawn = || {
        Command::new(snapvm_bin())
            .args(["start", vm.dir.to_str().unwrap()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (a, b) = (spawn(), spawn());
    let (a, b) = (a.wait_with_output().unwrap(), b.wait_with_output().unwrap());
    let ok = [&a, &b].iter().filter(|o| o.status.success()).count();
    assert_eq!(ok, 1, "a: {a:?}\nb: {b:?}");
    let loser = if a.status.success() { &b } else { &a };
    assert!(
        String::from_utf8_lossy(&loser.stderr).contains("already running"),
        "{loser:?}"
    );
    let again = vm.cli(&["start"]);
    assert_eq!(again.code(), 1);
    assert!(again.stderr.contains("already running"), "{again:?}");

    // kill -9: the stale pid file and sockets stay behind, yet status says
    // stopped and start works again.
    let pid = vm.status()["pid"].as_i64().unwrap() as i32;
    // SAFETY: kill(2) on the VMM we started.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_gone(pid);
    assert!(
        vm.dir.join("run/pid").exists() && vm.api().exists(),
        "stale files left"
    );
    assert_eq!(vm.status()["state"], "stopped");
    let r = vm.cli(&["start"]);
    assert_eq!(r.code(), 0, "{r:?}");
    let s = vm.status();
    assert_eq!(s["state"], "running");
    assert_ne!(s["pid"].as_i64().unwrap() as i32, pid);
    let log = std::fs::read_to_string(vm.dir.join("logs/vmm.log")).unwrap();
    assert!(log.contains("did not stop cleanly"), "{log}");
    assert_eq!(vm.cli(&["stop", "--force"]).code(), 0);
    assert_eq!(vm.status()["state"], "stopped");
}

#[test]
fn console_attach_sees_guest_output_and_detaches() {
    let vm = Vm::create("console", "workload=memstamp mem_mib=8 passes=0 rate=20");
    assert_eq!(vm.cli(&["start"]).code(), 0);
    let mut c = Command::new(snapvm_bin())
        .args(["console", vm.dir.to_str().unwrap()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = c.stdout.take().unwrap();
    let mut seen = String::new();
    let deadline = Instant::now() + T;
    let mut buf = [0u8; 4096];
    // The backlog replays READY; live output brings PASS lines.
    while !(seen.contains("TESTGUEST READY") && seen.contains("TESTGUEST PASS")) {
        assert!(Instant::now() < deadline, "console output: {seen}");
        let n = out.read(&mut buf).unwrap();
        assert!(n > 0, "console closed: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    c.stdin.as_mut().unwrap().write_all(&[0x1d]).unwrap();
    let status = c.wait().unwrap();
    assert!(status.success());
    let mut err = String::new();
    c.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(
        err.contains("detach with Ctrl-]") && err.contains("detached"),
        "{err}"
    );
    assert_eq!(
        vm.status()["state"],
        "running",
        "detaching leaves the VM running"
    );
}

#[test]
fn bad_vm_directories() {
    let r = snapvm(&["start", "/nonexistent/vm"]);
    assert_eq!(r.code(), 1);
    assert!(
        r.stderr.contains("/nonexistent/vm is not a VM directory"),
        "{r:?}"
    );
    let r = snapvm(&["status", "/tmp"]);
    assert!(r.stderr.contains("is not a VM directory"), "{r:?}");

    let vm = Vm::create("badtoml", "workload=idle");
    let cfg = vm.dir.join("vm.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, text.replace("vcpus = 2", "vcpus = 0")).unwrap();
    let r = vm.cli(&["start"]);
    assert_eq!(r.code(), 1);
    assert!(r.stderr.contains("key 'vcpus'"), "{r:?}");
    std::fs::write(&cfg, text.replace("memory = \"64M\"", "memory = 64")).unwrap();
    let r = vm.cli(&["start"]);
    assert!(r.stderr.contains("memory"), "{r:?}");
    std::fs::write(&cfg, &text).unwrap();

    // A VM directory whose socket path cannot fit a Unix socket address.
    let deep = vm.root.join("d".repeat(60)).join("e".repeat(60));
    let r = snapvm(&[
        "create",
        deep.to_str().unwrap(),
        "--kernel",
        testguest().to_str().unwrap(),
    ]);
    assert_eq!(r.code(), 1, "{r:?}");
    assert!(
        r.stderr
            .contains("longer than the 107 a Unix socket allows"),
        "{r:?}"
    );

    let r = vm.cli(&["create", "--kernel", testguest().to_str().unwrap()]);
    assert!(r.stderr.contains("already holds a VM"), "{r:?}");
}

/// (thread name, Cpus_allowed_list) of each vCPU thread of process `pid`.
fn vcpu_affinity(pid: i32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let name = comm.trim().to_string();
        if !name.starts_with("vcpu") {
            continue;
        }
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let cpus = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap_or("")
            .trim()
            .to_string();
        out.push((name, cpus));
    }
    out.sort();
    out
}

/// The host CPUs this test may run on, as a list of numbers.
fn allowed_cpus() -> Vec<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim();
    let mut cpus = Vec::new();
    for part in list.split(',') {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.parse().unwrap(), b.parse().unwrap());
                cpus.extend((a..=b).map(|c| c.to_string()));
            }
            None => cpus.push(part.to_string()),
        }
    }
    cpus
}

/// VmFlags of the guest RAM mapping (64 MiB) of process `pid`.
fn guest_ram_flags(pid: i32) -> String {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut size_kib = 0;
    for line in smaps.lines() {
        if let Some(v) = line.strip_prefix("Size:") {
            size_kib = v.trim().trim_end_matches(" kB").parse().unwrap_or(0);
        }
        if let Some(v) = line.strip_prefix("VmFlags:") {
            if size_kib == 64 * 1024 {
                return v.trim().to_string();
            }
        }
    }
    panic!("no 64 MiB guest RAM mapping in /proc/{pid}/smaps");
}

/// The kvm_pvm workarounds, with their vm.toml switches: vCPU threads run
/// on one host CPU each, round robin, when pinned ("auto" pins on the
/// kvm_pvm backend these machines have), and guest RAM is on huge pages
/// unless "off" keeps it on 4 KiB pages (the old kvm_pvm workaround);
/// "on" and "off" force them.
#[test]
fn vcpu_threads_are_pinned_where_the_backend_needs_it_and_huge_pages_follow_the_switch() {
    let allowed = allowed_cpus();
    let whole = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("Cpus_allowed_list:")
                .map(|s| s.trim().to_string())
        })
        .unwrap();
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    for (policy, pinned, huge) in [
        ("auto", pvm, true),
        ("on", true, true),
        ("off", false, false),
    ] {
        let vm = Vm::create(&format!("pin{policy}"), "workload=idle");
        let toml = vm.dir.join("vm.toml");
        let text = std::fs::read_to_string(&toml).unwrap();
        assert!(text.contains("pin_vcpus = \"auto\""), "{text}");
        assert!(text.contains("huge_pages = \"auto\""), "{text}");
        std::fs::write(&toml, text.replace("\"auto\"", &format!("\"{policy}\""))).unwrap();
        let r = vm.cli(&["start"]);
        assert_eq!(r.code(), 0, "{r:?}");
        let pid = vm.status()["pid"].as_i64().unwrap() as i32;
        let expected: Vec<(String, String)> = (0..2)
            .map(|i| {
                let cpus = if pinned {
                    allowed[i % allowed.len()].clone()
                } else {
                    whole.clone()
                };
                (format!("vcpu{i}"), cpus)
            })
            .collect();
        assert_eq!(vcpu_affinity(pid), expected, "pin_vcpus = {policy}");
        let flags = guest_ram_flags(pid);
        let advice = if huge { "hg" } else { "nh" };
        assert!(
            flags.split(' ').any(|f| f == advice),
            "huge_pages = {policy}: guest RAM flags {flags}"
        );
        let r = vm.cli(&["stop"]);
        assert_eq!(r.code(), 0, "{r:?}");
    }
    // A value vm.toml cannot hold is refused with the key named.
    let vm = Vm::create("pinbad", "workload=idle");
    let toml = vm.dir.join("vm.toml");
    let text = std::fs::read_to_string(&toml).unwrap();
    for key in ["pin_vcpus", "huge_pages"] {
        let bad = text.replace(
            &format!("{key} = \"auto\""),
            &format!("{key} = \"sometimes\""),
        );
        std::fs::write(&toml, bad).unwrap();
        let r = vm.cli(&["start"]);
        assert_ne!(r.code(), 0, "{r:?}");
        assert!(r.stderr.contains(key), "{key}: {r:?}");
    }
}
