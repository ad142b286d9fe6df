//! Applying a snapshot: prepared on disk (files checked, new working layers
//! created), then applied to the session's VM (machine/apply.rs) while the
//! metadata is recorded. This is the one restore path: an in-place apply
//! and `start --from` (an empty VM, then the same apply) both run
//! [`Session::apply_prepared`]. docs/architecture.md walks through it.

use std::path::PathBuf;
use std::time::Instant;

use snapshot::memory_file::MemoryFile;
use snapshot::tree::{PowerState, SnapshotMeta, Tree};

use super::create::CreateOptions;
use super::{overlay_on_snapshot, SnapshotError};
use crate::api::ApplyResult;
use crate::daemon::session::{Power, Session};
use crate::machine::apply::ApplyRequest;
use crate::machine::state::MachineState;
use crate::machine::vm::{Vm, VmError};
use crate::vmdir::{VmDir, VmToml};

/// What a restore needs, prepared on disk.
pub struct PreparedRestore {
    /// The snapshot.
    pub snapshot: SnapshotMeta,
    /// Its machine state (None for a powered-off snapshot).
    pub state: Option<MachineState>,
    /// Its memory.bin.
    pub memory: PathBuf,
    /// Its configuration (its hardware), with the new working layers.
    pub config: VmToml,
    previous_toml: VmToml,
    previous_tree: Tree,
    /// The file each disk of `config` writes: a new working layer, or an
    /// independent disk's own file.
    disks: Vec<PathBuf>,
    /// The layers created for it (removed on rollback).
    created: Vec<PathBuf>,
}

/// Checks the files of snapshot `reference` (state.bin, memory.bin's
/// trailer and layout, its configuration copy), reads its state and creates new empty
/// working layers over its disk layers, but records nothing yet
/// ([`PreparedRestore::commit`] does, so that an apply can write the
/// metadata while it replaces the VM's state). A corrupt snapshot changes
/// nothing.
pub fn load(dir: &VmDir, reference: &str) -> Result<PreparedRestore, SnapshotError> {
    let tree = Tree::load(&dir.tree_path())?;
    let snap = tree.resolve(reference)?.clone();
    let sdir = dir.snapshot_dir(&snap.id);
    let memory = sdir.join("memory.bin");
    let state = match snap.power_state {
        PowerState::Off => None,
        _ => {
            let s = MachineState::read(&sdir.join("state.bin"))?;
            MemoryFile::open(&memory)?.check_layout(&s.memory)?;
            Some(s)
        }
    };
    let mut config = VmDir::read_config_copy(&sdir.join("vm.toml"))?;
    let previous_toml = dir.load()?;
    let tag = &uuid::Uuid::new_v4().to_string()[..8];
    let mut created = Vec::new();
    let mut disks = Vec::new();
    let result = (|| {
        for d in config.disks.iter_mut() {
            if d.independent {
                // Not captured: attached as it is, its data untouched.
                let file = dir.resolve(&d.current);
                if !file.is_file() {
                    return Err(SnapshotError::MissingIndependentDisk {
                        disk: d.name.clone(),
                        path: file,
                    });
                }
                disks.push(file);
                continue;
            }
            let new = dir.layer_path(&d.name, tag);
            overlay_on_snapshot(dir, &snap, &d.name, &new)?;
            created.push(new.clone());
            d.current = dir.relative(&new);
            disks.push(new);
        }
        Ok(())
    })();
    if let Err(e) = result {
        for l in &created {
            let _ = std::fs::remove_file(l);
        }
        return Err(e);
    }
    config.name = previous_toml.name.clone();
    Ok(PreparedRestore {
        snapshot: snap,
        state,
        memory,
        config,
        previous_toml,
        previous_tree: tree,
        disks,
        created,
    })
}

/// Makes the VM directory of a VM that is off continue from snapshot
/// `reference`: [`load`], then [`PreparedRestore::commit`].
pub fn prepare(dir: &VmDir, reference: &str) -> Result<PreparedRestore, SnapshotError> {
    let prepared = load(dir, reference)?;
    if let Err(e) = prepared.commit(dir) {
        prepared.rollback(dir);
        return Err(e);
    }
    Ok(prepared)
}

