//! What the page's buttons do, each as the CLI does it: through the VM's
//! API while its VMM runs, on its directory while it is off (see
//! vmm/src/cli/lifecycle.rs and vmm/src/cli/snapshot_cmd.rs). Long
//! operations answer with the job that does them, which the page follows.
//! A snapshot reference from a URL is resolved against the VM's tree.json
//! first, as the CLI does, and only the id it resolves to goes on (to the
//! VMM, or to a `snapvm` command line). Everything here blocks: the server
//! calls it on tokio's blocking threads.

use std::ffi::OsStr;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use snapshot::tree::{SnapshotMeta, Tree};

use super::error::RequestError;
use super::jobs::LocalJobs;
use crate::api::{ApplySnapshotRequest, CreateSnapshotRequest, SaveCurrent, TargetState};
use crate::cli::api_client::Client;
use crate::cli::lifecycle::{self, LifecycleError};
use crate::daemon::lock::{is_running, lock_stopped};
use crate::daemon::merges::{self, Progress};
use crate::daemon::snapshots::create::{create_off, CreateOptions};
use crate::daemon::snapshots::{manage, SnapshotError};
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
        Some(j) => Err(RequestError::Busy {
            job: j.id,
            kind: j.kind,
            vm: dir.root().to_path_buf(),
        }),
    }
}

/// The snapshot `reference` (an id, a unique id prefix or a unique name)
/// names in the VM's tree.json, as the CLI resolves it
/// (vmm/src/cli/snapshot_cmd.rs): an unknown one is refused in its words.
pub fn resolve(dir: &VmDir, reference: &str) -> Result<SnapshotMeta, RequestError> {
    let tree = Tree::load(&dir.tree_path()).map_err(SnapshotError::from)?;
    let found = tree.resolve(reference).map_err(SnapshotError::from)?;
    Ok(found.clone())
}

/// `snapvm start -- ROOT`.
fn start_args(root: &Path) -> Vec<&OsStr> {
    vec!["start".as_ref(), "--".as_ref(), root.as_os_str()]
}

/// `snapvm snapshot apply [--save-current] -- ROOT ID`.
fn apply_args<'a>(root: &'a Path, id: &'a str, save_first: bool) -> Vec<&'a OsStr> {
    let mut args: Vec<&OsStr> = vec!["snapshot".as_ref(), "apply".as_ref()];
    if save_first {
        // Before `--`, which ends its optional value.
        args.push("--save-current".as_ref());
    }
    args.extend::<[&OsStr; 3]>(["--".as_ref(), root.as_os_str(), id.as_ref()]);
    args
}

