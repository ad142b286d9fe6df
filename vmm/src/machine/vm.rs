//! A KVM virtual machine: memory, in-kernel irqchip and PIT, devices, the
//! loaded kernel (or none, for a VM that a snapshot will fill), its vCPU
//! threads, and the list of its components with state. Capturing and
//! applying a snapshot are in `capture.rs` and `apply.rs`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use devices::bus::Bus;
use devices::exit::{ExitNotifier, GuestExit};
use devices::persist::{Components, StateError};
use devices::serial::{SerialDevice, SerialOutput};
use devices::virtio::mmio::MmioTransport;
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use snapshot::disk::DiskError;
use snapshot::lazy::{LazyError, LazyLoader};
use snapshot::live::{GuestRegion, LiveError, Tracker};
use snapshot::memory_file::MemoryFileError;
use snapshot::write_protect::{HostRange, WriteProtectError, WriteProtector};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::backend_quirks;
use super::boot::{self, BootError};
use super::cpuid;
use super::disk_backend::DiskBackend;
use super::irqchip::Irqchip;
use super::kvmclock::KvmClock;
use super::layout::KVM_TSS_ADDRESS;
use super::memory::{GuestRam, MemoryError};
use super::outcome::{Outcome, StopSink};
use super::pit::Pit;
use super::state::{ids, SavedMachine};
use super::tap_pool::TapPool;
use super::vcpu::control::{Requested, VcpuControl};
use super::vcpu::state::{VcpuStateError, Vcpus};
use super::vcpu::{self, VcpuContext, VcpuError, VcpuHandle};
use super::vm_devices;
use crate::config::{ConfigError, VmConfig};
use crate::hooks::Hooks;

