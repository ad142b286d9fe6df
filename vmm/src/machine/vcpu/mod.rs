//! vCPUs: creation and boot configuration, the run loop on its own thread,
//! and kicking a thread out of KVM_RUN. Run control (pause, stop, work on
//! parked vCPUs) is in [`control`], exit handling in [`exits`], the saved
//! state in [`state`].

use std::cell::Cell;
use std::sync::Arc;
use std::thread::JoinHandle;

use devices::bus::Bus;
use kvm_bindings::{kvm_msr_entry, kvm_run, CpuId, Msrs};
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use self::control::{Checkpoint, VcpuControl};
use self::exits::{handle_exit, recover_internal_error, Next, VcpuFailure};
use crate::machine::boot::BootState;
use crate::machine::memory::GuestRam;
use crate::machine::outcome::{Failure, StopSink};

pub mod control;
pub mod exits;
pub mod state;

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

/// Starts the thread of vCPU `index`; with `cpu`, the thread is pinned to
/// that host CPU before it runs any guest code (see
/// [`crate::machine::backend_quirks`]).
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
            let pinned = cpu.map_or(Ok(()), crate::machine::backend_quirks::pin_current_thread);
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
                ctx.sink.fail(Failure::Vcpu(f));
                break;
            }
        }
    }
    KVM_RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
}
