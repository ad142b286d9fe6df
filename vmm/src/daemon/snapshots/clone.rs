//! Clones: new VMs from one snapshot that share what they do not change.
//!
//! A clone is a normal VM directory with the snapshot's hardware, its own
//! name and new MAC addresses. Its disks are new qcow2 overlays over the
//! snapshot's frozen layers, which stay in the source VM's directory (read
//! only, shared by every clone). Until it first starts it is *pending*
//! (vm.toml `[clone] pending = true`): that start continues from the
//! snapshot with guest RAM mapped privately from the snapshot's memory,
//! staged once on tmpfs for all clones (snapshot/src/shared_memory.rs),
//! so host memory grows with what each clone writes. The snapshot lists
//! its clones (tree.json `clones`); it cannot be deleted, nor its layers
//! merged, while they read them. `detach` makes a clone standalone.

use std::path::{Path, PathBuf};

use snapshot::memory_file::MemoryFile;
use snapshot::shared_memory;
use snapshot::tree::{PowerState, SnapshotMeta, Tree};

use super::{io_err, overlay_on_snapshot, SnapshotError};
use crate::config::{mac_text, random_mac};
use crate::machine::state::MachineState;
use crate::vmdir::{CloneOf, VmDir, VmDirError};

/// Where snapshots' memory is staged for clones: `$SNAPVM_SHARED_DIR`, or
/// /dev/shm/snapvm (tmpfs).
pub fn shared_dir() -> PathBuf {
    std::env::var_os("SNAPVM_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/dev/shm/snapvm"))
}

/// How clones are made.
#[derive(Debug, Clone, Default)]
pub struct CloneOptions {
    /// The tap of each network adapter of clone `{n}`: a template with
    /// `{tap}` (the snapshot's tap) and `{n}` (the clone's number).
    /// Default `{tap}-{n}`.
    pub tap_template: Option<String>,
}

/// One clone made.
#[derive(Debug, Clone)]
pub struct Cloned {
    /// Its directory.
    pub dir: PathBuf,
    /// Its adapters: (name, tap, MAC).
    pub nets: Vec<(String, String, String)>,
    /// Independent disks of the snapshot it does not have.
    pub left_out: Vec<String>,
    /// Whether its first start continues from the snapshot.
    pub pending: bool,
}

fn tap_name(template: &str, tap: &str, n: usize) -> Result<String, SnapshotError> {
    let name = template
        .replace("{tap}", tap)
        .replace("{n}", &n.to_string());
    if !devices::virtio::tap::valid_name(&name) {
        return Err(SnapshotError::BadCloneTap { name });
    }
    Ok(name)
}

fn link_or_copy(src: &Path, dst: &Path) -> Result<(), SnapshotError> {
    if std::fs::hard_link(src, dst).is_ok() {
        return Ok(());
    }
    std::fs::copy(src, dst)
        .map(|_| ())
        .map_err(io_err("cannot copy", src))
}

