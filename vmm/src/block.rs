//! Connects the snapshot engine's disk layer stack to the virtio-blk device.

use std::io;

use devices::virtio::block::BlockBackend;
use snapshot::disk::Disk;

/// A [`Disk`] (top layer over its read-only chain) as a block backend.
pub struct DiskBackend(pub Disk);

impl BlockBackend for DiskBackend {
    fn size(&self) -> u64 {
        self.0.size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(buf, offset)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.0.write_at(buf, offset)
    }

    fn flush(&self) -> io::Result<()> {
        self.0.flush()
    }
}
