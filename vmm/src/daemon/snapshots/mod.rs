//! Snapshot operations on a VM directory, one file per job: taking one
//! (`create.rs`: live, or of a VM that is off), applying one (`restore.rs`:
//! in place, or at `start --from`), managing the tree (`manage.rs`: delete,
//! rename, describe, show, and cleaning up after interrupted operations),
//! and exporting one as a standalone VM (`export.rs`). The VMM runs them
//! for a running VM; the CLI runs the ones that work on a VM that is off
//! (a delete and its merges under the VM's lock).
//!
//! Files (docs/formats.md): `snapshots/tree.json`, `snapshots/<id>/vm.toml`,
//! `state.bin`, `memory.bin`; disk layers `disks/<disk>.<id8>.qcow2`. A
//! snapshot is assembled in `snapshots/<id>.partial/` and renamed into place
//! only when every file is durable; only then does it enter tree.json.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use snapshot::disk::DiskError;
use snapshot::live::LiveError;
use snapshot::memory_file::MemoryFileError;
use snapshot::state_file::StateFileError;
use snapshot::tree::TreeError;

use crate::machine::capture::CaptureError;
use crate::machine::vm::VmError;
use crate::vmdir::VmDirError;

pub mod clone;
pub mod create;
pub mod export;
pub mod manage;
pub mod restore;

/// Errors of snapshot operations.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The tree store failed.
    #[error(transparent)]
    Tree(#[from] TreeError),
    /// A disk layer could not be created or switched.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// The VM directory is unusable.
    #[error(transparent)]
    VmDir(#[from] VmDirError),
    /// Memory streaming failed.
    #[error(transparent)]
    Live(#[from] LiveError),
    /// memory.bin is unusable.
    #[error(transparent)]
    MemoryFile(#[from] MemoryFileError),
    /// state.bin is unusable.
    #[error(transparent)]
    StateFile(#[from] StateFileError),
    /// The VM could not be captured, created or applied.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A snapshot file could not be written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The snapshot has no memory (taken powered off) where one is needed.
    #[error("snapshot {0} was taken with the VM off; it has no memory to restore")]
    NoMemory(String),
    /// An independent disk the snapshot had attached is gone.
    #[error("the snapshot has independent disk {disk} attached, but {path} no longer exists; put it back (or attach another file under that name) before applying")]
    MissingIndependentDisk {
        /// The disk's name.
        disk: String,
        /// Its file.
        path: PathBuf,
    },
    /// A clone's adapter would get an impossible tap name.
    #[error("tap name '{name}' for a clone is not an interface name (1-15 bytes, no '/', ':' or space); give a shorter --tap template, e.g. --tap 'lab{{n}}'")]
    BadCloneTap {
        /// The name the template gave.
        name: String,
    },
    /// A pending clone's source snapshot is gone.
    #[error("clone {clone} continues from {missing}, which no longer exists: its source VM or snapshot moved or was deleted")]
    CloneSourceMissing {
        /// The clone.
        clone: PathBuf,
        /// The missing file.
        missing: PathBuf,
    },
    /// A layer's backing reference could not be rewritten.
    #[error(transparent)]
    Header(#[from] snapshot::qcow2_header::HeaderError),
    /// `clone detach` of a VM that is not a clone.
    #[error("{0} is not a clone (its vm.toml has no [clone] section)")]
    NotAClone(PathBuf),
    /// A snapshot's memory could not be staged or mapped for clones.
    #[error(transparent)]
    SharedMemory(snapshot::shared_memory::SharedMemoryError),
    /// The snapshot's configuration names a disk it froze no layer of.
    #[error("snapshot {snapshot} has no disk layer for its disk {disk}; its metadata is damaged")]
    NoDiskLayer {
        /// The snapshot.
        snapshot: String,
        /// The disk.
        disk: String,
    },
}

impl From<CaptureError> for SnapshotError {
    fn from(e: CaptureError) -> Self {
        SnapshotError::Vm(e.source)
    }
}

pub(crate) fn io_err(
    what: &'static str,
    path: &Path,
) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.to_path_buf();
    move |source| SnapshotError::Io { what, path, source }
}

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Creates `new`, an empty qcow2 layer over snapshot `snap`'s frozen layer
/// of disk `disk` (in the VM directory `dir`), the size of that layer;
/// returns the frozen layer. Shared by apply and clone.
pub(crate) fn overlay_on_snapshot(
    dir: &crate::vmdir::VmDir,
    snap: &snapshot::tree::SnapshotMeta,
    disk: &str,
    new: &Path,
) -> Result<PathBuf, SnapshotError> {
    use snapshot::disk::{create_overlay_sized, probe_format, Disk};
    let frozen =
        snap.disks
            .iter()
            .find(|l| l.name == disk)
            .ok_or_else(|| SnapshotError::NoDiskLayer {
                snapshot: snap.id.clone(),
                disk: disk.to_string(),
            })?;
    let base = dir.resolve(&frozen.layer);
    let size = Disk::open(&base, true)?.size();
    create_overlay_sized(&base, probe_format(&base)?, size, new)?;
    Ok(base)
}
