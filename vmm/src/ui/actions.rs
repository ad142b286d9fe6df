//! What the page's buttons do, each as the CLI does it: through the VM's
//! API while its VMM runs, on its directory while it is off (see
//! vmm/src/cli/lifecycle.rs and vmm/src/cli/snapshot_cmd.rs). Long
//! operations answer with the job that does them, which the page follows.
//! Everything here blocks: the server calls it on tokio's blocking threads.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use snapshot::tree::SnapshotMeta;

use super::error::RequestError;
use super::jobs::LocalJobs;
use crate::api::{ApplySnapshotRequest, CreateSnapshotRequest, SaveCurrent, TargetState};
use crate::cli::api_client::Client;
use crate::cli::lifecycle::{self, LifecycleError};
use crate::cli::snapshot_cmd;
use crate::daemon::lock::{is_running, lock_stopped};
use crate::daemon::merges::{self, Progress};
use crate::daemon::snapshots::create::{create_off, CreateOptions};
use crate::daemon::snapshots::manage;
use crate::hooks::Hooks;
use crate::vmdir::VmDir;

/// A power button.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Power {
    /// `snapvm start`.
    Start,
    /// `snapvm stop`.
    Stop,
    /// `snapvm pause`.
    Pause,
    /// `snapvm resume`.
    Resume,
}

impl Power {
    /// The button of a URL's last segment.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "start" => Power::Start,
            "stop" => Power::Stop,
            "pause" => Power::Pause,
            "resume" => Power::Resume,
            _ => return None,
        })
    }
}

/// POST /api/vms/{vm}/snapshots.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotBody {
    /// Name (default: the VM's name and the time).
    #[serde(default)]
    pub name: Option<String>,
    /// Free text.
    #[serde(default)]
    pub description: Option<String>,
}

/// POST /api/vms/{vm}/snapshots/{id}/apply.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApplyBody {
    /// Take a snapshot of the current state first.
    #[serde(default)]
    pub save_first: bool,
}

/// PATCH /api/vms/{vm}/snapshots/{id}.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditBody {
    /// The new name.
    #[serde(default)]
    pub name: Option<String>,
    /// The new description.
    #[serde(default)]
    pub description: Option<String>,
}

/// POST /api/vms/{vm}/snapshots/{id}/export.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportBody {
    /// The new VM directory (relative: to the directory shown).
    pub path: PathBuf,
}

/// What an action did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Done {
    /// The job doing the rest (the VMM's, or a "ui-" one of this server).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<String>,
    /// The snapshot made or changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<SnapshotMeta>,
    /// The snapshots deleted.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub deleted: Vec<SnapshotMeta>,
    /// The disk layers a delete retired.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub retired: Vec<PathBuf>,
    /// What happened, in the CLI's words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// What the actions need besides the VM.
#[derive(Clone)]
pub struct Context {
    /// This server's jobs.
    pub jobs: Arc<LocalJobs>,
    /// Test hooks (merges honour them as in the CLI).
    pub hooks: Arc<Hooks>,
    /// The directory shown (relative export paths are under it).
    pub root: PathBuf,
}

/// Refuses while this server's own job holds the VM's lock.
fn not_busy(ctx: &Context, dir: &VmDir) -> Result<(), RequestError> {
    match ctx.jobs.holding_lock(dir.root()) {
        None => Ok(()),
        Some(j) => Err(RequestError::Busy(format!(
            "the {} job {} started from this page works on {} (it holds the VM's lock); wait until it ends",
            j.kind,
            j.id,
            dir.root().display()
        ))),
    }
}

/// Runs `snapvm ARGS` (this executable) to its end; its output, or its
/// "snapvm: error: ..." message.
///
/// Used where the CLI spawns a VMM (`start`, and `snapshot apply` of a VM
/// that is off, which starts it from the snapshot): the VMM becomes the
/// child of that short-lived `snapvm` process and outlives it, as after a
/// `snapvm start` typed in a shell, instead of becoming a child of this
/// long-running server that would have to reap it.
fn run_snapvm(args: &[&std::ffi::OsStr]) -> Result<String, RequestError> {
    let exe = std::env::current_exe().map_err(|source| RequestError::Spawn {
        exe: PathBuf::from("snapvm"),
        source,
    })?;
    let out = Command::new(&exe)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| RequestError::Spawn {
            exe: exe.clone(),
            source,
        })?;
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
    if out.status.success() {
        return Ok(stdout);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let msg = stderr
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("snapvm: error: "))
        .map(str::to_string)
        .unwrap_or_else(|| {
            let text = stderr.trim();
            if text.is_empty() {
                format!("snapvm exited with {}", out.status)
            } else {
                text.to_string()
            }
        });
    Err(RequestError::Command(msg))
}

