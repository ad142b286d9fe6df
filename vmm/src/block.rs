//! Connects the snapshot engine's disk layer stack to the virtio-blk device,
//! and lets the VMM fork a disk onto a new layer while the device is
//! quiesced.

use std::io;
use std::path::Path;
use std::sync::RwLock;

use devices::virtio::block::BlockBackend;
use snapshot::disk::{Disk, DiskError};

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
