//! Interrupt lines backed by eventfds (registered with KVM as irqfds).

use vm_superio::Trigger;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// An edge-triggered interrupt line: writing the eventfd raises the GSI it
/// is registered for with KVM_IRQFD.
pub struct IrqLine {
    evt: EventFd,
}

impl IrqLine {
    /// Creates a new line (not yet registered with KVM).
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Wraps an existing eventfd (e.g. a clone of one KVM already knows).
    pub fn from_eventfd(evt: EventFd) -> Self {
        Self { evt }
    }

    /// The eventfd to register with KVM_IRQFD.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

impl Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.evt.write(1)
    }
}
