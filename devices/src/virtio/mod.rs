//! Virtio 1.x devices: the MMIO transport, the block device, and the
//! network device over a TAP.

pub mod block;
pub mod mmio;
pub mod net;
pub mod tap;

use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::QueueState;

use vm_superio::Trigger;

use crate::irq::IrqLine;

/// VIRTIO_F_VERSION_1: the device is a virtio 1.x ("modern") device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// Interrupt status bit: a used buffer was added.
pub const VIRTIO_MMIO_INT_VRING: u32 = 1;
/// Interrupt status bit: the configuration changed.
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 2;

/// A device's interrupt: the MMIO interrupt-status register plus the line,
/// and the configuration generation a configuration change bumps.
pub struct VirtioInterrupt {
    status: AtomicU32,
    config_generation: AtomicU32,
    line: IrqLine,
}

impl VirtioInterrupt {
    /// Wraps `line`.
    pub fn new(line: IrqLine) -> Self {
        Self {
            status: AtomicU32::new(0),
            config_generation: AtomicU32::new(0),
            line,
        }
    }

    /// Tells the driver the device's configuration changed.
    pub fn signal_config_change(&self) {
        self.config_generation.fetch_add(1, Ordering::SeqCst);
        self.status
            .fetch_or(VIRTIO_MMIO_INT_CONFIG, Ordering::SeqCst);
        if let Err(e) = self.line.trigger() {
            tracing::warn!("virtio interrupt lost: {e}");
        }
    }

    /// The ConfigGeneration register.
    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::SeqCst)
    }

    /// Restores the ConfigGeneration register.
    pub fn set_config_generation(&self, g: u32) {
        self.config_generation.store(g, Ordering::SeqCst);
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

/// A virtqueue's configuration and ring positions, as saved in a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueSnapshot {
    /// Maximum size offered.
    pub max_size: u16,
    /// Next available-ring index the device will read.
    pub next_avail: u16,
    /// Next used-ring index the device will write.
    pub next_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX negotiated.
    pub event_idx_enabled: bool,
    /// Size chosen by the driver.
    pub size: u16,
    /// Queue enabled by the driver.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> Self {
        Self {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(q: QueueSnapshot) -> Self {
        QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx_enabled,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

impl VirtioInterrupt {
    /// Restores the pending interrupt bits (after a snapshot restore).
    pub fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }
}
