//! Virtio 1.x devices: the MMIO transport and the block device.

pub mod block;
pub mod mmio;

use std::sync::atomic::{AtomicU32, Ordering};

use vm_superio::Trigger;

use crate::irq::IrqLine;

/// VIRTIO_F_VERSION_1: the device is a virtio 1.x ("modern") device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Interrupt status bit: a used buffer was added.
pub const VIRTIO_MMIO_INT_VRING: u32 = 1;
/// Interrupt status bit: the configuration changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 2;

/// A device's interrupt: the MMIO interrupt-status register plus the line.
pub struct VirtioInterrupt {
    status: AtomicU32,
    line: IrqLine,
}

impl VirtioInterrupt {
    /// Wraps `line`.
    pub fn new(line: IrqLine) -> Self {
        Self {
            status: AtomicU32::new(0),
            line,
        }
    }

    /// Tells the driver a queue has new used buffers.
    pub fn signal_used_queue(&self) {
        self.status
            .fetch_or(VIRTIO_MMIO_INT_VRING, Ordering::SeqCst);
        if let Err(e) = self.line.trigger() {
            tracing::warn!("virtio interrupt lost: {e}");
        }
    }

    /// The pending interrupt bits.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clears acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The line (to register with KVM).
    pub fn line(&self) -> &IrqLine {
        &self.line
    }
}
