//! A KVM virtual machine: memory, in-kernel irqchip and PIT, legacy devices,
//! the loaded kernel, and its vCPU threads.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use devices::bus::{Bus, SharedDevice};
use devices::debug_exit::{DebugExit, DEBUG_EXIT_PORT};
use devices::exit::{ExitNotifier, GuestExit};
use devices::i8042::{I8042, I8042_PORT, I8042_PORT_LEN};
use devices::irq::IrqLine;
use devices::serial::SerialSnapshot;
use devices::serial::{SerialDevice, SerialOutput, COM1_IRQ, COM1_PORT, SERIAL_PORT_LEN};
use devices::virtio::block::Block;
use devices::virtio::mmio::TransportSnapshot;
use devices::virtio::mmio::{MmioTransport, MMIO_WINDOW, QUEUE_NOTIFY};
use devices::virtio::VirtioInterrupt;
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::IoEventAddress;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use snapshot::disk::{Disk, DiskError};
use snapshot::lazy::LazyLoader;
use snapshot::live::{GuestRegion, Tracker};
use snapshot::memory_file::{MemoryFile, MemoryFileError, CHUNK_SIZE};
use snapshot::write_protect::{HostRange, WriteProtectError, WriteProtector};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::block::DiskBackend;
use crate::boot::e820::memory_map;
use crate::boot::pvh::InitrdPlacement;
use crate::boot::{self, BootError, KernelFormat};
use crate::config::{ConfigError, VmConfig};
use crate::cpuid;
use crate::layout::{
    HIMEM_START, KVM_TSS_ADDRESS, MMIO_GAP_START, PAGE_SIZE, VIRTIO_IRQ_BASE, VIRTIO_MMIO_BASE,
    VIRTIO_MMIO_STRIDE,
};
use crate::memory::{GuestRam, MemoryError};
use crate::vcpu::{
    self, Requested, StopSink, VcpuContext, VcpuControl, VcpuError, VcpuFailure, VcpuHandle,
};
use crate::vcpu_state::{VcpuState, VcpuStateError};
use crate::vm_state::{VmState, VmStateError};

/// Default KVM device node; `SNAPVM_KVM_DEVICE` overrides it (for tests).
pub const KVM_DEVICE: &str = "/dev/kvm";

