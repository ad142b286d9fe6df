//! How a VM run ends, and where the threads that end it report why.

use std::sync::{Arc, Mutex};

use devices::exit::{ExitNotifier, GuestExit};
use snapshot::lazy::LazyError;

use super::vcpu::exits::VcpuFailure;
use super::vm::VmError;

/// Why the VMM stopped the VM on its own.
#[derive(Debug, Clone)]
pub enum Failure {
    /// A vCPU hit something it could not handle.
    Vcpu(VcpuFailure),
    /// Guest memory could not be loaded from a snapshot after an apply.
    MemoryLoad(Arc<LazyError>),
    /// An apply failed after it had begun replacing the VM's state.
    ApplyFailed(Arc<VmError>),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Vcpu(v) => write!(f, "{v}"),
            Failure::MemoryLoad(e) => write!(
                f,
                "the applied snapshot's memory could not be loaded ({e}); the VM was stopped rather than run on wrong memory"
            ),
            Failure::ApplyFailed(e) => write!(
                f,
                "applying a snapshot failed after it had begun replacing the VM's state ({e}); the VM was stopped rather than resumed on a mix of two states"
            ),
        }
    }
}

/// How a VM run ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The guest asked to stop (status port, reset, power-off).
    Guest(GuestExit),
    /// The VMM stopped it (a vCPU failure, a failed apply or memory load).
    Failure(Failure),
    /// The VMM was told to stop (signal number; 0 for the API).
    Stopped(i32),
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Guest(GuestExit::Status(s)) => write!(f, "the guest exited with status {s}"),
            Outcome::Guest(GuestExit::Reset) => write!(f, "the guest reset the machine"),
            Outcome::Guest(GuestExit::PowerOff) => write!(f, "the guest powered off"),
            Outcome::Failure(e) => write!(f, "{e}"),
            Outcome::Stopped(0) => write!(f, "stopped by request"),
            Outcome::Stopped(sig) => write!(f, "stopped by signal {sig}"),
        }
    }
}

impl Outcome {
    /// The process exit code for this outcome.
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::Guest(GuestExit::Status(s)) => *s as i32,
            Outcome::Guest(GuestExit::Reset) | Outcome::Guest(GuestExit::PowerOff) => 0,
            Outcome::Failure(_) => 1,
            Outcome::Stopped(sig) => 128 + sig,
        }
    }
}

/// Where vCPU threads, the lazy loader and an apply report why they
/// stopped the VM.
pub struct StopSink {
    /// Guest-requested exits (and the event-loop wake-up).
    pub exit: Arc<ExitNotifier>,
    /// The first failure.
    pub failure: Mutex<Option<Failure>>,
}

impl StopSink {
    /// A sink waking the event loop through `exit`.
    pub fn new(exit: Arc<ExitNotifier>) -> Self {
        Self {
            exit,
            failure: Mutex::new(None),
        }
    }

    /// Records the first failure and asks the VMM to stop the VM.
    pub fn fail(&self, f: Failure) {
        tracing::debug!("{f}");
        let mut g = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            *g = Some(f);
        }
        drop(g);
        self.exit.wake();
    }

    /// Why the VM wants to stop, if it does.
    pub fn outcome(&self) -> Option<Outcome> {
        if let Some(f) = self
            .failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
        {
            return Some(Outcome::Failure(f));
        }
        self.exit.exit().map(Outcome::Guest)
    }
}
