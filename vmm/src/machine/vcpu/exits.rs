//! What a vCPU does with KVM's exits: port and MMIO accesses go to the
//! buses, the guest's own stop requests to the exit notifier, and the
//! emulator's known gaps (int3, fwait at CPL 0) are recovered from.

use devices::exit::GuestExit;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress};

use super::VcpuContext;
use crate::machine::memory::GuestRam;

/// What the run loop does after an exit.
pub(super) enum Next {
    /// Run the guest again.
    Continue,
    /// Leave the run loop.
    Stop,
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

pub(super) fn handle_exit(
    index: u8,
    exit: VcpuExit<'_>,
    ctx: &VcpuContext,
) -> Result<Next, VcpuFailure> {
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

/// The guest-physical addresses of the vCPU's instruction and stack
/// pointers (those its page tables map). Translating them reads the guest's
/// page tables.
pub fn first_touches(fd: &VcpuFd) -> Vec<u64> {
    let (Ok(regs), Ok(sregs)) = (fd.get_regs(), fd.get_sregs()) else {
        return vec![];
    };
    let long = sregs.efer & 0x400 != 0; // long mode: flat CS and SS
    let linear = |base: u64, off: u64| if long { off } else { base.wrapping_add(off) };
    [
        linear(sregs.cs.base, regs.rip),
        linear(sregs.ss.base, regs.rsp),
    ]
    .into_iter()
    .filter_map(|l| fd.translate_gva(l).ok())
    .filter(|t| t.valid != 0)
    .map(|t| t.physical_address)
    .collect()
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
pub(super) fn recover_internal_error(
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
