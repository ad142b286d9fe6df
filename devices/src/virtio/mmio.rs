//! The virtio-mmio transport (virtio 1.x, register layout version 2).
//!
//! Written here because rust-vmm's transport crate (virtio-device) is not
//! published on crates.io; queues themselves are the `virtio-queue` crate's.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{QueueSnapshot, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::bus::BusDevice;

/// Size of a virtio-mmio device's register window.
pub const MMIO_WINDOW: u64 = 0x200;
/// Offset of the QueueNotify register (where the ioeventfd goes).
pub const QUEUE_NOTIFY: u64 = 0x50;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x534e_4150; // "SNAP"

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_FAILED: u32 = 0x80;

/// What a virtio device provides to the transport.
pub trait VirtioDevice: Send {
    /// Virtio device type (2 = block).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Offered feature bits (VERSION_1 is added by the transport).
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Starts serving the queues with the negotiated features.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        features: u64,
        queues: Vec<Queue>,
        notify: Vec<EventFd>,
        irq: Arc<VirtioInterrupt>,
    ) -> std::io::Result<()>;
    /// Stops serving (driver reset); the transport forgets its queues.
    fn reset(&mut self);
    /// Finishes in-flight requests and serves no new ones until
    /// [`VirtioDevice::unquiesce`]; returns the queues' states.
    fn quiesce(&mut self) -> Vec<QueueSnapshot>;
    /// Serves requests again (including any that arrived meanwhile).
    fn unquiesce(&mut self);
}

/// The transport's registers and queues, as saved in a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransportSnapshot {
    /// Device status register.
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// Pending interrupt bits.
    pub interrupt_status: u32,
    /// Whether the device was activated (DRIVER_OK).
    pub activated: bool,
    /// Queue states.
    pub queues: Vec<QueueSnapshot>,
}

/// The MMIO transport around one device.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    irq: Arc<VirtioInterrupt>,
    queues: Vec<Queue>,
    notify: Vec<EventFd>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    config_generation: u32,
    activated: bool,
}

impl MmioTransport {
    /// Creates the transport; `irq` must be registered with KVM by the caller.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq: Arc<VirtioInterrupt>,
    ) -> std::io::Result<Self> {
        let mut queues = Vec::new();
        let mut notify = Vec::new();
        for max in device.queue_max_sizes() {
            queues.push(Queue::new(max).map_err(|e| std::io::Error::other(format!("{e:?}")))?);
            notify.push(EventFd::new(EFD_NONBLOCK)?);
        }
        debug_assert_eq!(queues.len(), fresh_queues(&*device).len());
        Ok(Self {
            device,
            mem,
            irq,
            queues,
            notify,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            config_generation: 0,
            activated: false,
        })
    }

    /// The queue-notification eventfds (register them as ioeventfds on
    /// QUEUE_NOTIFY with the queue index as datamatch).
    pub fn notify_eventfds(&self) -> &[EventFd] {
        &self.notify
    }

    /// The interrupt.
    pub fn interrupt(&self) -> &Arc<VirtioInterrupt> {
        &self.irq
    }

    /// Quiesces the device and returns the transport's state. Call
    /// [`MmioTransport::unquiesce`] when done.
    pub fn quiesce(&mut self) -> TransportSnapshot {
        let queues = if self.activated {
            self.device.quiesce()
        } else {
            self.queues.iter().map(|q| q.state().into()).collect()
        };
        TransportSnapshot {
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            interrupt_status: self.irq.status(),
            activated: self.activated,
            queues,
        }
    }

    /// Lets a quiesced device serve requests again.
    pub fn unquiesce(&mut self) {
        if self.activated {
            self.device.unquiesce();
        }
    }

    /// Resets the device (its worker stops) and loads a snapshot's state:
    /// applying a snapshot to a running VM.
    pub fn reset_and_restore(&mut self, snap: &TransportSnapshot) -> std::io::Result<()> {
        self.reset();
        for e in &self.notify {
            let _ = e.read();
        }
        self.restore(snap)
    }

    /// Restores a freshly created transport to a snapshot's state; an
    /// activated device starts serving (and picks up requests the guest
    /// queued before the snapshot).
    pub fn restore(&mut self, snap: &TransportSnapshot) -> std::io::Result<()> {
        self.status = snap.status;
        self.device_features_sel = snap.device_features_sel;
        self.driver_features_sel = snap.driver_features_sel;
        self.driver_features = snap.driver_features;
        self.queue_sel = snap.queue_sel;
        self.config_generation = snap.config_generation;
        self.irq.set_status(snap.interrupt_status);
        let mut queues = Vec::new();
        for q in &snap.queues {
            queues.push(
                Queue::try_from(virtio_queue::QueueState::from(*q))
                    .map_err(|e| std::io::Error::other(format!("invalid queue state: {e:?}")))?,
            );
        }
        if snap.activated {
            let notify: Vec<EventFd> = self
                .notify
                .iter()
                .map(|e| e.try_clone())
                .collect::<std::io::Result<_>>()?;
            self.device.activate(
                self.mem.clone(),
                self.driver_features,
                queues,
                notify,
                self.irq.clone(),
            )?;
            self.activated = true;
            for e in &self.notify {
                e.write(1)?;
            }
        } else {
            self.queues = queues;
        }
        Ok(())
    }

    fn offered_features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        if self.activated {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        if self.activated {
            self.device.reset();
        }
        self.activated = false;
        self.status = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.irq.ack(u32::MAX);
        self.queues = fresh_queues(&*self.device);
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let mut v = v;
        // FEATURES_OK only if the driver took a subset including VERSION_1.
        if v & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            let ok = self.driver_features & !self.offered_features() == 0
                && self.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                v &= !STATUS_FEATURES_OK;
            }
        }
        self.status = v;
        let ready = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        if !self.activated && v & ready == ready && v & STATUS_FAILED == 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        let valid = self
            .queues
            .iter()
            .all(|q| q.ready() && q.is_valid(&self.mem));
        if !valid {
            tracing::warn!("virtio driver set DRIVER_OK with invalid queues");
            self.status |= 0x40; // DEVICE_NEEDS_RESET
            return;
        }
        let notify: std::io::Result<Vec<EventFd>> =
            self.notify.iter().map(|e| e.try_clone()).collect();
        // The device takes the configured queues; the transport keeps fresh
        // ones for the next reset.
        let queues = std::mem::replace(&mut self.queues, fresh_queues(&*self.device));
        let result = notify.and_then(|notify| {
            self.device.activate(
                self.mem.clone(),
                self.driver_features,
                queues,
                notify,
                self.irq.clone(),
            )
        });
        match result {
            Ok(()) => self.activated = true,
            Err(e) => {
                tracing::error!("virtio device activation failed: {e}");
                self.status |= 0x40;
            }
        }
    }
}

