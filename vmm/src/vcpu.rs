//! vCPUs: creation and boot configuration, the run loop on its own thread,
//! pause/stop control, and recovery from the emulator's known gaps.

use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use devices::bus::Bus;
use devices::exit::{ExitNotifier, GuestExit};
use kvm_bindings::{kvm_msr_entry, kvm_run, CpuId, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::boot::BootState;
use crate::memory::GuestRam;
use crate::vcpu_state::{self, VcpuState, VcpuStateError};

/// Errors configuring a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// KVM_CREATE_VCPU failed.
    #[error("cannot create vCPU {index}: {source}")]
    Create {
        /// vCPU index.
        index: u8,
        /// The KVM error.
        source: kvm_ioctls::Error,
    },
    /// A KVM ioctl that sets up vCPU state failed.
    #[error("cannot set {what} of vCPU {index}: {source}")]
    Setup {
        /// vCPU index.
        index: u8,
        /// Which state.
        what: &'static str,
        /// The KVM error.
        source: kvm_ioctls::Error,
    },
    /// The host CPUs this process may run on could not be read.
    #[error("cannot read the host CPUs snapvm may run on (for pinning vCPUs): {0}")]
    Affinity(std::io::Error),
    /// The vCPU thread could not be pinned to its host CPU.
    #[error("cannot pin the thread of vCPU {index} to host CPU {cpu}: {source}")]
    Pin {
        /// vCPU index.
        index: u8,
        /// The host CPU.
        cpu: usize,
        /// The OS error.
        source: std::io::Error,
    },
    /// The vCPU thread could not be started.
    #[error("cannot start the thread of vCPU {index}: {source}")]
    Thread {
        /// vCPU index.
        index: u8,
        /// The OS error.
        source: std::io::Error,
    },
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    Signal(vmm_sys_util::errno::Error),
}

/// Why a vCPU stopped the VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuFailure {
    /// KVM could not emulate an instruction.
    EmulationFailure {
        /// vCPU index.
        vcpu: u8,
        /// Guest RIP.
        rip: u64,
        /// Instruction bytes at RIP (as many as could be read).
        bytes: Vec<u8>,
        /// KVM internal-error sub-code.
        suberror: u32,
    },
    /// Other KVM internal error.
    Internal {
        /// vCPU index.
        vcpu: u8,
        /// KVM internal-error sub-code.
        suberror: u32,
    },
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault {
        /// vCPU index.
        vcpu: u8,
        /// Guest RIP.
        rip: u64,
    },
    /// KVM could not enter the guest.
    FailEntry {
        /// vCPU index.
        vcpu: u8,
        /// Hardware entry failure reason.
        reason: u64,
    },
    /// KVM_RUN itself failed.
    Run {
        /// vCPU index.
        vcpu: u8,
        /// errno.
        errno: i32,
    },
    /// An exit snapvm does not handle.
    UnexpectedExit {
        /// vCPU index.
        vcpu: u8,
        /// Description of the exit.
        exit: String,
    },
    /// Guest memory could not be loaded from a snapshot after an apply
    /// (not a vCPU's fault, but it stops the VM the same way).
    MemoryLoad(String),
    /// An apply failed after it had begun replacing the VM's state.
    ApplyFailed(String),
}

impl std::fmt::Display for VcpuFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VcpuFailure::EmulationFailure {
                vcpu,
                rip,
                bytes,
                suberror,
            } => {
                write!(
                    f,
                    "vCPU {vcpu}: KVM cannot emulate the instruction at rip {rip:#x} (bytes"
                )?;
                if bytes.is_empty() {
                    write!(f, " unreadable")?;
                }
                for b in bytes {
                    write!(f, " {b:02x}")?;
                }
                write!(f, "; internal error suberror {suberror})")
            }
            VcpuFailure::MemoryLoad(message) => write!(
                f,
                "the applied snapshot's memory could not be loaded ({message}); the VM was stopped rather than run on wrong memory"
            ),
            VcpuFailure::ApplyFailed(message) => write!(
                f,
                "applying a snapshot failed after it had begun replacing the VM's state ({message}); the VM was stopped rather than resumed on a mix of two states"
            ),
            VcpuFailure::Internal { vcpu, suberror } => {
                write!(f, "vCPU {vcpu}: KVM internal error, suberror {suberror}")
            }
            VcpuFailure::TripleFault { vcpu, rip } => {
                write!(f, "vCPU {vcpu}: the guest triple-faulted at rip {rip:#x}")
            }
            VcpuFailure::FailEntry { vcpu, reason } => {
                write!(
                    f,
                    "vCPU {vcpu}: KVM failed to enter the guest (reason {reason:#x})"
                )
            }
            VcpuFailure::Run { vcpu, errno } => write!(
                f,
                "vCPU {vcpu}: KVM_RUN failed: {}",
                std::io::Error::from_raw_os_error(*errno)
            ),
            VcpuFailure::UnexpectedExit { vcpu, exit } => {
                write!(f, "vCPU {vcpu}: unexpected exit {exit}")
            }
        }
    }
}

