//! The background VMM process of a VM directory (`snapvm start` runs it as
//! `snapvm __vmm VMDIR`): one per VM, guarded by a lock in run/, serving the
//! control API and the console until the VM stops.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
    /// An interrupted merge could not be finished.
    #[error(transparent)]
    Merge(crate::merges::MergesError),
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
    merger: Merger,
}

/// Starts and stops the VMM's background merge job. Snapshots and applies
/// stop it first (a merge stops between two pieces with the chain intact)
/// and start it again when they end.
#[derive(Clone)]
pub struct Merger {
    dir: VmDir,
    jobs: Arc<Jobs>,
    disks: Vec<Arc<crate::block::DiskBackend>>,
    cancel: Arc<AtomicBool>,
    kick: Arc<AtomicU64>,
    start_lock: Arc<Mutex<()>>,
}

impl Merger {
    /// Starts the merge job if something waits for one and none runs;
    /// returns the id of the merge job running.
    pub fn start(&self) -> Option<String> {
        self.kick.fetch_add(1, Ordering::SeqCst);
        let _g = self.start_lock.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(j) = self.jobs.running(&[MERGE_JOB]) {
            return Some(j.id);
        }
        let tree = snapshot::tree::Tree::load(&crate::snapshots::tree_path(&self.dir)).ok()?;
        if tree.retired.is_empty() && tree.merge.is_none() {
            return None;
        }
        let m = self.clone();
        Some(self.jobs.spawn(MERGE_JOB, move |job| {
            let mut sum = crate::merges::MergeReport::default();
            let mut first = true;
            loop {
                let generation = m.kick.load(Ordering::SeqCst);
                let report = |done: u64, total: u64| {
                    job.set_total(total);
                    job.set_done(done);
                };
                let progress = crate::merges::Progress {
                    cancel: &m.cancel,
                    report: &report,
                };
                match crate::merges::run(&m.dir, &m.disks, &progress) {
                    Ok(r) => {
                        if first {
                            sum.disk_bytes_before = r.disk_bytes_before;
                            first = false;
                        }
                        sum.merged += r.merged;
                        sum.removed += r.removed;
                        sum.copied_bytes += r.copied_bytes;
                        sum.switch_us_max = sum.switch_us_max.max(r.switch_us_max);
                        sum.duration_ms += r.duration_ms;
                        sum.waiting = r.waiting;
                        sum.disk_bytes_after = r.disk_bytes_after;
                    }
                    Err(crate::merges::MergesError::Merge(
                        snapshot::merge::MergeError::Cancelled,
                    )) => {
                        tracing::info!("merge interrupted; it continues after the current job");
                        return Ok(json!({ "interrupted": true, "report": sum }));
                    }
                    Err(e) => {
                        tracing::error!("merge failed: {e}");
                        return Err(e.to_string());
                    }
                }
                if m.kick.load(Ordering::SeqCst) == generation {
                    tracing::info!(
                        "merges done: {} merged, {} removed, disk files {} -> {} bytes",
                        sum.merged,
                        sum.removed,
                        sum.disk_bytes_before,
                        sum.disk_bytes_after
                    );
                    return Ok(json!(sum));
                }
            }
        }))
    }

    /// Stops the merge job (if any) and waits for it.
    pub fn stop(&self) {
        self.cancel.store(true, Ordering::SeqCst);
        while self.jobs.running(&[MERGE_JOB]).is_some() {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        self.cancel.store(false, Ordering::SeqCst);
    }
}

impl Controller {
    fn power(&self) -> Power {
        *self.power.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn toml(&self) -> VmToml {
        self.toml.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Refuses `what` while the VM stops or a snapshot or apply job runs.
    fn check_idle(&self, what: &str) -> Result<(), ApiError> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err(ApiError::Conflict("the VM is stopping".into()));
        }
        match self.jobs.running(&[SNAPSHOT_JOB, APPLY_JOB]) {
            Some(j) => Err(ApiError::Conflict(format!(
                "{} job {} is still running; {what} after it ends",
                j.kind, j.id
            ))),
            None => Ok(()),
        }
    }

