//! The CLI side of VM lifecycle: start a background VMM for a VM directory,
//! stop, pause, resume, show status, list VMs, attach to the console. Every
//! operation on a running VM goes through its control API.

use std::io::{BufRead, Read, Seek, SeekFrom, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::api_client::{self, ClientError};
use crate::console::DETACH_KEY;
use crate::daemon::{disk_status, is_running};
use crate::snapshots::{CreateOptions, SnapshotError};
use crate::vmdir::{VmDir, VmDirError};
use snapshot::tree::{PowerState, Tree};

/// How long `start` and `stop` wait for the VMM.
pub const WAIT: Duration = Duration::from_secs(60);

/// How long `status` waits for a VMM that is starting or stopping to
/// answer or exit before it reports what the VM directory says.
const STATUS_WAIT: Duration = Duration::from_secs(5);

/// Errors of lifecycle commands.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// The VM directory is unusable.
    #[error(transparent)]
    VmDir(#[from] VmDirError),
    /// The API said no, or could not be reached.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The VM is already running.
    #[error("VM {0} is already running (pid {1}); stop it first or use `snapvm status`")]
    AlreadyRunning(PathBuf, String),
    /// The VM is not running.
    #[error("VM {0} is not running")]
    NotRunning(PathBuf),
    /// The VMM did not come up.
    #[error("the VMM did not start: {0}")]
    StartFailed(String),
    /// The VMM did not go away.
    #[error("the VMM of {0} did not stop within 60 s; use `snapvm stop --force`")]
    StopTimeout(PathBuf),
    /// A snapshot operation failed.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// A job failed.
    #[error("{0}")]
    JobFailed(String),
    /// Local I/O failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LifecycleError {
    let what = what.into();
    move |source| LifecycleError::Io { what, source }
}

/// Whether the VM's lock is held by a VMM that is still alive, waiting up to
/// `patience` for one that is exiting. A VMM killed with SIGKILL keeps its
/// lock until its last thread is gone, which takes a moment while the
/// kernel frees guest memory; its main thread is a zombie meanwhile (and
/// `status` already says stopped).
fn held_by_live_vmm(dir: &VmDir, patience: Duration) -> bool {
    let deadline = Instant::now() + patience;
    while is_running(dir) {
        let exiting = pid_of(dir).parse::<i32>().is_ok_and(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // The state follows the command name in parentheses.
            let state = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.chars().next());
            matches!(state, None | Some('Z') | Some('X'))
        });
        if !exiting || Instant::now() > deadline {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn pid_of(dir: &VmDir) -> String {
    std::fs::read_to_string(dir.pid_file())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// Lines starting "snapvm: error:" that the VMM wrote to vmm.log after `from`.
fn startup_errors(log: &Path, from: u64) -> Vec<String> {
    let Ok(mut f) = std::fs::File::open(log) else {
        return vec![];
    };
    if f.seek(SeekFrom::Start(from)).is_err() {
        return vec![];
    }
    std::io::BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .filter_map(|l| l.strip_prefix("snapvm: error: ").map(str::to_string))
        .collect()
}

/// Starts the VMM of `root` in the background; returns its status once the
/// guest runs (or is paused, with `paused`).
pub fn start(root: &Path, paused: bool) -> Result<Value, LifecycleError> {
    start_from(root, paused, None)
}

/// [`start`], continuing from snapshot `from` when given. A snapshot taken
/// powered off only sets configuration and disks: the VM stays off.
pub fn start_from(root: &Path, paused: bool, from: Option<&str>) -> Result<Value, LifecycleError> {
    let dir = VmDir::open(root)?;
    dir.load()?;
    dir.check_socket_paths()?;
    if held_by_live_vmm(&dir, Duration::from_secs(30)) {
        return Err(LifecycleError::AlreadyRunning(
            dir.root().to_path_buf(),
            pid_of(&dir),
        ));
    }
    if let Some(reference) = from {
        let tree = Tree::load(&crate::snapshots::tree_path(&dir)).map_err(SnapshotError::from)?;
        let snap = tree.resolve(reference).map_err(SnapshotError::from)?;
        if snap.power_state == PowerState::Off {
            crate::snapshots::prepare_restore(&dir, &snap.id)?;
            return status(root);
        }
    }
    std::fs::create_dir_all(dir.logs_dir()).map_err(io("cannot create logs/"))?;
    let log_path = dir.vmm_log();
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(io(format!("cannot open {}", log_path.display())))?;
    let offset = log.metadata().map(|m| m.len()).unwrap_or(0);
    let exe = std::env::current_exe().map_err(io("cannot find the snapvm executable"))?;
    let mut cmd = Command::new(exe);
    cmd.arg("__vmm").arg(dir.root());
    if paused {
        cmd.arg("--paused");
    }
    if let Some(f) = from {
        cmd.arg("--from").arg(f);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(io("cannot open vmm.log"))?)
        .stderr(log)
        .env(
            "SNAPVM_LOG",
            std::env::var("SNAPVM_LOG").unwrap_or_else(|_| "info".into()),
        )
        // Its own process group: Ctrl-C in this terminal does not reach it.
        .process_group(0)
        .spawn()
        .map_err(io("cannot start the VMM process"))?;
    let deadline = Instant::now() + WAIT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            let errors = startup_errors(&log_path, offset);
            let msg = errors
                .last()
                .cloned()
                .unwrap_or_else(|| format!("it exited with {status}; see {}", log_path.display()));
            return Err(LifecycleError::StartFailed(msg));
        }
        match api_client::request(&dir.api_socket(), "GET", "/vm", None) {
            Ok(v) if v["pid"].as_u64() == Some(child.id() as u64) => return Ok(v),
            Ok(v) => {
                // Another `start` won the race: our VMM loses the lock and exits.
                let _ = child.wait();
                return Err(LifecycleError::AlreadyRunning(
                    dir.root().to_path_buf(),
                    v["pid"].to_string(),
                ));
            }
            // Not bound yet, or exiting (the next round reads why).
            Err(ClientError::NotRunning(_) | ClientError::Closed(_)) => {}
            Err(e) => return Err(e.into()),
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(LifecycleError::StartFailed(format!(
                "no answer on {} within 60 s; see {}",
                dir.api_socket().display(),
                log_path.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn wait_stopped(dir: &VmDir) -> Result<(), LifecycleError> {
    let deadline = Instant::now() + WAIT;
    while is_running(dir) {
        if Instant::now() > deadline {
            return Err(LifecycleError::StopTimeout(dir.root().to_path_buf()));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Stops the VM: through the API, or with `force` by killing the VMM.
pub fn stop(root: &Path, force: bool) -> Result<(), LifecycleError> {
    let dir = VmDir::open(root)?;
    if !is_running(&dir) {
        return Err(LifecycleError::NotRunning(dir.root().to_path_buf()));
    }
    if force {
        let pid: i32 = pid_of(&dir)
            .parse()
            .map_err(|_| LifecycleError::NotRunning(dir.root().to_path_buf()))?;
        // SAFETY: kill(2) with a pid read from the VM's pid file, whose
        // holder also holds the VM's lock (checked above).
        unsafe { libc::kill(pid, libc::SIGKILL) };
        wait_stopped(&dir)?;
        for stale in [dir.api_socket(), dir.console_socket(), dir.pid_file()] {
            let _ = std::fs::remove_file(stale);
        }
        return Ok(());
    }
    api_client::request(
        &dir.api_socket(),
        "PUT",
        "/vm/state",
        Some(&json!({"state": "stopped"})),
    )?;
    wait_stopped(&dir)
}

/// Pauses or resumes (`target` = "paused" or "running").
pub fn set_state(root: &Path, target: &str) -> Result<Value, LifecycleError> {
    let dir = VmDir::open(root)?;
    if !is_running(&dir) {
        return Err(LifecycleError::NotRunning(dir.root().to_path_buf()));
    }
    Ok(api_client::request(
        &dir.api_socket(),
        "PUT",
        "/vm/state",
        Some(&json!({ "state": target })),
    )?)
}

/// The VM's status: from its VMM when running, from vm.toml otherwise.
pub fn status(root: &Path) -> Result<Value, LifecycleError> {
    let dir = VmDir::open(root)?;
    let toml = dir.load()?;
    // A VMM that holds the lock but does not answer is starting (its
    // socket is not bound yet) or stopping (it writes last-exit.json, then
    // lets go of the lock): ask again until it answers or is gone.
    let deadline = Instant::now() + STATUS_WAIT;
    while is_running(&dir) {
        match api_client::request(&dir.api_socket(), "GET", "/vm", None) {
            Ok(v) => return Ok(v),
            Err(ClientError::NotRunning(_) | ClientError::Closed(_))
                if Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(ClientError::NotRunning(_) | ClientError::Closed(_)) => break,
            Err(e) => return Err(e.into()),
        }
    }
    let last_exit: Value = std::fs::read_to_string(dir.logs_dir().join("last-exit.json"))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .unwrap_or(Value::Null);
    Ok(json!({
        "name": toml.name,
        "vmdir": dir.root(),
        "state": "stopped",
        "pid": Value::Null,
        "uptime_s": Value::Null,
        "memory_bytes": crate::config::parse_size(&toml.memory).unwrap_or(0),
        "vcpus": toml.vcpus,
        "disks": disk_status(&dir, &toml),
        "merges": crate::daemon::merge_status(&dir, None),
        "last_exit": last_exit,
    }))
}

/// Human-readable status.
pub fn format_status(v: &Value) -> String {
    let mut s = format!(
        "{}: {}\n  directory: {}\n",
        v["name"].as_str().unwrap_or("?"),
        v["state"].as_str().unwrap_or("?"),
        v["vmdir"].as_str().unwrap_or("?")
    );
    if let Some(pid) = v["pid"].as_u64() {
        s += &format!(
            "  pid: {pid}\n  uptime: {:.1} s\n",
            v["uptime_s"].as_f64().unwrap_or(0.0)
        );
    }
    s += &format!(
        "  memory: {} MiB\n  vcpus: {}\n",
        v["memory_bytes"].as_u64().unwrap_or(0) >> 20,
        v["vcpus"]
    );
    for d in v["disks"].as_array().into_iter().flatten() {
        s += &format!(
            "  disk {}{}:\n",
            d["name"].as_str().unwrap_or("?"),
            if d["readonly"].as_bool() == Some(true) {
                " (read-only)"
            } else {
                ""
            }
        );
        for (i, l) in d["layers"].as_array().into_iter().flatten().enumerate() {
            let role = if i == 0 { "working layer" } else { "backing" };
            s += &format!("    {}  ({role})\n", l.as_str().unwrap_or("?"));
        }
    }
    if let Some(l) = v["memory_load"].as_object() {
        let n = |k: &str| l.get(k).and_then(Value::as_u64).unwrap_or(0) * 2;
        s += &format!(
            "  memory still loading after an apply: {} of {} MiB\n",
            n("chunks_loaded"),
            n("chunks")
        );
    }
    let m = &v["merges"];
    if let Some(j) = m["job"].as_object() {
        let (done, total) = (
            j.get("done").and_then(Value::as_u64).unwrap_or(0),
            j.get("total").and_then(Value::as_u64).unwrap_or(0),
        );
        s += &format!(
            "  merge in progress: job {}, {} of {} MiB\n",
            j.get("id").and_then(Value::as_str).unwrap_or("?"),
            done >> 20,
            total >> 20
        );
    }
    if let Some(p) = m["in_progress"].as_object() {
        s += &format!(
            "  merging: {} with {}\n",
            p.get("parent").and_then(Value::as_str).unwrap_or("?"),
            p.get("child").and_then(Value::as_str).unwrap_or("?")
        );
    }
    for w in m["waiting"].as_array().into_iter().flatten() {
        s += &format!("  waiting for a merge: {}\n", w.as_str().unwrap_or("?"));
    }
    if let Some(o) = v["last_exit"]["outcome"].as_str() {
        s += &format!("  last exit: {o}\n");
    }
    s
}

/// VMs in `root` (itself, or its subdirectories): name, state, pid, path.
pub fn list(root: &Path) -> Result<Vec<Value>, LifecycleError> {
    let mut dirs = Vec::new();
    if root.join("vm.toml").is_file() {
        dirs.push(root.to_path_buf());
    } else {
        let entries =
            std::fs::read_dir(root).map_err(io(format!("cannot read {}", root.display())))?;
        for e in entries.flatten() {
            if e.path().join("vm.toml").is_file() {
                dirs.push(e.path());
            }
        }
    }
    dirs.sort();
    Ok(dirs
        .iter()
        .map(|d| {
            let dir = VmDir::new(d);
            let running = is_running(&dir);
            let name = dir
                .load()
                .map(|t| t.name)
                .unwrap_or_else(|e| format!("(invalid: {e})"));
            let state = if running {
                api_client::request(&dir.api_socket(), "GET", "/vm", None)
                    .ok()
                    .and_then(|v| v["state"].as_str().map(str::to_string))
                    .unwrap_or_else(|| "running".into())
            } else {
                "stopped".into()
            };
            json!({
                "name": name,
                "state": state,
                "pid": if running { json!(pid_of(&dir)) } else { Value::Null },
                "vmdir": dir.root(),
            })
        })
        .collect())
}

/// Restores the terminal mode when dropped.
struct RawMode {
    saved: libc::termios,
}

impl RawMode {
    fn enter() -> Option<Self> {
        // SAFETY: isatty has no memory effects.
        if unsafe { libc::isatty(0) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it for fd 0.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointer to a termios struct.
        if unsafe { libc::tcgetattr(0, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: cfmakeraw edits the struct it is given; tcsetattr reads it.
        unsafe {
            libc::cfmakeraw(&mut raw);
            libc::tcsetattr(0, libc::TCSANOW, &raw);
        }
        Some(Self { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: restores the attributes saved in `enter`.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &self.saved) };
    }
}

/// Attaches stdin/stdout to the VM's serial console until Ctrl-] (or EOF on
/// stdin, or the VM stopping).
pub fn console(root: &Path) -> Result<(), LifecycleError> {
    let dir = VmDir::open(root)?;
    let sock = dir.console_socket();
    let stream = UnixStream::connect(&sock)
        .map_err(|_| LifecycleError::NotRunning(dir.root().to_path_buf()))?;
    eprintln!(
        "snapvm: attached to the console of {}; detach with Ctrl-]",
        dir.root().display()
    );
    let _raw = RawMode::enter();
    let mut from_vm = stream.try_clone().map_err(io("console socket"))?;
    let output = std::thread::spawn(move || {
        let mut out = std::io::stdout();
        let mut buf = [0u8; 4096];
        while let Ok(n) = from_vm.read(&mut buf) {
            if n == 0 || out.write_all(&buf[..n]).is_err() {
                break;
            }
            let _ = out.flush();
        }
    });
    let mut to_vm = stream;
    let mut stdin = std::io::stdin();
    let mut buf = [0u8; 256];
    loop {
        if output.is_finished() {
            break;
        }
        let n = match stdin.read(&mut buf) {
            Ok(0) | Err(_) => {
                // No more input: keep showing output until the VM stops.
                let _ = output.join();
                break;
            }
            Ok(n) => n,
        };
        if let Some(pos) = buf[..n].iter().position(|b| *b == DETACH_KEY) {
            let _ = to_vm.write_all(&buf[..pos]);
            break;
        }
        if to_vm.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = to_vm.shutdown(std::net::Shutdown::Both);
    drop(_raw);
    eprintln!("\r\nsnapvm: detached");
    Ok(())
}

/// Follows job `id` until it ends: a progress bar on a terminal, a line
/// every second otherwise. Returns the job's result.
pub fn wait_job(socket: &Path, id: &str, what: &str) -> Result<Value, LifecycleError> {
    let bar = progress_bar(what);
    let mut last_line = Instant::now();
    loop {
        let j = api_client::request(socket, "GET", &format!("/jobs/{id}"), None)?;
        let (done, total) = (
            j["done"].as_u64().unwrap_or(0),
            j["total"].as_u64().unwrap_or(0),
        );
        if let Some(b) = &bar {
            b.set_length(total);
            b.set_position(done);
        } else if last_line.elapsed() >= Duration::from_secs(1) {
            let pct = (done * 100).checked_div(total).unwrap_or(0);
            eprintln!("{what}: {pct}% ({} of {} MiB)", done >> 20, total >> 20);
            last_line = Instant::now();
        }
        match j["state"].as_str() {
            Some("succeeded") => {
                if let Some(b) = &bar {
                    b.finish_and_clear();
                }
                return Ok(j["result"].clone());
            }
            Some("failed") => {
                if let Some(b) = &bar {
                    b.abandon();
                }
                return Err(LifecycleError::JobFailed(
                    j["error"].as_str().unwrap_or("the job failed").to_string(),
                ));
            }
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// `snapvm snapshot create`.
pub fn snapshot_create(
    root: &Path,
    name: Option<String>,
    description: String,
    no_wait: bool,
) -> Result<(), LifecycleError> {
    let dir = VmDir::open(root)?;
    if !is_running(&dir) {
        let opts = CreateOptions {
            name,
            description,
            stop_and_copy: false,
        };
        let m = crate::snapshots::create_off(&dir, &opts)?;
        println!(
            "snapshot {} \"{}\" taken (VM off: configuration and disks)",
            m.id, m.name
        );
        return Ok(());
    }
    let job = api_client::request(
        &dir.api_socket(),
        "POST",
        "/snapshots",
        Some(&json!({ "name": name, "description": description })),
    )?;
    let id = job["job"].as_str().unwrap_or_default().to_string();
    if no_wait {
        println!("{id}");
        return Ok(());
    }
    let r = wait_job(&dir.api_socket(), &id, "snapshot")?;
    let s = &r["snapshot"];
    println!(
        "snapshot {} \"{}\" taken: paused {} us, wrote {} MiB of memory in {} ms",
        s["id"].as_str().unwrap_or("?"),
        s["name"].as_str().unwrap_or("?"),
        s["pause_us"],
        s["memory_bytes"].as_u64().unwrap_or(0) >> 20,
        s["duration_ms"]
    );
    Ok(())
}

/// `snapvm snapshot apply`.
pub fn snapshot_apply(
    root: &Path,
    reference: &str,
    save_current: Option<String>,
) -> Result<(), LifecycleError> {
    let (dir, target) = open_snapshot(root, reference)?;
    if is_running(&dir) {
        let body = match save_current {
            None => json!({}),
            Some(n) if n.is_empty() => json!({ "save_current": true }),
            Some(n) => json!({ "save_current": n }),
        };
        let job = api_client::request(
            &dir.api_socket(),
            "POST",
            &format!("/snapshots/{}/apply", target.id),
            Some(&body),
        )?;
        let id = job["job"].as_str().unwrap_or_default().to_string();
        let r = match wait_job(&dir.api_socket(), &id, "apply") {
            Ok(r) => r,
            // A powered-off snapshot ends the VMM right after the job (the
            // last answer may be cut off): the tree tells whether it was
            // applied.
            Err(LifecycleError::Client(
                ClientError::NotRunning(_)
                | ClientError::Closed(_)
                | ClientError::Io { .. }
                | ClientError::Malformed(_),
            )) if target.power_state == PowerState::Off => {
                let deadline = Instant::now() + WAIT;
                while is_running(&dir) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(10));
                }
                let now = Tree::load(&crate::snapshots::tree_path(&dir))
                    .map_err(SnapshotError::from)?
                    .now;
                if target.power_state != PowerState::Off
                    || now.as_deref() != Some(target.id.as_str())
                {
                    return Err(LifecycleError::JobFailed(format!(
                        "the VMM exited while applying the snapshot; see {}",
                        dir.vmm_log().display()
                    )));
                }
                json!({ "power_state": "off", "apply_ms": null })
            }
            Err(e) => return Err(e),
        };
        if let Some(saved) = r["saved_current"]["id"].as_str() {
            println!("saved the current state as snapshot {saved}");
        }
        println!(
            "applied snapshot {} \"{}\" in {} ms; the VM is {}",
            target.id,
            target.name,
            r["apply_ms"],
            match r["power_state"].as_str() {
                Some("off") => "off",
                Some("paused") => "paused",
                _ => "running",
            }
        );
        if r["power_state"] == "off" {
            let deadline = Instant::now() + WAIT;
            while is_running(&dir) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        return Ok(());
    }
    if let Some(n) = save_current {
        let opts = CreateOptions {
            name: (!n.is_empty()).then_some(n),
            ..Default::default()
        };
        let m = crate::snapshots::create_off(&dir, &opts)?;
        println!("saved the current state as snapshot {}", m.id);
    }
    let v = start_from(root, false, Some(&target.id))?;
    println!(
        "applied snapshot {} \"{}\"; the VM is {}",
        target.id,
        target.name,
        v["state"].as_str().unwrap_or("?")
    );
    Ok(())
}

fn when(ms: u64) -> String {
    let t = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_seconds(t)
        .to_string()
        .trim_end_matches('Z')
        .replace('T', " ")
}

fn tree_label(s: &snapshot::tree::SnapshotMeta) -> String {
    let pause = s
        .pause_us
        .map(|p| format!(", paused {:.2} ms", p as f64 / 1000.0))
        .unwrap_or_default();
    format!(
        "{} ({}) {} {}{pause}",
        s.name,
        &s.id[..8.min(s.id.len())],
        format!("{:?}", s.power_state).to_lowercase(),
        when(s.created_ms)
    )
}

fn tree_walk(tree: &Tree, parent: Option<&str>, prefix: &str, out: &mut String) {
    let orphan = |s: &snapshot::tree::SnapshotMeta| {
        s.parent
            .as_deref()
            .is_some_and(|p| !tree.snapshots.iter().any(|x| x.id == p))
    };
    let mut items: Vec<Option<&snapshot::tree::SnapshotMeta>> = tree
        .snapshots
        .iter()
        .filter(|s| s.parent.as_deref() == parent || (parent.is_none() && orphan(s)))
        .map(Some)
        .collect();
    if tree.now.as_deref() == parent {
        items.push(None); // "Now"
    }
    let n = items.len();
    for (i, item) in items.into_iter().enumerate() {
        let (branch, cont) = if i + 1 == n {
            ("└── ", "    ")
        } else {
            ("├── ", "│   ")
        };
        match item {
            Some(s) => {
                out.push_str(&format!("{prefix}{branch}{}\n", tree_label(s)));
                tree_walk(tree, Some(&s.id), &format!("{prefix}{cont}"), out);
            }
            None => out.push_str(&format!("{prefix}{branch}Now\n")),
        }
    }
}

/// The snapshot tree as text: each snapshot under its parent, and "Now"
/// under the snapshot the current state hangs from.
pub fn render_tree(tree: &Tree) -> String {
    let mut out = String::new();
    tree_walk(tree, None, "", &mut out);
    out
}

/// `snapvm snapshot list`.
pub fn snapshot_list(root: &Path, json_out: bool, as_tree: bool) -> Result<(), LifecycleError> {
    let dir = VmDir::open(root)?;
    let tree = Tree::load(&crate::snapshots::tree_path(&dir)).map_err(SnapshotError::from)?;
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&tree).unwrap_or_default()
        );
        return Ok(());
    }
    if as_tree {
        print!("{}", render_tree(&tree));
        print!("{}", render_merges(&tree));
        return Ok(());
    }
    println!("{:<36}  {:<8} {:>10}  NAME", "ID", "STATE", "PAUSE us");
    for s in &tree.snapshots {
        let now = if tree.now.as_deref() == Some(s.id.as_str()) {
            "  <- Now"
        } else {
            ""
        };
        println!(
            "{:<36}  {:<8} {:>10}  {}{now}",
            s.id,
            format!("{:?}", s.power_state).to_lowercase(),
            s.pause_us
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into()),
            s.name
        );
    }
    print!("{}", render_merges(&tree));
    Ok(())
}

/// Lines about disk layers waiting for a merge and the merge in progress.
pub fn render_merges(tree: &Tree) -> String {
    let mut s = String::new();
    if let Some(m) = &tree.merge {
        s += &format!(
            "merging disk layer {} with {} ({:?})\n",
            m.parent.display(),
            m.child.display(),
            m.direction
        );
    }
    for r in &tree.retired {
        s += &format!("disk layer {} waits for a merge\n", r.display());
    }
    s
}

/// One line about a merge job's result.
fn merge_summary(r: &Value) -> String {
    let rep = if r["interrupted"] == true {
        &r["report"]
    } else {
        r
    };
    let mib = |k: &str| rep[k].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64;
    let mut s = format!(
        "merged {} disk layer(s), removed {}; copied {:.1} MiB; disk files {:.1} MiB -> {:.1} MiB",
        rep["merged"],
        rep["removed"],
        mib("copied_bytes"),
        mib("disk_bytes_before"),
        mib("disk_bytes_after"),
    );
    if let Some(w) = rep["waiting"].as_array().filter(|w| !w.is_empty()) {
        s += &format!(
            "; {} layer(s) wait until only one layer stands on them",
            w.len()
        );
    }
    if r["interrupted"] == true {
        s += " (interrupted by another job; it continues after it)";
    }
    s
}

/// The VM directory at `root` and its snapshot `reference`.
fn open_snapshot(
    root: &Path,
    reference: &str,
) -> Result<(VmDir, snapshot::tree::SnapshotMeta), LifecycleError> {
    let dir = VmDir::open(root)?;
    let tree = Tree::load(&crate::snapshots::tree_path(&dir)).map_err(SnapshotError::from)?;
    let target = tree
        .resolve(reference)
        .map_err(SnapshotError::from)?
        .clone();
    Ok((dir, target))
}

/// `snapvm snapshot delete`: removes the snapshot (with `subtree`, its
/// descendants too) and merges the disk layers it leaves, in the VMM's
/// background job when the VM runs, here when it is off.
pub fn snapshot_delete(
    root: &Path,
    reference: &str,
    subtree: bool,
    no_wait: bool,
) -> Result<(), LifecycleError> {
    let (dir, target) = open_snapshot(root, reference)?;
    let say_deleted = |deleted: &[Value]| {
        for d in deleted {
            println!(
                "deleted snapshot {} \"{}\"",
                d["id"].as_str().unwrap_or("?"),
                d["name"].as_str().unwrap_or("?")
            );
        }
    };
    if is_running(&dir) {
        let q = if subtree { "?subtree=true" } else { "" };
        let r = api_client::request(
            &dir.api_socket(),
            "DELETE",
            &format!("/snapshots/{}{q}", target.id),
            None,
        )?;
        say_deleted(r["deleted"].as_array().map(Vec::as_slice).unwrap_or(&[]));
        match r["job"].as_str() {
            None => println!("no disk layers to merge"),
            Some(id) if no_wait => println!(
                "merge job {id} runs in the background (`snapvm status` shows its progress)"
            ),
            Some(id) => {
                let res = wait_job(&dir.api_socket(), id, "merge")?;
                println!("{}", merge_summary(&res));
            }
        }
        return Ok(());
    }
    let _lock =
        crate::daemon::lock_stopped(&dir).map_err(|e| LifecycleError::JobFailed(e.to_string()))?;
    let r = crate::snapshots::delete(&dir, &target.id, subtree)?;
    let deleted: Vec<Value> = r.deleted.iter().map(|m| json!(m)).collect();
    say_deleted(&deleted);
    if no_wait {
        println!("the disk layers are merged when the VM next starts");
        return Ok(());
    }
    let bar = progress_bar("merge");
    let last_line = std::cell::Cell::new(Instant::now());
    let report = |done: u64, total: u64| match &bar {
        Some(b) => {
            b.set_length(total);
            b.set_position(done);
        }
        None if last_line.get().elapsed() >= Duration::from_secs(1) => {
            let pct = (done * 100).checked_div(total).unwrap_or(0);
            eprintln!("merge: {pct}% ({} of {} MiB)", done >> 20, total >> 20);
            last_line.set(Instant::now());
        }
        None => {}
    };
    let cancel = std::sync::atomic::AtomicBool::new(false);
    let res = crate::merges::run(
        &dir,
        &[],
        &crate::merges::Progress {
            cancel: &cancel,
            report: &report,
        },
    );
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    let res = res.map_err(|e| LifecycleError::JobFailed(e.to_string()))?;
    println!("{}", merge_summary(&json!(res)));
    Ok(())
}

/// A progress bar on a terminal, nothing otherwise.
fn progress_bar(what: &str) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal().then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b.set_message(what.to_string());
        b
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use snapshot::tree::{SnapshotMeta, Tree};

    fn meta(id: &str, name: &str, parent: Option<&str>) -> SnapshotMeta {
        SnapshotMeta {
            id: id.into(),
            name: name.into(),
            description: String::new(),
            created_ms: 0,
            parent: parent.map(str::to_string),
            power_state: PowerState::Running,
            pause_us: None,
            memory_bytes: 0,
            duration_ms: 0,
            disks: vec![],
        }
    }

    #[test]
    fn tree_shows_branches_and_now() {
        let mut t = Tree::default();
        t.add(meta("aaaaaaaa-1", "A", None));
        t.add(meta("bbbbbbbb-1", "B", Some("aaaaaaaa-1")));
        t.add(meta("cccccccc-1", "C", Some("aaaaaaaa-1")));
        t.now = Some("aaaaaaaa-1".into());
        let text = render_tree(&t);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].starts_with("└── A (aaaaaaaa) running"), "{text}");
        assert!(lines[1].starts_with("    ├── B (bbbbbbbb)"), "{text}");
        assert!(lines[2].starts_with("    ├── C (cccccccc)"), "{text}");
        assert_eq!(lines[3], "    └── Now");
        t.now = None;
        assert!(render_tree(&t).ends_with("└── Now\n"));
    }
}
