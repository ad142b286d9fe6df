//! Runs what deleted snapshots leave behind: removes disk layers nothing
//! uses and merges retired layers with their only child (the engine and
//! its invariants are in `snapshot::merge`). Runs inside the VMM as a
//! background job while the VM runs (the working layer of a running VM is
//! merged through its open disk), or in the CLI when the VM is off.
//!
//! Every step is journaled in tree.json before it is taken, and a journaled
//! switch is finished by [`recover`] when the VMM starts, so an interrupted
//! merge (kill -9, power loss, a full disk) never changes what any snapshot
//! or the VM reads.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use snapshot::atomic_file::sync_dir;
use snapshot::disk::relative_path;
use snapshot::merge::{
    copy_down, copy_into_child, copy_into_parent, normalize, own_bytes, own_extents, plan, Action,
    Direction, LayerGraph, MergeError, MergeRecord, Phase,
};
use snapshot::qcow2_header::{
    rebacked_header, sync, write_header, write_header_unsynced, HeaderError,
};
use snapshot::tree::Tree;

use crate::api::MergeReport;
use crate::hooks::Hooks;
use crate::machine::disk_backend::{DiskBackend, ReopenError};
use crate::vmdir::VmDir;

const PIECE: u64 = 1 << 20;
/// Pieces copied into a running VM's disk are smaller: the guest's own
/// requests wait while one is copied.
const LIVE_PIECE: u64 = 1 << 20;

/// Errors of a merge run.
#[derive(Debug, thiserror::Error)]
pub enum MergesError {
    /// The engine failed.
    #[error(transparent)]
    Merge(#[from] MergeError),
    /// tree.json could not be read or written.
    #[error(transparent)]
    Tree(#[from] snapshot::tree::TreeError),
    /// vm.toml is unusable.
    #[error(transparent)]
    VmDir(#[from] crate::vmdir::VmDirError),
    /// A file operation failed.
    #[error("cannot {what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The running VM's disk could not be switched.
    #[error("switching disk {path}: {source}")]
    Switch {
        /// The layer.
        path: PathBuf,
        /// What failed.
        source: ReopenError,
    },
    /// The header of a layer could not be rewritten.
    #[error(transparent)]
    Header(#[from] HeaderError),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> MergesError {
    let path = path.to_path_buf();
    move |source| MergesError::Io { what, path, source }
}

/// Space the files in `disks/` take (allocated blocks).
pub fn disk_usage(dir: &VmDir) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir.disks_dir())
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .filter(|m| m.is_file())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

/// Where a run reports progress and learns it should stop.
pub struct Progress<'a> {
    /// Set to stop at the next piece (the chain stays intact).
    pub cancel: &'a AtomicBool,
    /// Called with (bytes done, bytes in all) of the current merge.
    pub report: &'a dyn Fn(u64, u64),
    /// Test hooks ([`Hooks::merge_delay`], [`Hooks::merge_crash`]).
    pub hooks: &'a Hooks,
}

fn rel(dir: &VmDir, p: &Path) -> PathBuf {
    relative_path(p, dir.root())
}

/// Journals `record` (or clears the journal and forgets `done`).
fn journal(
    dir: &VmDir,
    record: Option<MergeRecord>,
    done: Option<&Path>,
) -> Result<(), MergesError> {
    let done = done.map(normalize);
    Tree::update(&dir.tree_path(), |t| {
        t.merge = record;
        if let Some(d) = &done {
            t.retired.retain(|r| normalize(&dir.resolve(r)) != *d);
        }
        Ok(())
    })?;
    Ok(())
}

fn live_index(live: &[Arc<DiskBackend>], layer: &Path) -> Option<usize> {
    live.iter()
        .position(|b| b.top().is_some_and(|t| normalize(&t) == layer))
}

/// Finishes a journaled switch left by an interrupted merge (or forgets
/// an interrupted copy, which starts again). Run before the disks are
/// opened; `live` is empty then.
pub fn recover(dir: &VmDir, live: &[Arc<DiskBackend>]) -> Result<Option<MergeRecord>, MergesError> {
    let tree = Tree::load(&dir.tree_path())?;
    let Some(rec) = tree.merge.clone() else {
        return Ok(None);
    };
    let parent = dir.resolve(&rec.parent);
    let child = dir.resolve(&rec.child);
    match &rec.phase {
        Phase::Copying => journal(dir, None, None)?,
        Phase::Switching { header } => {
            match live_index(live, &normalize(&child)) {
                Some(i) => {
                    let h = header.clone();
                    live[i]
                        .reopen(|top| write_header_unsynced(top, &h))
                        .map_err(|source| MergesError::Switch {
                            path: child.clone(),
                            source,
                        })?;
                    sync(&child).map_err(MergeError::from)?;
                }
                None => write_header(&child, header).map_err(MergeError::from)?,
            }
            remove_layer(&parent)?;
            journal(dir, None, Some(&parent))?;
        }
        Phase::Renaming => {
            if parent.exists() {
                std::fs::rename(&parent, &child).map_err(io_err("rename", &parent))?;
                sync_dir(&dir.disks_dir()).map_err(io_err("sync", &dir.disks_dir()))?;
            }
            journal(dir, None, Some(&parent))?;
        }
    }
    tracing::info!(
        "finished the interrupted merge of {} into {}",
        rec.parent.display(),
        rec.child.display()
    );
    Ok(Some(rec))
}

fn remove_layer(p: &Path) -> Result<(), MergesError> {
    match std::fs::remove_file(p) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("remove", p)(e)),
    }
    if let Some(d) = p.parent() {
        sync_dir(d).map_err(io_err("sync", d))?;
    }
    Ok(())
}

