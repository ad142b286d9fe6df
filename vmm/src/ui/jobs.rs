//! Long operations the web view runs itself, on a thread of its own: the
//! merges after a delete of a VM that is off (what `snapvm snapshot delete`
//! runs in the CLI, vmm/src/cli/snapshot_cmd.rs) and exports. They are
//! shown like the VMM's jobs (`JobInfo` of vmm/src/api.rs, ids starting
//! "ui-"), so the page follows both the same way. A job whose work panics
//! ends as failed, and no longer keeps its VM busy.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::api::{JobInfo, JobState};

/// How long a finished job stays in the answers (so the page sees how it
/// ended even when it ended between two polls).
pub const RECENT: Duration = Duration::from_secs(120);

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Whether `job` runs, or ended less than [`RECENT`] before `now`.
pub fn is_recent(job: &JobInfo, now: u64) -> bool {
    match job.ended_ms {
        None => true,
        Some(end) => now.saturating_sub(end) < RECENT.as_millis() as u64,
    }
}

struct LocalJob {
    vmdir: PathBuf,
    /// It holds the VM's lock (run/lock): the VM is off and cannot start.
    holds_lock: bool,
    info: JobInfo,
}

/// The jobs of this server.
#[derive(Default)]
pub struct LocalJobs {
    table: Mutex<Vec<LocalJob>>,
    /// Notified when a job ends.
    ended: Condvar,
}

/// The text of a panic's payload.
fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "no message".into())
}

