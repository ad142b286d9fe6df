//! The VMM process of a VM directory (`snapvm start` runs it as
//! `snapvm __vmm VMDIR`): one per VM, guarded by a lock in run/. It builds
//! the VM (booting it, or empty with a snapshot applied: the one restore
//! path), wraps it in a [`session::Session`], serves the control API and
//! the console, and runs snapshot jobs and background merges until the VM
//! stops.

use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use devices::exit::ExitNotifier;

use self::console_hub::ConsoleHub;
use self::controller::Controller;
use self::event_loop::{event_loop, RunError};
use self::jobs::Jobs;
use self::merger::Merger;
use self::session::{Links, Power, Session};
use self::snapshots::restore::{self, ApplyOptions};
use self::snapshots::SnapshotError;
use crate::api::LastExit;
use crate::hooks::Hooks;
use crate::machine::apply::ApplyRequest;
use crate::machine::outcome::Outcome;
use crate::machine::vm::{Vm, VmError};
use crate::vmdir::{CloneOf, VmDir, VmDirError, VmToml};

pub mod api_server;
pub mod console_hub;
pub mod controller;
pub mod event_loop;
pub mod hardware;
pub mod jobs;
pub mod lock;
pub mod merger;
pub mod merges;
pub mod orphans;
pub mod session;
pub mod snapshots;
pub mod status;

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
    Snapshot(#[from] SnapshotError),
    /// An interrupted merge could not be finished.
    #[error(transparent)]
    Merge(merges::MergesError),
}

pub(crate) fn io_err(what: &'static str, path: &Path) -> impl Fn(std::io::Error) -> DaemonError {
    let path = path.display().to_string();
    move |source| DaemonError::Io {
        what,
        path: path.clone(),
        source,
    }
}

/// Builds the session of a VM continuing from snapshot `reference`: an
/// empty VM (no kernel, empty memory, the snapshot's hardware), started
/// paused, then the same apply an in-place apply runs (lazy memory).
fn restore_session(
    dir: &VmDir,
    reference: &str,
    paused: bool,
    links: &Links,
    hooks: &Hooks,
) -> Result<Session, DaemonError> {
    let started = Instant::now();
    let prepared = restore::load(dir, reference)?;
    if prepared.state.is_none() {
        prepared.rollback(dir);
        return Err(SnapshotError::NoMemory(prepared.snapshot.id.clone()).into());
    }
    let built = dir
        .vm_config(&prepared.config)
        .map_err(DaemonError::from)
        .and_then(|config| Ok(Vm::create_empty(&config, links.wiring(), hooks)?))
        .and_then(|mut vm| {
            vm.start(true)?;
            Ok(vm)
        });
    let vm = match built {
        Ok(vm) => vm,
        Err(e) => {
            prepared.rollback(dir);
            return Err(e);
        }
    };
    let (id, name) = (prepared.snapshot.id.clone(), prepared.snapshot.name.clone());
    let session = Session::new(
        vm,
        dir.clone(),
        prepared.config.clone(),
        Power::Paused,
        hooks.clone(),
        links.clone(),
    );
    let options = ApplyOptions {
        eager: false,
        stay_paused: paused,
    };
    let applied = session.apply_prepared(prepared, options, started)?;
    tracing::info!("restored snapshot {id} ({name}) in {} ms", applied.apply_ms);
    Ok(session)
}

/// Builds the session of a pending clone's first start: an empty VM with
/// the clone's hardware, guest RAM mapped privately from the source
/// snapshot's staged memory (shared with the other clones), the snapshot's
/// state restored; then the clone is no longer pending.
fn clone_session(
    dir: &VmDir,
    mut toml: VmToml,
    origin: &CloneOf,
    paused: bool,
    links: &Links,
    hooks: &Hooks,
) -> Result<Session, DaemonError> {
    let started = Instant::now();
    let start = snapshots::clone::prepare_start(dir, origin)?;
    let config = dir.vm_config(&toml)?;
    let mut vm = Vm::create_empty(&config, links.wiring(), hooks)?;
    vm.start(true)?;
    let disks: Vec<PathBuf> = config.disks.iter().map(|d| d.path.clone()).collect();
    vm.apply(ApplyRequest {
        state: start.state,
        memory: &start.memory,
        disks: &disks,
        eager: false,
        shared: Some(&start.staged),
    })?;
    if let Some(c) = toml.clone.as_mut() {
        c.pending = false;
    }
    dir.save(&toml)?;
    let power = if paused {
        Power::Paused
    } else {
        vm.resume();
        Power::Running
    };
    tracing::info!(
        "clone started from snapshot {} in {} ms (memory shared through {})",
        start.snapshot,
        started.elapsed().as_millis(),
        start.staged.display()
    );
    Ok(Session::new(
        vm,
        dir.clone(),
        toml,
        power,
        hooks.clone(),
        links.clone(),
    ))
}