/// The layers snapshots and the VM name directly (absolute).
fn used_layers(dir: &VmDir, tree: &Tree) -> Result<Vec<PathBuf>, MergesError> {
    let toml = dir.load()?;
    let mut used: Vec<PathBuf> = toml.disks.iter().map(|d| dir.resolve(&d.current)).collect();
    for s in &tree.snapshots {
        used.extend(s.disks.iter().map(|d| dir.resolve(&d.layer)));
    }
    Ok(used)
}

/// The layers clones read: every layer under a cloned snapshot's frozen
/// layers, down to the base. None of them is merged or removed while the
/// clones exist (they have them open, or will).
fn pinned_layers(dir: &VmDir, tree: &Tree, graph: &LayerGraph) -> Vec<PathBuf> {
    let mut pinned = Vec::new();
    for s in &tree.snapshots {
        if crate::daemon::snapshots::clone::live_clones(dir, s).is_empty() {
            continue;
        }
        for d in &s.disks {
            let mut at = Some(normalize(&dir.resolve(&d.layer)));
            while let Some(p) = at {
                at = graph
                    .parent
                    .get(&p)
                    .and_then(|b| b.as_ref().map(|l| normalize(&l.path)));
                if !pinned.contains(&p) {
                    pinned.push(p);
                }
            }
        }
    }
    pinned
}

/// Keeps a merge away from files it must not touch: a layer outside this
/// VM's disks/ (another VM's, e.g. the snapshot layer a clone stands on, or
/// a file linked in with --link) is only forgotten, never written or
/// removed; a layer clones read waits until they are gone.
fn guard(dir: &VmDir, pinned: &[PathBuf], a: Action) -> Action {
    let own = |p: &Path| p.starts_with(normalize(&dir.disks_dir()));
    match a {
        Action::Remove(p) | Action::Merge { parent: p, .. } if !own(&p) => Action::Forget(p),
        Action::Remove(p) | Action::Merge { parent: p, .. } if pinned.contains(&p) => {
            Action::Wait {
                layer: p,
                children: 0,
            }
        }
        a => a,
    }
}

/// Removes and merges retired layers until none can go. `live` are the
/// running VM's disks (empty when the VM is off).
pub fn run(
    dir: &VmDir,
    live: &[Arc<DiskBackend>],
    progress: &Progress,
) -> Result<MergeReport, MergesError> {
    let t0 = Instant::now();
    let mut report = MergeReport {
        disk_bytes_before: disk_usage(dir),
        ..Default::default()
    };
    recover(dir, live)?;
    loop {
        if progress.cancel.load(Ordering::SeqCst) {
            return Err(MergeError::Cancelled.into());
        }
        let tree = Tree::load(&dir.tree_path())?;
        let used = used_layers(dir, &tree)?;
        let graph = LayerGraph::build(&used).map_err(MergesError::from)?;
        let retired: Vec<PathBuf> = tree.retired.iter().map(|r| dir.resolve(r)).collect();
        let pinned = pinned_layers(dir, &tree, &graph);
        let actions = plan(&graph, &used, &retired)
            .into_iter()
            .map(|a| guard(dir, &pinned, a))
            .collect::<Vec<_>>();
        let mut forget = Vec::new();
        let mut next = None;
        report.waiting.clear();
        for a in actions {
            match a {
                Action::Remove(p) => {
                    remove_layer(&p)?;
                    tracing::info!("removed disk layer {}", p.display());
                    report.removed += 1;
                    forget.push(p);
                }
                Action::Forget(p) => forget.push(p),
                Action::Wait { layer, .. } => report.waiting.push(rel(dir, &layer)),
                m @ Action::Merge { .. } if next.is_none() => next = Some(m),
                Action::Merge { .. } => {}
            }
        }
        if !forget.is_empty() {
            Tree::update(&dir.tree_path(), |t| {
                t.retired
                    .retain(|r| !forget.contains(&normalize(&dir.resolve(r))));
                Ok(())
            })?;
        }
        let Some(Action::Merge {
            parent,
            child,
            grandparent,
        }) = next
        else {
            break;
        };
        merge_one(
            dir,
            live,
            progress,
            &parent,
            &child,
            &grandparent,
            &mut report,
        )?;
        report.merged += 1;
    }
    report.disk_bytes_after = disk_usage(dir);
    report.duration_ms = t0.elapsed().as_millis() as u64;
    Ok(report)
}

