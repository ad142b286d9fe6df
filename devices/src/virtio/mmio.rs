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
use crate::persist::{ComponentState, Persist, PersistDyn, StateError};

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

/// What a virtio device provides to the transport. Its own state (config
/// space and the like) is saved through [`PersistDyn`]; the queues it
/// serves once activated are the transport's to save.
pub trait VirtioDevice: Send + PersistDyn {
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
    /// [`VirtioDevice::unquiesce`].
    fn quiesce(&mut self);
    /// Serves requests again (including any that arrived meanwhile).
    fn unquiesce(&mut self);
    /// The states of the queues an activated device serves (quiesce it
    /// first); empty when not activated.
    fn queue_states(&self) -> Vec<QueueSnapshot>;
}

/// Errors saving or restoring a transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The device's own state.
    #[error(transparent)]
    Device(#[from] StateError),
    /// A saved queue is invalid.
    #[error("invalid queue {index}: {message}")]
    Queue {
        /// Queue index.
        index: usize,
        /// virtio-queue's complaint.
        message: String,
    },
    /// The snapshot has another number of queues than the device.
    #[error("{saved} queues saved, the device has {device}")]
    QueueCount {
        /// Queues in the snapshot.
        saved: usize,
        /// Queues of the device.
        device: usize,
    },
    /// The device could not start serving its queues.
    #[error("cannot activate the device: {0}")]
    Activate(std::io::Error),
}

