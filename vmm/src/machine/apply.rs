//! Applying a snapshot to a VM, in place: the counterpart of `capture.rs`,
//! and the one restore path (a VM started from a snapshot is an empty VM
//! with a snapshot applied). docs/architecture.md walks through it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use snapshot::disk::Disk;
use snapshot::lazy::{LazyLoader, LazyOptions};
use snapshot::memory_file::MemoryFile;

use vm_memory::{Bytes, GuestAddress};

use super::backend_quirks;
use super::outcome::Failure;
use super::state::MachineState;
use super::vcpu::exits::first_touches;
use super::vm::{set_memslots, Vm, VmError};

/// What an apply needs besides the VM.
pub struct ApplyRequest<'a> {
    /// The snapshot's state.bin.
    pub state: MachineState,
    /// Its memory.bin.
    pub memory: &'a Path,
    /// The new working layer of each disk (over the snapshot's layers).
    pub disks: &'a [PathBuf],
    /// Load all memory before returning (the baseline of `snapvm bench
    /// apply`) instead of lazily.
    pub eager: bool,
    /// memory.bin staged on tmpfs (snapshot/src/shared_memory.rs): guest
    /// RAM becomes a private, copy-on-write mapping of it instead of being
    /// loaded (clones).
    pub shared: Option<&'a Path>,
}

impl Vm {
    /// Replaces this VM's state with a snapshot's, in place; the vCPUs must
    /// be paused. Everything is checked first (memory layout, memory.bin's
    /// trailer, each component's state), so a snapshot that does not fit
    /// changes nothing. Then: devices reset, guest memory replaced by
    /// memory.bin's (lazily: pages arrive on first touch, the rest in the
    /// background), disks switched to their new layers, every component
    /// restored. An error after the checks leaves the VM partly replaced:
    /// it is stopped with the reason rather than resumed.
    pub fn apply(&self, req: ApplyRequest<'_>) -> Result<(), VmError> {
        let regions = self.memory_layout();
        if req.state.memory != regions {
            return Err(VmError::LayoutMismatch {
                saved: req.state.memory.clone(),
                vm: regions,
            });
        }
        self.check_disk_count(req.disks.len())?;
        self.components.check(&req.state.components)?;
        let file = MemoryFile::open(req.memory)?;
        file.check_layout(&regions)?;
        let replaced = match req.shared {
            Some(staged) => self.share_state(&req.state, staged, req.disks),
            None => self.replace_state(&req.state, file, req.disks, req.eager),
        };
        // The guest's memory goes on in another context: a new generation
        // (devices/src/generation.rs), before any vCPU runs again.
        self.generation.renew();
        if let Err(e) = replaced {
            // Part of the VM's state is the snapshot's by now: stop it
            // rather than let it resume on a mix of two states.
            let e = Arc::new(e);
            self.sink.fail(Failure::ApplyFailed(e.clone()));
            return Err(VmError::Partial(e));
        }
        Ok(())
    }

    /// The part of [`Vm::apply`] after its checks for a clone: guest RAM
    /// maps the staged memory privately; nothing is loaded.
    fn share_state(
        &self,
        state: &MachineState,
        staged: &Path,
        disks: &[PathBuf],
    ) -> Result<(), VmError> {
        self.quiesce_devices();
        if let Some(l) = self.lazy.lock().unwrap_or_else(|e| e.into_inner()).take() {
            l.abandon();
        }
        set_memslots(
            &self.vm_fd,
            &self.ram,
            false,
            "remove guest memory from KVM for an apply",
        )?;
        snapshot::shared_memory::map_private(
            staged,
            self.tracker.regions(),
            self.tracker.write_protector(),
        )?;
        set_memslots(
            &self.vm_fd,
            &self.ram,
            true,
            "register guest memory with KVM again",
        )?;
        self.restore_components(state, disks)
    }