/// Errors creating or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The KVM device node does not exist.
    #[error("{0} does not exist: this host has no KVM. Load the module (modprobe kvm_intel or kvm_amd) or use a host with virtualization enabled")]
    KvmMissing(PathBuf),
    /// The KVM device node is not accessible.
    #[error("{0} is not accessible: run snapvm as root, or give your user access (usermod -aG kvm $USER, then log in again)")]
    KvmAccess(PathBuf),
    /// Opening KVM failed otherwise.
    #[error("cannot open {path}: {source}")]
    KvmOpen {
        /// The device path.
        path: PathBuf,
        /// The KVM error.
        source: kvm_ioctls::Error,
    },
    /// Too many vCPUs.
    #[error("--vcpus {requested} is above the limit of {max} on this host")]
    TooManyVcpus {
        /// Requested count.
        requested: u8,
        /// The limit.
        max: usize,
    },
    /// A VM-level KVM ioctl failed.
    #[error("cannot {what}: {source}")]
    Kvm {
        /// What was being done.
        what: &'static str,
        /// The KVM error.
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be created.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// userfaultfd registration failed.
    #[error(transparent)]
    WriteProtect(#[from] WriteProtectError),
    /// Kernel loading failed.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// vCPU setup failed.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// A disk could not be opened.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// vCPU state could not be saved or restored.
    #[error(transparent)]
    VcpuState(#[from] VcpuStateError),
    /// VM state could not be saved or restored.
    #[error(transparent)]
    VmState(#[from] VmStateError),
    /// memory.bin is unusable.
    #[error(transparent)]
    MemoryFile(#[from] MemoryFileError),
    /// A snapshot's state does not fit this VM.
    #[error("snapshot state does not fit the VM: {0}")]
    StateMismatch(String),
    /// A device could not be created.
    #[error("cannot create {what}: {source}")]
    Device {
        /// Which device.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Everything of a paused VM except guest memory: what state.bin holds.
#[derive(Serialize, Deserialize)]
pub struct MachineState {
    /// Per-vCPU state, in vCPU order.
    pub vcpus: Vec<VcpuState>,
    /// Irqchips, PIT, kvmclock.
    pub vm: VmState,
    /// COM1.
    pub serial: SerialSnapshot,
    /// virtio-blk transports, in disk order.
    pub disks: Vec<TransportSnapshot>,
    /// Guest RAM layout (guest-physical start, size).
    pub memory: Vec<(u64, u64)>,
}

/// How a VM run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The guest asked to stop (status port, reset, power-off).
    Guest(GuestExit),
    /// A vCPU hit something it could not handle.
    Failure(VcpuFailure),
    /// The VMM was told to stop (signal number).
    Stopped(i32),
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Guest(GuestExit::Status(s)) => write!(f, "the guest exited with status {s}"),
            Outcome::Guest(GuestExit::Reset) => write!(f, "the guest reset the machine"),
            Outcome::Guest(GuestExit::PowerOff) => write!(f, "the guest powered off"),
            Outcome::Failure(e) => write!(f, "{e}"),
            Outcome::Stopped(0) => write!(f, "stopped by request"),
            Outcome::Stopped(sig) => write!(f, "stopped by signal {sig}"),
        }
    }
}

impl Outcome {
    /// The process exit code for this outcome.
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::Guest(GuestExit::Status(s)) => *s as i32,
            Outcome::Guest(GuestExit::Reset) | Outcome::Guest(GuestExit::PowerOff) => 0,
            Outcome::Failure(_) => 1,
            Outcome::Stopped(sig) => 128 + sig,
        }
    }
}

/// A created VM.
pub struct Vm {
    // Devices first: their worker threads use guest memory, so they must be
    // dropped (and joined) before `ram` is unmapped.
    io_bus: Arc<Bus>,
    mmio_bus: Arc<Bus>,
    serial: Arc<Mutex<SerialDevice>>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    disk_backends: Vec<Arc<DiskBackend>>,
    handles: Vec<VcpuHandle>,
    pending_vcpus: Vec<VcpuFd>,
    control: Arc<VcpuControl>,
    sink: Arc<StopSink>,
    tracker: Tracker,
    lazy: Mutex<Option<LazyLoader>>,
    msrs: Arc<Vec<u32>>,
    vm_fd: VmFd,
    ram: Arc<GuestRam>,
    config: VmConfig,
    _kvm: Kvm,
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

fn dev_err(what: &'static str) -> impl Fn(std::io::Error) -> VmError {
    move |source| VmError::Device { what, source }
}

fn open_kvm() -> Result<Kvm, VmError> {
    let path =
        PathBuf::from(std::env::var("SNAPVM_KVM_DEVICE").unwrap_or_else(|_| KVM_DEVICE.into()));
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| VmError::KvmMissing(path.clone()))?;
    Kvm::new_with_path(&cpath).map_err(|source| match source.errno() {
        libc::ENOENT => VmError::KvmMissing(path.clone()),
        libc::EACCES | libc::EPERM => VmError::KvmAccess(path.clone()),
        _ => VmError::KvmOpen {
            path: path.clone(),
            source,
        },
    })
}

fn initrd_placement(
    ram: &GuestRam,
    path: &Path,
    kernel_end: u64,
) -> Result<InitrdPlacement, BootError> {
    let data = std::fs::read(path).map_err(|source| BootError::ReadInitrd {
        path: path.to_path_buf(),
        source,
    })?;
    let size = data.len() as u64;
    let low_end = ram
        .ranges()
        .first()
        .map(|r| r.start + r.size)
        .unwrap_or(0)
        .min(MMIO_GAP_START);
    let too_large = || BootError::InitrdTooLarge {
        path: path.to_path_buf(),
        size,
        limit: low_end,
    };
    let addr = low_end.checked_sub(size).ok_or_else(too_large)? & !(PAGE_SIZE - 1);
    if addr < kernel_end.max(HIMEM_START) {
        return Err(too_large());
    }
    use vm_memory::{Bytes, GuestAddress};
    ram.memory()
        .write_slice(&data, GuestAddress(addr))
        .map_err(|e| BootError::GuestWrite {
            what: "initrd",
            message: e.to_string(),
        })?;
    Ok(InitrdPlacement { addr, size })
}

impl Vm {
    /// Creates the VM described by `config` with its kernel loaded; the
    /// vCPUs start with [`Vm::start`]. Guest console output goes to
    /// `serial_out`.
    pub fn create(config: &VmConfig, serial_out: SerialOutput) -> Result<Self, VmError> {
        Self::build(config, serial_out, None)
    }

    /// Creates the VM of a snapshot: `state` (from state.bin) and guest
    /// memory from `memory` (memory.bin, verified chunk by chunk). The disks
    /// of `config` must be new working layers over the snapshot's layers.
    pub fn restore(
        config: &VmConfig,
        serial_out: SerialOutput,
        state: &MachineState,
        memory: &Path,
    ) -> Result<Self, VmError> {
        Self::build(config, serial_out, Some((state, memory)))
    }

    fn build(
        config: &VmConfig,
        serial_out: SerialOutput,
        restore: Option<(&MachineState, &Path)>,
    ) -> Result<Self, VmError> {
        config.validate()?;
        let format = match restore {
            None => Some(boot::detect_format(&config.kernel)?),
            Some((state, _)) => {
                if state.vcpus.len() != config.vcpus as usize
                    || state.disks.len() != config.disks.len()
                {
                    return Err(VmError::StateMismatch(format!(
                        "{} vCPUs and {} disks saved, {} and {} configured",
                        state.vcpus.len(),
                        state.disks.len(),
                        config.vcpus,
                        config.disks.len()
                    )));
                }
                None
            }
        };
        if let (Some(initrd), None) = (&config.initrd, restore) {
            std::fs::metadata(initrd).map_err(|source| BootError::ReadInitrd {
                path: initrd.clone(),
                source,
            })?;
        }
        let kvm = open_kvm()?;
        let max = kvm.get_max_vcpus().min(254);
        if config.vcpus as usize > max {
            return Err(VmError::TooManyVcpus {
                requested: config.vcpus,
                max,
            });
        }
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("read KVM's supported CPUID"))?;

        let vm_fd = kvm.create_vm().map_err(kvm_err("create the VM"))?;
        vm_fd
            .set_tss_address(KVM_TSS_ADDRESS)
            .map_err(kvm_err("set the TSS address"))?;
        vm_fd
            .create_irq_chip()
            .map_err(kvm_err("create the in-kernel irqchip"))?;
        vm_fd
            .create_pit2(kvm_pit_config {
                flags: KVM_PIT_SPEAKER_DUMMY,
                ..Default::default()
            })
            .map_err(kvm_err("create the in-kernel PIT"))?;

        let ram = Arc::new(GuestRam::new(
            config.memory,
            cpuid::phys_bits(&supported),
            crate::backend_quirks::huge_pages(config.huge_pages),
        )?);
        set_memslots(&vm_fd, &ram, true, "register guest memory with KVM")?;
        let host_ranges: Vec<HostRange> = ram
            .memory()
            .iter()
            .map(|region| HostRange {
                addr: region.as_ptr() as usize,
                len: region.len() as usize,
            })
            .collect();
        let write_protector = Arc::new(WriteProtector::new(&host_ranges)?);
        let tracker = Tracker::new(
            write_protector,
            ram.memory()
                .iter()
                .map(|r| GuestRegion {
                    gpa: r.start_addr().0,
                    host: r.as_ptr() as usize,
                    len: r.len() as usize,
                })
                .collect(),
        );
        let regions: Vec<(u64, u64)> = ram.ranges().iter().map(|r| (r.start, r.size)).collect();
        if let Some((state, memory)) = restore {
            if state.memory != regions {
                return Err(VmError::StateMismatch(format!(
                    "memory layout {:?} saved, {:?} configured",
                    state.memory, regions
                )));
            }
            load_memory(&ram, memory, &regions)?;
        }
        let msrs = Arc::new(
            kvm.get_msr_index_list()
                .map_err(kvm_err("read KVM's MSR list"))?
                .as_slice()
                .to_vec(),
        );

        let bus_err = |e: devices::bus::BusError| VmError::Device {
            what: "a device bus",
            source: std::io::Error::other(e.to_string()),
        };

        // Disks: virtio-mmio block devices, announced on the command line.
        let mut mmio_bus = Bus::new();
        let mut cmdline = config.cmdline.clone();
        let mut transports = Vec::new();
        let mut disk_backends = Vec::new();
        for (i, d) in config.disks.iter().enumerate() {
            let disk = Arc::new(DiskBackend::new(Disk::open(&d.path, d.readonly)?));
            disk_backends.push(disk.clone());
            let base = VIRTIO_MMIO_BASE + i as u64 * VIRTIO_MMIO_STRIDE;
            let irq = VIRTIO_IRQ_BASE + i as u32;
            let line = IrqLine::new().map_err(dev_err("a virtio interrupt"))?;
            vm_fd
                .register_irqfd(line.eventfd(), irq)
                .map_err(kvm_err("connect a virtio interrupt"))?;
            let block = Block::new(disk, d.readonly, &format!("snapvm-disk{i}"));
            let transport = MmioTransport::new(
                Box::new(block),
                ram.memory().clone(),
                Arc::new(VirtioInterrupt::new(line)),
            )
            .map_err(dev_err("a virtio-mmio transport"))?;
            let transport = Arc::new(Mutex::new(transport));
            transports.push(transport.clone());
            for (q, evt) in transport
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .notify_eventfds()
                .iter()
                .enumerate()
            {
                vm_fd
                    .register_ioevent(evt, &IoEventAddress::Mmio(base + QUEUE_NOTIFY), q as u32)
                    .map_err(kvm_err("register a virtio queue notifier"))?;
            }
            mmio_bus
                .insert(transport, base, MMIO_WINDOW)
                .map_err(bus_err)?;
            cmdline.push_str(&format!(
                " virtio_mmio.device={MMIO_WINDOW}@{base:#x}:{irq}"
            ));
        }
        let cmdline = cmdline.trim().to_string();

        // Kernel, initrd, boot structures.
        let map = memory_map(ram.ranges());
        let initrd = match &config.initrd {
            // The kernel's own footprint is checked by the loader; keep the
            // initrd at the top of low memory, away from it.
            Some(p) => Some(initrd_placement(&ram, p, HIMEM_START)?),
            None => None,
        };
        let boot_state = match format {
            Some(KernelFormat::Elf) => Some(boot::pvh::load(
                ram.memory(),
                &config.kernel,
                &cmdline,
                initrd,
                &map,
            )?),
            Some(KernelFormat::BzImage) => Some(boot::bzimage::load(
                ram.memory(),
                &config.kernel,
                &cmdline,
                initrd,
                &map,
            )?),
            None => None,
        };
        if boot_state.is_some() {
            boot::mptable::setup_mptable(ram.memory(), config.vcpus)?;
        }

        // Legacy devices.
        let exit = Arc::new(ExitNotifier::new().map_err(dev_err("the exit notifier"))?);
        let serial_irq = IrqLine::new().map_err(dev_err("the serial interrupt"))?;
        vm_fd
            .register_irqfd(serial_irq.eventfd(), COM1_IRQ)
            .map_err(kvm_err("connect the serial interrupt"))?;
        let serial = match restore {
            None => SerialDevice::new(serial_irq, serial_out),
            Some((state, _)) => SerialDevice::from_snapshot(&state.serial, serial_irq, serial_out)
                .map_err(dev_err("the serial port from its snapshot"))?,
        };
        let serial = Arc::new(Mutex::new(serial));
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
                Arc::new(Mutex::new(I8042::new(exit.clone()))),
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

        // vCPUs.
        vcpu::install_kick_handler()?;
        let mut pending_vcpus = Vec::new();
        for index in 0..config.vcpus {
            let fd = vcpu::create(
                &vm_fd,
                index,
                &cpuid::for_vcpu(&supported, index, config.vcpus),
            )?;
            match (&boot_state, restore) {
                (Some(b), _) if index == 0 => vcpu::set_boot_state(&fd, b)?,
                (_, Some((state, _))) => {
                    crate::vcpu_state::restore(index, &fd, &state.vcpus[index as usize])?
                }
                _ => {}
            }
            pending_vcpus.push(fd);
        }
        if let Some((state, _)) = restore {
            crate::vm_state::restore(&vm_fd, &state.vm)?;
            for (t, snap) in transports.iter().zip(&state.disks) {
                t.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .restore(snap)
                    .map_err(dev_err("a virtio-blk device from its snapshot"))?;
            }
        }

        Ok(Self {
            vm_fd,
            ram,
            tracker,
            lazy: Mutex::new(None),
            msrs,
            transports,
            disk_backends,
            config: config.clone(),
            pending_vcpus,
            handles: Vec::new(),
            control: Arc::new(VcpuControl::new(Requested::Run, config.vcpus as usize)),
            sink: Arc::new(StopSink {
                exit,
                failure: Mutex::new(None),
            }),
            io_bus: Arc::new(io_bus),
            mmio_bus: Arc::new(mmio_bus),
            serial,
            _kvm: kvm,
        })
    }

    /// Starts the vCPU threads; with `paused` they park before running
    /// any guest code (and this returns once all are parked).
    pub fn start(&mut self, paused: bool) -> Result<(), VmError> {
        if paused {
            self.control.request(Requested::Pause);
        }
        let count = self.pending_vcpus.len();
        self.spawn_vcpus()?;
        if paused {
            self.control.wait_parked(count);
        }
        Ok(())
    }

    fn spawn_vcpus(&mut self) -> Result<(), VmError> {
        let cpus = if crate::backend_quirks::pin_vcpus(self.config.pin_vcpus) {
            let allowed =
                crate::backend_quirks::allowed_cpus().map_err(vcpu::VcpuError::Affinity)?;
            let plan = crate::backend_quirks::plan(self.pending_vcpus.len(), &allowed);
            tracing::info!(
                "vCPU threads pinned to host CPUs {plan:?} (pin_vcpus = {})",
                self.config.pin_vcpus.as_str()
            );
            plan.into_iter().map(Some).collect()
        } else {
            vec![None; self.pending_vcpus.len()]
        };
        for ((index, fd), cpu) in self.pending_vcpus.drain(..).enumerate().zip(cpus) {
            let ctx = VcpuContext {
                io_bus: self.io_bus.clone(),
                mmio_bus: self.mmio_bus.clone(),
                ram: self.ram.clone(),
                control: self.control.clone(),
                sink: self.sink.clone(),
                msrs: self.msrs.clone(),
            };
            self.handles.push(vcpu::spawn(index as u8, fd, ctx, cpu)?);
        }
        Ok(())
    }

    /// Parks every vCPU outside KVM_RUN; returns when all are parked.
    pub fn pause(&self) {
        self.control.request(Requested::Pause);
        for h in &self.handles {
            h.kick();
        }
        self.control.wait_parked(self.handles.len());
    }

    /// Lets parked vCPUs run again.
    pub fn resume(&self) {
        self.control.request(Requested::Run);
    }

    /// Stops and joins every vCPU thread.
    pub fn stop(&mut self) {
        self.control.request(Requested::Stop);
        for h in &self.handles {
            h.kick();
        }
        for h in &mut self.handles {
            h.join();
        }
        self.serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .flush();
    }

    /// Why the VM wants to stop, if it does.
    pub fn outcome(&self) -> Option<Outcome> {
        if let Some(f) = self
            .sink
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Some(Outcome::Failure(f));
        }
        self.sink.exit.exit().map(Outcome::Guest)
    }

    /// The eventfd signalled when the guest or a vCPU wants the VM to stop.
    pub fn stop_eventfd(&self) -> &vmm_sys_util::eventfd::EventFd {
        self.sink.exit.eventfd()
    }

    /// The serial port (for console input).
    pub fn serial(&self) -> Arc<Mutex<SerialDevice>> {
        self.serial.clone()
    }

    /// Guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// Guest memory registered for live snapshots.
    pub fn tracker(&self) -> &Tracker {
        &self.tracker
    }

    /// Guest RAM layout (guest-physical start, size).
    pub fn memory_layout(&self) -> Vec<(u64, u64)> {
        self.ram
            .ranges()
            .iter()
            .map(|r| (r.start, r.size))
            .collect()
    }

    /// Finishes in-flight disk requests and holds new ones; returns the
    /// transports' states. Pair with [`Vm::unquiesce_devices`].
    pub fn quiesce_devices(&self) -> Vec<TransportSnapshot> {
        self.transports
            .iter()
            .map(|t| t.lock().unwrap_or_else(|e| e.into_inner()).quiesce())
            .collect()
    }

    /// Lets disks serve requests again.
    pub fn unquiesce_devices(&self) {
        for t in &self.transports {
            t.lock().unwrap_or_else(|e| e.into_inner()).unquiesce();
        }
    }

    /// Captures vCPU, VM and device state. The vCPUs must be paused and the
    /// devices quiesced (`disks` is what [`Vm::quiesce_devices`] returned).
    pub fn save_state(&self, disks: Vec<TransportSnapshot>) -> Result<MachineState, VmError> {
        let vcpus = self.control.save_all(self.handles.len())?;
        Ok(MachineState {
            vcpus,
            vm: crate::vm_state::save(&self.vm_fd)?,
            serial: self
                .serial
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .snapshot(),
            disks,
            memory: self.memory_layout(),
        })
    }

    /// Replaces this VM's state with a snapshot's, in place (the vCPUs
    /// must be paused): devices reset, guest memory reloaded from `memory`,
    /// vCPU, VM and device state loaded, disks switched to `disks` (new
    /// working layers over the snapshot's layers).
    pub fn apply(
        &self,
        state: MachineState,
        memory: &Path,
        disks: &[PathBuf],
        eager: bool,
    ) -> Result<(), VmError> {
        let regions = self.memory_layout();
        if state.memory != regions
            || state.vcpus.len() != self.handles.len()
            || state.disks.len() != self.transports.len()
            || disks.len() != self.transports.len()
        {
            return Err(VmError::StateMismatch(
                "the snapshot's memory, vCPUs or disks differ from this VM's".into(),
            ));
        }
        // Check the memory file before anything is touched.
        let file = MemoryFile::open(memory)?;
        file.check_layout(&regions)?;
        let replaced = self.replace_state(state, file, disks, eager);
        if let Err(e) = &replaced {
            // Part of the VM's state is the snapshot's by now: stop it
            // rather than let it resume on a mix of two states.
            self.sink
                .fail(crate::vcpu::VcpuFailure::ApplyFailed(e.to_string()));
        }
        replaced
    }

    /// The part of [`Vm::apply`] after its checks: from here on, an error
    /// leaves the VM's state partly replaced.
    fn replace_state(
        &self,
        state: MachineState,
        file: MemoryFile,
        disks: &[PathBuf],
        eager: bool,
    ) -> Result<(), VmError> {
        let started = std::time::Instant::now();
        for t in &self.transports {
            t.lock().unwrap_or_else(|e| e.into_inner()).quiesce();
        }
        // A previous apply's load still running is dropped (its memory is
        // replaced next); then memory is replaced lazily: pages come from
        // memory.bin when touched, the rest in the background (instant
        // revert).
        if let Some(l) = self.lazy.lock().unwrap_or_else(|e| e.into_inner()).take() {
            l.abandon();
        }
        // A chunk that fails its checksum (or cannot be placed) stops the VM
        // with the reason rather than letting it run on wrong memory.
        // The loader's messages name memory.bin.
        let sink = self.sink.clone();
        // KVM lets go of guest memory before it is replaced, and gets it
        // back once the new memory is in place (see `set_memslots`).
        set_memslots(
            &self.vm_fd,
            &self.ram,
            false,
            "remove guest memory from KVM for an apply",
        )?;
        let loader = LazyLoader::start(
            self.tracker.regions(),
            file,
            self.tracker.write_protector().clone(),
            Box::new(move |e| sink.fail(crate::vcpu::VcpuFailure::MemoryLoad(e.to_string()))),
            crate::backend_quirks::huge_pages(self.config.huge_pages),
        )
        .map_err(|e| VmError::StateMismatch(e.to_string()));
        set_memslots(
            &self.vm_fd,
            &self.ram,
            true,
            "register guest memory with KVM again",
        )?;
        let mut loader = loader?;
        if eager {
            // The baseline of `snapvm bench apply`: all memory before resuming.
            loader.free_old_memory();
            loader
                .finish()
                .map_err(|e| VmError::StateMismatch(format!("memory load failed: {e}")))?;
        } else {
            let replaced = started.elapsed();
            self.restore_machine(state, disks)?;
            tracing::debug!(
                "apply: memory replaced after {} us, state loaded after {} us",
                replaced.as_micros(),
                started.elapsed().as_micros()
            );
            loader.start_prefetch();
            loader.free_old_memory();
            *self.lazy.lock().unwrap_or_else(|e| e.into_inner()) = Some(loader);
            return Ok(());
        }
        self.restore_machine(state, disks)
    }

    /// Loads vCPU, VM and device state and switches the disks (the second
    /// half of [`Vm::apply`]).
    fn restore_machine(&self, state: MachineState, disks: &[PathBuf]) -> Result<(), VmError> {
        let dev = |what| move |source| VmError::Device { what, source };
        let MachineState {
            vcpus,
            vm,
            serial,
            disks: transports,
            ..
        } = state;
        self.control.restore_all(vcpus)?;
        crate::vm_state::restore(&self.vm_fd, &vm)?;
        self.serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore(&serial)
            .map_err(dev("the serial port"))?;
        for (i, (t, snap)) in self.transports.iter().zip(&transports).enumerate() {
            let readonly = self.config.disks.get(i).is_some_and(|d| d.readonly);
            self.disk_backends[i].replace(Disk::open(&disks[i], readonly)?);
            t.lock()
                .unwrap_or_else(|e| e.into_inner())
                .reset_and_restore(snap)
                .map_err(dev("a virtio-blk device"))?;
        }
        Ok(())
    }

    /// Completes a lazy memory load in progress (live snapshots need all of
    /// memory in place and write tracking back).
    pub fn finish_lazy_load(&self) -> Result<(), VmError> {
        let loader = self.lazy.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(l) = loader {
            let took = l
                .finish()
                .map_err(|e| VmError::StateMismatch(format!("lazy memory load failed: {e}")))?;
            tracing::info!("lazy memory load complete after {} ms", took.as_millis());
        }
        Ok(())
    }

    /// A lazy memory load still in progress: (2 MiB chunks loaded, in all).
    pub fn memory_load(&self) -> Option<(u64, u64)> {
        let l = self.lazy.lock().unwrap_or_else(|e| e.into_inner());
        l.as_ref().filter(|l| !l.finished()).map(|l| l.progress())
    }

    /// The disks' backends, in disk order (for merges).
    pub fn disk_backends(&self) -> Vec<Arc<DiskBackend>> {
        self.disk_backends.clone()
    }

    /// The top layer of each disk.
    pub fn disk_tops(&self) -> Vec<Option<PathBuf>> {
        self.disk_backends.iter().map(|d| d.top()).collect()
    }

    /// Switches disk `i` to the pre-created overlay `new_top` (devices
    /// quiesced).
    pub fn fork_disk(&self, i: usize, new_top: &Path) -> Result<(), VmError> {
        match self.disk_backends.get(i) {
            Some(d) => Ok(d.fork(new_top)?),
            None => Err(VmError::StateMismatch(format!("no disk {i}"))),
        }
    }

    /// The configuration this VM was created from.
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// The KVM VM file descriptor.
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm_fd
    }
}

