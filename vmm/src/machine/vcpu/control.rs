//! Run control shared by all vCPU threads: running, paused (parked outside
//! KVM_RUN, where saving and restoring their state happens on their own
//! threads), stopping.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use kvm_ioctls::VcpuFd;

use super::state::{self, VcpuState, VcpuStateError};

/// What the VMM wants the vCPUs to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requested {
    /// Run the guest.
    Run,
    /// Park outside KVM_RUN until asked to run again.
    Pause,
    /// Leave the run loop.
    Stop,
}

/// What a vCPU thread does after [`VcpuControl::checkpoint`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Checkpoint {
    /// Run the guest.
    Run,
    /// A pause waits: first let KVM complete the exit just handled (an
    /// MMIO or port access finishes inside the next KVM_RUN), without
    /// running guest code.
    FinishIo,
    /// Leave the run loop.
    Stop,
}

/// Work a parked vCPU does on its own thread.
#[derive(Clone)]
enum ParkedCommand {
    Save,
    Restore(Arc<Vec<VcpuState>>),
    /// Work on the vCPU's file descriptor.
    Run(ParkedWork),
}

/// Work a parked vCPU does on its own file descriptor (given its index).
pub type ParkedWork = Arc<dyn Fn(u8, &VcpuFd) + Send + Sync>;

type ParkedResult = Result<Option<VcpuState>, VcpuStateError>;

struct ControlState {
    requested: Requested,
    parked: usize,
    exited: usize,
    cmd_seq: u64,
    cmd: Option<ParkedCommand>,
    results: Vec<Option<ParkedResult>>,
}

/// Shared run control for all vCPU threads.
pub struct VcpuControl {
    state: Mutex<ControlState>,
    cv: Condvar,
}

