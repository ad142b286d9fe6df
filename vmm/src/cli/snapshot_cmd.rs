//! `snapvm snapshot ...`: through the VM's API while its VMM runs, on the
//! VM directory (under its lock) while it is off.

use std::path::Path;
use std::time::{Duration, Instant};

use snapshot::tree::{PowerState, SnapshotMeta, Tree};

use super::api_client::{Client, ClientError};
use super::lifecycle::{start_from, LifecycleError, WAIT};
use super::progress::{progress_bar, wait_job};
use super::render::{merge_summary, render_merges, render_tree};
use crate::api::{
    ApplyResult, ApplySnapshotRequest, CreateSnapshotRequest, LiveResult, MergeOutcome, SaveCurrent,
};
use crate::daemon::lock::{is_running, lock_stopped};
use crate::daemon::merges::{self, Progress};
use crate::daemon::snapshots::create::{create_off, CreateOptions};
use crate::daemon::snapshots::manage::{self, SnapshotDetails};
use crate::daemon::snapshots::{export, SnapshotError};
use crate::hooks::Hooks;
use crate::vmdir::VmDir;

/// The VM directory at `root` and its snapshot `reference`.
fn open_snapshot(root: &Path, reference: &str) -> Result<(VmDir, SnapshotMeta), LifecycleError> {
    let dir = VmDir::open(root)?;
    let tree = Tree::load(&dir.tree_path()).map_err(SnapshotError::from)?;
    let target = tree
        .resolve(reference)
        .map_err(SnapshotError::from)?
        .clone();
    Ok((dir, target))
}

/// `snapvm snapshot create`.
pub fn create(
    root: &Path,
    name: Option<String>,
    description: String,
    no_wait: bool,
) -> Result<(), LifecycleError> {
    let dir = VmDir::open(root)?;
    if !is_running(&dir) {
        let opts = CreateOptions {
            name,
            description,
            stop_and_copy: false,
        };
        let m = create_off(&dir, &opts)?;
        println!(
            "snapshot {} \"{}\" taken (VM off: configuration and disks)",
            m.id, m.name
        );
        say_not_captured(&dir);
        return Ok(());
    }
    let job = Client::new(&dir.api_socket()).create_snapshot(&CreateSnapshotRequest {
        name,
        description: Some(description),
        stop_and_copy: false,
    })?;
    if no_wait {
        println!(
            "snapshot job {} runs in the background (`snapvm status` shows its progress; the snapshot gets its id when it is published)",
            job.job
        );
        return Ok(());
    }
    let r: LiveResult = wait_job(&dir.api_socket(), &job.job, "snapshot")?;
    let s = &r.snapshot;
    println!(
        "snapshot {} \"{}\" taken: paused {} us, wrote {} MiB of memory in {} ms",
        s.id,
        s.name,
        s.pause_us.unwrap_or(0),
        s.memory_bytes >> 20,
        s.duration_ms
    );
    say_not_captured(&dir);
    Ok(())
}

/// Names the independent disks a snapshot just taken did not capture.
fn say_not_captured(dir: &VmDir) {
    for d in dir.load().map(|t| t.disks).unwrap_or_default() {
        if d.independent {
            println!(
                "disk {} is independent: its data is not captured, only that it is attached",
                d.name
            );
        }
    }
}