/// Runs `snapvm ARGS` (this executable) to its end; its output, or its
/// "snapvm: error: ..." message.
///
/// Used where the CLI spawns a VMM (`start`, and `snapshot apply` of a VM
/// that is off, which starts it from the snapshot): the VMM becomes the
/// child of that short-lived `snapvm` process and outlives it, as after a
/// `snapvm start` typed in a shell, instead of becoming a child of this
/// long-running server that would have to reap it.
fn run_snapvm(args: &[&OsStr]) -> Result<String, RequestError> {
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
    let message = stderr
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("snapvm: error: "))
        .map(str::to_string)
        .or_else(|| Some(stderr.trim().to_string()).filter(|t| !t.is_empty()));
    let command = std::iter::once("snapvm".into())
        .chain(args.iter().map(|a| a.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ");
    Err(RequestError::Command {
        command,
        status: out.status,
        message,
    })
}

/// start, stop, pause, resume.
pub fn power(ctx: &Context, dir: &VmDir, what: Power) -> Result<Done, RequestError> {
    not_busy(ctx, dir)?;
    let root = dir.root();
    let message = match what {
        Power::Start => run_snapvm(&start_args(root))?,
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
pub fn apply(
    ctx: &Context,
    dir: &VmDir,
    reference: &str,
    body: ApplyBody,
) -> Result<Done, RequestError> {
    not_busy(ctx, dir)?;
    let target = resolve(dir, reference)?;
    if is_running(dir) {
        let req = ApplySnapshotRequest {
            save_current: SaveCurrent::Flag(body.save_first),
            eager: false,
        };
        let job = Client::new(&dir.api_socket()).apply_snapshot(&target.id, &req)?;
        return Ok(Done {
            job: Some(job.job),
            ..Default::default()
        });
    }
    let message = run_snapvm(&apply_args(dir.root(), &target.id, body.save_first))?;
    Ok(Done {
        message: Some(message),
        ..Default::default()
    })
}

/// Renames and/or describes a snapshot on tree.json (as the CLI does,
/// whether the VM runs or not): both changes in one update of the tree,
/// to the snapshot the reference resolved to.
pub fn edit(dir: &VmDir, reference: &str, body: EditBody) -> Result<Done, RequestError> {
    let EditBody { name, description } = body;
    if name.is_none() && description.is_none() {
        return Err(RequestError::NothingToEdit);
    }
    if name.as_deref().is_some_and(|n| n.trim().is_empty()) {
        return Err(RequestError::EmptyName);
    }
    let id = resolve(dir, reference)?.id;
    let changed = Tree::update(&dir.tree_path(), |t| {
        let s = t.resolve_mut(&id)?;
        if let Some(n) = name {
            s.name = n;
        }
        if let Some(d) = description {
            s.description = d;
        }
        Ok(s.clone())
    })
    .map_err(SnapshotError::from)?;
    Ok(Done {
        snapshot: Some(changed),
        ..Default::default()
    })
}

/// Deletes a snapshot (and with `subtree` its descendants): by the VMM,
/// which merges in its background job, or, for a VM that is off, here
/// under the VM's lock, the merges in a job of this server.
pub fn delete(
    ctx: &Context,
    dir: &VmDir,
    reference: &str,
    subtree: bool,
) -> Result<Done, RequestError> {
    not_busy(ctx, dir)?;
    let id = resolve(dir, reference)?.id;
    if is_running(dir) {
        let r = Client::new(&dir.api_socket()).delete_snapshot(&id, subtree)?;
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
    let r = manage::delete(dir, &id, subtree)?;
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

/// Where an export goes: `path`, under the directory shown when relative
/// (and then without `..`, which would climb out of it).
pub fn export_dest(root: &Path, path: &Path) -> Result<PathBuf, RequestError> {
    if path.as_os_str().is_empty() {
        return Err(RequestError::NoExportPath);
    }
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(RequestError::ExportPathClimbs(path.to_path_buf()));
    }
    Ok(root.join(path))
}

/// Exports a snapshot as a standalone VM directory, in a job of this
/// server (`snapvm snapshot export`). What the export refuses (a
/// destination that already holds a VM...) is the job's error, in its
/// words.
pub fn export(
    ctx: &Context,
    dir: &VmDir,
    reference: &str,
    body: ExportBody,
) -> Result<Done, RequestError> {
    let dest = export_dest(&ctx.root, &body.path)?;
    let id = resolve(dir, reference)?.id;
    let owned = dir.clone();
    let job = ctx
        .jobs
        .spawn(dir.root(), "export", false, move |_: &dyn Fn(u64, u64)| {
            crate::daemon::snapshots::export::export(&owned, &id, &dest).map(|m| {
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

    use crate::cli::args::{Cli, Command as Cmd, SnapshotCommand};
    use clap::Parser;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("snapvm-ui-act-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn snap(id: &str, name: &str) -> SnapshotMeta {
        SnapshotMeta {
            id: id.into(),
            name: name.into(),
            description: String::new(),
            created_ms: 0,
            parent: None,
            power_state: snapshot::tree::PowerState::Off,
            pause_us: None,
            memory_bytes: 0,
            duration_ms: 0,
            disks: vec![],
            clones: vec![],
        }
    }

    #[test]
    fn bodies() {
        let b: ApplyBody = serde_json::from_str(r#"{"save_first": true}"#).unwrap();
        assert!(b.save_first);
        assert!(serde_json::from_str::<ApplyBody>(r#"{"eager": true}"#).is_err());
        let e: EditBody = serde_json::from_str(r#"{"name": "n"}"#).unwrap();
        assert_eq!(e.name.as_deref(), Some("n"));
        let nowhere = VmDir::new(Path::new("/nonexistent"));
        let r = edit(&nowhere, "x", EditBody::default());
        assert!(matches!(r, Err(RequestError::NothingToEdit)), "{r:?}");
        let blank = EditBody {
            name: Some(" ".into()),
            description: None,
        };
        assert!(matches!(
            edit(&nowhere, "x", blank),
            Err(RequestError::EmptyName)
        ));
    }

    #[test]
    fn references_resolve_against_the_tree_and_edits_go_to_the_id() {
        let root = scratch("resolve");
        let dir = VmDir::new(&root);
        std::fs::create_dir_all(dir.tree_path().parent().unwrap()).unwrap();
        let mut tree = Tree::default();
        tree.add(snap("11111111-aaaa-4000-8000-000000000001", "base"));
        tree.add(snap("22222222-bbbb-4000-8000-000000000002", "other"));
        tree.save(&dir.tree_path()).unwrap();
        assert_eq!(
            resolve(&dir, "base").unwrap().id,
            "11111111-aaaa-4000-8000-000000000001"
        );
        assert_eq!(resolve(&dir, "2222").unwrap().name, "other");
        let e = resolve(&dir, "nope").unwrap_err();
        assert_eq!(e.status(), axum::http::StatusCode::NOT_FOUND);
        assert!(
            e.to_string().starts_with("no snapshot matches 'nope'"),
            "{e}"
        );
        // A rename to the other's name and a description at once: both
        // reach the snapshot named at first.
        let both = EditBody {
            name: Some("other".into()),
            description: Some("renamed".into()),
        };
        let done = edit(&dir, "base", both).unwrap();
        let m = done.snapshot.unwrap();
        assert_eq!(m.id, "11111111-aaaa-4000-8000-000000000001");
        assert_eq!(
            (m.name.as_str(), m.description.as_str()),
            ("other", "renamed")
        );
        let t = Tree::load(&dir.tree_path()).unwrap();
        let other = t.resolve("2222").unwrap();
        assert_eq!(other.description, "", "the other snapshot is untouched");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn child_command_lines_parse_as_meant() {
        let parse = |args: &[&OsStr]| {
            Cli::try_parse_from(std::iter::once(OsStr::new("snapvm")).chain(args.iter().copied()))
        };
        // A directory whose name looks like an option stays a directory.
        let root = Path::new("--paused");
        match parse(&start_args(root)).unwrap().command {
            Cmd::Start {
                vmdir,
                paused,
                from,
            } => {
                assert_eq!(vmdir, root);
                assert!(!paused && from.is_none());
            }
            _ => panic!("not a start"),
        }
        for save_first in [false, true] {
            let args = apply_args(root, "-1234", save_first);
            match parse(&args).unwrap().command {
                Cmd::Snapshot(SnapshotCommand::Apply {
                    vmdir,
                    snapshot,
                    save_current,
                }) => {
                    assert_eq!(vmdir, root);
                    assert_eq!(snapshot, "-1234");
                    assert_eq!(save_current, save_first.then(String::new));
                }
                _ => panic!("not an apply"),
            }
        }
    }

    #[test]
    fn export_paths_are_under_the_directory_shown_unless_absolute() {
        let root = Path::new("/vms");
        assert_eq!(
            export_dest(root, Path::new("copy")).unwrap(),
            Path::new("/vms/copy")
        );
        assert_eq!(
            export_dest(root, Path::new("sub/copy")).unwrap(),
            Path::new("/vms/sub/copy")
        );
        assert_eq!(
            export_dest(root, Path::new("/elsewhere/copy")).unwrap(),
            Path::new("/elsewhere/copy")
        );
        assert!(matches!(
            export_dest(root, Path::new("")),
            Err(RequestError::NoExportPath)
        ));
        for climbing in ["..", "../copy", "sub/../../copy", "./.."] {
            let r = export_dest(root, Path::new(climbing));
            match r {
                Err(RequestError::ExportPathClimbs(p)) => assert_eq!(p, Path::new(climbing)),
                other => panic!("{climbing}: {other:?}"),
            }
        }
        let e = export_dest(root, Path::new("../x")).unwrap_err();
        assert_eq!(e.status(), axum::http::StatusCode::BAD_REQUEST);
        assert!(e.to_string().contains("../x"), "{e}");
    }
}
