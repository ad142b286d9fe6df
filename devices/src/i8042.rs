//! The i8042 keyboard controller, reduced to what guests use to reset the
//! machine (vm-superio's model), on ports 0x60-0x64.

use std::sync::Arc;

use vm_superio::{I8042Device, Trigger};

use crate::bus::BusDevice;
use crate::exit::{ExitNotifier, GuestExit};
use crate::persist::Persist;

/// First port of the i8042 (data); the command port is base + 4.
pub const I8042_PORT: u16 = 0x60;
/// Ports covered: 0x60..=0x64.
pub const I8042_PORT_LEN: u16 = 5;

/// Trigger that turns the i8042 reset line into a guest exit.
pub struct ResetTrigger(Arc<ExitNotifier>);

impl Trigger for ResetTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.notify(GuestExit::Reset);
        Ok(())
    }
}

/// Bus adapter around vm-superio's i8042.
pub struct I8042 {
    inner: I8042Device<ResetTrigger>,
}

impl I8042 {
    /// Creates the controller; a CPU reset command ends the VM.
    pub fn new(notifier: Arc<ExitNotifier>) -> Self {
        Self {
            inner: I8042Device::new(ResetTrigger(notifier)),
        }
    }
}

/// The i8042's state: none. vm-superio's model keeps no registers (it
/// answers the reset command and reads back fixed values), so there is
/// nothing to carry over; the component still has a place in a snapshot
/// so that a later model with state can add it.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042State {}

impl Persist for I8042 {
    type State = I8042State;
    type Error = std::convert::Infallible;
    const KIND: &'static str = "i8042";
    const VERSION: u32 = 1;

    fn save(&self) -> Result<I8042State, Self::Error> {
        Ok(I8042State {})
    }

    fn restore(&mut self, _state: I8042State) -> Result<(), Self::Error> {
        Ok(())
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let v = self.inner.read(offset as u8);
        data.fill(v);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&v) = data.first() {
            // The trigger cannot fail (Infallible).
            let _ = self.inner.write(offset as u8, v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes and reads of any port offset and value: never a panic, and
    /// only the reset command (0xfe to the command port) ends the VM.
    #[test]
    fn fuzz_ports() {
        fuzzing::run("i8042 ports", 3000, 64, |u| {
            let n = Arc::new(ExitNotifier::new().unwrap());
            let mut d = I8042::new(n.clone());
            let mut reset = false;
            for _ in 0..u.int_in_range(1..=16)? {
                let off = u.int_in_range(0..=7u64)?;
                let v: u8 = u.arbitrary()?;
                if u.arbitrary()? {
                    let mut b = [0u8];
                    d.read(off, &mut b);
                } else {
                    d.write(off, &[v]);
                    reset |= off == 4 && v == 0xfe;
                }
            }
            assert_eq!(n.exit().is_some(), reset);
            Ok(())
        });
    }

    #[test]
    fn reset_command_ends_the_vm() {
        let n = Arc::new(ExitNotifier::new().unwrap());
        let mut d = I8042::new(n.clone());
        d.write(0, &[0xfe]);
        assert_eq!(n.exit(), None);
        d.write(4, &[0xfe]);
        assert_eq!(n.exit(), Some(GuestExit::Reset));
    }
}
