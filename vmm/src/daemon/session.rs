//! The session: what one VMM process runs. It owns the VM, the VM
//! directory and its configuration, and the power state, so that the
//! snapshot operations (take_snapshot in snapshots/create.rs,
//! apply_snapshot and apply_prepared in snapshots/restore.rs) are methods
//! on it rather than functions threading those through.
//!
//! Lock order: the power state, then the VM. Pausing, resuming, capturing
//! and applying take both in that order.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use devices::exit::ExitNotifier;

use super::console_hub::ConsoleHub;
use crate::api::VmState;
use crate::config::VmConfig;
use crate::hooks::Hooks;
use crate::machine::tap_pool::TapPool;
use crate::machine::vm::{Vm, VmError, Wiring};
use crate::vmdir::{VmDir, VmToml};

/// Whether the vCPUs of a running VMM run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Power {
    /// vCPUs run.
    Running,
    /// vCPUs are parked.
    Paused,
}

impl From<Power> for VmState {
    fn from(p: Power) -> Self {
        match p {
            Power::Running => VmState::Running,
            Power::Paused => VmState::Paused,
        }
    }
}

/// What the VMs of a session are connected to: the console and the stop
/// notifier the VMM's event loop watches. Every VM the session builds gets
/// the same.
#[derive(Clone)]
pub struct Links {
    /// Console output and input.
    pub console: ConsoleHub,
    /// Where the guest's own stop requests go.
    pub exit: Arc<ExitNotifier>,
    /// The TAP devices the VMM holds open.
    pub taps: Arc<TapPool>,
}

impl Links {
    /// The wiring of a new VM.
    pub fn wiring(&self) -> Wiring {
        Wiring {
            serial_out: Box::new(self.console.clone()),
            exit: self.exit.clone(),
            taps: self.taps.clone(),
        }
    }
}

/// One VMM's VM, directory, configuration and power state.
pub struct Session {
    vm: Mutex<Vm>,
    dir: VmDir,
    toml: Mutex<VmToml>,
    power: Mutex<Power>,
    hooks: Hooks,
    links: Links,
    started: Instant,
}

impl Session {
    /// A session for `vm` (whose vCPUs are in `power`), created from the
    /// VM directory `dir` with configuration `toml`; `links` are what `vm`
    /// was built with.
    pub fn new(vm: Vm, dir: VmDir, toml: VmToml, power: Power, hooks: Hooks, links: Links) -> Self {
        links.console.set_input(vm.serial());
        Self {
            vm: Mutex::new(vm),
            dir,
            toml: Mutex::new(toml),
            power: Mutex::new(power),
            hooks,
            links,
            started: Instant::now(),
        }
    }

    /// The console.
    pub fn console(&self) -> &ConsoleHub {
        &self.links.console
    }

    /// Builds an empty VM with `config`'s hardware, wired like the
    /// session's, its vCPUs started paused (for an apply).
    pub fn build_empty(&self, config: &VmConfig) -> Result<Vm, VmError> {
        let mut vm = Vm::create_empty(config, self.links.wiring(), &self.hooks)?;
        vm.start(true)?;
        Ok(vm)
    }

    /// The VM directory.
    pub fn dir(&self) -> &VmDir {
        &self.dir
    }

    /// Debug aids and test hooks.
    pub fn hooks(&self) -> &Hooks {
        &self.hooks
    }

    /// The configuration as vm.toml has it now.
    pub fn toml(&self) -> VmToml {
        self.toml.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the configuration (after vm.toml was written).
    pub(crate) fn set_toml(&self, t: VmToml) {
        *self.toml.lock().unwrap_or_else(|e| e.into_inner()) = t;
    }

    /// The VM.
    pub fn vm(&self) -> MutexGuard<'_, Vm> {
        self.vm.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The VM, unless a job holds it.
    pub fn try_vm(&self) -> Option<MutexGuard<'_, Vm>> {
        self.vm.try_lock().ok()
    }

    /// The power state.
    pub fn power(&self) -> Power {
        *self.power_lock()
    }

    /// The power state, held (take it before the VM).
    pub(crate) fn power_lock(&self) -> MutexGuard<'_, Power> {
        self.power.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Seconds since the session began.
    pub fn uptime_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Pauses the vCPUs; false if they were paused already.
    pub fn pause(&self) -> bool {
        let mut power = self.power_lock();
        if *power == Power::Paused {
            return false;
        }
        self.vm().pause();
        *power = Power::Paused;
        true
    }

    /// Resumes the vCPUs; false if they were running already.
    pub fn resume(&self) -> bool {
        let mut power = self.power_lock();
        if *power == Power::Running {
            return false;
        }
        self.vm().resume();
        *power = Power::Running;
        true
    }
}