/// The transport's registers and queues, and the device's own state, as
/// saved in a snapshot.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TransportState {
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
    /// The device's own state (absent in snapshots of state.bin format 1,
    /// which did not save it).
    #[serde(default)]
    pub device: Option<ComponentState>,
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

    /// Finishes the device's in-flight requests and holds new ones until
    /// [`MmioTransport::unquiesce`].
    pub fn quiesce(&mut self) {
        if self.activated {
            self.device.quiesce();
        }
    }

    /// Lets a quiesced device serve requests again.
    pub fn unquiesce(&mut self) {
        if self.activated {
            self.device.unquiesce();
        }
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

impl Persist for MmioTransport {
    type State = TransportState;
    type Error = TransportError;
    const KIND: &'static str = "virtio-mmio";
    const VERSION: u32 = 1;

    /// The registers, the queues (the device's, once activated: quiesce
    /// it first) and the device's own state.
    fn save(&self) -> Result<TransportState, TransportError> {
        let queues = if self.activated {
            self.device.queue_states()
        } else {
            self.queues.iter().map(|q| q.state().into()).collect()
        };
        Ok(TransportState {
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            config_generation: self.irq.config_generation(),
            interrupt_status: self.irq.status(),
            activated: self.activated,
            queues,
            device: Some(self.device.save_dyn("device")?.encode()?),
        })
    }

    /// The queue count and the device's own state.
    fn check(&self, state: &TransportState) -> Result<(), TransportError> {
        let expected = self.device.queue_max_sizes().len();
        if state.queues.len() != expected {
            return Err(TransportError::QueueCount {
                saved: state.queues.len(),
                device: expected,
            });
        }
        if let Some(d) = &state.device {
            self.device.check_dyn(d)?;
        }
        Ok(())
    }

    /// Resets the device (its worker stops) and loads the saved state; an
    /// activated device starts serving again and picks up requests the
    /// guest queued before the snapshot.
    fn restore(&mut self, state: TransportState) -> Result<(), TransportError> {
        self.check(&state)?;
        let mut queues = Vec::new();
        for (index, q) in state.queues.iter().enumerate() {
            queues.push(
                Queue::try_from(virtio_queue::QueueState::from(*q)).map_err(|e| {
                    TransportError::Queue {
                        index,
                        message: format!("{e:?}"),
                    }
                })?,
            );
        }
        self.reset();
        for e in &self.notify {
            let _ = e.read();
        }
        if let Some(d) = &state.device {
            self.device.restore_dyn(d)?;
        }
        self.status = state.status;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        self.irq.set_config_generation(state.config_generation);
        self.irq.set_status(state.interrupt_status);
        if !state.activated {
            self.queues = queues;
            return Ok(());
        }
        let notify: Vec<EventFd> = self
            .notify
            .iter()
            .map(|e| e.try_clone())
            .collect::<std::io::Result<_>>()
            .map_err(TransportError::Activate)?;
        self.device
            .activate(
                self.mem.clone(),
                self.driver_features,
                queues,
                notify,
                self.irq.clone(),
            )
            .map_err(TransportError::Activate)?;
        self.activated = true;
        for e in &self.notify {
            e.write(1).map_err(TransportError::Activate)?;
        }
        Ok(())
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
            0xfc => self.irq.config_generation(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::IrqLine;
    use vm_memory::GuestAddress;

    /// A device with one queue whose only state is a number the guest
    /// could see.
    struct Fake {
        size: u64,
        active: Option<Vec<Queue>>,
    }

    impl Persist for Fake {
        type State = u64;
        type Error = std::io::Error;
        const KIND: &'static str = "fake";
        const VERSION: u32 = 1;

        fn save(&self) -> std::io::Result<u64> {
            Ok(self.size)
        }

        fn restore(&mut self, s: u64) -> std::io::Result<()> {
            if s != self.size {
                return Err(std::io::Error::other(format!("size {s} != {}", self.size)));
            }
            Ok(())
        }
    }

    impl VirtioDevice for Fake {
        fn device_type(&self) -> u32 {
            99
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![16]
        }
        fn features(&self) -> u64 {
            0
        }
        fn read_config(&self, _: u64, data: &mut [u8]) {
            data.fill(0);
        }
        fn activate(
            &mut self,
            _: GuestMemoryMmap,
            _: u64,
            queues: Vec<Queue>,
            _: Vec<EventFd>,
            _: Arc<VirtioInterrupt>,
        ) -> std::io::Result<()> {
            self.active = Some(queues);
            Ok(())
        }
        fn reset(&mut self) {
            self.active = None;
        }
        fn quiesce(&mut self) {}
        fn unquiesce(&mut self) {}
        fn queue_states(&self) -> Vec<QueueSnapshot> {
            self.active
                .iter()
                .flatten()
                .map(|q| q.state().into())
                .collect()
        }
    }

    fn transport(size: u64) -> MmioTransport {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let irq = Arc::new(VirtioInterrupt::new(IrqLine::new().unwrap()));
        let dev = Fake { size, active: None };
        MmioTransport::new(Box::new(dev), mem, irq).unwrap()
    }

    fn w(t: &mut MmioTransport, reg: u64, v: u32) {
        t.write(reg, &v.to_le_bytes());
    }

    /// Drives the driver's side of initialisation up to DRIVER_OK.
    fn activate(t: &mut MmioTransport) {
        w(t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(t, 0x24, 1);
        w(t, 0x20, 1); // VERSION_1
        w(
            t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        w(t, 0x30, 0);
        w(t, 0x38, 8);
        w(t, 0x80, 0x1000);
        w(t, 0x90, 0x2000);
        w(t, 0xa0, 0x3000);
        w(t, 0x44, 1);
        w(
            t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert!(t.activated);
    }

    /// Register reads and writes of any offset and width, in any order
    /// (activation half done, queues out of range, resets), and saved
    /// states with damaged fields: refused or taken, never a panic.
    #[test]
    fn fuzz_registers_and_saved_states() {
        fuzzing::run("virtio-mmio registers and state", 2000, 1024, |u| {
            let mut t = transport(7);
            if u.arbitrary()? {
                activate(&mut t);
            }
            for _ in 0..u.int_in_range(1..=64)? {
                let reg = if u.arbitrary()? {
                    u.int_in_range(0..=0x1ffu64)? & !3
                } else {
                    u.int_in_range(0..=0x210u64)?
                };
                let len = *u.choose(&[1usize, 2, 4, 8])?;
                if u.arbitrary()? {
                    let mut b = vec![0u8; len];
                    t.read(reg, &mut b);
                } else {
                    let mut b = vec![0u8; len];
                    u.fill_buffer(&mut b)?;
                    t.write(reg, &b);
                }
            }
            if let Ok(saved) = t.save() {
                let json = serde_json::to_vec(&saved).unwrap();
                let text = fuzzing::mutate(&json, u)?;
                if let Ok(s) = serde_json::from_slice::<TransportState>(&text) {
                    let _ = transport(7).restore(s);
                }
            }
            Ok(())
        });
    }

    #[test]
    fn an_active_transport_round_trips_into_a_fresh_one() {
        let mut a = transport(7);
        activate(&mut a);
        a.interrupt().signal_used_queue();
        let saved = a.save().unwrap();
        assert!(saved.activated);
        assert_eq!(saved.queues.len(), 1);
        assert_eq!(saved.queues[0].size, 8);
        assert_eq!(saved.queues[0].desc_table, 0x1000);
        assert_eq!(saved.interrupt_status, super::super::VIRTIO_MMIO_INT_VRING);

        let mut b = transport(7);
        b.restore(saved.clone()).unwrap();
        assert_eq!(b.save().unwrap(), saved);
        let mut status = [0u8; 4];
        b.read(0x70, &mut status);
        assert_eq!(u32::from_le_bytes(status), saved.status);
        // Restoring again (an apply onto a running VM) resets first.
        b.restore(saved.clone()).unwrap();
        assert_eq!(b.save().unwrap(), saved);
    }

    #[test]
    fn a_state_that_does_not_fit_is_refused() {
        let mut a = transport(7);
        activate(&mut a);
        let saved = a.save().unwrap();
        let e = transport(8).restore(saved.clone()).unwrap_err().to_string();
        assert!(e.contains("size 7 != 8"), "{e}");
        let mut two = saved.clone();
        two.queues.push(two.queues[0]);
        let e = transport(7).restore(two).unwrap_err().to_string();
        assert!(e.contains("2 queues saved, the device has 1"), "{e}");
        // Format 1 saved no device state: accepted as it is.
        let mut v1 = saved;
        v1.device = None;
        transport(8).restore(v1).unwrap();
    }
}