/// Makes `dest`, clone number `n` of snapshot `reference` of `dir`, and
/// records it in the snapshot.
pub fn clone(
    dir: &VmDir,
    reference: &str,
    dest: &Path,
    n: usize,
    opts: &CloneOptions,
) -> Result<Cloned, SnapshotError> {
    let tree = Tree::load(&dir.tree_path())?;
    let snap = tree.resolve(reference)?.clone();
    if dest.join("vm.toml").exists() {
        return Err(VmDirError::Exists(dest.to_path_buf()).into());
    }
    let sdir = dir.snapshot_dir(&snap.id);
    let pending = snap.power_state != PowerState::Off;
    if pending {
        // Checked now rather than at the clone's first start.
        MachineState::read(&sdir.join("state.bin"))?;
        MemoryFile::open(&sdir.join("memory.bin"))?;
    }
    let mut t = VmDir::read_config_copy(&sdir.join("vm.toml"))?;
    let staging = dest.with_extension("partial");
    let _ = std::fs::remove_dir_all(&staging);
    let sd = VmDir::new(&staging);
    for d in [sd.kernel_dir(), sd.disks_dir(), sd.logs_dir(), sd.run_dir()] {
        std::fs::create_dir_all(&d).map_err(io_err("cannot create", &d))?;
    }
    let template = opts.tap_template.as_deref().unwrap_or("{tap}-{n}");
    let result = (|| {
        let fname = |p: &Path| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "image".into())
        };
        // Kernel and initrd: the clone's own (hard links where possible).
        let kernel = fname(&t.kernel);
        link_or_copy(&dir.resolve(&t.kernel), &sd.kernel_dir().join(&kernel))?;
        t.kernel = PathBuf::from("kernel").join(kernel);
        if let Some(i) = t.initrd.clone() {
            let name = fname(&i);
            link_or_copy(&dir.resolve(&i), &sd.kernel_dir().join(&name))?;
            t.initrd = Some(PathBuf::from("kernel").join(name));
        }
        // Independent disks hold live data of the source: not shared.
        let left_out: Vec<String> = t
            .disks
            .iter()
            .filter(|d| d.independent)
            .map(|d| d.name.clone())
            .collect();
        t.disks.retain(|d| !d.independent);
        let tag = &uuid::Uuid::new_v4().to_string()[..8];
        for d in t.disks.iter_mut() {
            let new = sd.layer_path(&d.name, tag);
            d.base = overlay_on_snapshot(dir, &snap, &d.name, &new)?;
            d.current = sd.relative(&new);
        }
        let mut nets = Vec::new();
        for a in t.nets.iter_mut() {
            a.tap = tap_name(template, &a.tap, n)?;
            a.mac = mac_text(&random_mac());
            nets.push((a.name.clone(), a.tap.clone(), a.mac.clone()));
        }
        t.name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| t.name.clone());
        t.clone = Some(CloneOf {
            source: dir.root().to_path_buf(),
            snapshot: snap.id.clone(),
            pending,
        });
        sd.save(&t)?;
        Ok((nets, left_out))
    })();
    let (nets, left_out) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
    };
    // Recorded in the snapshot before it exists: killed in between, the
    // snapshot names a clone that is not there (ignored), never the other
    // way round (a clone its snapshot does not protect).
    let dest = match (dest.parent(), dest.file_name()) {
        (Some(p), Some(n)) => std::fs::canonicalize(if p.as_os_str().is_empty() {
            Path::new(".")
        } else {
            p
        })
        .map(|p| p.join(n))
        .unwrap_or_else(|_| dest.to_path_buf()),
        _ => dest.to_path_buf(),
    };
    let registered = Tree::update(&dir.tree_path(), |t| {
        let s = t.resolve_mut(&snap.id)?;
        if !s.clones.contains(&dest) {
            s.clones.push(dest.clone());
        }
        Ok(())
    });
    if let Err(e) = registered {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e.into());
    }
    if let Err(e) = std::fs::rename(&staging, &dest) {
        let _ = std::fs::remove_dir_all(&staging);
        let _ = Tree::update(&dir.tree_path(), |t| {
            if let Ok(s) = t.resolve_mut(&snap.id) {
                s.clones.retain(|c| *c != dest);
            }
            Ok(())
        });
        return Err(io_err("cannot publish", &dest)(e));
    }
    if pending {
        // Staged now (once for all clones of the snapshot), so that the
        // clones' starts only map it.
        stage_memory(&snap.id, &sdir.join("memory.bin"))?;
    }
    Ok(Cloned {
        dir: dest,
        nets,
        left_out,
        pending,
    })
}

/// The clones of `snap` (of the VM in `dir`) that still read it: listed,
/// present, and naming it as their source.
pub fn live_clones(dir: &VmDir, snap: &SnapshotMeta) -> Vec<PathBuf> {
    snap.clones
        .iter()
        .filter(|c| {
            VmDir::open(c)
                .and_then(|cd| cd.load())
                .ok()
                .and_then(|t| t.clone)
                .is_some_and(|o| o.source == dir.root() && o.snapshot == snap.id)
        })
        .cloned()
        .collect()
}

/// Stages the memory of snapshot `id` for its clones unless it is staged
/// already; returns the staged file.
fn stage_memory(id: &str, memory: &Path) -> Result<PathBuf, SnapshotError> {
    let staged = shared_memory::staged_path(&shared_dir(), id, memory)
        .map_err(SnapshotError::SharedMemory)?;
    if shared_memory::stage(memory, &staged).map_err(SnapshotError::SharedMemory)? {
        tracing::info!(
            "staged the memory of snapshot {id} at {} for its clones",
            staged.display()
        );
    }
    Ok(staged)
}

/// What a pending clone's first start needs.
pub struct CloneStart {
    /// The snapshot's machine state.
    pub state: MachineState,
    /// Its memory.bin.
    pub memory: PathBuf,
    /// memory.bin staged on tmpfs, mapped privately by every clone.
    pub staged: PathBuf,
    /// The snapshot.
    pub snapshot: String,
}

/// Prepares the first start of pending clone `dir`: the source snapshot's
/// state, and its memory staged for sharing. A source that moved or
/// vanished fails naming the missing file.
pub fn prepare_start(dir: &VmDir, origin: &CloneOf) -> Result<CloneStart, SnapshotError> {
    let source = VmDir::new(&origin.source);
    let sdir = source.snapshot_dir(&origin.snapshot);
    let state_path = sdir.join("state.bin");
    let memory = sdir.join("memory.bin");
    for f in [&state_path, &memory] {
        if !f.is_file() {
            return Err(SnapshotError::CloneSourceMissing {
                clone: dir.root().to_path_buf(),
                missing: f.clone(),
            });
        }
    }
    let state = MachineState::read(&state_path)?;
    MemoryFile::open(&memory)?.check_layout(&state.memory)?;
    let staged = stage_memory(&origin.snapshot, &memory)?;
    Ok(CloneStart {
        state,
        memory,
        staged,
        snapshot: origin.snapshot.clone(),
    })
}

/// What `detach` did.
#[derive(Debug, Clone, Default)]
pub struct Detached {
    /// Flattened copies of the source's layers now in the clone.
    pub copied: Vec<PathBuf>,
    /// Whether the source snapshot's state and memory were copied too (a
    /// clone that never started).
    pub copied_memory: bool,
}

