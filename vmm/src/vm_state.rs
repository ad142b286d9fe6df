//! VM-wide state for snapshots: the in-kernel PIC pair and IOAPIC, the PIT,
//! and kvmclock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

/// Errors saving or restoring VM state.
#[derive(Debug, thiserror::Error)]
#[error("cannot {op} {what}: {source}")]
pub struct VmStateError {
    /// "save" or "restore".
    pub op: &'static str,
    /// Which state.
    pub what: &'static str,
    /// The KVM error.
    pub source: kvm_ioctls::Error,
}

/// In-kernel device and clock state.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmState {
    /// Master 8259.
    pub pic_master: kvm_irqchip,
    /// Slave 8259.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
    /// 8254 PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

fn chip(vm: &VmFd, id: u32, what: &'static str) -> Result<kvm_irqchip, VmStateError> {
    let mut c = kvm_irqchip {
        chip_id: id,
        ..Default::default()
    };
    vm.get_irqchip(&mut c).map_err(|source| VmStateError {
        op: "save",
        what,
        source,
    })?;
    Ok(c)
}

/// Saves the state of a paused VM.
pub fn save(vm: &VmFd) -> Result<VmState, VmStateError> {
    let err = |what| {
        move |source| VmStateError {
            op: "save",
            what,
            source,
        }
    };
    Ok(VmState {
        pic_master: chip(vm, KVM_IRQCHIP_PIC_MASTER, "the master PIC")?,
        pic_slave: chip(vm, KVM_IRQCHIP_PIC_SLAVE, "the slave PIC")?,
        ioapic: chip(vm, KVM_IRQCHIP_IOAPIC, "the IOAPIC")?,
        pit: vm.get_pit2().map_err(err("the PIT"))?,
        clock: vm.get_clock().map_err(err("kvmclock"))?,
    })
}

/// Restores into a new VM (irqchip and PIT created).
pub fn restore(vm: &VmFd, s: &VmState) -> Result<(), VmStateError> {
    let err = |what| {
        move |source| VmStateError {
            op: "restore",
            what,
            source,
        }
    };
    vm.set_pit2(&s.pit).map_err(err("the PIT"))?;
    vm.set_irqchip(&s.pic_master)
        .map_err(err("the master PIC"))?;
    vm.set_irqchip(&s.pic_slave).map_err(err("the slave PIC"))?;
    vm.set_irqchip(&s.ioapic).map_err(err("the IOAPIC"))?;
    // No KVM_CLOCK_REALTIME / HOST_TSC: kvmclock continues from the
    // snapshot instant instead of jumping by the time the snapshot sat on
    // disk (the guest sees one continuous run, as its timeouts expect).
    let mut clock = s.clock;
    clock.flags = 0;
    vm.set_clock(&clock).map_err(err("kvmclock"))?;
    if let Ok(now) = vm.get_clock() {
        tracing::debug!(
            "kvmclock restored to {} ns (saved {} ns, flags {:#x})",
            now.clock,
            s.clock.clock,
            s.clock.flags
        );
    }
    Ok(())
}
