//! Managing the snapshot tree: delete (the merges it allows run in
//! daemon/merges.rs), rename, describe, show, and cleaning up what an
//! interrupted snapshot or delete left behind.

use std::path::{Path, PathBuf};

use snapshot::atomic_file::sync_dir;
use snapshot::tree::{SnapshotMeta, Tree, TreeError};

use super::{io_err, SnapshotError};
use crate::daemon::hardware::Hardware;
use crate::vmdir::{VmDir, VmToml};

/// Removes `snapshots/<id>.partial` directories and the disk layers they
/// created that nothing uses, left by a snapshot interrupted by a crash.
/// Returns the ids cleaned up.
pub fn clean_leftovers(dir: &VmDir, toml: &VmToml) -> Vec<String> {
    let mut cleaned = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir.snapshots_dir()) else {
        return cleaned;
    };
    // Only a tree that reads says what is left over: with tree.json
    // unreadable every snapshot would look like one.
    let tree = match Tree::load(&dir.tree_path()) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!("leftovers of interrupted snapshots are not cleaned up: {e}");
            return cleaned;
        }
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_suffix(".partial") else {
            // A snapshot directory no longer in the tree: a delete was
            // interrupted after the tree was updated.
            let orphan = e.path().is_dir()
                && uuid::Uuid::parse_str(&name).is_ok()
                && !tree.snapshots.iter().any(|s| s.id == name);
            if orphan {
                let _ = std::fs::remove_dir_all(e.path());
                tracing::warn!("removed the files of deleted snapshot {name}");
            }
            continue;
        };
        let _ = std::fs::remove_dir_all(e.path());
        for d in &toml.disks {
            let layer = dir.layer_path(&d.name, id.get(..8).unwrap_or(id));
            let rel = dir.relative(&layer);
            let used = toml.disks.iter().any(|x| x.current == rel)
                || tree
                    .snapshots
                    .iter()
                    .any(|s| s.disks.iter().any(|l| l.layer == rel));
            if !used && layer.exists() {
                let _ = std::fs::remove_file(&layer);
            }
        }
        tracing::warn!("removed incomplete snapshot {id} left by an interrupted snapshot");
        cleaned.push(id.to_string());
    }
    cleaned
}

/// What `snapshot delete` removed.
#[derive(Debug, Clone)]
pub struct DeleteResult {
    /// The snapshots removed from the tree.
    pub deleted: Vec<SnapshotMeta>,
    /// Disk layers now waiting to be removed or merged.
    pub retired: Vec<PathBuf>,
}

/// Removes snapshot `reference` (with `subtree`, also all its descendants)
/// from the tree and deletes its saved state and memory. Its children hang
/// under its parent from now on, and so does "Now" if it hung under a
/// deleted snapshot. Its disk layers are retired: [`crate::daemon::merges::run`]
/// removes or merges them. Nothing the VM or another snapshot reads
/// changes.
pub fn delete(dir: &VmDir, reference: &str, subtree: bool) -> Result<DeleteResult, SnapshotError> {
    let result = Tree::update(&dir.tree_path(), |t| {
        let target = t.resolve(reference)?.clone();
        let mut gone = vec![target.id.clone()];
        if subtree {
            let mut i = 0;
            while i < gone.len() {
                let kids: Vec<String> = t.children(&gone[i]).iter().map(|c| c.id.clone()).collect();
                gone.extend(kids);
                i += 1;
            }
        }
        let deleted: Vec<SnapshotMeta> = t
            .snapshots
            .iter()
            .filter(|s| gone.contains(&s.id))
            .cloned()
            .collect();
        // Clones read a snapshot's layers and memory: it stays while they do.
        for s in &deleted {
            let clones = super::clone::live_clones(dir, s);
            if !clones.is_empty() {
                return Err(TreeError::HasClones {
                    snapshot: s.id.clone(),
                    clones,
                });
            }
        }
        for s in t.snapshots.iter_mut() {
            if s.parent.as_deref() == Some(target.id.as_str()) {
                s.parent = target.parent.clone();
            }
        }
        if t.now.as_ref().is_some_and(|n| gone.contains(n)) {
            t.now = target.parent.clone();
        }
        t.snapshots.retain(|s| !gone.contains(&s.id));
        let retired: Vec<PathBuf> = deleted
            .iter()
            .flat_map(|s| s.disks.iter().map(|d| d.layer.clone()))
            .collect();
        for r in &retired {
            if !t.retired.contains(r) {
                t.retired.push(r.clone());
            }
        }
        Ok(DeleteResult { deleted, retired })
    })?;
    let sdir = dir.snapshots_dir();
    for s in &result.deleted {
        // The copy of its memory staged for clones, if any, goes too.
        snapshot::shared_memory::remove_staged(&super::clone::shared_dir(), &s.id);
        let d = sdir.join(&s.id);
        if let Err(e) = std::fs::remove_dir_all(&d) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(io_err("cannot remove", &d)(e));
            }
        }
    }
    sync_dir(&sdir).map_err(io_err("cannot sync", &sdir))?;
    Ok(result)
}

