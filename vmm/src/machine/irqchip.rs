//! The in-kernel interrupt controllers as a component: the two 8259 PICs
//! and the IOAPIC (each vCPU's local APIC is part of its own state).

use std::sync::Arc;

use devices::persist::Persist;
use kvm_bindings::{
    kvm_irqchip, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;

/// The in-kernel irqchip of a VM (created with KVM_CREATE_IRQCHIP).
pub struct Irqchip(pub Arc<VmFd>);

/// The PICs' and the IOAPIC's registers.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct IrqchipState {
    /// Master 8259.
    pub pic_master: kvm_irqchip,
    /// Slave 8259.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
}

/// Which chip failed.
#[derive(Debug, thiserror::Error)]
#[error("{chip}: {source}")]
pub struct IrqchipError {
    /// The chip.
    pub chip: &'static str,
    /// The KVM error.
    pub source: kvm_ioctls::Error,
}

const CHIPS: [(u32, &str); 3] = [
    (KVM_IRQCHIP_PIC_MASTER, "the master PIC"),
    (KVM_IRQCHIP_PIC_SLAVE, "the slave PIC"),
    (KVM_IRQCHIP_IOAPIC, "the IOAPIC"),
];

impl Persist for Irqchip {
    type State = IrqchipState;
    type Error = IrqchipError;
    const KIND: &'static str = "kvm-irqchip";
    const VERSION: u32 = 1;

    fn save(&self) -> Result<IrqchipState, IrqchipError> {
        let get = |(chip_id, chip): (u32, &'static str)| {
            let mut c = kvm_irqchip {
                chip_id,
                ..Default::default()
            };
            self.0
                .get_irqchip(&mut c)
                .map(|_| c)
                .map_err(|source| IrqchipError { chip, source })
        };
        Ok(IrqchipState {
            pic_master: get(CHIPS[0])?,
            pic_slave: get(CHIPS[1])?,
            ioapic: get(CHIPS[2])?,
        })
    }

    fn restore(&mut self, s: IrqchipState) -> Result<(), IrqchipError> {
        for (state, (_, chip)) in [&s.pic_master, &s.pic_slave, &s.ioapic]
            .into_iter()
            .zip(CHIPS)
        {
            self.0
                .set_irqchip(state)
                .map_err(|source| IrqchipError { chip, source })?;
        }
        Ok(())
    }
}
