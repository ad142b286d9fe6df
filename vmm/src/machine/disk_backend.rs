//! Connects the snapshot engine's disk layer stack to the virtio-blk device,
//! and lets the VMM fork a disk onto a new layer while the device is
//! quiesced.

use std::io;
use std::path::Path;
use std::sync::RwLock;

use devices::virtio::block::BlockBackend;
use snapshot::disk::{Disk, DiskError};
use snapshot::qcow2_header::HeaderError;

/// Errors reopening a disk from its files (a merge's switch).
#[derive(Debug, thiserror::Error)]
pub enum ReopenError {
    /// Another switch had left the disk closed.
    #[error("the disk is being switched to a new layer")]
    Gone,
    /// Its cached metadata could not be written to its file.
    #[error("{path}: cannot write its metadata back: {source}")]
    WriteBack {
        /// The top layer.
        path: std::path::PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// What was to be done on the closed top layer failed.
    #[error(transparent)]
    Header(#[from] HeaderError),
    /// The disk could not be opened again.
    #[error(transparent)]
    Open(#[from] DiskError),
}

/// A [`Disk`] (top layer over its read-only chain) as a block backend.
pub struct DiskBackend {
    disk: RwLock<Option<Disk>>,
    size: u64,
}

fn gone() -> io::Error {
    io::Error::other("disk is being switched to a new layer")
}

impl DiskBackend {
    /// Wraps `disk`.
    pub fn new(disk: Disk) -> Self {
        Self {
            size: disk.size(),
            disk: RwLock::new(Some(disk)),
        }
    }

    /// Moves writes to the pre-created overlay `new_top` (see
    /// [`Disk::fork`]). Call only while the device is quiesced. If the
    /// switch fails, the previous top layer is reopened and stays in use.
    pub fn fork(&self, new_top: &Path) -> Result<(), DiskError> {
        let mut slot = self.disk.write().unwrap_or_else(|e| e.into_inner());
        let Some(disk) = slot.take() else {
            return Err(DiskError::Open {
                path: new_top.to_path_buf(),
                source: gone(),
            });
        };
        let old = disk.chain()[0].path.clone();
        let readonly = disk.readonly();
        match disk.fork(new_top) {
            Ok(d) => {
                *slot = Some(d);
                Ok(())
            }
            Err(e) => {
                *slot = Some(Disk::open(&old, readonly)?);
                Err(e)
            }
        }
    }

    /// Replaces the disk (applying a snapshot: new working layer over the
    /// snapshot's layers). The device must be reset or quiesced.
    pub fn replace(&self, disk: Disk) {
        *self.disk.write().unwrap_or_else(|e| e.into_inner()) = Some(disk);
    }

    /// The current top layer.
    pub fn top(&self) -> Option<std::path::PathBuf> {
        self.disk
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|d| d.chain()[0].path.clone())
    }

    /// Merge step: writes into the top layer the parts of `buf` (data of
    /// its backing layer at `offset`, read beforehand without any lock)
    /// that the top does not hold itself (see [`Disk::fill_below`]).
    /// Holds the disk exclusively only for that check and write, so a guest
    /// write to the range is either before (and kept) or after (and lands
    /// on the copy).
    pub fn fill_below(&self, buf: &[u8], offset: u64, zero: bool) -> io::Result<u64> {
        let slot = self.disk.write().unwrap_or_else(|e| e.into_inner());
        match slot.as_ref() {
            // Metadata goes to the file at once, as after guest writes.
            Some(d) => d.fill_below(buf, offset, zero).and_then(|n| {
                d.write_back()?;
                Ok(n)
            }),
            None => Err(gone()),
        }
    }

    /// Reopens the disk from its files, with `before` run on the closed
    /// top layer (e.g. rewriting its backing reference), while guest I/O
    /// waits. Nothing is synced. Returns how long the disk was held. If reopening fails the
    /// device reports errors until the next switch.
    pub fn reopen(
        &self,
        before: impl FnOnce(&Path) -> Result<(), HeaderError>,
    ) -> Result<std::time::Duration, ReopenError> {
        let mut slot = self.disk.write().unwrap_or_else(|e| e.into_inner());
        let t0 = std::time::Instant::now();
        let Some(disk) = slot.take() else {
            return Err(ReopenError::Gone);
        };
        let top = disk.chain()[0].path.clone();
        let readonly = disk.readonly();
        // Metadata to the file, no fsync: the caller syncs once the guest
        // runs again if it needs durability.
        let flushed = disk.write_back();
        drop(disk);
        let r = flushed
            .map_err(|source| ReopenError::WriteBack {
                path: top.clone(),
                source,
            })
            .and_then(|()| Ok(before(&top)?));
        *slot = Some(Disk::open(&top, readonly)?);
        r.map(|()| t0.elapsed())
    }

    /// The layers of the disk, top first.
    pub fn chain(&self) -> Vec<std::path::PathBuf> {
        self.disk
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|d| d.chain().iter().map(|l| l.path.clone()).collect())
            .unwrap_or_default()
    }

    fn with<T>(&self, f: impl FnOnce(&Disk) -> io::Result<T>) -> io::Result<T> {
        match self.disk.read().unwrap_or_else(|e| e.into_inner()).as_ref() {
            Some(d) => f(d),
            None => Err(gone()),
        }
    }
}

impl BlockBackend for DiskBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.with(|d| d.read_at(buf, offset))
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.with(|d| d.write_at(buf, offset))
    }

    fn flush(&self) -> io::Result<()> {
        self.with(|d| d.flush())
    }

    fn write_back(&self) -> io::Result<()> {
        self.with(|d| d.write_back())
    }
}