    /// Waits for running jobs (they may read guest memory) to end.
    fn wait_jobs(&self) {
        self.merger.stop();
        while self.jobs.running(&[SNAPSHOT_JOB, APPLY_JOB]).is_some() {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

/// Kind of the live snapshot job.
pub const SNAPSHOT_JOB: &str = "snapshot-create";
/// Kind of the snapshot apply job.
pub const APPLY_JOB: &str = "snapshot-apply";
/// Kind of the background merge job.
pub const MERGE_JOB: &str = "merge";

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

/// Merges in progress and layers waiting for one.
pub fn merge_status(dir: &VmDir, job: Option<crate::jobs::JobInfo>) -> Value {
    let tree = snapshot::tree::Tree::load(&crate::snapshots::tree_path(dir)).unwrap_or_default();
    json!({
        "job": job,
        "in_progress": tree.merge,
        "waiting": tree.retired,
    })
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
            "merges": merge_status(&self.dir, self.jobs.running(&[MERGE_JOB])),
            // Memory still arriving after an apply (instant revert); null
            // when complete, or while a job holds the VM.
            "memory_load": self.vm.try_lock().ok().and_then(|vm| vm.memory_load()).map(
                |(done, total)| json!({ "chunks_loaded": done, "chunks": total })
            ),
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
        let merger = self.merger.clone();
        let id = self.jobs.spawn(SNAPSHOT_JOB, move |job| {
            merger.stop();
            let r = crate::snapshots::create_live(&vm, &dir, &toml, running, &opts, job);
            merger.start();
            r.map(|r| {
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
        self.check_idle("apply")?;
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
        let merger = self.merger.clone();
        let id = self.jobs.spawn(APPLY_JOB, move |job| {
            merger.stop();
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
            drop(p);
            if !stopping.load(Ordering::SeqCst) {
                merger.start();
            }
            r.map(|a| {
                tracing::info!("applied snapshot {} in {} ms", a.applied.id, a.apply_ms);
                json!(a)
            })
            .map_err(|e| e.to_string())
        });
        Ok(json!({ "job": id }))
    }

    fn delete_snapshot(&self, reference: &str, subtree: bool) -> Result<Value, ApiError> {
        self.check_idle("delete")?;
        let r = crate::snapshots::delete(&self.dir, reference, subtree).map_err(|e| match e {
            crate::snapshots::SnapshotError::Tree(e @ snapshot::tree::TreeError::NotFound(_)) => {
                ApiError::NotFound(e.to_string())
            }
            crate::snapshots::SnapshotError::Tree(
                e @ snapshot::tree::TreeError::Ambiguous { .. },
            ) => ApiError::BadRequest(e.to_string()),
            e => ApiError::Internal(e.to_string()),
        })?;
        for s in &r.deleted {
            tracing::info!("deleted snapshot {} ({})", s.id, s.name);
        }
        let job = self.merger.start();
        Ok(json!({ "deleted": r.deleted, "retired": r.retired, "job": job }))
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

/// Takes the lock of a VM that is off, for work on its files (merges) that
/// must not overlap a start; fails if the VM runs.
pub fn lock_stopped(dir: &VmDir) -> Result<File, DaemonError> {
    std::fs::create_dir_all(dir.run_dir()).map_err(io_err("create", &dir.run_dir()))?;
    take_lock(dir)
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

    // A merge interrupted in its switch is finished before any disk opens.
    if let Err(e) = crate::merges::recover(&dir, &[]) {
        tracing::error!("cannot finish the interrupted merge: {e}");
        return Err(DaemonError::Merge(e));
    }
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
    let jobs = Jobs::new();
    let merger = Merger {
        dir: dir.clone(),
        jobs: jobs.clone(),
        disks: vm.disk_backends(),
        cancel: Arc::new(AtomicBool::new(false)),
        kick: Arc::new(AtomicU64::new(0)),
        start_lock: Arc::new(Mutex::new(())),
    };
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
        jobs,
        stop_evt: Arc::new(
            EventFd::new(EFD_NONBLOCK).map_err(io_err("create", Path::new("eventfd")))?,
        ),
        stopping: Arc::new(AtomicBool::new(false)),
        merger,
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
    // Merges left by deletes (or an interrupted merge) continue.
    controller.merger.start();

    let sig = event_loop(vec![vm_stop_fd, controller.stop_evt.as_raw_fd()], vec![])?;
    controller.stopping.store(true, Ordering::SeqCst);
    // A snapshot streaming guest memory finishes before the memory goes.
    controller.wait_jobs();
    let outcome = {
        let mut vm = controller.vm.lock().unwrap_or_else(|e| e.into_inner());
        vm.stop();
        let outcome = vm.outcome().unwrap_or(Outcome::Stopped(sig.unwrap_or(0)));
        if outcome.exit_code() != 0 && std::env::var_os("SNAPVM_DEBUG_DUMP_ON_FAIL").is_some() {
            dump_guest_ram(&vm, &dir.logs_dir().join("guest-ram.dump"));
        }
        outcome
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

/// Debug aid: writes guest RAM as the VMM sees it to `path` (sparse, at
/// file offset = guest-physical address) for a post-mortem of a guest
/// failure.
fn dump_guest_ram(vm: &crate::vm::Vm, path: &Path) {
    use std::os::unix::fs::FileExt;
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    if let Err(e) = vm.finish_lazy_load() {
        tracing::warn!("guest RAM dump: {e}");
    }
    let Ok(f) = std::fs::File::create(path) else {
        return;
    };
    for region in vm.ram().memory().iter() {
        let gpa = region.start_addr().0;
        // SAFETY: the region's own mapping, alive while `vm` is; only read.
        let bytes = unsafe {
            std::slice::from_raw_parts(region.as_ptr() as *const u8, region.len() as usize)
        };
        for (i, page) in bytes.chunks(4096).enumerate() {
            if page.iter().any(|b| *b != 0) {
                let _ = f.write_all_at(page, gpa + i as u64 * 4096);
            }
        }
    }
    tracing::info!("guest RAM written to {}", path.display());
}