impl VcpuControl {
    /// Starts in `initial` state, for `vcpus` vCPUs.
    pub fn new(initial: Requested, vcpus: usize) -> Self {
        Self {
            state: Mutex::new(ControlState {
                requested: initial,
                parked: 0,
                exited: 0,
                cmd_seq: 0,
                cmd: None,
                results: (0..vcpus).map(|_| None).collect(),
            }),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets the request and wakes parked vCPUs.
    pub fn request(&self, r: Requested) {
        self.lock().requested = r;
        self.cv.notify_all();
    }

    /// Blocks until `count` vCPUs are parked or gone.
    pub fn wait_parked(&self, count: usize) {
        let mut g = self.lock();
        while g.parked + g.exited < count {
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Has each of the `count` parked vCPUs run `cmd` on its own thread.
    fn run_parked(
        &self,
        cmd: ParkedCommand,
        count: usize,
    ) -> Result<Vec<Option<VcpuState>>, VcpuStateError> {
        let mut g = self.lock();
        for r in g.results.iter_mut() {
            *r = None;
        }
        g.cmd = Some(cmd);
        g.cmd_seq += 1;
        self.cv.notify_all();
        while g.results.iter().take(count).any(Option::is_none) {
            if g.exited > 0 {
                return Err(VcpuStateError::ThreadGone);
            }
            g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
        g.cmd = None;
        g.results
            .iter_mut()
            .take(count)
            .map(|r| r.take().unwrap_or(Ok(None)))
            .collect()
    }

    /// Has every parked vCPU save its state (the vCPUs must be paused).
    pub fn save_all(&self, count: usize) -> Result<Vec<VcpuState>, VcpuStateError> {
        Ok(self
            .run_parked(ParkedCommand::Save, count)?
            .into_iter()
            .flatten()
            .collect())
    }

    /// Has each of the `count` parked vCPUs run `f` on its own thread, all
    /// at once; returns when all are done (the vCPUs must be paused).
    pub fn run_on_all(&self, count: usize, f: ParkedWork) -> Result<(), VcpuStateError> {
        self.run_parked(ParkedCommand::Run(f), count).map(|_| ())
    }

    /// Has every parked vCPU load `states[index]` (the vCPUs must be paused).
    pub fn restore_all(&self, states: Vec<VcpuState>) -> Result<(), VcpuStateError> {
        let count = states.len();
        self.run_parked(ParkedCommand::Restore(Arc::new(states)), count)
            .map(|_| ())
    }

    /// Called by a vCPU thread before each KVM_RUN: parks while paused
    /// (running save/restore commands) and says what to do next. With
    /// `io_pending` (the last KVM_RUN ended in an exit the VMM handled,
    /// which KVM completes in the next KVM_RUN) a pause first returns
    /// [`Checkpoint::FinishIo`]: the vCPU must not park, and have its state
    /// saved or replaced, halfway through an instruction. Deciding that
    /// here, under the lock a pause request takes, leaves no window for a
    /// pause to slip in between.
    pub(super) fn checkpoint(
        &self,
        index: u8,
        fd: &VcpuFd,
        msrs: &[u32],
        seen: &mut u64,
        io_pending: bool,
    ) -> Checkpoint {
        let mut g = self.lock();
        loop {
            match g.requested {
                Requested::Run => return Checkpoint::Run,
                Requested::Stop => return Checkpoint::Stop,
                Requested::Pause if io_pending => return Checkpoint::FinishIo,
                Requested::Pause => {
                    g.parked += 1;
                    self.cv.notify_all();
                    while g.requested == Requested::Pause {
                        if g.cmd_seq != *seen {
                            *seen = g.cmd_seq;
                            // The work runs unlocked, so that all vCPUs do
                            // theirs at once; the requester waits for every
                            // result and changes nothing meanwhile.
                            let cmd = g.cmd.clone();
                            drop(g);
                            let r = match cmd {
                                Some(ParkedCommand::Save) => state::save(index, fd, msrs).map(Some),
                                Some(ParkedCommand::Restore(states)) => {
                                    match states.get(index as usize) {
                                        Some(st) => state::restore(index, fd, st).map(|_| None),
                                        None => Ok(None),
                                    }
                                }
                                Some(ParkedCommand::Run(f)) => {
                                    f(index, fd);
                                    Ok(None)
                                }
                                None => Ok(None),
                            };
                            g = self.lock();
                            if let Some(slot) = g.results.get_mut(index as usize) {
                                *slot = Some(r);
                            }
                            self.cv.notify_all();
                            continue;
                        }
                        g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
                    }
                    g.parked -= 1;
                }
            }
        }
    }

    pub(super) fn mark_exited(&self) {
        self.lock().exited += 1;
        self.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vcpu() -> (kvm_ioctls::VmFd, VcpuFd) {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm (run as root)");
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        let fd = vm.create_vcpu(0).expect("KVM_CREATE_VCPU");
        (vm, fd)
    }

    /// A pause never parks a vCPU whose last exit KVM has yet to complete:
    /// it is told to finish that first, and parks once nothing is pending.
    #[test]
    fn a_pause_first_lets_kvm_finish_a_pending_exit() {
        let (_vm, fd) = vcpu();
        let control = Arc::new(VcpuControl::new(Requested::Pause, 1));
        let mut seen = 0;
        assert_eq!(
            control.checkpoint(0, &fd, &[], &mut seen, true),
            Checkpoint::FinishIo
        );
        // Nothing pending: it parks until the VM runs again.
        let c = control.clone();
        let parked = std::thread::spawn(move || {
            let mut seen = 0;
            c.checkpoint(0, &fd, &[], &mut seen, false)
        });
        control.wait_parked(1);
        control.request(Requested::Run);
        assert_eq!(parked.join().unwrap(), Checkpoint::Run);
        let (_vm, fd) = vcpu();
        assert_eq!(
            control.checkpoint(0, &fd, &[], &mut seen, true),
            Checkpoint::Run
        );
        control.request(Requested::Stop);
        assert_eq!(
            control.checkpoint(0, &fd, &[], &mut seen, true),
            Checkpoint::Stop
        );
    }
}