/// Makes clone `dir` (off) standalone: every chain of its disks that goes
/// on into another VM directory is cut there, the rest of it flattened into
/// a raw image of the clone's own; a clone that never started gets the
/// snapshot's state and memory as its own snapshot, which its first start
/// continues from. The source snapshot then no longer lists it.
pub fn detach(dir: &VmDir) -> Result<Detached, SnapshotError> {
    let mut toml = dir.load()?;
    let Some(origin) = toml.clone.clone() else {
        return Err(SnapshotError::NotAClone(dir.root().to_path_buf()));
    };
    let own = |p: &Path| {
        snapshot::merge::normalize(p).starts_with(snapshot::merge::normalize(&dir.disks_dir()))
    };
    let tree = Tree::load(&dir.tree_path())?;
    let mut tops: Vec<PathBuf> = toml.disks.iter().map(|d| dir.resolve(&d.current)).collect();
    for s in &tree.snapshots {
        tops.extend(s.disks.iter().map(|d| dir.resolve(&d.layer)));
    }
    // Each own layer standing on a foreign one, and what that one is.
    let mut cuts: Vec<(PathBuf, PathBuf)> = Vec::new();
    for top in &tops {
        let chain = snapshot::disk::resolve_chain(top)?;
        for pair in chain.windows(2) {
            let (upper, lower) = (&pair[0].path, &pair[1].path);
            let (upper, lower) = (
                snapshot::merge::normalize(upper),
                snapshot::merge::normalize(lower),
            );
            if own(&upper) && !own(&lower) && !cuts.iter().any(|(u, _)| *u == upper) {
                cuts.push((upper, lower));
            }
        }
    }
    let mut done = Detached::default();
    let mut flat_of: Vec<(PathBuf, PathBuf)> = Vec::new();
    for (upper, lower) in &cuts {
        let flat = match flat_of.iter().find(|(l, _)| l == lower) {
            Some((_, f)) => f.clone(),
            None => {
                let stem = lower
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_else(|| "disk".into());
                let flat = dir.disks_dir().join(format!("{stem}.detached.raw"));
                super::export::flatten_disk(lower, &flat)?;
                flat_of.push((lower.clone(), flat.clone()));
                done.copied.push(flat.clone());
                flat
            }
        };
        let name = snapshot::disk::relative_path(&flat, upper.parent().unwrap_or(Path::new(".")));
        let header = snapshot::qcow2_header::rebacked_header(
            upper,
            &name.to_string_lossy(),
            snapshot::disk::DiskFormat::Raw,
        )?;
        snapshot::qcow2_header::write_header(upper, &header)?;
    }
    for d in toml.disks.iter_mut() {
        let base = snapshot::merge::normalize(&dir.resolve(&d.base));
        if let Some((_, flat)) = flat_of.iter().find(|(l, _)| *l == base) {
            d.base = dir.relative(flat);
        }
    }
    let source = VmDir::new(&origin.source);
    if origin.pending {
        // Its first start continues from its own copy of the snapshot.
        let from = source.snapshot_dir(&origin.snapshot);
        let mut meta = Tree::load(&source.tree_path())?
            .resolve(&origin.snapshot)?
            .clone();
        let to = dir.snapshot_dir(&origin.snapshot);
        std::fs::create_dir_all(&to).map_err(io_err("cannot create", &to))?;
        for f in ["state.bin", "memory.bin", "vm.toml"] {
            super::export::copy_sparse(&from.join(f), &to.join(f))?;
        }
        MemoryFile::open(&to.join("memory.bin"))?.verify_all()?;
        meta.parent = None;
        meta.clones.clear();
        meta.disks = toml
            .disks
            .iter()
            .map(|d| snapshot::tree::DiskLayer {
                name: d.name.clone(),
                layer: d.base.clone(),
            })
            .collect();
        Tree::update(&dir.tree_path(), |t| {
            t.add(meta.clone());
            t.now = Some(meta.id.clone());
            Ok(())
        })?;
        toml.clone = Some(CloneOf {
            source: dir.root().to_path_buf(),
            snapshot: origin.snapshot.clone(),
            pending: true,
        });
        done.copied_memory = true;
    } else {
        toml.clone = None;
    }
    dir.save(&toml)?;
    // The source may be gone already; then there is nothing to update.
    let me = dir.root().to_path_buf();
    let _ = Tree::update(&source.tree_path(), |t| {
        if let Ok(s) = t.resolve_mut(&origin.snapshot) {
            s.clones.retain(|c| *c != me);
        }
        Ok(())
    });
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tap_names_follow_the_template() {
        assert_eq!(tap_name("{tap}-{n}", "tap0", 3).unwrap(), "tap0-3");
        assert_eq!(tap_name("lab{n}", "tap0", 12).unwrap(), "lab12");
        assert!(matches!(
            tap_name("{tap}-clone-{n}", "a-long-tap", 1),
            Err(SnapshotError::BadCloneTap { .. })
        ));
    }
}
