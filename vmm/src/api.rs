//! The control API's request and response bodies, shared by the server
//! (daemon/api_server.rs) and the client (cli/api_client.rs), so both
//! sides agree by construction. docs/api.yaml describes the same bodies as
//! OpenAPI 3.0 schemas (named as the types here); tests check real answers
//! of a running VMM against it.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use snapshot::live::LiveStats;
use snapshot::merge::MergeRecord;
use snapshot::tree::{PowerState, SnapshotMeta};

/// The VM's power state as the API reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// vCPUs run.
    Running,
    /// vCPUs are parked.
    Paused,
    /// The VMM is shutting down.
    Stopping,
    /// No VMM runs (the CLI's answer for a VM that is off).
    Stopped,
}

impl VmState {
    /// The word used everywhere (API, CLI, tests).
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
        }
    }
}

/// One disk and its layers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskStatus {
    /// Name (as in vm.toml).
    pub name: String,
    /// Working layer, relative to the VM directory.
    pub current: PathBuf,
    /// Whether the guest may not write.
    pub readonly: bool,
    /// Never forked nor rewound by snapshots.
    #[serde(default)]
    pub independent: bool,
    /// The chain, top first (or one "error: ..." entry if it is broken).
    pub layers: Vec<String>,
}

/// One network adapter.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetStatus {
    /// Name (as in vm.toml).
    pub name: String,
    /// The host's TAP device.
    pub tap: String,
    /// MAC address.
    pub mac: String,
}

/// Merges in progress and layers waiting for one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MergeStatus {
    /// The merge job running, if any.
    pub job: Option<JobInfo>,
    /// The journaled merge step.
    pub in_progress: Option<MergeRecord>,
    /// Retired disk layers not yet removed or merged.
    pub waiting: Vec<PathBuf>,
}

/// A lazy memory load after an apply still in progress (2 MiB chunks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryLoad {
    /// Chunks loaded.
    pub chunks_loaded: u64,
    /// Chunks in all.
    pub chunks: u64,
}

/// How the VMM last ended (logs/last-exit.json; the CLI's stopped status).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LastExit {
    /// What happened, in words.
    pub outcome: String,
    /// The VMM's exit code.
    pub exit_code: i32,
}

/// GET /vm (and `snapvm status --json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmStatus {
    /// The VM's name.
    pub name: String,
    /// The VM directory.
    pub vmdir: PathBuf,
    /// Power state.
    pub state: VmState,
    /// The VMM's pid (null when stopped).
    pub pid: Option<u32>,
    /// Seconds since the VMM started (null when stopped).
    pub uptime_s: Option<f64>,
    /// Guest memory.
    pub memory_bytes: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// Disks and their layers.
    pub disks: Vec<DiskStatus>,
    /// Network adapters.
    #[serde(default)]
    pub nets: Vec<NetStatus>,
    /// Merges.
    pub merges: MergeStatus,
    /// A lazy memory load still in progress (null when complete, while a
    /// job holds the VM, or when the VM is stopped).
    #[serde(default)]
    pub memory_load: Option<MemoryLoad>,
    /// How the VMM last ended (the CLI's answer for a stopped VM only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<LastExit>,
}

/// What PUT /vm/state asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetState {
    /// Resume.
    Running,
    /// Pause.
    Paused,
    /// Stop the VMM.
    Stopped,
}

/// PUT /vm/state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetStateRequest {
    /// The state wanted.
    pub state: TargetState,
}

/// POST /snapshots (the body is optional: all fields have defaults).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshotRequest {
    /// Name (default: the VM's name and the time).
    #[serde(default)]
    pub name: Option<String>,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
    /// Keep the VM paused until all memory is written (the stop-and-copy
    /// baseline of `snapvm bench snapshot`).
    #[serde(default, deserialize_with = "null_is_default")]
    pub stop_and_copy: bool,
}

/// `save_current` of an apply: false, true, or the name to give the
/// snapshot of the current state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum SaveCurrent {
    /// Whether to snapshot the current state first (default name).
    Flag(bool),
    /// Snapshot it first, with this name.
    Named(String),
}

impl Default for SaveCurrent {
    fn default() -> Self {
        SaveCurrent::Flag(false)
    }
}

impl SaveCurrent {
    /// None: do not save; Some(None): save with a default name.
    pub fn wanted(&self) -> Option<Option<String>> {
        match self {
            SaveCurrent::Flag(false) => None,
            SaveCurrent::Flag(true) => Some(None),
            SaveCurrent::Named(n) => Some(Some(n.clone())),
        }
    }
}

/// POST /snapshots/{id}/apply (the body is optional).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplySnapshotRequest {
    /// Snapshot the current state first.
    #[serde(default, deserialize_with = "null_is_default")]
    pub save_current: SaveCurrent,
    /// Load all memory before resuming (the baseline of `snapvm bench
    /// apply`) instead of lazily.
    #[serde(default, deserialize_with = "null_is_default")]
    pub eager: bool,
}

/// Reads `null` as the field's default.
fn null_is_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// 202 answer: the job that does the work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobAccepted {
    /// The job's id (GET /jobs/{id}).
    pub job: String,
}

