//! What the control API acts on: the session, its jobs and merges, and
//! the VMM's stop. Long operations become jobs; requests that do not fit
//! the VM's state are refused with 409.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use snapshot::tree::{PowerState, Tree, TreeError};
use vmm_sys_util::eventfd::EventFd;

use super::api_server::{ApiBackend, ApiError};
use super::jobs::Jobs;
use super::merger::Merger;
use super::session::Session;
use super::snapshots::create::CreateOptions;
use super::snapshots::manage;
use super::snapshots::restore::ApplyOptions;
use super::snapshots::SnapshotError;
use super::status;
use crate::api::{
    ApplySnapshotRequest, CreateSnapshotRequest, DeleteSnapshotResponse, JobAccepted, JobKind,
    MemoryLoad, SetStateRequest, TargetState, VmState, VmStatus,
};

/// The API's view of a running VMM.
pub struct Controller {
    session: Arc<Session>,
    jobs: Arc<Jobs>,
    merger: Merger,
    stop_evt: Arc<EventFd>,
    stopping: Arc<AtomicBool>,
}

/// A reference the tree cannot resolve is the request's fault.
fn reference_error(e: TreeError) -> ApiError {
    match e {
        TreeError::NotFound(_) => ApiError::NotFound(e.to_string()),
        TreeError::Ambiguous { .. } => ApiError::BadRequest(e.to_string()),
        _ => ApiError::Internal(e.to_string()),
    }
}

impl Controller {
    /// A controller of `session`; `stop_evt` ends the VMM's event loop.
    pub fn new(session: Arc<Session>, jobs: Arc<Jobs>, merger: Merger, stop_evt: EventFd) -> Self {
        Self {
            session,
            jobs,
            merger,
            stop_evt: Arc::new(stop_evt),
            stopping: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The eventfd that ends the event loop.
    pub fn stop_eventfd(&self) -> &EventFd {
        &self.stop_evt
    }

    /// Marks the VMM as stopping (requests that change state are refused).
    pub fn set_stopping(&self) {
        self.stopping.store(true, Ordering::SeqCst);
    }

    /// Whether the VMM is stopping.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// The background merges.
    pub fn merger(&self) -> &Merger {
        &self.merger
    }

    /// Refuses `what` while the VM stops or a snapshot or apply job runs.
    fn check_idle(&self, what: &str) -> Result<(), ApiError> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err(ApiError::Conflict("the VM is stopping".into()));
        }
        match self
            .jobs
            .running(&[JobKind::SnapshotCreate, JobKind::SnapshotApply])
        {
            Some(j) => Err(ApiError::Conflict(format!(
                "{} job {} is still running; {what} after it ends",
                j.kind, j.id
            ))),
            None => Ok(()),
        }
    }

    /// Waits for running jobs (they may read guest memory) to end.
    pub fn wait_jobs(&self) {
        self.merger.stop();
        while self
            .jobs
            .running(&[JobKind::SnapshotCreate, JobKind::SnapshotApply])
            .is_some()
        {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
}

impl ApiBackend for Controller {
    fn status(&self) -> VmStatus {
        let s = &self.session;
        let state = if self.stopping.load(Ordering::SeqCst) {
            VmState::Stopping
        } else {
            s.power().into()
        };
        let toml = s.toml();
        VmStatus {
            name: toml.name.clone(),
            vmdir: s.dir().root().to_path_buf(),
            state,
            pid: Some(std::process::id()),
            uptime_s: Some(s.uptime_s()),
            memory_bytes: crate::config::parse_size(&toml.memory).unwrap_or(0),
            vcpus: toml.vcpus,
            disks: status::disks(s.dir(), &toml),
            nets: status::nets(&toml),
            merges: status::merges(s.dir(), self.jobs.running(&[JobKind::Merge])),
            // Memory still arriving after an apply (instant revert); null
            // when complete, or while a job holds the VM.
            memory_load: s.try_vm().and_then(|vm| vm.memory_load()).map(
                |(chunks_loaded, chunks)| MemoryLoad {
                    chunks_loaded,
                    chunks,
                },
            ),
            last_exit: None,
        }
    }

    fn set_state(&self, req: SetStateRequest) -> Result<VmStatus, ApiError> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err(ApiError::Conflict("the VM is stopping".into()));
        }
        match req.state {
            TargetState::Paused => {
                if !self.session.pause() {
                    return Err(ApiError::Conflict("the VM is already paused".into()));
                }
                tracing::info!("paused");
            }
            TargetState::Running => {
                if !self.session.resume() {
                    return Err(ApiError::Conflict("the VM is already running".into()));
                }
                tracing::info!("resumed");
            }
            TargetState::Stopped => {
                if let Some(j) = self
                    .jobs
                    .running(&[JobKind::SnapshotCreate, JobKind::SnapshotApply])
                {
                    return Err(ApiError::Conflict(format!(
                        "{} job {} is running; stop after it ends (or stop --force)",
                        j.kind, j.id
                    )));
                }
                self.set_stopping();
                let _ = self.stop_evt.write(1);
                tracing::info!("stop requested through the API");
            }
        }
        Ok(self.status())
    }

