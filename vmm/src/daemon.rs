//! The background VMM process of a VM directory (`snapvm start` runs it as
//! `snapvm __vmm VMDIR`): one per VM, guarded by a lock in run/, serving the
//! control API and the console until the VM stops.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::{json, Value};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::api_server::{self, ApiBackend, ApiError};
use crate::console::{self, ConsoleHub};
use crate::jobs::Jobs;
use crate::run::{event_loop, RunError};
use crate::vm::{Outcome, Vm, VmError};
use crate::vmdir::{VmDir, VmDirError, VmToml};

/// Errors of the VMM process.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The VM directory is unusable.
    #[error(transparent)]
    VmDir(#[from] VmDirError),
    /// Another VMM holds the lock.
    #[error("VM {dir} is already running (pid {pid})")]
    AlreadyRunning {
        /// The VM directory.
        dir: String,
        /// The running VMM's pid, as recorded.
        pid: String,
    },
    /// A runtime file could not be created.
    #[error("cannot {what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The VM could not be created.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The event loop failed.
    #[error(transparent)]
    Run(#[from] RunError),
    /// The snapshot to restore is unusable.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshots::SnapshotError),
}

/// Power state of a running VMM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Power {
    /// vCPUs run.
    Running,
    /// vCPUs are parked.
    Paused,
}

impl Power {
    fn name(self) -> &'static str {
        match self {
            Power::Running => "running",
            Power::Paused => "paused",
        }
    }
}

/// What the API acts on.
pub struct Controller {
    vm: Arc<Mutex<Vm>>,
    power: Arc<Mutex<Power>>,
    started: Instant,
    dir: VmDir,
    toml: Arc<Mutex<VmToml>>,
    jobs: Arc<Jobs>,
    stop_evt: Arc<EventFd>,
    stopping: Arc<AtomicBool>,
}