    /// The part of [`Vm::apply`] after its checks.
    fn replace_state(
        &self,
        state: &MachineState,
        file: MemoryFile,
        disks: &[PathBuf],
        eager: bool,
    ) -> Result<(), VmError> {
        let started = std::time::Instant::now();
        self.quiesce_devices();
        // A previous apply's load still running is dropped (its memory is
        // replaced next).
        if let Some(l) = self.lazy.lock().unwrap_or_else(|e| e.into_inner()).take() {
            l.abandon();
        }
        // A chunk that fails its checksum (or cannot be placed) stops the VM
        // with the reason rather than letting it run on wrong memory.
        let sink = self.sink.clone();
        let quiesced = started.elapsed();
        // KVM lets go of guest memory before it is replaced, and gets it
        // back once the new memory is in place (see `set_memslots`).
        set_memslots(
            &self.vm_fd,
            &self.ram,
            false,
            "remove guest memory from KVM for an apply",
        )?;
        let removed = started.elapsed();
        let loader = LazyLoader::start(
            self.tracker.regions(),
            file,
            self.tracker.write_protector().clone(),
            Box::new(move |e| sink.fail(Failure::MemoryLoad(e))),
            LazyOptions {
                huge_pages: backend_quirks::huge_pages(self.config.huge_pages),
                check_old_memory: self.check_old_memory.clone(),
            },
        );
        let fresh = started.elapsed();
        set_memslots(
            &self.vm_fd,
            &self.ram,
            true,
            "register guest memory with KVM again",
        )?;
        let mut loader = loader?;
        if eager {
            // All memory before the state (the baseline of `bench apply`).
            loader.free_old_memory();
            loader.finish()?;
            return self.restore_components(state, disks);
        }
        let replaced = started.elapsed();
        self.restore_components(state, disks)?;
        let loaded = started.elapsed();
        self.touch_first_pages()?;
        if let Some(e) = loader.error() {
            return Err(VmError::MemoryLoad(e));
        }
        tracing::debug!(
            "apply: devices quiet after {} us, memory slots removed after {} us, fresh memory after {} us, memory replaced after {} us, state loaded after {} us, first pages in after {} us",
            quiesced.as_micros(),
            removed.as_micros(),
            fresh.as_micros(),
            replaced.as_micros(),
            loaded.as_micros(),
            started.elapsed().as_micros()
        );
        loader.start_prefetch();
        loader.free_old_memory();
        *self.lazy.lock().unwrap_or_else(|e| e.into_inner()) = Some(loader);
        Ok(())
    }

    /// Switches the disks to their new layers, then restores every
    /// component: a walk over the machine's components.
    fn restore_components(&self, state: &MachineState, disks: &[PathBuf]) -> Result<(), VmError> {
        for ((backend, layer), d) in self.disk_backends.iter().zip(disks).zip(&self.config.disks) {
            backend.replace(Disk::open(layer, d.readonly)?);
        }
        self.components.restore_all(&state.components)?;
        Ok(())
    }

    /// Brings in, before the vCPUs run again, the memory each of them needs
    /// first: the pages its instruction and stack pointers map to, and the
    /// page tables on the way there (translating reads them). Their faults
    /// would come at once anyway; served here, a chunk of memory.bin that
    /// is corrupt where the guest resumes fails the apply before the guest
    /// runs a single instruction on it.
    fn touch_first_pages(&self) -> Result<(), VmError> {
        let ram = self.ram.clone();
        let touch = Arc::new(move |_index: u8, fd: &kvm_ioctls::VcpuFd| {
            for gpa in first_touches(fd) {
                // The read faults the page in (the loader serves it); its
                // value does not matter.
                let _ = ram.memory().read_obj::<u8>(GuestAddress(gpa));
            }
        });
        Ok(self.control.run_on_all(self.handles.len(), touch)?)
    }

    /// Completes a lazy memory load in progress (live snapshots need all of
    /// memory in place and write tracking back).
    pub fn finish_lazy_load(&self) -> Result<(), VmError> {
        let loader = self.lazy.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(l) = loader {
            let took = l.finish()?;
            tracing::info!("lazy memory load complete after {} ms", took.as_millis());
        }
        Ok(())
    }

    /// A lazy memory load still in progress: (2 MiB chunks loaded, in all).
    pub fn memory_load(&self) -> Option<(u64, u64)> {
        let l = self.lazy.lock().unwrap_or_else(|e| e.into_inner());
        l.as_ref().filter(|l| !l.finished()).map(|l| l.progress())
    }
}