/// Registers guest memory with KVM, one slot per region (`present`), or
/// removes it. An apply removes it while the vCPUs are paused and guest
/// memory is replaced, the guest's own page tables included: KVM learns of
/// the old pages going through its MMU notifier, but with shadow paging,
/// as on the kvm_pvm backend, it also keeps translations it built from the
/// guest's page tables and reuses them when the vCPU state it is given has
/// the same CR3; removing the slots makes it discard all of them. Removing
/// them *before* the memory is replaced also spares KVM the walk over every
/// old page the notifier would otherwise do (on 4 KiB pages, tens of ms
/// per GiB).
fn set_memslots(
    vm_fd: &VmFd,
    ram: &GuestRam,
    present: bool,
    what: &'static str,
) -> Result<(), VmError> {
    for (slot, region) in ram.memory().iter().enumerate() {
        let mr = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: if present { region.len() } else { 0 },
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the host range belongs to `ram`, which outlives the VM fd
        // (both live in `Vm`, and the range stays mapped while the VM
        // exists; an apply replaces its pages in place, never unmaps it).
        unsafe { vm_fd.set_user_memory_region(mr) }.map_err(kvm_err(what))?;
    }
    Ok(())
}

fn load_memory(ram: &GuestRam, path: &Path, regions: &[(u64, u64)]) -> Result<(), VmError> {
    let file = MemoryFile::open(path)?;
    file.check_layout(regions)?;
    let mut buf = vec![0u8; CHUNK_SIZE as usize];
    for (i, (gpa, len)) in file.chunks().into_iter().enumerate() {
        let b = &mut buf[..len as usize];
        file.read_verified(i, gpa, b)?;
        for (p, page) in b.chunks(4096).enumerate() {
            if page.iter().all(|x| *x == 0) {
                continue;
            }
            use vm_memory::{Bytes, GuestAddress};
            ram.memory()
                .write_slice(page, GuestAddress(gpa + p as u64 * 4096))
                .map_err(|e| {
                    VmError::StateMismatch(format!("cannot load memory at {gpa:#x}: {e}"))
                })?;
        }
    }
    Ok(())
}

impl Drop for Vm {
    fn drop(&mut self) {
        if !self.handles.is_empty() {
            self.stop();
        }
        // The loader writes guest memory: stop it before the memory goes.
        drop(self.lazy.lock().unwrap_or_else(|e| e.into_inner()).take());
        // Join device workers now, while guest memory is still mapped.
        self.mmio_bus = Arc::new(Bus::new());
    }
}
