//! `snapvm run`: one VM in the foreground, console on stdin/stdout, until
//! the guest stops it or the user presses Ctrl-C.

use std::os::fd::AsRawFd;

use devices::serial::SerialInput;
use event_manager::MutEventSubscriber;

use crate::config::VmConfig;
use crate::daemon::event_loop::{event_loop, RunError};
use crate::hooks::Hooks;
use crate::machine::outcome::Outcome;
use crate::machine::vm::{Vm, VmError, Wiring};

/// Errors of `snapvm run`.
#[derive(Debug, thiserror::Error)]
pub enum ForegroundError {
    /// The VM could not be created or started.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The event loop failed.
    #[error(transparent)]
    Run(#[from] RunError),
}

/// Boots `config` with the console on stdio and runs it to the end.
pub fn run_foreground(config: &VmConfig, hooks: &Hooks) -> Result<Outcome, ForegroundError> {
    let mut vm = Vm::create(config, Wiring::new(Box::new(std::io::stdout()))?, hooks)?;
    let stdin = std::io::stdin();
    let input: Box<dyn MutEventSubscriber> = Box::new(SerialInput::new(vm.serial(), &stdin));
    vm.start(false)?;
    let sig = event_loop(vec![vm.stop_eventfd().as_raw_fd()], vec![input])?;
    vm.stop();
    Ok(match vm.outcome() {
        Some(o) => o,
        None => Outcome::Stopped(sig.unwrap_or(0)),
    })
}
