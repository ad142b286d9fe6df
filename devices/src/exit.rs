//! How devices tell the VMM that the guest asked to stop.

use std::sync::Mutex;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the guest stopped itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestExit {
    /// The guest wrote a status byte to the debug-exit port.
    Status(u8),
    /// The guest reset the machine (i8042 reset line or a KVM reset event).
    Reset,
    /// The guest powered off (KVM shutdown system event).
    PowerOff,
}

/// Records the first exit request and wakes the VMM's event loop.
pub struct ExitNotifier {
    first: Mutex<Option<GuestExit>>,
    evt: EventFd,
}

impl ExitNotifier {
    /// Creates a notifier with a non-blocking eventfd.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            first: Mutex::new(None),
            evt: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Records `exit` (only the first one counts) and signals the eventfd.
    pub fn notify(&self, exit: GuestExit) {
        let mut first = self.first.lock().unwrap_or_else(|e| e.into_inner());
        if first.is_none() {
            *first = Some(exit);
        }
        if let Err(e) = self.evt.write(1) {
            tracing::error!("cannot signal guest exit: {e}");
        }
    }

    /// Wakes the event loop without recording a guest exit (the VMM keeps
    /// its own reason, e.g. a vCPU failure).
    pub fn wake(&self) {
        if let Err(e) = self.evt.write(1) {
            tracing::error!("cannot wake the event loop: {e}");
        }
    }

    /// The first exit requested, if any.
    pub fn exit(&self) -> Option<GuestExit> {
        *self.first.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The eventfd to poll.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_exit_wins() {
        let n = ExitNotifier::new().unwrap();
        assert_eq!(n.exit(), None);
        n.notify(GuestExit::Status(3));
        n.notify(GuestExit::Reset);
        assert_eq!(n.exit(), Some(GuestExit::Status(3)));
        assert_eq!(n.eventfd().read().unwrap(), 2);
    }
}
