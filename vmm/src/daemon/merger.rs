//! The VMM's background merge job: runs daemon/merges.rs while the VM
//! runs, whenever deletes left disk layers to remove or merge. Snapshots
//! and applies stop it first (a merge stops between two pieces with the
//! chain intact) and start it again when they end.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use snapshot::merge::MergeError;
use snapshot::tree::Tree;

use super::jobs::Jobs;
use super::merges::{self, MergesError, Progress};
use super::session::Session;
use crate::api::{JobKind, MergeOutcome, MergeReport};
use crate::hooks::Hooks;
use crate::machine::disk_backend::DiskBackend;
use crate::vmdir::VmDir;

/// Starts and stops the merge job.
#[derive(Clone)]
pub struct Merger {
    dir: VmDir,
    jobs: Arc<Jobs>,
    session: Arc<Session>,
    hooks: Hooks,
    cancel: Arc<AtomicBool>,
    kick: Arc<AtomicU64>,
    start_lock: Arc<Mutex<()>>,
}

impl Merger {
    /// A merger for the session's VM in `dir` (its open disks are merged
    /// live).
    pub fn new(dir: VmDir, jobs: Arc<Jobs>, session: Arc<Session>, hooks: Hooks) -> Self {
        Self {
            dir,
            jobs,
            session,
            hooks,
            cancel: Arc::new(AtomicBool::new(false)),
            kick: Arc::new(AtomicU64::new(0)),
            start_lock: Arc::new(Mutex::new(())),
        }
    }

    /// Starts the merge job if something waits for one and none runs;
    /// returns the id of the merge job running.
    pub fn start(&self) -> Option<String> {
        self.kick.fetch_add(1, Ordering::SeqCst);
        let _g = self.start_lock.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(j) = self.jobs.running(&[JobKind::Merge]) {
            return Some(j.id);
        }
        let tree = Tree::load(&self.dir.tree_path()).ok()?;
        if tree.retired.is_empty() && tree.merge.is_none() {
            return None;
        }
        let m = self.clone();
        Some(self.jobs.spawn(JobKind::Merge, move |job| m.run(job)))
    }

    /// The job: merge runs until nothing new was asked for meanwhile.
    fn run(&self, job: &super::jobs::JobHandle) -> Result<MergeOutcome, MergesError> {
        let mut sum = MergeReport::default();
        let mut first = true;
        // The disks of the VM running now (an apply may have rebuilt it;
        // it stops this job first).
        let disks: Vec<Arc<DiskBackend>> = self.session.vm().disk_backends();
        loop {
            let generation = self.kick.load(Ordering::SeqCst);
            let report = |done: u64, total: u64| job.progress(done, total);
            let progress = Progress {
                cancel: &self.cancel,
                report: &report,
                hooks: &self.hooks,
            };
            match merges::run(&self.dir, &disks, &progress) {
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
                Err(MergesError::Merge(MergeError::Cancelled)) => {
                    tracing::info!("merge interrupted; it continues after the current job");
                    return Ok(MergeOutcome::Interrupted {
                        interrupted: true,
                        report: sum,
                    });
                }
                Err(e) => {
                    tracing::error!("merge failed: {e}");
                    return Err(e);
                }
            }
            if self.kick.load(Ordering::SeqCst) == generation {
                tracing::info!(
                    "merges done: {} merged, {} removed, disk files {} -> {} bytes",
                    sum.merged,
                    sum.removed,
                    sum.disk_bytes_before,
                    sum.disk_bytes_after
                );
                return Ok(MergeOutcome::Done(sum));
            }
        }
    }

    /// Stops the merge job (if any) and waits for it.
    pub fn stop(&self) {
        self.cancel.store(true, Ordering::SeqCst);
        while self.jobs.running(&[JobKind::Merge]).is_some() {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        self.cancel.store(false, Ordering::SeqCst);
    }
}
