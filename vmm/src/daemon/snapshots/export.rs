//! Exporting a snapshot as a standalone VM directory: its configuration,
//! kernel, flattened disks, and (for a running or paused snapshot) its
//! state and memory as the new VM's only snapshot. A snapshot is not a
//! backup; an export is.

use std::path::{Path, PathBuf};

use snapshot::memory_file::MemoryFile;
use snapshot::tree::{DiskLayer, PowerState, SnapshotMeta, Tree};

use super::{io_err, SnapshotError};
use crate::vmdir::{VmDir, VmDirError};

/// Copies `src` to `dst` keeping holes: only non-zero 4 KiB blocks are
/// written (memory.bin is mostly holes; std::fs::copy may fill them).
pub(crate) fn copy_sparse(src: &Path, dst: &Path) -> Result<(), SnapshotError> {
    use std::os::unix::fs::FileExt;
    let input = std::fs::File::open(src).map_err(io_err("cannot open", src))?;
    let len = input.metadata().map_err(io_err("cannot stat", src))?.len();
    let out = std::fs::File::create(dst).map_err(io_err("cannot create", dst))?;
    out.set_len(len).map_err(io_err("cannot size", dst))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        input
            .read_exact_at(&mut buf[..n], off)
            .map_err(io_err("cannot read", src))?;
        for (i, block) in buf[..n].chunks(4096).enumerate() {
            if block.iter().any(|b| *b != 0) {
                out.write_all_at(block, off + i as u64 * 4096)
                    .map_err(io_err("cannot write", dst))?;
            }
        }
        off += n as u64;
    }
    out.sync_all().map_err(io_err("cannot fsync", dst))
}

/// Writes the content of the disk chain topped by `layer` into a sparse raw
/// image `dst` (the flattened disk of an export).
pub(crate) fn flatten_disk(layer: &Path, dst: &Path) -> Result<(), SnapshotError> {
    use std::os::unix::fs::FileExt;
    let disk = snapshot::disk::Disk::open(layer, true)?;
    let size = disk.size();
    let out = std::fs::File::create(dst).map_err(io_err("cannot create", dst))?;
    out.set_len(size).map_err(io_err("cannot size", dst))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        disk.read_at(&mut buf[..n], off)
            .map_err(io_err("cannot read", layer))?;
        if buf[..n].iter().any(|b| *b != 0) {
            out.write_all_at(&buf[..n], off)
                .map_err(io_err("cannot write", dst))?;
        }
        off += n as u64;
    }
    out.sync_all().map_err(io_err("cannot fsync", dst))
}

/// Exports snapshot `reference` of `dir` as a standalone VM directory at
/// `dest`: its configuration, kernel, flattened disks, and (for a running
/// or paused snapshot) its state and memory as the new VM's only snapshot.
/// A snapshot is not a backup; an export is. Returns the snapshot's id in
/// the new VM (`snapvm start DEST --from ID` continues from it).
pub fn export(dir: &VmDir, reference: &str, dest: &Path) -> Result<SnapshotMeta, SnapshotError> {
    let tree = Tree::load(&dir.tree_path())?;
    let snap = tree.resolve(reference)?.clone();
    if dest.join("vm.toml").exists() {
        return Err(VmDirError::Exists(dest.to_path_buf()).into());
    }
    let sdir = dir.snapshot_dir(&snap.id);
    let mut t = VmDir::read_config_copy(&sdir.join("vm.toml"))?;
    let staging = dest.with_extension("partial");
    let _ = std::fs::remove_dir_all(&staging);
    let sd = VmDir::new(&staging);
    for d in [
        sd.kernel_dir(),
        sd.disks_dir(),
        sd.logs_dir(),
        sd.run_dir(),
        sd.snapshot_dir(&snap.id),
    ] {
        std::fs::create_dir_all(&d).map_err(io_err("cannot create", &d))?;
    }
    let result = (|| {
        let copy_into = |src: &Path, name: &str| -> Result<PathBuf, SnapshotError> {
            let to = sd.kernel_dir().join(name);
            std::fs::copy(src, &to).map_err(io_err("cannot copy", src))?;
            Ok(PathBuf::from("kernel").join(name))
        };
        let fname = |p: &Path| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "image".into())
        };
        t.kernel = copy_into(&dir.resolve(&t.kernel), &fname(&t.kernel))?;
        if let Some(i) = t.initrd.clone() {
            t.initrd = Some(copy_into(&dir.resolve(&i), &fname(&i))?);
        }
        let mut layers = Vec::new();
        for d in t.disks.iter_mut() {
            let rel = PathBuf::from("disks").join(format!("{}.raw", d.name));
            // An independent disk was not captured: it is exported as it
            // is now, and stays independent.
            let source = match snap.disks.iter().find(|l| l.name == d.name) {
                Some(frozen) if !d.independent => dir.resolve(&frozen.layer),
                _ => dir.resolve(&d.current),
            };
            flatten_disk(&source, &staging.join(&rel))?;
            d.base = rel.clone();
            d.current = rel.clone();
            if !d.independent {
                layers.push(DiskLayer {
                    name: d.name.clone(),
                    layer: rel,
                });
            }
        }
        t.name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| t.name.clone());
        sd.save(&t)?;
        let out = sd.snapshot_dir(&snap.id);
        VmDir::write_config_copy(&out.join("vm.toml"), &t)?;
        if snap.power_state != PowerState::Off {
            copy_sparse(&sdir.join("state.bin"), &out.join("state.bin"))?;
            copy_sparse(&sdir.join("memory.bin"), &out.join("memory.bin"))?;
            // Check what was written before calling it an export.
            MemoryFile::open(&out.join("memory.bin"))?.verify_all()?;
        }
        let mut meta = snap.clone();
        meta.parent = None;
        meta.disks = layers;
        let mut new_tree = Tree::default();
        new_tree.add(meta.clone());
        new_tree.save(&sd.tree_path())?;
        Ok(meta)
    })();
    match result {
        Ok(meta) => {
            std::fs::rename(&staging, dest).map_err(io_err("cannot publish", dest))?;
            Ok(meta)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            Err(e)
        }
    }
}