/// Errors creating, running, capturing or applying a VM.
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
    /// A disk could not be opened or switched.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// A network adapter's tap could not be opened.
    #[error(transparent)]
    Tap(#[from] devices::virtio::tap::TapError),
    /// A component's state could not be saved or restored.
    #[error(transparent)]
    State(#[from] StateError),
    /// vCPU state could not be saved or restored.
    #[error(transparent)]
    VcpuState(#[from] VcpuStateError),
    /// memory.bin is unusable.
    #[error(transparent)]
    MemoryFile(#[from] MemoryFileError),
    /// Guest memory could not be loaded (lazily or not) from memory.bin.
    #[error(transparent)]
    MemoryLoad(#[from] Arc<LazyError>),
    /// A clone's shared memory could not be mapped.
    #[error(transparent)]
    SharedMemory(#[from] snapshot::shared_memory::SharedMemoryError),
    /// Guest memory could not be frozen for a live snapshot.
    #[error(transparent)]
    Live(#[from] LiveError),
    /// A snapshot's guest RAM layout differs from this VM's.
    #[error(
        "the snapshot's guest memory is laid out as {saved:?} (start, size), this VM's as {vm:?}"
    )]
    LayoutMismatch {
        /// The snapshot's regions.
        saved: Vec<(u64, u64)>,
        /// This VM's regions.
        vm: Vec<(u64, u64)>,
    },
    /// A snapshot names another number of disk layers than the VM has disks.
    #[error("{layers} disk layers given for {disks} disks")]
    DiskCount {
        /// Layers given.
        layers: usize,
        /// Disks of the VM.
        disks: usize,
    },
    /// An apply failed after it had begun replacing the VM's state; the VM
    /// is being stopped.
    #[error(transparent)]
    Partial(Arc<VmError>),
    /// A device could not be created.
    #[error("cannot create {what}: {source}")]
    Device {
        /// Which device.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

impl From<LazyError> for VmError {
    fn from(e: LazyError) -> Self {
        VmError::MemoryLoad(Arc::new(e))
    }
}

/// A created VM.
pub struct Vm {
    // Devices first: their worker threads use guest memory, so they must be
    // dropped (and joined) before `ram` is unmapped (see Drop).
    pub(super) io_bus: Arc<Bus>,
    pub(super) mmio_bus: Arc<Bus>,
    pub(super) serial: Arc<Mutex<SerialDevice>>,
    pub(super) transports: Vec<Arc<Mutex<MmioTransport>>>,
    pub(super) disk_backends: Vec<Arc<DiskBackend>>,
    /// The generation the guest reads; a restore renews it.
    pub(super) generation: Arc<devices::generation::Generation>,
    /// Everything with state, in save/restore order.
    pub(super) components: Components,
    pub(super) handles: Vec<VcpuHandle>,
    pub(super) pending_vcpus: Vec<VcpuFd>,
    pub(super) control: Arc<VcpuControl>,
    pub(super) sink: Arc<StopSink>,
    pub(super) tracker: Tracker,
    pub(super) lazy: Mutex<Option<LazyLoader>>,
    pub(super) msrs: Arc<Vec<u32>>,
    pub(super) vm_fd: Arc<VmFd>,
    pub(super) ram: Arc<GuestRam>,
    pub(super) config: VmConfig,
    /// Debug aid of applies ([`Hooks::check_old_memory`]).
    pub(super) check_old_memory: Option<PathBuf>,
    _kvm: Kvm,
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

fn open_kvm(path: &Path) -> Result<Kvm, VmError> {
    let cpath = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| VmError::KvmMissing(path.to_path_buf()))?;
    Kvm::new_with_path(&cpath).map_err(|source| match source.errno() {
        libc::ENOENT => VmError::KvmMissing(path.to_path_buf()),
        libc::EACCES | libc::EPERM => VmError::KvmAccess(path.to_path_buf()),
        _ => VmError::KvmOpen {
            path: path.to_path_buf(),
            source,
        },
    })
}

/// What a VM is connected to in its VMM, besides its configuration.
pub struct Wiring {
    /// Guest console output.
    pub serial_out: SerialOutput,
    /// Where the guest's own stop requests go. A VMM that rebuilds its VM
    /// (an apply across different hardware) hands every VM it builds the
    /// same one, so its event loop keeps watching one eventfd.
    pub exit: Arc<ExitNotifier>,
    /// The TAP devices network adapters use (shared the same way).
    pub taps: Arc<TapPool>,
}

impl Wiring {
    /// Console output to `serial_out`, and a stop notifier of its own.
    pub fn new(serial_out: SerialOutput) -> Result<Self, VmError> {
        Ok(Self {
            serial_out,
            exit: Arc::new(ExitNotifier::new().map_err(|source| VmError::Device {
                what: "the exit notifier",
                source,
            })?),
            taps: TapPool::new(),
        })
    }
}

impl Vm {
    /// Creates the VM described by `config` with its kernel loaded; the
    /// vCPUs start with [`Vm::start`].
    pub fn create(config: &VmConfig, wiring: Wiring, hooks: &Hooks) -> Result<Self, VmError> {
        Self::build(config, wiring, hooks, true)
    }

    /// Creates the VM described by `config` with empty memory and vCPUs in
    /// their reset state, for [`Vm::apply`] to fill from a snapshot (no
    /// kernel is loaded). Start it paused.
    pub fn create_empty(config: &VmConfig, wiring: Wiring, hooks: &Hooks) -> Result<Self, VmError> {
        Self::build(config, wiring, hooks, false)
    }

    fn build(
        config: &VmConfig,
        wiring: Wiring,
        hooks: &Hooks,
        load_kernel: bool,
    ) -> Result<Self, VmError> {
        config.validate()?;
        if load_kernel {
            boot::detect_format(&config.kernel)?;
            if let Some(initrd) = &config.initrd {
                std::fs::metadata(initrd).map_err(|source| BootError::ReadInitrd {
                    path: initrd.clone(),
                    source,
                })?;
            }
        }
        let kvm = open_kvm(&hooks.kvm_device)?;
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

        let vm_fd = Arc::new(kvm.create_vm().map_err(kvm_err("create the VM"))?);
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
            backend_quirks::huge_pages(config.huge_pages),
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
        let msrs = Arc::new(
            kvm.get_msr_index_list()
                .map_err(kvm_err("read KVM's MSR list"))?
                .as_slice()
                .to_vec(),
        );

        let Wiring {
            serial_out,
            exit,
            taps,
        } = wiring;
        let devices = vm_devices::create(&vm_fd, &ram, config, serial_out, &exit, &taps)?;
        let boot_state = if load_kernel {
            let cmdline = format!("{}{}", config.cmdline, devices.cmdline);
            Some(boot::load(&ram, config, cmdline.trim())?)
        } else {
            None
        };

        vcpu::install_kick_handler()?;
        let mut pending_vcpus = Vec::new();
        for index in 0..config.vcpus {
            let fd = vcpu::create(
                &vm_fd,
                index,
                &cpuid::for_vcpu(&supported, index, config.vcpus),
            )?;
            if let (Some(b), 0) = (&boot_state, index) {
                vcpu::set_boot_state(&fd, b)?;
            }
            pending_vcpus.push(fd);
        }
        let control = Arc::new(VcpuControl::new(Requested::Run, config.vcpus as usize));

        // The components, in the order they are saved and restored.
        let mut components = Components::new();
        components.register(
            ids::VCPUS,
            Arc::new(Mutex::new(Vcpus::new(
                control.clone(),
                config.vcpus as usize,
            ))),
        );
        components.register(ids::PIT, Arc::new(Mutex::new(Pit(vm_fd.clone()))));
        components.register(ids::IRQCHIP, Arc::new(Mutex::new(Irqchip(vm_fd.clone()))));
        components.register(ids::KVMCLOCK, Arc::new(Mutex::new(KvmClock(vm_fd.clone()))));
        for (id, c) in devices.components {
            components.register(id, c);
        }

        Ok(Self {
            io_bus: Arc::new(devices.io_bus),
            mmio_bus: Arc::new(devices.mmio_bus),
            serial: devices.serial,
            transports: devices.transports,
            disk_backends: devices.disk_backends,
            generation: devices.generation,
            components,
            handles: Vec::new(),
            pending_vcpus,
            control,
            sink: Arc::new(StopSink::new(exit)),
            tracker,
            lazy: Mutex::new(None),
            msrs,
            vm_fd,
            ram,
            config: config.clone(),
            check_old_memory: hooks.check_old_memory.clone(),
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
        let cpus = if backend_quirks::pin_vcpus(self.config.pin_vcpus) {
            let allowed = backend_quirks::allowed_cpus().map_err(VcpuError::Affinity)?;
            let plan = backend_quirks::plan(self.pending_vcpus.len(), &allowed);
            // Device workers (started on vCPU threads) run on the CPUs no
            // vCPU is pinned to, or on all when there are none left.
            let spare: Vec<usize> = allowed
                .iter()
                .copied()
                .filter(|c| !plan.contains(c))
                .collect();
            let workers = if spare.is_empty() { allowed } else { spare };
            tracing::info!(
                "vCPU threads pinned to host CPUs {plan:?} (pin_vcpus = {}), device workers on {workers:?}",
                self.config.pin_vcpus.as_str()
            );
            devices::worker::set_worker_cpus(Some(workers));
            plan.into_iter().map(Some).collect()
        } else {
            devices::worker::set_worker_cpus(None);
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
        self.sink.outcome()
    }

    /// The guest's own stop request, if any.
    pub fn guest_exit(&self) -> Option<GuestExit> {
        self.sink.exit.exit()
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

    /// The ids of the VM's components, in save/restore order.
    pub fn component_ids(&self) -> Vec<&str> {
        self.components.ids()
    }

    /// Finishes in-flight disk requests and holds new ones. Pair with
    /// [`Vm::unquiesce_devices`].
    pub fn quiesce_devices(&self) {
        for t in &self.transports {
            t.lock().unwrap_or_else(|e| e.into_inner()).quiesce();
        }
    }

    /// Lets disks serve requests again.
    pub fn unquiesce_devices(&self) {
        for t in &self.transports {
            t.lock().unwrap_or_else(|e| e.into_inner()).unquiesce();
        }
    }

    /// Saves every component's state: a walk over the components. The
    /// vCPUs must be paused and the devices quiesced. Encoding the states
    /// ([`SavedMachine::encode`]) can wait until the guest runs again.
    pub fn save_state(&self) -> Result<SavedMachine, VmError> {
        Ok(SavedMachine {
            memory: self.memory_layout(),
            components: self.components.save_all()?,
        })
    }

    /// The disks' backends, in disk order (for merges).
    pub fn disk_backends(&self) -> Vec<Arc<DiskBackend>> {
        self.disk_backends.clone()
    }

    /// The top layer of each disk.
    pub fn disk_tops(&self) -> Vec<Option<PathBuf>> {
        self.disk_backends.iter().map(|d| d.top()).collect()
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
pub(super) fn set_memslots(
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

impl Drop for Vm {
    fn drop(&mut self) {
        if !self.handles.is_empty() {
            self.stop();
        }
        // The loader writes guest memory: stop it before the memory goes.
        drop(self.lazy.lock().unwrap_or_else(|e| e.into_inner()).take());
        // Join device workers now, while guest memory is still mapped: the
        // buses and the component list hold the devices.
        self.mmio_bus = Arc::new(Bus::new());
        self.components = Components::new();
        self.transports.clear();
    }
}