/// start, stop, pause, resume.
pub fn power(ctx: &Context, dir: &VmDir, what: Power) -> Result<Done, RequestError> {
    not_busy(ctx, dir)?;
    let root = dir.root();
    let message = match what {
        Power::Start => run_snapvm(&["start".as_ref(), root.as_os_str()])?,
        Power::Stop => {
            lifecycle::stop(root, false)?;
            format!("stopped {}", root.display())
        }
        Power::Pause => {
            lifecycle::set_state(root, TargetState::Paused)?;
            format!("paused {}", root.display())
        }
        Power::Resume => {
            lifecycle::set_state(root, TargetState::Running)?;
            format!("resumed {}", root.display())
        }
    };
    Ok(Done {
        message: Some(message),
        ..Default::default()
    })
}

/// Takes a snapshot: a live one by the VMM's job, or a configuration-and-
/// disks one of a VM that is off.
pub fn snapshot(ctx: &Context, dir: &VmDir, body: SnapshotBody) -> Result<Done, RequestError> {
    not_busy(ctx, dir)?;
    let name = body.name.filter(|n| !n.trim().is_empty());
    let description = body.description.unwrap_or_default();
    if is_running(dir) {
        let job = Client::new(&dir.api_socket()).create_snapshot(&CreateSnapshotRequest {
            name,
            description: Some(description),
            stop_and_copy: false,
        })?;
        return Ok(Done {
            job: Some(job.job),
            ..Default::default()
        });
    }
    let m = create_off(
        dir,
        &CreateOptions {
            name,
            description,
            stop_and_copy: false,
        },
    )?;
    Ok(Done {
        message: Some(format!(
            "snapshot {} \"{}\" taken (VM off: configuration and disks)",
            m.id, m.name
        )),
        snapshot: Some(m),
        ..Default::default()
    })
}

/// Applies a snapshot: in the running VMM by its job, or, for a VM that is
/// off, as `snapvm snapshot apply` does (it starts the VM from it).
pub fn apply(ctx: &Context, dir: &VmDir, id: &str, body: ApplyBody) -> Result<Done, RequestError> {
    not_busy(ctx, dir)?;
    if is_running(dir) {
        let req = ApplySnapshotRequest {
            save_current: SaveCurrent::Flag(body.save_first),
            eager: false,
        };
        let job = Client::new(&dir.api_socket()).apply_snapshot(id, &req)?;
        return Ok(Done {
            job: Some(job.job),
            ..Default::default()
        });
    }
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "snapshot".as_ref(),
        "apply".as_ref(),
        dir.root().as_os_str(),
        id.as_ref(),
    ];
    if body.save_first {
        // Last: the option takes an optional name.
        args.push("--save-current".as_ref());
    }
    let message = run_snapvm(&args)?;
    Ok(Done {
        message: Some(message),
        ..Default::default()
    })
}

/// Renames and/or describes a snapshot (on tree.json, as the CLI does,
/// whether the VM runs or not).
pub fn edit(dir: &VmDir, id: &str, body: EditBody) -> Result<Done, RequestError> {
    if body.name.is_none() && body.description.is_none() {
        return Err(RequestError::BadRequest(
            "give a new name, a new description, or both".into(),
        ));
    }
    let mut last = None;
    if let Some(n) = body.name.as_deref() {
        if n.trim().is_empty() {
            return Err(RequestError::BadRequest(
                "a snapshot's name cannot be empty".into(),
            ));
        }
        last = Some(snapshot_cmd::rename(dir.root(), id, n)?);
    }
    if let Some(d) = body.description.as_deref() {
        last = Some(snapshot_cmd::describe(dir.root(), id, d)?);
    }
    Ok(Done {
        snapshot: last,
        ..Default::default()
    })
}