/// DELETE /snapshots/{id}.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeleteSnapshotResponse {
    /// The snapshots removed from the tree.
    pub deleted: Vec<SnapshotMeta>,
    /// Disk layers now waiting to be removed or merged.
    pub retired: Vec<PathBuf>,
    /// The merge job started (null when there is nothing to merge).
    pub job: Option<String>,
}

/// An error answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: String,
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// Working.
    Running,
    /// Finished with a result.
    Succeeded,
    /// Finished with an error.
    Failed,
}

/// A job as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobInfo {
    /// Unique id.
    pub id: String,
    /// What it does ([`JobKind`] as text).
    pub kind: String,
    /// Its state.
    pub state: JobState,
    /// Bytes done.
    pub done: u64,
    /// Bytes in all (0 while unknown).
    pub total: u64,
    /// Start, milliseconds since the Unix epoch.
    pub started_ms: u64,
    /// End, milliseconds since the Unix epoch.
    pub ended_ms: Option<u64>,
    /// Result (on success): a [`LiveResult`], [`ApplyResult`] or
    /// [`MergeOutcome`] by kind.
    pub result: Option<serde_json::Value>,
    /// Error message (on failure).
    pub error: Option<String>,
}

/// The kinds of jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    /// Taking a live snapshot.
    SnapshotCreate,
    /// Applying a snapshot.
    SnapshotApply,
    /// Merging disk layers after deletes.
    Merge,
}

impl JobKind {
    /// The kind as the API shows it.
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::SnapshotCreate => "snapshot-create",
            JobKind::SnapshotApply => "snapshot-apply",
            JobKind::Merge => "merge",
        }
    }
}

/// Result of a live snapshot job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LiveResult {
    /// The published snapshot.
    pub snapshot: SnapshotMeta,
    /// Streaming figures.
    pub stats: LiveStats,
}

/// Result of an apply job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApplyResult {
    /// The snapshot applied.
    pub applied: SnapshotMeta,
    /// The snapshot of the state before, with `save_current`.
    pub saved_current: Option<SnapshotMeta>,
    /// The power state the VM continues in.
    pub power_state: PowerState,
    /// Time from the request to the guest running again (or being ready).
    pub apply_ms: u64,
}

/// What a merge run did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MergeReport {
    /// Layers merged with their child.
    pub merged: u32,
    /// Layers removed because nothing stood on them.
    pub removed: u32,
    /// Layers still waiting (several children).
    pub waiting: Vec<PathBuf>,
    /// Bytes copied.
    pub copied_bytes: u64,
    /// Space the VM's disk files took before and after.
    pub disk_bytes_before: u64,
    /// See `disk_bytes_before`.
    pub disk_bytes_after: u64,
    /// Longest time guest disk I/O waited for a switch, microseconds.
    pub switch_us_max: u64,
    /// Wall time of the run, ms.
    pub duration_ms: u64,
}

/// Result of a merge job: its report, or the report so far when another
/// job interrupted it (it continues after that job).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MergeOutcome {
    /// Stopped by another job.
    Interrupted {
        /// Always true.
        interrupted: bool,
        /// What was done until then.
        report: MergeReport,
    },
    /// All done.
    Done(MergeReport),
}

impl MergeOutcome {
    /// The report either way.
    pub fn report(&self) -> &MergeReport {
        match self {
            MergeOutcome::Interrupted { report, .. } | MergeOutcome::Done(report) => report,
        }
    }

    /// Whether another job interrupted it.
    pub fn interrupted(&self) -> bool {
        matches!(self, MergeOutcome::Interrupted { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn optional_bodies_and_their_defaults() {
        let empty: ApplySnapshotRequest = serde_json::from_str("{}").unwrap();
        assert_eq!(empty, ApplySnapshotRequest::default());
        let named: ApplySnapshotRequest =
            serde_json::from_str(r#"{"save_current": "kept", "eager": null}"#).unwrap();
        assert_eq!(named.save_current.wanted(), Some(Some("kept".into())));
        assert!(!named.eager);
        let flag: ApplySnapshotRequest = serde_json::from_str(r#"{"save_current": true}"#).unwrap();
        assert_eq!(flag.save_current.wanted(), Some(None));
        assert!(serde_json::from_str::<ApplySnapshotRequest>(r#"{"eager": "yes"}"#).is_err());
        let c: CreateSnapshotRequest =
            serde_json::from_str(r#"{"name": null, "description": "d"}"#).unwrap();
        assert_eq!((c.name, c.description.as_deref()), (None, Some("d")));
        assert!(serde_json::from_str::<SetStateRequest>(r#"{"state": "flying"}"#).is_err());
        assert!(serde_json::from_str::<SetStateRequest>(r#"{"colour": "red"}"#).is_err());
    }

    #[test]
    fn merge_outcomes_read_back() {
        let done = MergeOutcome::Done(MergeReport {
            merged: 2,
            ..Default::default()
        });
        let text = serde_json::to_string(&done).unwrap();
        let back: MergeOutcome = serde_json::from_str(&text).unwrap();
        assert_eq!(back.report().merged, 2);
        assert!(!back.interrupted());
        let cut: MergeOutcome = serde_json::from_value(
            serde_json::json!({"interrupted": true, "report": back.report()}),
        )
        .unwrap();
        assert!(cut.interrupted());
    }
}
