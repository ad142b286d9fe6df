//! Jobs: every long operation runs as a job with an id, a state, progress
//! in bytes, start and end times, and a result or an error.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::api::{JobInfo, JobKind, JobState};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The VMM's job table.
#[derive(Default)]
pub struct Jobs {
    table: Mutex<BTreeMap<String, JobInfo>>,
}

/// Lets a running job report progress and its end.
pub struct JobHandle {
    jobs: Arc<Jobs>,
    id: String,
}

impl Jobs {
    /// An empty table.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut JobInfo)) {
        let mut t = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(j) = t.get_mut(id) {
            f(j);
        }
    }

    /// Registers a new running job.
    pub fn create(self: &Arc<Self>, kind: JobKind) -> JobHandle {
        let id = uuid::Uuid::new_v4().to_string();
        let info = JobInfo {
            id: id.clone(),
            kind: kind.as_str().into(),
            state: JobState::Running,
            done: 0,
            total: 0,
            started_ms: now_ms(),
            ended_ms: None,
            result: None,
            error: None,
        };
        self.table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), info);
        JobHandle {
            jobs: self.clone(),
            id,
        }
    }

    /// Runs `work` on a new thread as a job of `kind`; returns its id. Its
    /// result is what the job shows on success; its error's message what
    /// it shows on failure.
    pub fn spawn<F, T, E>(self: &Arc<Self>, kind: JobKind, work: F) -> String
    where
        F: FnOnce(&JobHandle) -> Result<T, E> + Send + 'static,
        T: Serialize,
        E: std::fmt::Display,
    {
        let handle = self.create(kind);
        let id = handle.id.clone();
        std::thread::spawn(move || {
            let r = work(&handle);
            handle.finish(r);
        });
        id
    }

    /// One job.
    pub fn get(&self, id: &str) -> Option<JobInfo> {
        self.table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    /// All jobs, oldest first.
    pub fn list(&self) -> Vec<JobInfo> {
        let mut v: Vec<JobInfo> = self
            .table
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect();
        v.sort_by_key(|j| j.started_ms);
        v
    }

    /// Whether a job of one of `kinds` is running.
    pub fn running(&self, kinds: &[JobKind]) -> Option<JobInfo> {
        self.list()
            .into_iter()
            .find(|j| j.state == JobState::Running && kinds.iter().any(|k| k.as_str() == j.kind))
    }
}

impl JobHandle {
    /// The job's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Sets the total bytes.
    pub fn set_total(&self, total: u64) {
        self.jobs.update(&self.id, |j| j.total = total);
    }

    /// Sets the bytes done.
    pub fn set_done(&self, done: u64) {
        self.jobs.update(&self.id, |j| j.done = done);
    }

    /// Reports (bytes done, bytes in all).
    pub fn progress(&self, done: u64, total: u64) {
        self.jobs.update(&self.id, |j| {
            j.total = total;
            j.done = done;
        });
    }

    /// Ends the job.
    pub fn finish<T: Serialize, E: std::fmt::Display>(&self, r: Result<T, E>) {
        let r = r.map_err(|e| e.to_string()).and_then(|v| {
            serde_json::to_value(v).map_err(|e| format!("cannot encode the job's result: {e}"))
        });
        self.jobs.update(&self.id, |j| {
            j.ended_ms = Some(now_ms());
            match r {
                Ok(v) => {
                    j.state = JobState::Succeeded;
                    j.result = Some(v);
                    j.done = j.total.max(j.done);
                }
                Err(e) => {
                    j.state = JobState::Failed;
                    j.error = Some(e);
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn wait_done(jobs: &Jobs, id: &str) -> JobInfo {
        for _ in 0..500 {
            let j = jobs.get(id).unwrap();
            if j.state != JobState::Running {
                return j;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        panic!("job did not finish");
    }

    #[test]
    fn jobs_report_progress_result_and_errors() {
        let jobs = Jobs::new();
        let ok = jobs.spawn(JobKind::Merge, |h| {
            h.set_total(100);
            h.set_done(50);
            Ok::<_, std::io::Error>(serde_json::json!({"bytes": 100}))
        });
        let bad = jobs.spawn(JobKind::Merge, |_| {
            Err::<(), _>(std::io::Error::other("disk full"))
        });
        let j = wait_done(&jobs, &ok);
        assert_eq!(j.state, JobState::Succeeded);
        assert_eq!((j.done, j.total), (100, 100));
        assert_eq!(j.result.unwrap()["bytes"], 100);
        assert!(j.ended_ms.unwrap() >= j.started_ms);
        let j = wait_done(&jobs, &bad);
        assert_eq!(j.state, JobState::Failed);
        assert_eq!(j.error.as_deref(), Some("disk full"));
        assert_eq!(jobs.list().len(), 2);
        assert!(jobs.get("nope").is_none());
        assert!(jobs.running(&[JobKind::Merge]).is_none());
    }
}