impl Controller {
    fn power(&self) -> Power {
        *self.power.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn toml(&self) -> VmToml {
        self.toml.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits for running jobs (they may read guest memory) to end.
    fn wait_jobs(&self) {
        while self.jobs.running(&[SNAPSHOT_JOB, APPLY_JOB]).is_some() {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

/// Kind of the live snapshot job.
pub const SNAPSHOT_JOB: &str = "snapshot-create";
/// Kind of the snapshot apply job.
pub const APPLY_JOB: &str = "snapshot-apply";

/// The layers of every disk, top first.
pub fn disk_status(dir: &VmDir, toml: &VmToml) -> Value {
    let disks: Vec<Value> = toml
        .disks
        .iter()
        .map(|d| {
            let current = dir.resolve(&d.current);
            let layers: Vec<String> = snapshot::disk::resolve_chain(&current)
                .map(|c| c.iter().map(|l| l.path.display().to_string()).collect())
                .unwrap_or_else(|e| vec![format!("error: {e}")]);
            json!({
                "name": d.name,
                "current": d.current,
                "readonly": d.readonly,
                "layers": layers,
            })
        })
        .collect();
    json!(disks)
}

impl ApiBackend for Controller {
    fn status(&self) -> Value {
        let state = if self.stopping.load(Ordering::SeqCst) {
            "stopping"
        } else {
            self.power().name()
        };
        let toml = self.toml();
        json!({
            "name": toml.name,
            "vmdir": self.dir.root(),
            "state": state,
            "pid": std::process::id(),
            "uptime_s": self.started.elapsed().as_secs_f64(),
            "memory_bytes": crate::config::parse_size(&toml.memory).unwrap_or(0),
            "vcpus": toml.vcpus,
            "disks": disk_status(&self.dir, &toml),
        })
    }

    fn set_state(&self, target: &str) -> Result<Value, ApiError> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err(ApiError::Conflict("the VM is stopping".into()));
        }
        let mut power = self.power.lock().unwrap_or_else(|e| e.into_inner());
        match (target, *power) {
            ("paused", Power::Paused) => Err(ApiError::Conflict("the VM is already paused".into())),
            ("running", Power::Running) => {
                Err(ApiError::Conflict("the VM is already running".into()))
            }
            ("paused", Power::Running) => {
                self.vm.lock().unwrap_or_else(|e| e.into_inner()).pause();
                *power = Power::Paused;
                drop(power);
                tracing::info!("paused");
                Ok(self.status())
            }
            ("running", Power::Paused) => {
                self.vm.lock().unwrap_or_else(|e| e.into_inner()).resume();
                *power = Power::Running;
                drop(power);
                tracing::info!("resumed");
                Ok(self.status())
            }
            ("stopped", _) => {
                drop(power);
                if let Some(j) = self.jobs.running(&[SNAPSHOT_JOB, APPLY_JOB]) {
                    return Err(ApiError::Conflict(format!(
                        "snapshot job {} is running; stop after it ends (or stop --force)",
                        j.id
                    )));
                }
                self.stopping.store(true, Ordering::SeqCst);
                let _ = self.stop_evt.write(1);
                tracing::info!("stop requested through the API");
                Ok(self.status())
            }
            (other, _) => Err(ApiError::BadRequest(format!(
                "unknown state '{other}': use running, paused or stopped"
            ))),
        }
    }

    fn jobs(&self) -> &Arc<Jobs> {
        &self.jobs
    }

    fn create_snapshot(
        &self,
        name: Option<String>,
        description: String,
        stop_and_copy: bool,
    ) -> Result<Value, ApiError> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err(ApiError::Conflict("the VM is stopping".into()));
        }
        if let Some(j) = self.jobs.running(&[SNAPSHOT_JOB]) {
            return Err(ApiError::Conflict(format!(
                "snapshot job {} is still running",
                j.id
            )));
        }
        let running = self.power() == Power::Running;
        let (vm, dir, toml) = (self.vm.clone(), self.dir.clone(), self.toml.clone());
        let opts = crate::snapshots::CreateOptions {
            name,
            description,
            stop_and_copy,
        };
        let id = self.jobs.spawn(SNAPSHOT_JOB, move |job| {
            crate::snapshots::create_live(&vm, &dir, &toml, running, &opts, job)
                .map(|r| {
                    tracing::info!(
                        "snapshot {} taken: paused {} us, {} bytes of memory",
                        r.snapshot.id,
                        r.snapshot.pause_us.unwrap_or(0),
                        r.snapshot.memory_bytes
                    );
                    json!(r)
                })
                .map_err(|e| e.to_string())
        });
        Ok(json!({ "job": id }))
    }

    fn apply_snapshot(
        &self,
        reference: &str,
        save_current: Option<Option<String>>,
        eager: bool,
    ) -> Result<Value, ApiError> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err(ApiError::Conflict("the VM is stopping".into()));
        }
        if let Some(j) = self.jobs.running(&[SNAPSHOT_JOB, APPLY_JOB]) {
            return Err(ApiError::Conflict(format!(
                "{} job {} is still running",
                j.kind, j.id
            )));
        }
        // A bad reference is the request's fault: answer it directly.
        snapshot::tree::Tree::load(&crate::snapshots::tree_path(&self.dir))
            .and_then(|t| t.resolve(reference).map(|_| ()))
            .map_err(|e| match e {
                snapshot::tree::TreeError::NotFound(_) => ApiError::NotFound(e.to_string()),
                snapshot::tree::TreeError::Ambiguous { .. } => ApiError::BadRequest(e.to_string()),
                _ => ApiError::Internal(e.to_string()),
            })?;
        let running = self.power() == Power::Running;
        let (vm, dir, toml, power) = (
            self.vm.clone(),
            self.dir.clone(),
            self.toml.clone(),
            self.power.clone(),
        );
        let (stop_evt, stopping) = (self.stop_evt.clone(), self.stopping.clone());
        let reference = reference.to_string();
        let id = self.jobs.spawn(APPLY_JOB, move |job| {
            let r = crate::snapshots::apply_live(
                &vm,
                &dir,
                &toml,
                running,
                &reference,
                save_current,
                eager,
                job,
            );
            let mut p = power.lock().unwrap_or_else(|e| e.into_inner());
            match &r {
                Ok(a) => match a.power_state {
                    snapshot::tree::PowerState::Running => *p = Power::Running,
                    snapshot::tree::PowerState::Paused => *p = Power::Paused,
                    snapshot::tree::PowerState::Off => {
                        stopping.store(true, Ordering::SeqCst);
                        let _ = stop_evt.write(1);
                    }
                },
                // A failed apply leaves the vCPUs paused.
                Err(_) => *p = Power::Paused,
            }
            r.map(|a| {
                tracing::info!("applied snapshot {} in {} ms", a.applied.id, a.apply_ms);
                json!(a)
            })
            .map_err(|e| e.to_string())
        });
        Ok(json!({ "job": id }))
    }

    fn snapshots(&self) -> Result<Value, ApiError> {
        snapshot::tree::Tree::load(&crate::snapshots::tree_path(&self.dir))
            .map(|t| json!(t))
            .map_err(|e| ApiError::Internal(e.to_string()))
    }
}