fn wait_gone(dir: &VmDir) {
    let deadline = Instant::now() + WAIT;
    while is_running(dir) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `snapvm snapshot apply`.
pub fn apply(
    root: &Path,
    reference: &str,
    save_current: Option<String>,
) -> Result<(), LifecycleError> {
    let (dir, target) = open_snapshot(root, reference)?;
    if is_running(&dir) {
        let req = ApplySnapshotRequest {
            save_current: match save_current {
                None => SaveCurrent::Flag(false),
                Some(n) if n.is_empty() => SaveCurrent::Flag(true),
                Some(n) => SaveCurrent::Named(n),
            },
            eager: false,
        };
        let job = Client::new(&dir.api_socket()).apply_snapshot(&target.id, &req)?;
        let r: Option<ApplyResult> = match wait_job(&dir.api_socket(), &job.job, "apply") {
            Ok(r) => Some(r),
            // A powered-off snapshot ends the VMM right after the job (the
            // last answer may be cut off): the tree tells whether it was
            // applied.
            Err(LifecycleError::Client(
                ClientError::NotRunning(_)
                | ClientError::Closed(_)
                | ClientError::Io { .. }
                | ClientError::Malformed(_),
            )) if target.power_state == PowerState::Off => {
                wait_gone(&dir);
                let now = Tree::load(&dir.tree_path())
                    .map_err(SnapshotError::from)?
                    .now;
                if now.as_deref() != Some(target.id.as_str()) {
                    return Err(LifecycleError::JobFailed(format!(
                        "the VMM exited while applying the snapshot; see {}",
                        dir.vmm_log().display()
                    )));
                }
                None
            }
            // The VMM died during the apply: the tree says whether the
            // apply was recorded (the next start continues from it).
            Err(LifecycleError::Client(
                ClientError::NotRunning(_)
                | ClientError::Closed(_)
                | ClientError::Io { .. }
                | ClientError::Malformed(_),
            )) => {
                wait_gone(&dir);
                let now = Tree::load(&dir.tree_path())
                    .map_err(SnapshotError::from)?
                    .now;
                let what = if now.as_deref() == Some(target.id.as_str()) {
                    format!(
                        "the apply was recorded: `snapvm start {}` boots the VM on the snapshot's disks; `snapvm start {} --from {}` continues from it",
                        dir.root().display(),
                        dir.root().display(),
                        &target.id[..8]
                    )
                } else {
                    "the apply was not recorded: the VM's disks and snapshots are as they were"
                        .into()
                };
                return Err(LifecycleError::JobFailed(format!(
                    "the VMM stopped during the apply ({what}); see {}",
                    dir.vmm_log().display()
                )));
            }
            Err(e) => return Err(e),
        };
        if let Some(saved) = r.as_ref().and_then(|r| r.saved_current.as_ref()) {
            println!("saved the current state as snapshot {}", saved.id);
        }
        let power = r.as_ref().map_or(PowerState::Off, |r| r.power_state);
        let took = r
            .as_ref()
            .map(|r| format!(" in {} ms", r.apply_ms))
            .unwrap_or_default();
        println!(
            "applied snapshot {} \"{}\"{took}; the VM is {}",
            target.id,
            target.name,
            match power {
                PowerState::Off => "stopped",
                PowerState::Paused => "paused",
                PowerState::Running => "running",
            }
        );
        if power == PowerState::Off {
            wait_gone(&dir);
        }
        return Ok(());
    }
    if let Some(n) = save_current {
        let opts = CreateOptions {
            name: (!n.is_empty()).then_some(n),
            ..Default::default()
        };
        let m = create_off(&dir, &opts)?;
        println!("saved the current state as snapshot {}", m.id);
    }
    let v = start_from(root, false, Some(&target.id))?;
    println!(
        "applied snapshot {} \"{}\"; the VM is {}",
        target.id,
        target.name,
        v.state.as_str()
    );
    Ok(())
}

/// `snapvm snapshot list`.
pub fn list(root: &Path, json_out: bool, as_tree: bool) -> Result<(), LifecycleError> {
    let dir = VmDir::open(root)?;
    let tree = Tree::load(&dir.tree_path()).map_err(SnapshotError::from)?;
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&tree).unwrap_or_default()
        );
        return Ok(());
    }
    if as_tree {
        print!("{}", render_tree(&tree));
        print!("{}", render_merges(&tree));
        return Ok(());
    }
    println!("{:<36}  {:<8} {:>10}  NAME", "ID", "STATE", "PAUSE us");
    for s in &tree.snapshots {
        let now = if tree.now.as_deref() == Some(s.id.as_str()) {
            "  <- Now"
        } else {
            ""
        };
        println!(
            "{:<36}  {:<8} {:>10}  {}{now}",
            s.id,
            format!("{:?}", s.power_state).to_lowercase(),
            s.pause_us
                .map(|p| p.to_string())
                .unwrap_or_else(|| "-".into()),
            s.name
        );
    }
    print!("{}", render_merges(&tree));
    Ok(())
}