impl LocalJobs {
    /// An empty table.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut JobInfo)) {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(j) = t.iter_mut().find(|j| j.info.id == id) {
            f(&mut j.info);
        }
    }

    /// Runs `work` on a new thread as job `kind` of the VM in `vmdir`;
    /// returns its id. `work` reports (bytes done, bytes in all) through
    /// its argument; its result or error message is the job's.
    pub fn spawn<F, T, E>(
        self: &Arc<Self>,
        vmdir: &Path,
        kind: &str,
        holds_lock: bool,
        work: F,
    ) -> String
    where
        F: FnOnce(&dyn Fn(u64, u64)) -> Result<T, E> + Send + 'static,
        T: Serialize,
        E: std::fmt::Display,
    {
        let id = format!("ui-{}", uuid::Uuid::new_v4());
        let info = JobInfo {
            id: id.clone(),
            kind: kind.to_string(),
            state: JobState::Running,
            done: 0,
            total: 0,
            started_ms: now_ms(),
            ended_ms: None,
            result: None,
            error: None,
        };
        {
            let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
            let now = now_ms();
            t.retain(|j| is_recent(&j.info, now));
            t.push(LocalJob {
                vmdir: vmdir.to_path_buf(),
                holds_lock,
                info,
            });
        }
        let jobs = self.clone();
        let job_id = id.clone();
        std::thread::spawn(move || {
            let report = |done: u64, total: u64| {
                jobs.update(&job_id, |j| {
                    j.done = done;
                    j.total = total;
                })
            };
            // Whatever `work` does, the job ends: a panic is its error (the
            // unwinding drops what it held, the VM's lock included).
            let r = catch_unwind(AssertUnwindSafe(|| {
                work(&report).map_err(|e| e.to_string()).and_then(|v| {
                    serde_json::to_value(v)
                        .map_err(|e| format!("cannot encode the job's result: {e}"))
                })
            }))
            .unwrap_or_else(|p| Err(format!("the job failed: {}", panic_text(p.as_ref()))));
            jobs.update(&job_id, |j| {
                j.ended_ms = Some(now_ms());
                match r {
                    Ok(v) => {
                        j.state = JobState::Succeeded;
                        j.done = j.total.max(j.done);
                        j.result = Some(v);
                    }
                    Err(e) => {
                        j.state = JobState::Failed;
                        j.error = Some(e);
                    }
                }
            });
            jobs.ended.notify_all();
        });
        id
    }

    /// The VM's jobs that run or ended recently, oldest first.
    pub fn for_vm(&self, vmdir: &Path) -> Vec<JobInfo> {
        let now = now_ms();
        self.table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|j| j.vmdir == vmdir && is_recent(&j.info, now))
            .map(|j| j.info.clone())
            .collect()
    }

    /// The jobs that run, of every VM.
    pub fn running(&self) -> Vec<JobInfo> {
        self.table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|j| j.info.state == JobState::Running)
            .map(|j| j.info.clone())
            .collect()
    }

    /// Blocks until no job runs.
    pub fn wait_all(&self) {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        while t.iter().any(|j| j.info.state == JobState::Running) {
            t = self.ended.wait(t).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// The running job that holds the VM's lock, if any.
    pub fn holding_lock(&self, vmdir: &Path) -> Option<JobInfo> {
        self.table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|j| j.vmdir == vmdir && j.holds_lock && j.info.state == JobState::Running)
            .map(|j| j.info.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wait_end(jobs: &LocalJobs, dir: &Path, id: &str) -> JobInfo {
        for _ in 0..1000 {
            let j = jobs.for_vm(dir).into_iter().find(|j| j.id == id).unwrap();
            if j.state != JobState::Running {
                return j;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        panic!("job {id} did not end");
    }

    #[test]
    fn jobs_report_progress_results_errors_and_the_lock() {
        let jobs = LocalJobs::new();
        let dir = Path::new("/vms/a");
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let ok = jobs.spawn(dir, "merge", true, move |report| {
            report(5, 10);
            let _ = go_rx.recv();
            Ok::<_, String>(7)
        });
        assert!(ok.starts_with("ui-"));
        assert_eq!(jobs.holding_lock(dir).map(|j| j.id), Some(ok.clone()));
        assert!(jobs.holding_lock(Path::new("/vms/b")).is_none());
        go_tx.send(()).unwrap();
        let j = wait_end(&jobs, dir, &ok);
        assert_eq!(j.state, JobState::Succeeded);
        assert_eq!((j.done, j.total), (10, 10));
        assert_eq!(j.result, Some(serde_json::json!(7)));
        assert!(jobs.holding_lock(dir).is_none());
        let bad = jobs.spawn(dir, "export", false, |_| Err::<(), _>("disk full"));
        let j = wait_end(&jobs, dir, &bad);
        assert_eq!(j.state, JobState::Failed);
        assert_eq!(j.error.as_deref(), Some("disk full"));
        assert!(jobs.for_vm(Path::new("/vms/b")).is_empty());
        let mut old = j.clone();
        old.ended_ms = Some(now_ms() - RECENT.as_millis() as u64 - 1);
        assert!(!is_recent(&old, now_ms()));
    }

    #[test]
    fn a_job_that_panics_fails_and_frees_its_vm() {
        let jobs = LocalJobs::new();
        let dir = Path::new("/vms/p");
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let id = jobs.spawn(dir, "merge", true, move |_| {
            let _ = go_rx.recv();
            if dir.is_absolute() {
                panic!("layer table torn");
            }
            Ok::<_, String>(())
        });
        assert_eq!(jobs.running().len(), 1);
        assert!(jobs.holding_lock(dir).is_some());
        go_tx.send(()).unwrap();
        jobs.wait_all();
        let j = wait_end(&jobs, dir, &id);
        assert_eq!(j.state, JobState::Failed);
        assert!(j.ended_ms.is_some());
        let e = j.error.unwrap_or_default();
        assert!(e.contains("layer table torn"), "{e}");
        assert!(jobs.holding_lock(dir).is_none(), "the VM is not busy");
        assert!(jobs.running().is_empty());
        // Formatted panics carry their text too.
        let id = jobs.spawn(dir, "export", false, |_| -> Result<(), String> {
            panic!("disk {} gone", 2)
        });
        jobs.wait_all();
        let j = wait_end(&jobs, dir, &id);
        assert!(j.error.unwrap_or_default().contains("disk 2 gone"));
    }
}
