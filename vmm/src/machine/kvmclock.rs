//! kvmclock as a component: the guest's paravirtual clock.

use std::sync::Arc;

use devices::persist::Persist;
use kvm_bindings::kvm_clock_data;
use kvm_ioctls::VmFd;

/// The kvmclock of a VM.
pub struct KvmClock(pub Arc<VmFd>);

/// The clock as KVM_GET_CLOCK gives it.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct ClockState {
    /// Nanoseconds and flags.
    pub clock: kvm_clock_data,
}

impl Persist for KvmClock {
    type State = ClockState;
    type Error = kvm_ioctls::Error;
    const KIND: &'static str = "kvmclock";
    const VERSION: u32 = 1;

    fn save(&self) -> Result<ClockState, kvm_ioctls::Error> {
        Ok(ClockState {
            clock: self.0.get_clock()?,
        })
    }

    /// Without KVM_CLOCK_REALTIME / HOST_TSC: kvmclock continues from the
    /// snapshot instant instead of jumping by the time the snapshot sat on
    /// disk (the guest sees one continuous run, as its timeouts expect).
    fn restore(&mut self, s: ClockState) -> Result<(), kvm_ioctls::Error> {
        let mut clock = s.clock;
        clock.flags = 0;
        self.0.set_clock(&clock)?;
        if let Ok(now) = self.0.get_clock() {
            tracing::debug!(
                "kvmclock restored to {} ns (saved {} ns, flags {:#x})",
                now.clock,
                s.clock.clock,
                s.clock.flags
            );
        }
        Ok(())
    }
}
