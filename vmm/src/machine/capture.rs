//! Capturing a running (or paused) VM for a live snapshot: the pause
//! window. docs/architecture.md walks through it step by step; this is
//! its code. The counterpart is `apply.rs`.

use std::path::PathBuf;
use std::time::Instant;

use snapshot::live::ArmedSnapshot;
use snapshot::memory_file::MemoryFileWriter;

use super::state::SavedMachine;
use super::vm::{Vm, VmError};

/// What a capture needs besides the VM.
pub struct CaptureRequest<'a> {
    /// Whether the vCPUs run (they are paused for the capture and resumed
    /// after it) or are paused already (they stay paused).
    pub running: bool,
    /// Keep a running VM paused after the capture (the stop-and-copy
    /// baseline); the caller resumes it.
    pub keep_paused: bool,
    /// The pre-created overlay each disk moves its writes to, in disk
    /// order; None for a disk that is not forked (an independent disk).
    pub new_layers: &'a [Option<PathBuf>],
    /// Guest memory, armed for the snapshot ([`snapshot::live::Tracker::arm`]).
    pub armed: &'a mut ArmedSnapshot,
    /// memory.bin, which the frozen memory streams into afterwards.
    pub memory: MemoryFileWriter,
}

/// A capture that succeeded.
pub struct Captured {
    /// Every component's state at the instant (encode it once the guest
    /// runs again).
    pub state: SavedMachine,
    /// How long the vCPUs were paused for it, microseconds.
    pub pause_us: u64,
    /// When the pause began.
    pub paused_at: Instant,
}

/// A capture that failed: memory is released again and the VM runs (or
/// stays paused) as before. `forked` says which disks had already moved to
/// their new layer, which they keep (a valid chain).
#[derive(Debug, thiserror::Error)]
#[error("{source}")]
pub struct CaptureError {
    /// What failed.
    pub source: VmError,
    /// Per disk, whether it writes its new layer now.
    pub forked: Vec<bool>,
}

impl Vm {
    /// The pause window of a live snapshot: pause the vCPUs, quiesce the
    /// devices, save every component's state, fork each disk onto its new
    /// layer, freeze guest memory (from here on memory.bin gets the
    /// instant's pages), unquiesce, resume. The state returned is exactly
    /// the VM at that instant.
    pub fn capture(&self, req: CaptureRequest<'_>) -> Result<Captured, CaptureError> {
        let CaptureRequest {
            running,
            keep_paused,
            new_layers,
            armed,
            memory,
        } = req;
        let paused_at = Instant::now();
        if running {
            self.pause();
        }
        let t_paused = paused_at.elapsed();
        self.quiesce_devices();
        let t_quiesced = paused_at.elapsed();
        let mut t_saved = t_quiesced;
        let mut t_forked = t_quiesced;
        let captured = self
            .check_disk_count(new_layers.len())
            .and_then(|()| self.save_state())
            .and_then(|state| {
                t_saved = paused_at.elapsed();
                for (d, l) in self.disk_backends.iter().zip(new_layers) {
                    if let Some(l) = l {
                        d.fork(l)?;
                    }
                }
                t_forked = paused_at.elapsed();
                armed.freeze(memory)?;
                Ok(state)
            });
        self.unquiesce_devices();
        tracing::debug!(
            "capture: paused after {} us, quiesced {} us, saved {} us, forked {} us, frozen {} us",
            t_paused.as_micros(),
            t_quiesced.as_micros(),
            t_saved.as_micros(),
            t_forked.as_micros(),
            paused_at.elapsed().as_micros()
        );
        let resume = running && (!keep_paused || captured.is_err());
        if resume {
            self.resume();
        }
        let pause_us = paused_at.elapsed().as_micros() as u64;
        match captured {
            Ok(state) => Ok(Captured {
                state,
                pause_us,
                paused_at,
            }),
            Err(source) => {
                armed.abort();
                let tops = self.disk_tops();
                let forked = new_layers
                    .iter()
                    .map(|l| {
                        l.as_ref()
                            .is_some_and(|l| tops.iter().any(|t| t.as_deref() == Some(l.as_path())))
                    })
                    .collect();
                Err(CaptureError { source, forked })
            }
        }
    }

    pub(super) fn check_disk_count(&self, layers: usize) -> Result<(), VmError> {
        if layers != self.disk_backends.len() {
            return Err(VmError::DiskCount {
                layers,
                disks: self.disk_backends.len(),
            });
        }
        Ok(())
    }
}
