//! The devices of a VM, wired to KVM and to the buses the vCPUs dispatch
//! to: COM1, the i8042 (reset line) and the debug-exit port on the port
//! bus; one virtio-blk device per disk on the MMIO bus. Each device with
//! state is listed as a component of the machine (see
//! [`super::state::ids`]); adding a device means adding it here.

use std::sync::{Arc, Mutex};

use devices::bus::{Bus, BusError, SharedDevice};
use devices::debug_exit::{DebugExit, DEBUG_EXIT_PORT};
use devices::exit::ExitNotifier;
use devices::generation::{Generation, GenerationDevice, GENERATION_PORT, GENERATION_PORT_LEN};
use devices::i8042::{I8042, I8042_PORT, I8042_PORT_LEN};
use devices::irq::IrqLine;
use devices::persist::Component;
use devices::serial::{SerialDevice, SerialOutput, COM1_IRQ, COM1_PORT, SERIAL_PORT_LEN};
use devices::virtio::block::Block;
use devices::virtio::mmio::{MmioTransport, MMIO_WINDOW, QUEUE_NOTIFY};
use devices::virtio::net::Net;
use devices::virtio::VirtioInterrupt;
use kvm_ioctls::{IoEventAddress, VmFd};
use snapshot::disk::Disk;

use super::disk_backend::DiskBackend;
use super::layout::{VIRTIO_IRQ_BASE, VIRTIO_MMIO_BASE, VIRTIO_MMIO_STRIDE};
use super::memory::GuestRam;
use super::state::ids;
use super::tap_pool::TapPool;
use super::vm::VmError;
use crate::config::VmConfig;

/// A VM's devices.
pub(super) struct Devices {
    /// Port I/O devices.
    pub io_bus: Bus,
    /// MMIO devices.
    pub mmio_bus: Bus,
    /// COM1 (console input goes here).
    pub serial: Arc<Mutex<SerialDevice>>,
    /// One virtio-mmio transport per disk, then per network adapter.
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// The disks behind them.
    pub disk_backends: Vec<Arc<DiskBackend>>,
    /// What the kernel command line needs to find the virtio devices.
    pub cmdline: String,
    /// The devices with state, in the order they are saved and restored.
    pub components: Vec<(String, Arc<dyn Component>)>,
    /// The VM generation the guest reads (devices/src/generation.rs).
    pub generation: Arc<Generation>,
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

fn dev_err(what: &'static str) -> impl Fn(std::io::Error) -> VmError {
    move |source| VmError::Device { what, source }
}

fn bus_err(e: BusError) -> VmError {
    VmError::Device {
        what: "a device bus",
        source: std::io::Error::other(e),
    }
}

/// Creates the devices of `config` for the VM `vm_fd` with guest memory
/// `ram`; guest console output goes to `serial_out`, the guest's own stop
/// requests to `exit`, network adapters use the taps in `taps`.
pub(super) fn create(
    vm_fd: &VmFd,
    ram: &GuestRam,
    config: &VmConfig,
    serial_out: SerialOutput,
    exit: &Arc<ExitNotifier>,
    taps: &TapPool,
) -> Result<Devices, VmError> {
    let mut components: Vec<(String, Arc<dyn Component>)> = Vec::new();

    // Legacy devices.
    let serial_irq = IrqLine::new().map_err(dev_err("the serial interrupt"))?;
    vm_fd
        .register_irqfd(serial_irq.eventfd(), COM1_IRQ)
        .map_err(kvm_err("connect the serial interrupt"))?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, serial_out)));
    let i8042 = Arc::new(Mutex::new(I8042::new(exit.clone())));
    let mut io_bus = Bus::new();
    io_bus
        .insert(
            serial.clone() as SharedDevice,
            COM1_PORT as u64,
            SERIAL_PORT_LEN as u64,
        )
        .map_err(bus_err)?;
    io_bus
        .insert(
            i8042.clone() as SharedDevice,
            I8042_PORT as u64,
            I8042_PORT_LEN as u64,
        )
        .map_err(bus_err)?;
    io_bus
        .insert(
            Arc::new(Mutex::new(DebugExit::new(exit.clone()))),
            DEBUG_EXIT_PORT as u64,
            1,
        )
        .map_err(bus_err)?;
    let generation = Generation::new();
    io_bus
        .insert(
            Arc::new(Mutex::new(GenerationDevice::new(generation.clone()))),
            GENERATION_PORT as u64,
            GENERATION_PORT_LEN,
        )
        .map_err(bus_err)?;
    components.push((ids::SERIAL.into(), serial.clone()));
    components.push((ids::I8042.into(), i8042));

    // Disks: virtio-mmio block devices, announced on the command line.
    let mut mmio_bus = Bus::new();
    let mut cmdline = String::new();
    let mut transports = Vec::new();
    let mut disk_backends = Vec::new();
    let mut add = |i: usize,
                   device: Box<dyn devices::virtio::mmio::VirtioDevice>,
                   id: String,
                   mmio_bus: &mut Bus,
                   cmdline: &mut String|
     -> Result<Arc<Mutex<MmioTransport>>, VmError> {
        let base = VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_STRIDE;
        let irq = VIRTIO_IRQ_BASE + i as u32;
        let line = IrqLine::new().map_err(dev_err("a virtio interrupt"))?;
        vm_fd
            .register_irqfd(line.eventfd(), irq)
            .map_err(kvm_err("connect a virtio interrupt"))?;
        let transport = MmioTransport::new(
            device,
            ram.memory().clone(),
            Arc::new(VirtioInterrupt::new(line)),
        )
        .map_err(dev_err("a virtio-mmio transport"))?;
        for (q, evt) in transport.notify_eventfds().iter().enumerate() {
            vm_fd
                .register_ioevent(evt, &IoEventAddress::Mmio(base + QUEUE_NOTIFY), q as u32)
                .map_err(kvm_err("register a virtio queue notifier"))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        mmio_bus
            .insert(transport.clone(), base, MMIO_WINDOW)
            .map_err(bus_err)?;
        components.push((id, transport.clone()));
        cmdline.push_str(&format!(
            " virtio_mmio.device={MMIO_WINDOW}@{base:#x}:{irq}"
        ));
        Ok(transport)
    };
    for (i, d) in config.disks.iter().enumerate() {
        let disk = Arc::new(DiskBackend::new(Disk::open(&d.path, d.readonly)?));
        disk_backends.push(disk.clone());
        let block = Block::new(disk, d.readonly, &format!("snapvm-disk{i}"));
        transports.push(add(
            i,
            Box::new(block),
            ids::disk(i),
            &mut mmio_bus,
            &mut cmdline,
        )?);
    }
    // Network adapters: after the disks, on the taps the VMM holds.
    for (j, n) in config.nets.iter().enumerate() {
        let tap = taps.get(&n.tap)?;
        let net = Net::new(tap, n.mac);
        transports.push(add(
            config.disks.len() + j,
            Box::new(net),
            ids::net(j),
            &mut mmio_bus,
            &mut cmdline,
        )?);
    }
    Ok(Devices {
        io_bus,
        mmio_bus,
        serial,
        transports,
        disk_backends,
        cmdline,
        components,
        generation,
    })
}