const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

const APIC_LVT_LINT0: usize = 0x350;
const APIC_LVT_LINT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Creates vCPU `index` and configures CPUID, MSRs and the local APIC.
pub fn create(vm: &VmFd, index: u8, cpuid: &CpuId) -> Result<VcpuFd, VcpuError> {
    let fd = vm
        .create_vcpu(index as u64)
        .map_err(|source| VcpuError::Create { index, source })?;
    let setup = |what| {
        move |source| VcpuError::Setup {
            index,
            what,
            source,
        }
    };
    fd.set_cpuid2(cpuid).map_err(setup("CPUID"))?;

    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, 1),          // fast strings
        (MSR_MTRR_DEF_TYPE, (1 << 11) | 6), // MTRRs on, write-back default
    ]
    .iter()
    .map(|&(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::Setup {
        index,
        what: "MSRs",
        source: kvm_ioctls::Error::new(libc::EINVAL),
    })?;
    let set = fd.set_msrs(&msrs).map_err(setup("MSRs"))?;
    if set != entries.len() {
        tracing::debug!(
            "vCPU {index}: KVM accepted {set} of {} boot MSRs (MSR {:#x} refused)",
            entries.len(),
            entries[set].index
        );
    }

    // LINT0 = ExtINT (legacy PIC), LINT1 = NMI, as firmware would set them.
    let mut lapic = fd.get_lapic().map_err(setup("LAPIC"))?;
    for (reg, mode) in [
        (APIC_LVT_LINT0, APIC_MODE_EXTINT),
        (APIC_LVT_LINT1, APIC_MODE_NMI),
    ] {
        let mut b = [0u8; 4];
        for (i, x) in b.iter_mut().enumerate() {
            *x = lapic.regs[reg + i] as u8;
        }
        let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (i, x) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *x as _;
        }
    }
    fd.set_lapic(&lapic).map_err(setup("LAPIC"))?;

    let mut fpu = fd.get_fpu().map_err(setup("FPU"))?;
    fpu.fcw = 0x37f;
    fpu.mxcsr = 0x1f80;
    fd.set_fpu(&fpu).map_err(setup("FPU"))?;
    Ok(fd)
}

/// Puts the boot vCPU at the kernel's entry point.
pub fn set_boot_state(fd: &VcpuFd, boot: &BootState) -> Result<(), VcpuError> {
    let setup = |what| {
        move |source| VcpuError::Setup {
            index: 0,
            what,
            source,
        }
    };
    let mut sregs = fd.get_sregs().map_err(setup("special registers"))?;
    boot.sregs.apply(&mut sregs);
    fd.set_sregs(&sregs).map_err(setup("special registers"))?;
    fd.set_regs(&boot.regs).map_err(setup("registers"))?;
    Ok(())
}

// ---------------------------------------------------------------------------
// Kicking vCPUs out of KVM_RUN.
// ---------------------------------------------------------------------------

thread_local! {
    /// This thread's kvm_run page, for the kick signal handler.
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The real-time signal used to kick vCPU threads.
pub fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let run = KVM_RUN_PTR.with(|p| p.get());
    if !run.is_null() {
        // SAFETY: the pointer is this thread's own kvm_run mapping, set by
        // the vCPU loop before entering KVM_RUN and valid until the VcpuFd is
        // dropped (after the loop ends and clears it). Setting immediate_exit
        // makes the current or next KVM_RUN return EINTR, so a kick that
        // lands just before KVM_RUN is not lost.
        unsafe { (*run).immediate_exit = 1 };
    }
}

/// Installs the kick handler (idempotent).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(kick_signal(), kick_handler).map_err(VcpuError::Signal)
}

