//! The in-kernel 8254 PIT as a component: its channels' state.

use std::sync::Arc;

use devices::persist::Persist;
use kvm_bindings::kvm_pit_state2;
use kvm_ioctls::VmFd;

/// The in-kernel PIT of a VM (created with KVM_CREATE_PIT2).
pub struct Pit(pub Arc<VmFd>);

/// The PIT's state, as KVM_GET_PIT2 gives it.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub struct PitState {
    /// Channels, flags.
    pub pit: kvm_pit_state2,
}

impl Persist for Pit {
    type State = PitState;
    type Error = kvm_ioctls::Error;
    const KIND: &'static str = "kvm-pit";
    const VERSION: u32 = 1;

    fn save(&self) -> Result<PitState, kvm_ioctls::Error> {
        Ok(PitState {
            pit: self.0.get_pit2()?,
        })
    }

    fn restore(&mut self, s: PitState) -> Result<(), kvm_ioctls::Error> {
        self.0.set_pit2(&s.pit)
    }
}