fn io_err(what: &'static str, path: &Path) -> impl Fn(std::io::Error) -> DaemonError {
    let path = path.display().to_string();
    move |source| DaemonError::Io {
        what,
        path: path.clone(),
        source,
    }
}

/// Takes the VM's lock; fails if a live VMM holds it. A lock left by a
/// killed VMM is free again (flock dies with its holder).
fn take_lock(dir: &VmDir) -> Result<File, DaemonError> {
    let path = dir.lock_file();
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err("open", &path))?;
    // `is_running` probes the lock with a brief shared lock: retry for a
    // moment so such a probe is not mistaken for a running VMM.
    let mut rc = -1;
    for _ in 0..20 {
        // SAFETY: flock on a descriptor we own; no memory is involved.
        rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(25));
    }
    if rc != 0 {
        let pid = std::fs::read_to_string(dir.pid_file()).unwrap_or_else(|_| "unknown".into());
        return Err(DaemonError::AlreadyRunning {
            dir: dir.root().display().to_string(),
            pid: pid.trim().to_string(),
        });
    }
    Ok(f)
}

/// Whether a live VMM holds the VM's lock.
pub fn is_running(dir: &VmDir) -> bool {
    let Ok(f) = File::open(dir.lock_file()) else {
        return false;
    };
    // SAFETY: flock on a descriptor we own.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) };
    rc != 0
}

