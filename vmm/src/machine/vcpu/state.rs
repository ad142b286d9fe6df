//! A vCPU's complete architectural state for snapshots: registers, special
//! registers, FPU/SSE (xsave), XCRs, the MSRs KVM lists, the local APIC,
//! pending events, MP state and debug registers; and [`Vcpus`], the
//! component that saves and restores all of a VM's vCPUs at once.

use kvm_bindings::{
    kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
};
use std::sync::Arc;

use devices::persist::Persist;
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use super::control::VcpuControl;

/// Errors saving or restoring vCPU state.
#[derive(Debug, Clone, thiserror::Error)]
pub enum VcpuStateError {
    /// A KVM ioctl failed.
    #[error("vCPU {vcpu}: cannot {op} {what}: {source}")]
    Kvm {
        /// vCPU index.
        vcpu: u8,
        /// "save" or "restore".
        op: &'static str,
        /// Which state.
        what: &'static str,
        /// The KVM error.
        source: kvm_ioctls::Error,
    },
    /// A vCPU thread ended while its state was wanted.
    #[error("a vCPU thread has exited; its state cannot be saved or restored")]
    ThreadGone,
    /// The saved state is for another number of vCPUs.
    #[error("the snapshot has {saved} vCPUs, this VM {vcpus}")]
    Count {
        /// vCPUs in the snapshot.
        saved: usize,
        /// vCPUs of the VM.
        vcpus: usize,
    },
}

/// Everything needed to continue a vCPU exactly where it was paused.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU/SSE state (XSAVE layout).
    pub xsave: kvm_xsave,
    /// Extended control registers, if KVM provides them.
    pub xcrs: Option<kvm_xcrs>,
    /// (index, value) of every MSR KVM could read.
    pub msrs: Vec<(u32, u64)>,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// Pending exceptions, interrupts, NMIs.
    pub events: kvm_vcpu_events,
    /// Runnable, halted, waiting for SIPI...
    pub mp_state: kvm_mp_state,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
}

fn msrs_of(indices: &[u32]) -> Option<Msrs> {
    let entries: Vec<kvm_msr_entry> = indices
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).ok()
}

/// Saves vCPU `vcpu`'s state; `msr_indices` is KVM_GET_MSR_INDEX_LIST.
/// Must run on the vCPU's thread while it is outside KVM_RUN.
pub fn save(vcpu: u8, fd: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, VcpuStateError> {
    let err = |what| {
        move |source: kvm_ioctls::Error| VcpuStateError::Kvm {
            vcpu,
            op: "save",
            what,
            source,
        }
    };
    // MSRs: KVM stops at the first one it cannot read; skip it and go on.
    let mut msrs = Vec::new();
    let mut rest: &[u32] = msr_indices;
    while !rest.is_empty() {
        let Some(mut m) = msrs_of(rest) else { break };
        let n = fd.get_msrs(&mut m).map_err(err("MSRs"))?;
        msrs.extend(m.as_slice()[..n].iter().map(|e| (e.index, e.data)));
        rest = &rest[(n + 1).min(rest.len())..];
    }
    Ok(VcpuState {
        regs: fd.get_regs().map_err(err("registers"))?,
        sregs: fd.get_sregs().map_err(err("special registers"))?,
        xsave: fd.get_xsave().map_err(err("xsave"))?,
        xcrs: fd.get_xcrs().ok(),
        msrs,
        lapic: fd.get_lapic().map_err(err("local APIC"))?,
        events: fd.get_vcpu_events().map_err(err("vcpu events"))?,
        mp_state: fd.get_mp_state().map_err(err("MP state"))?,
        debugregs: fd.get_debug_regs().map_err(err("debug registers"))?,
    })
}

/// Restores a saved state into a freshly created (CPUID set) vCPU.
pub fn restore(vcpu: u8, fd: &VcpuFd, s: &VcpuState) -> Result<(), VcpuStateError> {
    let err = |what| {
        move |source: kvm_ioctls::Error| VcpuStateError::Kvm {
            vcpu,
            op: "restore",
            what,
            source,
        }
    };
    fd.set_mp_state(s.mp_state).map_err(err("MP state"))?;
    fd.set_regs(&s.regs).map_err(err("registers"))?;
    fd.set_sregs(&s.sregs).map_err(err("special registers"))?;
    // SAFETY: the xsave area was produced by KVM_GET_XSAVE on the same kind
    // of host (KVM validates it again on KVM_SET_XSAVE).
    unsafe { fd.set_xsave(&s.xsave) }.map_err(err("xsave"))?;
    if let Some(x) = &s.xcrs {
        fd.set_xcrs(x).map_err(err("XCRs"))?;
    }
    fd.set_debug_regs(&s.debugregs)
        .map_err(err("debug registers"))?;
    fd.set_lapic(&s.lapic).map_err(err("local APIC"))?;
    let mut rest: Vec<kvm_msr_entry> = s
        .msrs
        .iter()
        .map(|&(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    while !rest.is_empty() {
        let Ok(m) = Msrs::from_entries(&rest) else {
            break;
        };
        let n = fd.set_msrs(&m).map_err(err("MSRs"))?;
        if n < rest.len() {
            tracing::debug!(
                "vCPU {vcpu}: KVM refused MSR {:#x} on restore",
                rest[n].index
            );
        }
        rest.drain(..(n + 1).min(rest.len()));
    }
    fd.set_vcpu_events(&s.events).map_err(err("vcpu events"))?;
    Ok(())
}

/// All vCPUs of a VM as one component: their states are saved and
/// restored in parallel, each on its own (parked) thread, because KVM
/// wants a vCPU's ioctls from the thread that runs it.
pub struct Vcpus {
    control: Arc<VcpuControl>,
    count: usize,
}

impl Vcpus {
    /// The `count` vCPUs run by `control`.
    pub fn new(control: Arc<VcpuControl>, count: usize) -> Self {
        Self { control, count }
    }
}

impl Persist for Vcpus {
    type State = Vec<VcpuState>;
    type Error = VcpuStateError;
    const KIND: &'static str = "vcpus";
    const VERSION: u32 = 1;

    /// The vCPUs must be paused (parked).
    fn save(&self) -> Result<Vec<VcpuState>, VcpuStateError> {
        self.control.save_all(self.count)
    }

    fn check(&self, states: &Vec<VcpuState>) -> Result<(), VcpuStateError> {
        if states.len() != self.count {
            return Err(VcpuStateError::Count {
                saved: states.len(),
                vcpus: self.count,
            });
        }
        Ok(())
    }

    /// The vCPUs must be paused (parked).
    fn restore(&mut self, states: Vec<VcpuState>) -> Result<(), VcpuStateError> {
        self.check(&states)?;
        self.control.restore_all(states)
    }
}