/// Renames snapshot `reference`.
pub fn rename(dir: &VmDir, reference: &str, name: &str) -> Result<SnapshotMeta, SnapshotError> {
    Ok(Tree::update(&dir.tree_path(), |t| {
        let s = t.resolve_mut(reference)?;
        s.name = name.to_string();
        Ok(s.clone())
    })?)
}

/// Sets the description of snapshot `reference`.
pub fn describe(dir: &VmDir, reference: &str, text: &str) -> Result<SnapshotMeta, SnapshotError> {
    Ok(Tree::update(&dir.tree_path(), |t| {
        let s = t.resolve_mut(reference)?;
        s.description = text.to_string();
        Ok(s.clone())
    })?)
}

fn file_size(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)
}

/// What `snapshot show` prints.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SnapshotDetails {
    /// The snapshot's metadata.
    pub snapshot: SnapshotMeta,
    /// Ids of its children.
    pub children: Vec<String>,
    /// Whether "Now" hangs under it.
    pub now_here: bool,
    /// Space it takes.
    pub size_on_disk: SizeOnDisk,
    /// The hardware it was taken with (applying it brings that back).
    pub hardware: Hardware,
    /// What differs in the VM's hardware now, a line each.
    pub differences: Vec<String>,
    /// Independent disks it had attached: their data is not captured.
    pub not_captured: Vec<String>,
}

/// Space a snapshot takes (allocated blocks).
#[derive(Debug, Clone, serde::Serialize)]
pub struct SizeOnDisk {
    /// vm.toml, state.bin, memory.bin.
    pub files: u64,
    /// The disk layers it froze.
    pub disk_layers: u64,
    /// Both.
    pub total: u64,
}

/// Details of snapshot `reference`: its metadata, children, whether "Now"
/// hangs under it, and its size on disk (files and frozen disk layers).
pub fn show(dir: &VmDir, reference: &str) -> Result<SnapshotDetails, SnapshotError> {
    let tree = Tree::load(&dir.tree_path())?;
    let s = tree.resolve(reference)?;
    let sdir = dir.snapshot_dir(&s.id);
    let files: u64 = ["vm.toml", "state.bin", "memory.bin"]
        .iter()
        .map(|f| file_size(&sdir.join(f)))
        .sum();
    let layers: u64 = s
        .disks
        .iter()
        .map(|d| file_size(&dir.resolve(&d.layer)))
        .sum();
    let copy = VmDir::read_config_copy(&sdir.join("vm.toml"))?;
    let hardware = Hardware::from(&copy);
    let differences = hardware.differences(&Hardware::from(&dir.load()?));
    Ok(SnapshotDetails {
        not_captured: copy
            .disks
            .iter()
            .filter(|d| d.independent)
            .map(|d| d.name.clone())
            .collect(),
        hardware,
        differences,
        snapshot: SnapshotMeta {
            // Only the clones that still read it.
            clones: super::clone::live_clones(dir, s),
            ..s.clone()
        },
        children: tree.children(&s.id).iter().map(|c| c.id.clone()).collect(),
        now_here: tree.now.as_deref() == Some(s.id.as_str()),
        size_on_disk: SizeOnDisk {
            files,
            disk_layers: layers,
            total: files + layers,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toml() -> VmToml {
        VmToml {
            name: "t".into(),
            kernel: "k".into(),
            initrd: None,
            cmdline: String::new(),
            memory: "64M".into(),
            vcpus: 1,
            pin_vcpus: Default::default(),
            huge_pages: Default::default(),
            disks: vec![],
            nets: vec![],
            clone: None,
        }
    }

    /// A snapshot directory the tree does not name is what an interrupted
    /// delete leaves; but with tree.json unreadable nothing can be told
    /// apart, and nothing is removed.
    #[test]
    fn leftovers_are_removed_only_when_the_tree_reads() {
        let root = std::env::temp_dir().join(format!("snapvm-leftovers-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let dir = VmDir::new(&root);
        let orphan = dir.snapshot_dir(&uuid::Uuid::new_v4().to_string());
        std::fs::create_dir_all(&orphan).unwrap();
        std::fs::write(dir.tree_path(), b"{ not json").unwrap();
        assert!(clean_leftovers(&dir, &toml()).is_empty());
        assert!(orphan.is_dir(), "kept while tree.json is unreadable");
        Tree::default().save(&dir.tree_path()).unwrap();
        clean_leftovers(&dir, &toml());
        assert!(!orphan.exists(), "removed once the tree says it is gone");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