/// Runs the VMM of `root` until the VM stops. Returns how it ended. With
/// `from`, the VM continues from that snapshot instead of booting.
pub fn run(root: &Path, paused: bool, from: Option<&str>) -> Result<Outcome, DaemonError> {
    // SAFETY: umask only changes this process's file creation mask.
    unsafe { libc::umask(0o077) };
    let dir = VmDir::open(root)?;
    dir.check_socket_paths()?;
    for d in [dir.run_dir(), dir.logs_dir()] {
        std::fs::create_dir_all(&d).map_err(io_err("create", &d))?;
    }
    let _lock = take_lock(&dir)?;
    // Leftovers of a VMM that was killed: its sockets and pid file.
    for stale in [dir.api_socket(), dir.console_socket(), dir.pid_file()] {
        if stale.exists() {
            tracing::warn!(
                "removing {} left by a VMM that did not stop cleanly",
                stale.display()
            );
            let _ = std::fs::remove_file(&stale);
        }
    }
    std::fs::write(dir.pid_file(), format!("{}\n", std::process::id()))
        .map_err(io_err("write", &dir.pid_file()))?;

    let toml = dir.load()?;
    for id in crate::snapshots::clean_leftovers(&dir, &toml) {
        tracing::warn!("cleaned up the incomplete snapshot {id}");
    }
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.serial_log())
        .map_err(io_err("open", &dir.serial_log()))?;
    let hub = ConsoleHub::new(Some(log));
    let (mut vm, toml, paused) = match from {
        None => (
            Vm::create(&dir.vm_config(&toml)?, Box::new(hub.clone()))?,
            toml,
            paused,
        ),
        Some(reference) => {
            let prepared = crate::snapshots::prepare_restore(&dir, reference)?;
            let Some(state) = &prepared.state else {
                prepared.rollback(&dir);
                return Err(crate::snapshots::SnapshotError::NoMemory(
                    prepared.snapshot.id.clone(),
                )
                .into());
            };
            let toml = dir.load()?;
            let restored = dir
                .vm_config(&toml)
                .map_err(DaemonError::from)
                .and_then(|c| {
                    Ok(Vm::restore(
                        &c,
                        Box::new(hub.clone()),
                        state,
                        &prepared.memory,
                    )?)
                });
            match restored {
                Ok(vm) => {
                    tracing::info!(
                        "restored snapshot {} ({})",
                        prepared.snapshot.id,
                        prepared.snapshot.name
                    );
                    let was_paused =
                        prepared.snapshot.power_state == snapshot::tree::PowerState::Paused;
                    (vm, toml, paused || was_paused)
                }
                Err(e) => {
                    prepared.rollback(&dir);
                    return Err(e);
                }
            }
        }
    };
    let console =
        console::bind(&dir.console_socket()).map_err(io_err("bind", &dir.console_socket()))?;
    let serial = vm.serial();
    let hub2 = hub.clone();
    std::thread::spawn(move || hub2.serve(console, serial));

    vm.start(paused)?;
    let vm_stop_fd = vm.stop_eventfd().as_raw_fd();
    let controller = Arc::new(Controller {
        vm: Arc::new(Mutex::new(vm)),
        power: Arc::new(Mutex::new(if paused {
            Power::Paused
        } else {
            Power::Running
        })),
        started: Instant::now(),
        dir: dir.clone(),
        toml: Arc::new(Mutex::new(toml)),
        jobs: Jobs::new(),
        stop_evt: Arc::new(
            EventFd::new(EFD_NONBLOCK).map_err(io_err("create", Path::new("eventfd")))?,
        ),
        stopping: Arc::new(AtomicBool::new(false)),
    });
    let server =
        Arc::new(api_server::bind(&dir.api_socket()).map_err(io_err("bind", &dir.api_socket()))?);
    let (srv, ctl) = (server.clone(), controller.clone());
    std::thread::spawn(move || api_server::serve(&srv, &*ctl));
    tracing::info!(
        "VM {} started ({})",
        controller.toml().name,
        controller.power().name()
    );

    let sig = event_loop(vec![vm_stop_fd, controller.stop_evt.as_raw_fd()], vec![])?;
    controller.stopping.store(true, Ordering::SeqCst);
    // A snapshot streaming guest memory finishes before the memory goes.
    controller.wait_jobs();
    let outcome = {
        let mut vm = controller.vm.lock().unwrap_or_else(|e| e.into_inner());
        vm.stop();
        vm.outcome().unwrap_or(Outcome::Stopped(sig.unwrap_or(0)))
    };
    // Let answers in flight (e.g. the job result of an apply that turned
    // the VM off) reach their clients before the process ends.
    std::thread::sleep(std::time::Duration::from_millis(50));
    server.unblock();
    tracing::info!("VM stopped: {outcome}");
    let _ = std::fs::remove_file(dir.api_socket());
    let _ = std::fs::remove_file(dir.console_socket());
    let _ = std::fs::remove_file(dir.pid_file());
    let last = json!({ "outcome": outcome.to_string(), "exit_code": outcome.exit_code() });
    let _ = snapshot::atomic_file::write_atomic(
        &dir.logs_dir().join("last-exit.json"),
        last.to_string().as_bytes(),
    );
    Ok(outcome)
}