/// Runs the VMM of `root` until the VM stops. Returns how it ended. With
/// `from`, the VM continues from that snapshot instead of booting.
pub fn run(
    root: &Path,
    paused: bool,
    from: Option<&str>,
    hooks: &Hooks,
) -> Result<Outcome, DaemonError> {
    // SAFETY: umask only changes this process's file creation mask.
    unsafe { libc::umask(0o077) };
    let dir = VmDir::open(root)?;
    dir.check_socket_paths()?;
    for d in [dir.run_dir(), dir.logs_dir()] {
        std::fs::create_dir_all(&d).map_err(io_err("create", &d))?;
    }
    let _lock = lock::take(&dir)?;
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
    if let Err(e) = merges::recover(&dir, &[]) {
        tracing::error!("cannot finish the interrupted merge: {e}");
        return Err(DaemonError::Merge(e));
    }
    let toml = dir.load()?;
    for id in snapshots::manage::clean_leftovers(&dir, &toml) {
        tracing::warn!("cleaned up the incomplete snapshot {id}");
    }
    orphans::collect(&dir);
    let toml = dir.load()?;
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.serial_log())
        .map_err(io_err("open", &dir.serial_log()))?;
    let links = Links {
        console: ConsoleHub::new(Some(log)),
        exit: Arc::new(
            ExitNotifier::new().map_err(io_err("create", Path::new("the exit eventfd")))?,
        ),
        taps: crate::machine::tap_pool::TapPool::new(),
    };
    let pending_clone = toml.clone.clone().filter(|c| c.pending);
    let session = match (from, pending_clone) {
        (Some(reference), _) => restore_session(&dir, reference, paused, &links, hooks)?,
        (None, Some(origin)) => clone_session(&dir, toml, &origin, paused, &links, hooks)?,
        (None, None) => {
            let mut vm = Vm::create(&dir.vm_config(&toml)?, links.wiring(), hooks)?;
            vm.start(paused)?;
            let power = if paused {
                Power::Paused
            } else {
                Power::Running
            };
            Session::new(vm, dir.clone(), toml, power, hooks.clone(), links.clone())
        }
    };
    let session = Arc::new(session);
    let console =
        console_hub::bind(&dir.console_socket()).map_err(io_err("bind", &dir.console_socket()))?;
    let hub = links.console.clone();
    std::thread::spawn(move || hub.serve(console));

    // Every VM of the session reports to the same eventfd.
    let vm_stop_fd = links.exit.eventfd().as_raw_fd();
    let jobs = Jobs::new();
    let merger = Merger::new(dir.clone(), jobs.clone(), session.clone(), hooks.clone());
    let stop_evt = EventFd::new(EFD_NONBLOCK).map_err(io_err("create", Path::new("eventfd")))?;
    let controller = Arc::new(Controller::new(session.clone(), jobs, merger, stop_evt));
    let server =
        Arc::new(api_server::bind(&dir.api_socket()).map_err(io_err("bind", &dir.api_socket()))?);
    let (srv, ctl) = (server.clone(), controller.clone());
    std::thread::spawn(move || api_server::serve(&srv, &*ctl));
    tracing::info!(
        "VM {} started ({})",
        session.toml().name,
        crate::api::VmState::from(session.power()).as_str()
    );
    // Merges left by deletes (or an interrupted merge) continue.
    controller.merger().start();

    let sig = loop {
        let sig = event_loop(
            vec![vm_stop_fd, controller.stop_eventfd().as_raw_fd()],
            vec![],
        )?;
        // A VM built for an apply that then failed wakes the loop too; the
        // session's VM goes on unless it is the one that wants to stop.
        if sig.is_some() || controller.is_stopping() || session.vm().outcome().is_some() {
            break sig;
        }
    };
    controller.set_stopping();
    // A snapshot streaming guest memory finishes before the memory goes.
    controller.wait_jobs();
    let outcome = {
        let mut vm = session.vm();
        vm.stop();
        let outcome = vm.outcome().unwrap_or(Outcome::Stopped(sig.unwrap_or(0)));
        if outcome.exit_code() != 0 && hooks.dump_on_fail {
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
    let last = LastExit {
        outcome: outcome.to_string(),
        exit_code: outcome.exit_code(),
    };
    if let Ok(text) = serde_json::to_string(&last) {
        let _ = snapshot::atomic_file::write_atomic(&dir.last_exit_file(), text.as_bytes());
    }
    Ok(outcome)
}

/// Debug aid ([`Hooks::dump_on_fail`]): writes guest RAM as the VMM sees it
/// to `path` (sparse, at file offset = guest-physical address) for a
/// post-mortem of a guest failure.
fn dump_guest_ram(vm: &Vm, path: &Path) {
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
