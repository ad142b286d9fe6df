//! The CLI side of VM lifecycle: start a background VMM for a VM directory,
//! stop, pause, resume, show status, list VMs. Every operation on a running
//! VM goes through its control API.

use std::io::{BufRead, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use snapshot::tree::{PowerState, Tree};

use super::api_client::{Client, ClientError};
use crate::api::{TargetState, VmState, VmStatus};
use crate::daemon::lock::is_running;
use crate::daemon::snapshots::restore;
use crate::daemon::snapshots::SnapshotError;
use crate::daemon::status;
use crate::vmdir::{VmDir, VmDirError};

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
    /// A job failed (the VMM's message).
    #[error("{0}")]
    JobFailed(String),
    /// The VM's lock could not be taken.
    #[error(transparent)]
    Daemon(#[from] crate::daemon::DaemonError),
    /// A merge of a VM that is off failed.
    #[error(transparent)]
    Merge(#[from] crate::daemon::merges::MergesError),
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
pub fn start(root: &Path, paused: bool) -> Result<VmStatus, LifecycleError> {
    start_from(root, paused, None)
}

/// Starts every VM of `roots` at once (each VMM starts on its own; clones
/// of one snapshot start together): each one's result, in order.
pub fn start_all(roots: &[PathBuf]) -> Vec<Result<VmStatus, LifecycleError>> {
    std::thread::scope(|s| {
        let started: Vec<_> = roots
            .iter()
            .map(|r| s.spawn(move || start(r, false)))
            .collect();
        started
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(LifecycleError::StartFailed(
                        "the starting thread panicked".into(),
                    ))
                })
            })
            .collect()
    })
}

/// [`start`], continuing from snapshot `from` when given. A snapshot taken
/// powered off only sets configuration and disks: the VM stays off.
pub fn start_from(
    root: &Path,
    paused: bool,
    from: Option<&str>,
) -> Result<VmStatus, LifecycleError> {
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
        let tree = Tree::load(&dir.tree_path()).map_err(SnapshotError::from)?;
        let snap = tree.resolve(reference).map_err(SnapshotError::from)?;
        if snap.power_state == PowerState::Off {
            restore::prepare(&dir, &snap.id)?;
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
    let client = Client::new(&dir.api_socket());
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
        match client.status() {
            Ok(v) if v.pid == Some(child.id()) => return Ok(v),
            Ok(v) => {
                // Another `start` won the race: our VMM loses the lock and exits.
                let _ = child.wait();
                return Err(LifecycleError::AlreadyRunning(
                    dir.root().to_path_buf(),
                    v.pid
                        .map(|p| p.to_string())
                        .unwrap_or_else(|| "unknown".into()),
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
        std::thread::sleep(Duration::from_millis(3));
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
    Client::new(&dir.api_socket()).set_state(TargetState::Stopped)?;
    wait_stopped(&dir)
}

/// Pauses or resumes.
pub fn set_state(root: &Path, target: TargetState) -> Result<VmStatus, LifecycleError> {
    let dir = VmDir::open(root)?;
    if !is_running(&dir) {
        return Err(LifecycleError::NotRunning(dir.root().to_path_buf()));
    }
    Ok(Client::new(&dir.api_socket()).set_state(target)?)
}

/// The VM's status: from its VMM when running, from vm.toml otherwise.
pub fn status(root: &Path) -> Result<VmStatus, LifecycleError> {
    let dir = VmDir::open(root)?;
    let toml = dir.load()?;
    // A VMM that holds the lock but does not answer is starting (its
    // socket is not bound yet) or stopping (it writes last-exit.json, then
    // lets go of the lock): ask again until it answers or is gone.
    let deadline = Instant::now() + STATUS_WAIT;
    let client = Client::new(&dir.api_socket());
    while is_running(&dir) {
        match client.status() {
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
    Ok(status::offline(&dir, &toml))
}

/// One line of `snapvm list`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VmEntry {
    /// Name (or why vm.toml is invalid).
    pub name: String,
    /// Power state.
    pub state: VmState,
    /// The VMM's pid, as recorded.
    pub pid: Option<String>,
    /// The VM directory.
    pub vmdir: PathBuf,
}

/// VMs in `root` (itself, or its subdirectories): name, state, pid, path.
pub fn list(root: &Path) -> Result<Vec<VmEntry>, LifecycleError> {
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
                Client::new(&dir.api_socket())
                    .status()
                    .map(|v| v.state)
                    .unwrap_or(VmState::Running)
            } else {
                VmState::Stopped
            };
            VmEntry {
                name,
                state,
                pid: running.then(|| pid_of(&dir)),
                vmdir: dir.root().to_path_buf(),
            }
        })
        .collect())
}