fn fresh_queues(device: &dyn VirtioDevice) -> Vec<Queue> {
    device
        .queue_max_sizes()
        .into_iter()
        .filter_map(|max| Queue::new(max).ok())
        .collect()
}

fn read_u32(data: &mut [u8], v: u32) {
    let b = v.to_le_bytes();
    let n = data.len().min(4);
    data[..n].copy_from_slice(&b[..n]);
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.device.read_config(offset - 0x100, data);
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        let v = match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => self.device.device_type(),
            0x0c => VENDOR,
            0x10 => match self.device_features_sel {
                0 => self.offered_features() as u32,
                1 => (self.offered_features() >> 32) as u32,
                _ => 0,
            },
            0x34 => self
                .queues
                .get(self.queue_sel as usize)
                .map(|q| q.max_size() as u32)
                .unwrap_or(0),
            0x44 if self.activated => 1,
            0x44 => self
                .queues
                .get(self.queue_sel as usize)
                .map(|q| q.ready() as u32)
                .unwrap_or(0),
            0x60 => self.irq.status(),
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => 0,
        };
        read_u32(data, v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            // Block configuration is read-only.
            return;
        }
        if data.len() != 4 {
            return;
        }
        let v = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        match offset {
            0x14 => self.device_features_sel = v,
            0x20 => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v as u64,
                1 => {
                    self.driver_features = (self.driver_features & 0xffff_ffff) | ((v as u64) << 32)
                }
                _ => {}
            },
            0x24 => self.driver_features_sel = v,
            0x30 => self.queue_sel = v,
            0x38 => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(v as u16);
                }
            }
            0x44 => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            QUEUE_NOTIFY => {
                // Normally an ioeventfd catches this write; without one the
                // exit lands here.
                if let Some(e) = self.notify.get(v as usize) {
                    let _ = e.write(1);
                }
            }
            0x64 => self.irq.ack(v),
            0x70 => self.set_status(v),
            0x80 => self
                .selected_queue()
                .map_or((), |q| q.set_desc_table_address(Some(v), None)),
            0x84 => self
                .selected_queue()
                .map_or((), |q| q.set_desc_table_address(None, Some(v))),
            0x90 => self
                .selected_queue()
                .map_or((), |q| q.set_avail_ring_address(Some(v), None)),
            0x94 => self
                .selected_queue()
                .map_or((), |q| q.set_avail_ring_address(None, Some(v))),
            0xa0 => self
                .selected_queue()
                .map_or((), |q| q.set_used_ring_address(Some(v), None)),
            0xa4 => self
                .selected_queue()
                .map_or((), |q| q.set_used_ring_address(None, Some(v))),
            _ => tracing::debug!("virtio-mmio: write to unknown register {offset:#x}"),
        }
    }
}