/// Deletes a snapshot (and with `subtree` its descendants): by the VMM,
/// which merges in its background job, or, for a VM that is off, here
/// under the VM's lock, the merges in a job of this server.
pub fn delete(ctx: &Context, dir: &VmDir, id: &str, subtree: bool) -> Result<Done, RequestError> {
    not_busy(ctx, dir)?;
    if is_running(dir) {
        let r = Client::new(&dir.api_socket()).delete_snapshot(id, subtree)?;
        return Ok(Done {
            job: r.job,
            deleted: r.deleted,
            retired: r.retired,
            ..Default::default()
        });
    }
    let lock = lock_stopped(dir).map_err(LifecycleError::from)?;
    merges::recover(dir, &[]).map_err(LifecycleError::from)?;
    crate::daemon::orphans::collect(dir);
    let r = manage::delete(dir, id, subtree)?;
    let owned = dir.clone();
    let hooks = ctx.hooks.clone();
    let job = ctx.jobs.spawn(
        dir.root(),
        "merge",
        true,
        move |report: &dyn Fn(u64, u64)| {
            // The lock is held until the merges end.
            let _lock = lock;
            let cancel = AtomicBool::new(false);
            merges::run(
                &owned,
                &[],
                &Progress {
                    cancel: &cancel,
                    report,
                    hooks: &hooks,
                },
            )
        },
    );
    Ok(Done {
        job: Some(job),
        deleted: r.deleted,
        retired: r.retired,
        ..Default::default()
    })
}

/// Where an export goes: `path`, under the directory shown when relative.
pub fn export_dest(root: &Path, path: &Path) -> Result<PathBuf, RequestError> {
    if path.as_os_str().is_empty() {
        return Err(RequestError::BadRequest(
            "give the new VM directory to export to".into(),
        ));
    }
    Ok(if path.is_absolute() {
        path.to_path_buf()
    } else {
        root.join(path)
    })
}

/// Exports a snapshot as a standalone VM directory, in a job of this
/// server (`snapvm snapshot export`).
pub fn export(
    ctx: &Context,
    dir: &VmDir,
    id: &str,
    body: ExportBody,
) -> Result<Done, RequestError> {
    let dest = export_dest(&ctx.root, &body.path)?;
    if dest.join("vm.toml").exists() {
        return Err(RequestError::BadRequest(format!(
            "{} already holds a VM",
            dest.display()
        )));
    }
    // Resolve now, so a wrong reference is refused at once.
    snapshot_cmd::show(dir.root(), id)?;
    let root = dir.root().to_path_buf();
    let reference = id.to_string();
    let job = ctx
        .jobs
        .spawn(dir.root(), "export", false, move |_: &dyn Fn(u64, u64)| {
            snapshot_cmd::export(&root, &reference, &dest).map(|m| {
                format!(
                    "exported snapshot {} \"{}\" to {}; continue it with: snapvm start {} --from {}",
                    m.id,
                    m.name,
                    dest.display(),
                    dest.display(),
                    m.id.get(..8).unwrap_or(&m.id)
                )
            })
        });
    Ok(Done {
        job: Some(job),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buttons_and_bodies() {
        assert_eq!(Power::parse("pause"), Some(Power::Pause));
        assert_eq!(Power::parse("reboot"), None);
        let b: ApplyBody = serde_json::from_str(r#"{"save_first": true}"#).unwrap();
        assert!(b.save_first);
        assert!(serde_json::from_str::<ApplyBody>(r#"{"eager": true}"#).is_err());
        let e: EditBody = serde_json::from_str(r#"{"name": "n"}"#).unwrap();
        assert_eq!(e.name.as_deref(), Some("n"));
        let r = edit(
            &VmDir::new(Path::new("/nonexistent")),
            "x",
            EditBody::default(),
        );
        assert!(matches!(r, Err(RequestError::BadRequest(_))));
    }

    #[test]
    fn export_paths_are_under_the_directory_shown_unless_absolute() {
        let root = Path::new("/vms");
        assert_eq!(
            export_dest(root, Path::new("copy")).unwrap(),
            Path::new("/vms/copy")
        );
        assert_eq!(
            export_dest(root, Path::new("/elsewhere/copy")).unwrap(),
            Path::new("/elsewhere/copy")
        );
        assert!(export_dest(root, Path::new("")).is_err());
    }
}