// ---------------------------------------------------------------------------
// Run control: running, paused, stopping.
// ---------------------------------------------------------------------------

/// What the VMM wants the vCPUs to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requested {
    /// Run the guest.
    Run,
    /// Park outside KVM_RUN until asked to run again.
    Pause,
    /// Leave the run loop.
    Stop,
}

/// What a vCPU thread does after [`VcpuControl::checkpoint`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Checkpoint {
    /// Run the guest.
    Run,
    /// A pause waits: first let KVM complete the exit just handled (an
    /// MMIO or port access finishes inside the next KVM_RUN), without
    /// running guest code.
    FinishIo,
    /// Leave the run loop.
    Stop,
}

/// Work a parked vCPU does on its own thread.
#[derive(Clone)]
enum ParkedCommand {
    Save,
    Restore(Arc<Vec<VcpuState>>),
}

type ParkedResult = Result<Option<VcpuState>, VcpuStateError>;

struct ControlState {
    requested: Requested,
    parked: usize,
    exited: usize,
    cmd_seq: u64,
    cmd: Option<ParkedCommand>,
    results: Vec<Option<ParkedResult>>,
}

/// Shared run control for all vCPU threads.
pub struct VcpuControl {
    state: Mutex<ControlState>,
    cv: Condvar,
}