impl PreparedRestore {
    /// Records the restore durably: vm.toml names the new working layers,
    /// "Now" hangs under the snapshot, and the working layers being
    /// replaced are retired (discarded; with --save-current they are
    /// frozen by a snapshot, which keeps them in use). A disk's base image
    /// is never retired (a disk attached after every snapshot writes its
    /// base: the apply detaches it, and its image stays), nor an
    /// independent disk, nor a file the applied configuration still uses.
    pub fn commit(&self, dir: &VmDir) -> Result<(), SnapshotError> {
        dir.save(&self.config)?;
        let id = self.snapshot.id.clone();
        let discarded: Vec<PathBuf> = self
            .previous_toml
            .disks
            .iter()
            .filter(|d| !d.independent && d.current != d.base)
            .filter(|d| self.config.disks.iter().all(|n| n.current != d.current))
            .map(|d| d.current.clone())
            .collect();
        Tree::update(&dir.tree_path(), |t| {
            t.now = Some(id);
            t.retired.extend(discarded);
            Ok(())
        })?;
        Ok(())
    }

    /// The file each disk writes after the apply, in disk order.
    pub fn disks(&self) -> &[PathBuf] {
        &self.disks
    }

    /// Disks of the VM before the apply that the snapshot's hardware does
    /// not have: detached by the apply (their files stay).
    pub fn detached(&self) -> Vec<String> {
        self.previous_toml
            .disks
            .iter()
            .filter(|d| self.config.disks.iter().all(|n| n.name != d.name))
            .map(|d| d.name.clone())
            .collect()
    }

    /// Puts vm.toml and "Now" back and removes the new layers.
    pub fn rollback(&self, dir: &VmDir) {
        if let Err(e) = dir.save(&self.previous_toml) {
            tracing::error!("cannot restore vm.toml: {e}");
        }
        let now = self.previous_tree.now.clone();
        let retired = self.previous_tree.retired.clone();
        if let Err(e) = Tree::update(&dir.tree_path(), |t| {
            t.now = now;
            t.retired = retired;
            Ok(())
        }) {
            tracing::error!("cannot restore tree.json: {e}");
        }
        for l in &self.created {
            let _ = std::fs::remove_file(l);
        }
    }
}

/// How to apply.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApplyOptions {
    /// Load all memory before resuming (the baseline of `snapvm bench
    /// apply`).
    pub eager: bool,
    /// Leave the VM paused even if the snapshot was taken running
    /// (`start --from --paused`).
    pub stay_paused: bool,
}

impl Session {
    /// Applies snapshot `reference` to the session's VM, in place: with
    /// `save_current`, first takes a snapshot of the current state (named
    /// by the inner option). A snapshot taken powered off leaves the VM's
    /// disks and configuration set and returns `Off` (the caller stops the
    /// VMM). `progress` follows the snapshot of the current state.
    pub fn apply_snapshot(
        &self,
        reference: &str,
        save_current: Option<Option<String>>,
        options: ApplyOptions,
        progress: &dyn Fn(u64, u64),
    ) -> Result<ApplyResult, SnapshotError> {
        let mut started = Instant::now();
        let dir = self.dir();
        // Resolve first: a bad reference must not take a snapshot.
        let target = Tree::load(&dir.tree_path())?.resolve(reference)?.clone();
        let saved_current = match save_current {
            Some(name) => {
                let opts = CreateOptions {
                    name: name.or_else(|| Some(format!("before applying {}", target.name))),
                    ..Default::default()
                };
                let saved = self.take_snapshot(&opts, progress)?.snapshot;
                started = Instant::now();
                Some(saved)
            }
            None => None,
        };
        let prepared = load(dir, &target.id)?;
        tracing::debug!(
            "apply: snapshot {} read and working layers created in {} us",
            target.id,
            started.elapsed().as_micros()
        );
        let mut r = self.apply_prepared(prepared, options, started)?;
        r.saved_current = saved_current;
        Ok(r)
    }

