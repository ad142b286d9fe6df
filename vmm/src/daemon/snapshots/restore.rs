//! Applying a snapshot: prepared on disk (files checked, new working layers
//! created), then applied to the session's VM (machine/apply.rs) while the
//! metadata is recorded. This is the one restore path: an in-place apply
//! and `start --from` (an empty VM, then the same apply) both run
//! [`Session::apply_prepared`]. docs/architecture.md walks through it.

use std::path::PathBuf;
use std::time::Instant;

use snapshot::disk::{create_overlay_sized, probe_format, Disk};
use snapshot::memory_file::MemoryFile;
use snapshot::tree::{PowerState, SnapshotMeta, Tree};

use super::create::CreateOptions;
use super::SnapshotError;
use crate::api::ApplyResult;
use crate::daemon::session::{Power, Session};
use crate::machine::apply::ApplyRequest;
use crate::machine::state::MachineState;
use crate::machine::vm::VmError;
use crate::vmdir::{VmDir, VmToml};

/// What a restore needs, prepared on disk.
pub struct PreparedRestore {
    /// The snapshot.
    pub snapshot: SnapshotMeta,
    /// Its machine state (None for a powered-off snapshot).
    pub state: Option<MachineState>,
    /// Its memory.bin.
    pub memory: PathBuf,
    /// Its configuration, with the new working layers.
    pub config: VmToml,
    previous_toml: VmToml,
    previous_tree: Tree,
    new_layers: Vec<PathBuf>,
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
    let mut new_layers = Vec::new();
    for (d, frozen) in config.disks.iter_mut().zip(&snap.disks) {
        let base = dir.resolve(&frozen.layer);
        let new = dir.layer_path(&d.name, tag);
        let created = probe_format(&base).and_then(|format| {
            let size = Disk::open(&base, true)?.size();
            create_overlay_sized(&base, format, size, &new)
        });
        if let Err(e) = created {
            for l in &new_layers {
                let _ = std::fs::remove_file(l);
            }
            return Err(e.into());
        }
        d.current = dir.relative(&new);
        new_layers.push(new);
    }
    config.name = previous_toml.name.clone();
    Ok(PreparedRestore {
        snapshot: snap,
        state,
        memory,
        config,
        previous_toml,
        previous_tree: tree,
        new_layers,
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
    /// frozen by a snapshot, which keeps them in use).
    pub fn commit(&self, dir: &VmDir) -> Result<(), SnapshotError> {
        dir.save(&self.config)?;
        let id = self.snapshot.id.clone();
        let discarded: Vec<PathBuf> = self
            .previous_toml
            .disks
            .iter()
            .map(|d| d.current.clone())
            .collect();
        Tree::update(&dir.tree_path(), |t| {
            t.now = Some(id);
            t.retired.extend(discarded);
            Ok(())
        })?;
        Ok(())
    }

    /// The new working layers, in disk order.
    pub fn new_layers(&self) -> &[PathBuf] {
        &self.new_layers
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
        for l in &self.new_layers {
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
    /// `started`: when the request arrived (for `apply_ms`).
    pub fn apply_prepared(
        &self,
        mut prepared: PreparedRestore,
        options: ApplyOptions,
        started: Instant,
    ) -> Result<ApplyResult, SnapshotError> {
        let dir = self.dir();
        // Lock order: power, then the VM (as pause and resume do).
        let mut power = self.power_lock();
        let vm = self.vm();
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
        let Some(state) = prepared.state.take() else {
            // Powered off: disks and configuration are set; the VM goes off.
            if let Err(e) = prepared.commit(dir) {
                prepared.rollback(dir);
                if was_running {
                    vm.resume();
                    *power = Power::Running;
                }
                return Err(e);
            }
            self.set_toml(dir.load()?);
            return Ok(result(PowerState::Off));
        };
        // The metadata is written (fsyncs) while the VM's state is replaced.
        let (applied, committed) = std::thread::scope(|s| {
            let commit = s.spawn(|| prepared.commit(dir));
            let applied = vm.apply(ApplyRequest {
                state,
                memory: &prepared.memory,
                disks: prepared.new_layers(),
                eager: options.eager,
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
            prepared.rollback(dir);
            // Checks that failed changed nothing: the VM goes on as it
            // was. Past them, the VM's state may be half replaced: it is
            // being stopped (see Vm::apply) and stays paused until then.
            if was_running && !matches!(e, VmError::Partial(_)) {
                vm.resume();
                *power = Power::Running;
            }
            return Err(e.into());
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
        self.set_toml(dir.load()?);
        let continues = prepared.snapshot.power_state;
        if continues == PowerState::Running && !options.stay_paused {
            vm.resume();
            *power = Power::Running;
        }
        Ok(result(continues))
    }
}