impl VcpuControl {
    /// Starts in `initial` state, for `vcpus` vCPUs.
    pub fn new(initial: Requested, vcpus: usize) -> Self {
        Self {
            state: Mutex::new(ControlState {
                requested: initial,
                parked: 0,
                exited: 0,
                cmd_seq: 0,
                cmd: None,
                results: (0..vcpus).map(|_| None).collect(),
            }),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the request and wakes parked vCPUs.
    pub fn request(&self, r: Requested) {
        self.lock().requested = r;
        self.cv.notify_all();
    }

    /// Blocks until `count` vCPUs are parked or gone.
    pub fn wait_parked(&self, count: usize) {
        let mut g = self.lock();
        while g.parked + g.exited < count {
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Has each of the `count` parked vCPUs run `cmd` on its own thread.
    fn run_parked(
        &self,
        cmd: ParkedCommand,
        count: usize,
    ) -> Result<Vec<Option<VcpuState>>, VcpuStateError> {
        let mut g = self.lock();
        for r in g.results.iter_mut() {
            *r = None;
        }
        g.cmd = Some(cmd);
        g.cmd_seq += 1;
        self.cv.notify_all();
        while g.results.iter().take(count).any(Option::is_none) {
            if g.exited > 0 {
                return Err(VcpuStateError {
                    vcpu: 0,
                    op: "reach",
                    what: "vCPU threads",
                    message: "a vCPU thread has exited".into(),
                });
            }
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g.cmd = None;
        g.results
            .iter_mut()
            .take(count)
            .map(|r| r.take().unwrap_or(Ok(None)))
            .collect()
    }

    /// Has every parked vCPU save its state (the vCPUs must be paused).
    pub fn save_all(&self, count: usize) -> Result<Vec<VcpuState>, VcpuStateError> {
        Ok(self
            .run_parked(ParkedCommand::Save, count)?
            .into_iter()
            .flatten()
            .collect())
    }

    /// Has every parked vCPU load `states[index]` (the vCPUs must be paused).
    pub fn restore_all(&self, states: Vec<VcpuState>) -> Result<(), VcpuStateError> {
        let count = states.len();
        self.run_parked(ParkedCommand::Restore(Arc::new(states)), count)
            .map(|_| ())
    }

    /// Called by a vCPU thread before each KVM_RUN: parks while paused
    /// (running save/restore commands) and says what to do next. With
    /// `io_pending` (the last KVM_RUN ended in an exit the VMM handled,
    /// which KVM completes in the next KVM_RUN) a pause first returns
    /// [`Checkpoint::FinishIo`]: the vCPU must not park, and have its state
    /// saved or replaced, halfway through an instruction. Deciding that
    /// here, under the lock a pause request takes, leaves no window for a
    /// pause to slip in between.
    fn checkpoint(
        &self,
        index: u8,
        fd: &VcpuFd,
        msrs: &[u32],
        seen: &mut u64,
        io_pending: bool,
    ) -> Checkpoint {
        let mut g = self.lock();
        loop {
            match g.requested {
                Requested::Run => return Checkpoint::Run,
                Requested::Stop => return Checkpoint::Stop,
                Requested::Pause if io_pending => return Checkpoint::FinishIo,
                Requested::Pause => {
                    g.parked += 1;
                    self.cv.notify_all();
                    while g.requested == Requested::Pause {
                        if g.cmd_seq != *seen {
                            *seen = g.cmd_seq;
                            let r = match g.cmd.clone() {
                                Some(ParkedCommand::Save) => {
                                    vcpu_state::save(index, fd, msrs).map(Some)
                                }
                                Some(ParkedCommand::Restore(states)) => match states
                                    .get(index as usize)
                                {
                                    Some(st) => vcpu_state::restore(index, fd, st).map(|_| None),
                                    None => Ok(None),
                                },
                                None => Ok(None),
                            };
                            if let Some(slot) = g.results.get_mut(index as usize) {
                                *slot = Some(r);
                            }
                            self.cv.notify_all();
                            continue;
                        }
                        g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
                    }
                    g.parked -= 1;
                }
            }
        }
    }

    fn mark_exited(&self) {
        self.lock().exited += 1;
        self.cv.notify_all();
    }
}

/// Where vCPU threads report why they stopped the VM.
pub struct StopSink {
    /// Guest-requested exits (and the event-loop wake-up).
    pub exit: Arc<ExitNotifier>,
    /// The first vCPU failure.
    pub failure: Mutex<Option<VcpuFailure>>,
}

impl StopSink {
    /// Records the first failure and asks the VMM to stop the VM.
    pub fn fail(&self, f: VcpuFailure) {
        tracing::debug!("{f}");
        let mut g = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            *g = Some(f);
        }
        drop(g);
        self.exit.wake();
    }
}

/// Everything a vCPU thread needs.
pub struct VcpuContext {
    /// Port I/O devices.
    pub io_bus: Arc<Bus>,
    /// MMIO devices.
    pub mmio_bus: Arc<Bus>,
    /// Guest RAM (to read instructions on emulation failures).
    pub ram: Arc<GuestRam>,
    /// Run control.
    pub control: Arc<VcpuControl>,
    /// Stop reporting.
    pub sink: Arc<StopSink>,
    /// MSRs saved in snapshots (KVM_GET_MSR_INDEX_LIST).
    pub msrs: Arc<Vec<u32>>,
}

/// A running vCPU thread.
pub struct VcpuHandle {
    thread: Option<JoinHandle<VcpuFd>>,
}

impl VcpuHandle {
    /// Kicks the thread out of KVM_RUN.
    pub fn kick(&self) {
        if let Some(t) = &self.thread {
            if let Err(e) = t.kill(kick_signal()) {
                tracing::debug!("kick failed: {e}");
            }
        }
    }

    /// Waits for the thread to end.
    pub fn join(&mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Starts vCPU `index`'s run loop on a new thread.
/// Starts the thread of vCPU `index`; with `cpu`, the thread is pinned to
/// that host CPU before it runs any guest code (see [`crate::backend_quirks`]).
pub fn spawn(
    index: u8,
    fd: VcpuFd,
    ctx: VcpuContext,
    cpu: Option<usize>,
) -> Result<VcpuHandle, VcpuError> {
    let (pinned_tx, pinned_rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new()
        .name(format!("vcpu{index}"))
        .spawn(move || {
            let mut fd = fd;
            let pinned = cpu.map_or(Ok(()), crate::backend_quirks::pin_current_thread);
            let ok = pinned.is_ok();
            let _ = pinned_tx.send(pinned);
            if ok {
                run_loop(index, &mut fd, &ctx);
            }
            ctx.control.mark_exited();
            fd
        })
        .map_err(|source| VcpuError::Thread { index, source })?;
    let pinned = pinned_rx
        .recv()
        .unwrap_or_else(|_| Err(std::io::Error::other("the vCPU thread ended early")));
    if let Err(source) = pinned {
        let _ = thread.join();
        return Err(VcpuError::Pin {
            index,
            cpu: cpu.unwrap_or_default(),
            source,
        });
    }
    Ok(VcpuHandle {
        thread: Some(thread),
    })
}

/// What the loop should do after an exit.
enum Next {
    Continue,
    Stop,
}

fn run_loop(index: u8, fd: &mut VcpuFd, ctx: &VcpuContext) {
    KVM_RUN_PTR.with(|p| p.set(fd.get_kvm_run() as *mut kvm_run));
    let mut seen = 0;
    let mut io_pending = false;
    loop {
        let finish_io = match ctx
            .control
            .checkpoint(index, fd, &ctx.msrs, &mut seen, io_pending)
        {
            Checkpoint::Run => false,
            // With immediate_exit, KVM completes the pending access and
            // returns at once (KVM API: "userspace can re-enter the guest
            // ... with the immediate_exit field set to complete pending
            // operations without allowing any further instructions to be
            // executed"). An access that needs another exit (the next
            // fragment of a split MMIO access) comes back as one.
            Checkpoint::FinishIo => true,
            Checkpoint::Stop => break,
        };
        if finish_io {
            fd.set_kvm_immediate_exit(1);
        }
        let next = match fd.run() {
            Ok(exit) => {
                io_pending = true;
                handle_exit(index, exit, ctx)
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                fd.set_kvm_immediate_exit(0);
                io_pending = false;
                Ok(Next::Continue)
            }
            Err(e) => Err(VcpuFailure::Run {
                vcpu: index,
                errno: e.errno(),
            }),
        };
        let next = match next {
            Err(VcpuFailure::Internal { vcpu, suberror }) => {
                recover_internal_error(vcpu, suberror, fd, ctx)
            }
            Err(VcpuFailure::TripleFault { vcpu, .. }) => Err(VcpuFailure::TripleFault {
                vcpu,
                rip: fd.get_regs().map(|r| r.rip).unwrap_or(0),
            }),
            other => other,
        };
        match next {
            Ok(Next::Continue) => {}
            Ok(Next::Stop) => break,
            Err(f) => {
                ctx.sink.fail(f);
                break;
            }
        }
    }
    KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
}

fn handle_exit(index: u8, exit: VcpuExit<'_>, ctx: &VcpuContext) -> Result<Next, VcpuFailure> {
    match exit {
        VcpuExit::IoIn(port, data) => {
            ctx.io_bus.read(port as u64, data);
        }
        VcpuExit::IoOut(port, data) => {
            if !ctx.io_bus.write(port as u64, data) && port != 0x80 {
                tracing::trace!("vCPU {index}: write to unclaimed port {port:#x}");
            }
        }
        VcpuExit::MmioRead(addr, data) => {
            if !ctx.mmio_bus.read(addr, data) {
                tracing::debug!("vCPU {index}: read from unclaimed MMIO {addr:#x}");
            }
        }
        VcpuExit::MmioWrite(addr, data) => {
            if !ctx.mmio_bus.write(addr, data) {
                tracing::debug!("vCPU {index}: write to unclaimed MMIO {addr:#x}");
            }
        }
        // With the in-kernel irqchip HLT stays in KVM; a stray exit is harmless.
        VcpuExit::Hlt => {}
        VcpuExit::Shutdown => {
            return Err(VcpuFailure::TripleFault {
                vcpu: index,
                rip: 0,
            })
        }
        VcpuExit::SystemEvent(kind, _) => {
            let exit = match kind {
                kvm_bindings::KVM_SYSTEM_EVENT_RESET => GuestExit::Reset,
                kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => GuestExit::PowerOff,
                other => {
                    return Err(VcpuFailure::UnexpectedExit {
                        vcpu: index,
                        exit: format!("system event {other}"),
                    })
                }
            };
            ctx.sink.exit.notify(exit);
            return Ok(Next::Stop);
        }
        VcpuExit::FailEntry(reason, _) => {
            return Err(VcpuFailure::FailEntry {
                vcpu: index,
                reason,
            })
        }
        VcpuExit::InternalError => {
            // Details are read from kvm_run by the caller once the exit's
            // borrow of the vCPU has ended.
            return Err(VcpuFailure::Internal {
                vcpu: index,
                suberror: 0,
            });
        }
        other => {
            return Err(VcpuFailure::UnexpectedExit {
                vcpu: index,
                exit: format!("{other:?}"),
            })
        }
    }
    Ok(Next::Continue)
}

/// Reads up to 15 instruction bytes at the guest's RIP.
fn instruction_bytes(fd: &VcpuFd, ram: &GuestRam) -> (u64, Vec<u8>) {
    let Ok(regs) = fd.get_regs() else {
        return (0, vec![]);
    };
    let linear = match fd.get_sregs() {
        Ok(s) if s.efer & 0x400 != 0 => regs.rip, // long mode: flat CS
        Ok(s) => s.cs.base.wrapping_add(regs.rip),
        Err(_) => regs.rip,
    };
    let mut bytes = Vec::new();
    if let Ok(t) = fd.translate_gva(linear) {
        if t.valid != 0 {
            for i in 0..15u64 {
                match ram
                    .memory()
                    .read_obj::<u8>(GuestAddress(t.physical_address + i))
                {
                    Ok(b) => bytes.push(b),
                    Err(_) => break,
                }
            }
        }
    }
    (regs.rip, bytes)
}

/// Handles KVM_EXIT_INTERNAL_ERROR: steps over `fwait`, turns `int3` into
/// an injected #BP (both are instructions the emulating backend cannot run
/// at CPL 0), and reports anything else with the instruction bytes.
fn recover_internal_error(
    vcpu: u8,
    _: u32,
    fd: &mut VcpuFd,
    ctx: &VcpuContext,
) -> Result<Next, VcpuFailure> {
    let run = fd.get_kvm_run();
    // SAFETY: the last exit was KVM_EXIT_INTERNAL_ERROR, for which KVM fills
    // the `internal` member of the exit union.
    let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
    const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;
    if suberror != KVM_INTERNAL_ERROR_EMULATION {
        return Err(VcpuFailure::Internal { vcpu, suberror });
    }
    let (rip, bytes) = instruction_bytes(fd, &ctx.ram);
    let fail = |bytes: Vec<u8>| VcpuFailure::EmulationFailure {
        vcpu,
        rip,
        bytes,
        suberror,
    };
    match bytes.first() {
        Some(0x9b) => {
            // fwait: nothing to wait for without x87 exceptions pending.
            let mut regs = fd.get_regs().map_err(|_| fail(bytes.clone()))?;
            regs.rip += 1;
            fd.set_regs(&regs).map_err(|_| fail(bytes.clone()))?;
            tracing::debug!("vCPU {vcpu}: stepped over fwait at {rip:#x}");
            Ok(Next::Continue)
        }
        Some(0xcc) => {
            // int3: a trap, so #BP is delivered with RIP after the instruction.
            let mut regs = fd.get_regs().map_err(|_| fail(bytes.clone()))?;
            regs.rip += 1;
            fd.set_regs(&regs).map_err(|_| fail(bytes.clone()))?;
            let mut events = fd.get_vcpu_events().map_err(|_| fail(bytes.clone()))?;
            events.exception.injected = 1;
            events.exception.nr = 3;
            events.exception.has_error_code = 0;
            events.exception.pending = 0;
            events.flags = 0;
            fd.set_vcpu_events(&events)
                .map_err(|_| fail(bytes.clone()))?;
            tracing::debug!("vCPU {vcpu}: injected #BP for int3 at {rip:#x}");
            Ok(Next::Continue)
        }
        _ => Err(fail(bytes)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vcpu() -> (kvm_ioctls::VmFd, VcpuFd) {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm (run as root)");
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        let fd = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
        (vm, fd)
    }

    /// A pause never parks a vCPU whose last exit KVM has yet to complete:
    /// it is told to finish that first, and parks once nothing is pending.
    #[test]
    fn a_pause_first_lets_kvm_finish_a_pending_exit() {
        let (_vm, fd) = vcpu();
        let control = Arc::new(VcpuControl::new(Requested::Pause, 1));
        let mut seen = 0;
        assert_eq!(
            control.checkpoint(0, &fd, &[], &mut seen, true),
            Checkpoint::FinishIo
        );
        // Nothing pending: it parks until the VM runs again.
        let c = control.clone();
        let parked = std::thread::spawn(move || {
            let mut seen = 0;
            c.checkpoint(0, &fd, &[], &mut seen, false)
        });
        control.wait_parked(1);
        control.request(Requested::Run);
        assert_eq!(parked.join().unwrap(), Checkpoint::Run);
        let (_vm, fd) = vcpu();
        assert_eq!(
            control.checkpoint(0, &fd, &[], &mut seen, true),
            Checkpoint::Run
        );
        control.request(Requested::Stop);
        assert_eq!(
            control.checkpoint(0, &fd, &[], &mut seen, true),
            Checkpoint::Stop
        );
    }
}