    /// Applies a prepared snapshot to the session's VM (paused for it) and
    /// records it; the VM then continues in the snapshot's power state.
    /// When the snapshot's hardware (memory, vCPUs, disks) differs from the
    /// VM's, a new VM is built for it inside this VMM and takes the old
    /// one's place once the apply succeeded; the old one goes on untouched
    /// if it fails. `started`: when the request arrived (for `apply_ms`).
    pub fn apply_prepared(
        &self,
        mut prepared: PreparedRestore,
        options: ApplyOptions,
        started: Instant,
    ) -> Result<ApplyResult, SnapshotError> {
        let dir = self.dir();
        // Lock order: power, then the VM (as pause and resume do).
        let mut power = self.power_lock();
        let mut vm = self.vm();
        let was_running = *power == Power::Running;
        if was_running {
            vm.pause();
            *power = Power::Paused;
        }
        let result = |power_state| ApplyResult {
            applied: prepared.snapshot.clone(),
            saved_current: None,
            power_state,
            apply_ms: started.elapsed().as_millis() as u64,
        };
        let state = prepared.state.take();
        // Undoes everything but a VM that is being stopped.
        let give_up = |vm: &Vm, power: &mut Power, resume: bool| {
            prepared.rollback(dir);
            if was_running && resume {
                vm.resume();
                *power = Power::Running;
            }
        };
        let Some(state) = state else {
            // Powered off: disks and configuration are set; the VM goes off.
            if let Err(e) = prepared.commit(dir) {
                give_up(&vm, &mut power, true);
                return Err(e);
            }
            self.set_toml(dir.load()?);
            return Ok(result(PowerState::Off));
        };
        // The snapshot's hardware: this VM, or a new one built for it.
        let config = match dir.vm_config(&prepared.config) {
            Ok(c) => c,
            Err(e) => {
                give_up(&vm, &mut power, true);
                return Err(e.into());
            }
        };
        let rebuilt = if vm.config().same_hardware(&config) {
            None
        } else {
            match self.build_empty(&config) {
                Ok(new) => Some(new),
                Err(e) => {
                    give_up(&vm, &mut power, true);
                    return Err(e.into());
                }
            }
        };
        let target: &Vm = rebuilt.as_ref().unwrap_or(&vm);
        // The metadata is written (fsyncs) while the VM's state is replaced.
        let (applied, committed) = std::thread::scope(|s| {
            let commit = s.spawn(|| prepared.commit(dir));
            let applied = target.apply(ApplyRequest {
                state,
                memory: &prepared.memory,
                disks: prepared.disks(),
                eager: options.eager,
                shared: None,
            });
            (applied, commit.join())
        });
        let committed = committed.unwrap_or_else(|_| {
            Err(SnapshotError::Io {
                what: "cannot record the apply in",
                path: dir.tree_path(),
                source: std::io::Error::other("the metadata writer panicked"),
            })
        });
        if let Err(e) = applied {
            // Checks that failed changed nothing, and a new VM that failed
            // leaves the old one as it was: it goes on. Past the checks, the
            // VM's state may be half replaced: it is being stopped (see
            // Vm::apply) and stays paused until then.
            let untouched = rebuilt.is_some() || !matches!(e, VmError::Partial(_));
            give_up(&vm, &mut power, untouched);
            if let Some(new) = rebuilt {
                discard(new);
            }
            return Err(e.into());
        }
        if let Some(new) = rebuilt {
            let old = std::mem::replace(&mut *vm, new);
            self.console().set_input(vm.serial());
            discard(old);
            tracing::info!(
                "apply: the VM was rebuilt for the snapshot's hardware ({} MiB, {} vCPUs, {} disks)",
                vm.config().memory >> 20,
                vm.config().vcpus,
                vm.config().disks.len()
            );
        }
        if let Err(e) = committed {
            // The VM already runs on the new layers: they stay. It stays
            // paused; vm.toml and the tree may still name the previous state.
            tracing::error!(
                "applied snapshot {} but could not record it: {e}",
                prepared.snapshot.id
            );
            return Err(e);
        }
        for d in prepared.detached() {
            tracing::info!(
                "apply: disk {d} is not part of the snapshot's hardware: detached (its files stay)"
            );
        }
        self.set_toml(dir.load()?);
        let continues = prepared.snapshot.power_state;
        if continues == PowerState::Running && !options.stay_paused {
            vm.resume();
            *power = Power::Running;
        }
        Ok(result(continues))
    }
}

/// Drops a VM that is no longer used on a thread of its own: freeing its
/// memory takes long (tens of ms per GiB on 4 KiB pages) and nobody needs
/// to wait for it.
fn discard(vm: Vm) {
    let spawned = std::thread::Builder::new()
        .name("vm-discard".into())
        .spawn(move || drop(vm));
    if let Err(e) = spawned {
        tracing::warn!("cannot free the replaced VM in the background: {e}");
    }
}
