//! The debug-exit port (isa-debug-exit convention, port 0x501): a byte
//! written there ends the VM with that byte as its status.

use std::sync::Arc;

use crate::bus::BusDevice;
use crate::exit::{ExitNotifier, GuestExit};

/// The conventional port of the debug-exit device.
pub const DEBUG_EXIT_PORT: u16 = 0x501;

/// Ends the VM with the status the guest writes.
pub struct DebugExit {
    notifier: Arc<ExitNotifier>,
}

impl DebugExit {
    /// Creates the device.
    pub fn new(notifier: Arc<ExitNotifier>) -> Self {
        Self { notifier }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 {
            if let Some(&status) = data.first() {
                self.notifier.notify(GuestExit::Status(status));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_byte_ends_the_vm() {
        let n = Arc::new(ExitNotifier::new().unwrap());
        let mut d = DebugExit::new(n.clone());
        d.write(1, &[5]);
        assert_eq!(n.exit(), None);
        d.write(0, &[7]);
        assert_eq!(n.exit(), Some(GuestExit::Status(7)));
    }
}