/// `snapvm snapshot delete`: removes the snapshot (with `subtree`, its
/// descendants too) and merges the disk layers it leaves, in the VMM's
/// background job when the VM runs, here when it is off.
pub fn delete(
    root: &Path,
    reference: &str,
    subtree: bool,
    no_wait: bool,
    hooks: &Hooks,
) -> Result<(), LifecycleError> {
    let (dir, target) = open_snapshot(root, reference)?;
    let say_deleted = |deleted: &[SnapshotMeta]| {
        for d in deleted {
            println!("deleted snapshot {} \"{}\"", d.id, d.name);
        }
    };
    if is_running(&dir) {
        let r = Client::new(&dir.api_socket()).delete_snapshot(&target.id, subtree)?;
        say_deleted(&r.deleted);
        match r.job {
            None => println!("no disk layers to merge"),
            Some(id) if no_wait => println!(
                "merge job {id} runs in the background (`snapvm status` shows its progress)"
            ),
            Some(id) => {
                let res: MergeOutcome = wait_job(&dir.api_socket(), &id, "merge")?;
                println!("{}", merge_summary(&res));
            }
        }
        return Ok(());
    }
    let _lock = lock_stopped(&dir)?;
    crate::daemon::merges::recover(&dir, &[])?;
    crate::daemon::orphans::collect(&dir);
    let r = manage::delete(&dir, &target.id, subtree)?;
    say_deleted(&r.deleted);
    if no_wait {
        println!("the disk layers are merged when the VM next starts");
        return Ok(());
    }
    let bar = progress_bar("merge");
    let last_line = std::cell::Cell::new(Instant::now());
    let report = |done: u64, total: u64| match &bar {
        Some(b) => {
            b.set_length(total);
            b.set_position(done);
        }
        None if last_line.get().elapsed() >= Duration::from_secs(1) => {
            let pct = (done * 100).checked_div(total).unwrap_or(0);
            eprintln!("merge: {pct}% ({} of {} MiB)", done >> 20, total >> 20);
            last_line.set(Instant::now());
        }
        None => {}
    };
    let cancel = std::sync::atomic::AtomicBool::new(false);
    let res = merges::run(
        &dir,
        &[],
        &Progress {
            cancel: &cancel,
            report: &report,
            hooks,
        },
    );
    if let Some(b) = &bar {
        b.finish_and_clear();
    }
    println!("{}", merge_summary(&MergeOutcome::Done(res?)));
    Ok(())
}

/// `snapvm snapshot export`: returns the snapshot's id in the new VM.
pub fn export(root: &Path, reference: &str, dest: &Path) -> Result<SnapshotMeta, LifecycleError> {
    let dir = VmDir::open(root)?;
    Ok(export::export(&dir, reference, dest)?)
}

/// `snapvm snapshot show`.
pub fn show(root: &Path, reference: &str) -> Result<SnapshotDetails, LifecycleError> {
    let dir = VmDir::open(root)?;
    Ok(manage::show(&dir, reference)?)
}

/// `snapvm snapshot rename`.
pub fn rename(root: &Path, reference: &str, name: &str) -> Result<SnapshotMeta, LifecycleError> {
    let dir = VmDir::open(root)?;
    Ok(manage::rename(&dir, reference, name)?)
}

/// `snapvm snapshot describe`.
pub fn describe(root: &Path, reference: &str, text: &str) -> Result<SnapshotMeta, LifecycleError> {
    let dir = VmDir::open(root)?;
    Ok(manage::describe(&dir, reference, text)?)
}