#[allow(clippy::too_many_arguments)]
fn merge_one(
    dir: &VmDir,
    live: &[Arc<DiskBackend>],
    progress: &Progress,
    parent: &Path,
    child: &Path,
    grandparent: &snapshot::disk::Layer,
    report: &mut MergeReport,
) -> Result<(), MergesError> {
    let live_child = live_index(live, child);
    let direction = if live_child.is_some() || own_bytes(parent)? <= own_bytes(child)? {
        Direction::IntoChild
    } else {
        Direction::IntoParent
    };
    tracing::info!(
        "merging disk layer {} {} {}",
        parent.display(),
        if direction == Direction::IntoChild {
            "into its child"
        } else {
            "with its child"
        },
        child.display()
    );
    let mut record = MergeRecord {
        parent: rel(dir, parent),
        child: rel(dir, child),
        direction,
        phase: Phase::Copying,
    };
    journal(dir, Some(record.clone()), None)?;

    // Copy.
    let source = if direction == Direction::IntoChild {
        parent
    } else {
        child
    };
    let total: u64 = own_extents(source)?.iter().map(|e| e.len).sum();
    let hooks = progress.hooks;
    let pause = hooks.merge_delay;
    let mut pieces = 0u32;
    let step = |done: u64| {
        (progress.report)(done, total);
        pieces += 1;
        hooks.crash_at(&format!("copying:{pieces}"));
        if let Some(d) = pause {
            std::thread::sleep(d);
        }
        !progress.cancel.load(Ordering::SeqCst)
    };
    let copied = match (direction, live_child) {
        (Direction::IntoChild, Some(i)) => {
            let fill = |b: &[u8], o: u64, z: bool| {
                let n = live[i].fill_below(b, o, z)?;
                // Let guest requests that queued behind the piece in.
                std::thread::sleep(Duration::from_micros(100));
                Ok(n)
            };
            let done = copy_down(parent, child, LIVE_PIECE, fill, step)?;
            use devices::virtio::block::BlockBackend;
            live[i].flush().map_err(io_err("sync", child))?;
            done
        }
        (Direction::IntoChild, None) => copy_into_child(parent, child, PIECE, step)?,
        (Direction::IntoParent, _) => copy_into_parent(child, parent, PIECE, step)?,
    };
    report.copied_bytes += copied;

    // Switch.
    match direction {
        Direction::IntoChild => {
            let name = relative_path(&grandparent.path, child.parent().unwrap_or(Path::new(".")));
            let header = rebacked_header(child, &name.to_string_lossy(), grandparent.format)
                .map_err(MergeError::from)?;
            record.phase = Phase::Switching {
                header: header.clone(),
            };
            journal(dir, Some(record), None)?;
            hooks.crash_at("switching");
            let write = |top: &Path| -> Result<(), HeaderError> {
                if hooks.merge_crash.as_deref() == Some("torn") {
                    use std::os::unix::fs::FileExt;
                    let f = std::fs::OpenOptions::new().write(true).open(top);
                    if let Ok(f) = f {
                        let _ = f.write_all_at(&header[..header.len() / 2], 0);
                        let _ = f.sync_all();
                    }
                    hooks.crash_at("torn");
                }
                write_header_unsynced(top, &header)
            };
            match live_child {
                Some(i) => {
                    let held = live[i]
                        .reopen(write)
                        .map_err(|source| MergesError::Switch {
                            path: child.to_path_buf(),
                            source,
                        })?;
                    report.switch_us_max = report.switch_us_max.max(held.as_micros() as u64);
                }
                None => write(child)?,
            }
            // The parent goes only once the new header is durable (the
            // guest already runs on the switched disk meanwhile).
            sync(child).map_err(MergeError::from)?;
            remove_layer(parent)?;
        }
        Direction::IntoParent => {
            record.phase = Phase::Renaming;
            journal(dir, Some(record), None)?;
            hooks.crash_at("renaming");
            std::fs::rename(parent, child).map_err(io_err("rename", parent))?;
            sync_dir(&dir.disks_dir()).map_err(io_err("sync", &dir.disks_dir()))?;
            hooks.crash_at("renamed");
        }
    }
    journal(dir, None, Some(parent))?;

    // The running VM may still hold the old files open: reopen its disks
    // whose chain went through them, so their space is given back.
    for (i, b) in live.iter().enumerate() {
        if Some(i) == live_child {
            continue;
        }
        let chain: Vec<PathBuf> = b.chain().iter().map(|p| normalize(p)).collect();
        if chain.iter().any(|p| p == child || p == parent) {
            let held = b.reopen(|_| Ok(())).map_err(|source| MergesError::Switch {
                path: child.to_path_buf(),
                source,
            })?;
            report.switch_us_max = report.switch_us_max.max(held.as_micros() as u64);
        }
    }
    Ok(())
}