    fn jobs(&self) -> &Arc<Jobs> {
        &self.jobs
    }

    fn create_snapshot(&self, req: CreateSnapshotRequest) -> Result<JobAccepted, ApiError> {
        self.check_idle("take a snapshot")?;
        let opts = CreateOptions {
            name: req.name,
            description: req.description.unwrap_or_default(),
            stop_and_copy: req.stop_and_copy,
        };
        let (session, merger) = (self.session.clone(), self.merger.clone());
        let job = self.jobs.spawn(JobKind::SnapshotCreate, move |job| {
            merger.stop();
            let r = session.take_snapshot(&opts, &|done, total| job.progress(done, total));
            merger.start();
            if let Ok(r) = &r {
                tracing::info!(
                    "snapshot {} taken: paused {} us, {} bytes of memory",
                    r.snapshot.id,
                    r.snapshot.pause_us.unwrap_or(0),
                    r.snapshot.memory_bytes
                );
            }
            r
        });
        Ok(JobAccepted { job })
    }

    fn apply_snapshot(
        &self,
        reference: &str,
        req: ApplySnapshotRequest,
    ) -> Result<JobAccepted, ApiError> {
        self.check_idle("apply")?;
        Tree::load(&self.session.dir().tree_path())
            .and_then(|t| t.resolve(reference).map(|_| ()))
            .map_err(reference_error)?;
        let (session, merger) = (self.session.clone(), self.merger.clone());
        let (stop_evt, stopping) = (self.stop_evt.clone(), self.stopping.clone());
        let reference = reference.to_string();
        let options = ApplyOptions {
            eager: req.eager,
            stay_paused: false,
        };
        let job = self.jobs.spawn(JobKind::SnapshotApply, move |job| {
            merger.stop();
            let r = session.apply_snapshot(
                &reference,
                req.save_current.wanted(),
                options,
                &|done, total| job.progress(done, total),
            );
            if let Ok(a) = &r {
                tracing::info!("applied snapshot {} in {} ms", a.applied.id, a.apply_ms);
                if a.power_state == PowerState::Off {
                    stopping.store(true, Ordering::SeqCst);
                    let _ = stop_evt.write(1);
                }
            }
            if !stopping.load(Ordering::SeqCst) {
                merger.start();
            }
            r
        });
        Ok(JobAccepted { job })
    }

    fn delete_snapshot(
        &self,
        reference: &str,
        subtree: bool,
    ) -> Result<DeleteSnapshotResponse, ApiError> {
        self.check_idle("delete")?;
        let r = manage::delete(self.session.dir(), reference, subtree).map_err(|e| match e {
            SnapshotError::Tree(e) => reference_error(e),
            e => ApiError::Internal(e.to_string()),
        })?;
        for s in &r.deleted {
            tracing::info!("deleted snapshot {} ({})", s.id, s.name);
        }
        let job = self.merger.start();
        Ok(DeleteSnapshotResponse {
            deleted: r.deleted,
            retired: r.retired,
            job,
        })
    }

    fn snapshots(&self) -> Result<Tree, ApiError> {
        Tree::load(&self.session.dir().tree_path()).map_err(|e| ApiError::Internal(e.to_string()))
    }
}
