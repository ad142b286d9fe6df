//! Taking a snapshot: live (the VM runs or is paused in its VMM) or of a
//! VM that is off (configuration and disks only).
//!
//! A live snapshot, around the VM's capture (machine/capture.rs): the new
//! disk layers and memory.bin are created and guest memory is armed while
//! the guest runs; the capture pauses it for a moment; memory streams out
//! while it runs again; the snapshot is published once every file is
//! durable. docs/architecture.md walks through the whole protocol.

use std::path::PathBuf;
use std::time::{Instant, SystemTime};

use snapshot::atomic_file::sync_dir;
use snapshot::disk::{create_overlay_sized, probe_format, Disk, DiskFormat};
use snapshot::memory_file::MemoryFileWriter;
use snapshot::tree::{DiskLayer, PowerState, SnapshotMeta, Tree};

use super::manage::clean_leftovers;
use super::{io_err, now_ms, SnapshotError};
use crate::api::LiveResult;
use crate::daemon::session::{Power, Session};
use crate::machine::capture::CaptureRequest;
use crate::machine::vm::VmError;
use crate::vmdir::{VmDir, VmToml};

/// What `snapshot create` was asked for.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// Name (default: VM name and time).
    pub name: Option<String>,
    /// Description.
    pub description: String,
    /// Keep the guest paused until all memory is written (the stop-and-copy
    /// baseline of `snapvm bench snapshot`, as Firecracker and `savevm` do).
    pub stop_and_copy: bool,
}

fn default_name(vm: &str) -> String {
    let t = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    format!("{vm} {}", t.trim_end_matches('Z').replace('T', " "))
}

/// A snapshot being assembled in `snapshots/<id>.partial/`.
struct Staging {
    id: String,
    partial: PathBuf,
    /// The new working layer of each disk (None: independent, not forked).
    layers: Vec<Option<PathBuf>>,
}

impl Staging {
    fn new(dir: &VmDir, toml: &VmToml) -> Result<Self, SnapshotError> {
        let id = uuid::Uuid::new_v4().to_string();
        let snaps = dir.snapshots_dir();
        std::fs::create_dir_all(&snaps).map_err(io_err("cannot create", &snaps))?;
        let partial = dir.partial_snapshot_dir(&id);
        std::fs::create_dir(&partial).map_err(io_err("cannot create", &partial))?;
        let layers = toml
            .disks
            .iter()
            .map(|d| (!d.independent).then(|| dir.layer_path(&d.name, &id[..8])))
            .collect();
        Ok(Self {
            id,
            partial,
            layers,
        })
    }

    /// Creates the new working layers over the current ones.
    fn create_layers(&self, dir: &VmDir, toml: &VmToml) -> Result<(), SnapshotError> {
        for (d, new) in toml.disks.iter().zip(&self.layers) {
            let Some(new) = new else { continue };
            let cur = dir.resolve(&d.current);
            let format = probe_format(&cur)?;
            let size = match format {
                DiskFormat::Raw => std::fs::metadata(&cur)
                    .map_err(io_err("cannot stat", &cur))?
                    .len(),
                _ => Disk::open(&cur, true)?.size(),
            };
            create_overlay_sized(&cur, format, size, new)?;
        }
        Ok(())
    }

    /// Removes everything (on failure before the disks were forked).
    fn discard(&self) {
        let _ = std::fs::remove_dir_all(&self.partial);
        for l in self.layers.iter().flatten() {
            let _ = std::fs::remove_file(l);
        }
    }

    fn meta(&self, toml: &VmToml, opts: &CreateOptions, power: PowerState) -> SnapshotMeta {
        SnapshotMeta {
            id: self.id.clone(),
            name: opts
                .name
                .clone()
                .unwrap_or_else(|| default_name(&toml.name)),
            description: opts.description.clone(),
            created_ms: now_ms(),
            parent: None,
            power_state: power,
            pause_us: None,
            memory_bytes: 0,
            duration_ms: 0,
            clones: vec![],
            // Independent disks are not captured: the configuration copy
            // records only that they were attached.
            disks: toml
                .disks
                .iter()
                .filter(|d| !d.independent)
                .map(|d| DiskLayer {
                    name: d.name.clone(),
                    layer: d.current.clone(),
                })
                .collect(),
        }
    }

    /// Writes the config copy, renames the snapshot into place, adds it to
    /// the tree.
    fn publish(
        self,
        dir: &VmDir,
        frozen: &VmToml,
        mut meta: SnapshotMeta,
        started: Instant,
    ) -> Result<SnapshotMeta, SnapshotError> {
        VmDir::write_config_copy(&self.partial.join("vm.toml"), frozen)?;
        // The frozen disk layers must be durable too.
        for d in frozen.disks.iter().filter(|d| !d.independent) {
            let p = dir.resolve(&d.current);
            std::fs::File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(io_err("cannot fsync", &p))?;
        }
        sync_dir(&self.partial).map_err(io_err("cannot fsync", &self.partial))?;
        let final_dir = dir.snapshot_dir(&self.id);
        std::fs::rename(&self.partial, &final_dir).map_err(io_err("cannot publish", &final_dir))?;
        let snaps = dir.snapshots_dir();
        sync_dir(&snaps).map_err(io_err("cannot fsync", &snaps))?;
        meta.duration_ms = started.elapsed().as_millis() as u64;
        Ok(Tree::update(&dir.tree_path(), |tree| {
            meta.parent = tree.now.clone();
            tree.add(meta.clone());
            Ok(meta)
        })?)
    }
}

impl Session {
    /// Takes a live snapshot of the session's VM: paused only for the
    /// capture if it runs, left paused if it is. vm.toml moves to the new
    /// working layers. `progress` gets (bytes of memory written, in all).
    pub fn take_snapshot(
        &self,
        opts: &CreateOptions,
        progress: &dyn Fn(u64, u64),
    ) -> Result<LiveResult, SnapshotError> {
        let started = Instant::now();
        let dir = self.dir();
        let frozen = self.toml();
        clean_leftovers(dir, &frozen);
        let staging = Staging::new(dir, &frozen)?;
        let prepared = staging.create_layers(dir, &frozen).and_then(|()| {
            let layout = self.vm().memory_layout();
            Ok(MemoryFileWriter::create(
                &staging.partial.join("memory.bin"),
                &layout,
            )?)
        });
        let memfile = match prepared {
            Ok(f) => f,
            Err(e) => {
                staging.discard();
                return Err(e);
            }
        };

        // Phase 1: protect memory while the guest runs (a lazy load from an
        // apply completes first).
        let armed = {
            let vm = self.vm();
            vm.finish_lazy_load()
                .map_err(SnapshotError::from)
                .and_then(|()| Ok(vm.tracker().arm()?))
        };
        let mut armed = match armed {
            Ok(a) => a,
            Err(e) => {
                staging.discard();
                return Err(e);
            }
        };
        if let Some(d) = self.hooks().stream_delay {
            armed.set_chunk_delay(d);
        }
        if let Some(report) = &self.hooks().check_snapshot {
            armed.check_against_instant(report.clone());
        }

        // Phase 2: the pause. Pause and resume requests wait meanwhile
        // (lock order: power, then the VM).
        let power = self.power_lock();
        let running = *power == Power::Running;
        let mut meta = staging.meta(
            &frozen,
            opts,
            if running {
                PowerState::Running
            } else {
                PowerState::Paused
            },
        );
        let captured = self.vm().capture(CaptureRequest {
            running,
            keep_paused: opts.stop_and_copy,
            new_layers: &staging.layers,
            armed: &mut armed,
            memory: memfile,
        });
        // Stop-and-copy keeps the VM paused until memory is out: pause and
        // resume requests wait until then.
        let held = (running && opts.stop_and_copy).then_some(power);
        let captured = match captured {
            Ok(c) => c,
            Err(e) => {
                // Disks that were forked keep their new layer (a valid chain).
                self.record_layers(&staging.layers, &e.forked);
                let _ = std::fs::remove_dir_all(&staging.partial);
                for (l, f) in staging.layers.iter().zip(&e.forked) {
                    if let (Some(l), false) = (l, f) {
                        let _ = std::fs::remove_file(l);
                    }
                }
                return Err(e.into());
            }
        };
        let mut pause_us = captured.pause_us;
        if !opts.stop_and_copy {
            tracing::info!("snapshot {}: paused for {pause_us} us", staging.id);
        }
        // The VM now writes the new layers.
        self.record_layers(&staging.layers, &vec![true; staging.layers.len()]);

        // Phase 3: stream memory while the guest runs.
        let streamed = armed.stream(progress);
        if running && opts.stop_and_copy {
            self.vm().resume();
            pause_us = captured.paused_at.elapsed().as_micros() as u64;
        }
        drop(held);
        meta.pause_us = Some(pause_us);
        let result = streamed
            .map_err(SnapshotError::from)
            .and_then(|(stats, file)| {
                meta.memory_bytes = file.finish()?;
                let state = captured.state.encode().map_err(VmError::from)?;
                state.write(&staging.partial.join("state.bin"))?;
                Ok(stats)
            });
        let stats = match result {
            Ok(s) => s,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&staging.partial);
                return Err(e);
            }
        };
        let snapshot = staging.publish(dir, &frozen, meta, started)?;
        tracing::info!(
            "snapshot {}: memory out in {} ms: {} pages written, {} pages never touched (zeroes, not protected), {} write faults (p99 {:.0} us), {} split extents back on huge pages in {} us",
            snapshot.id,
            stats.stream_us / 1000,
            stats.pages_written,
            stats.empty_pages,
            stats.faults,
            stats.fault_p99_us,
            stats.collapsed_extents,
            stats.collapse_us
        );
        Ok(LiveResult { snapshot, stats })
    }

    /// Points vm.toml at the new working layers of the disks that were
    /// forked.
    fn record_layers(&self, layers: &[Option<PathBuf>], forked: &[bool]) {
        let dir = self.dir();
        let mut t = self.toml();
        for ((d, l), f) in t.disks.iter_mut().zip(layers).zip(forked) {
            if let (Some(l), true) = (l, f) {
                d.current = dir.relative(l);
            }
        }
        if let Err(e) = dir.save(&t) {
            tracing::error!("cannot record the new disk layers in vm.toml: {e}");
        }
        self.set_toml(t);
    }
}

/// Takes a snapshot of a VM that is off: configuration and disk layers.
pub fn create_off(dir: &VmDir, opts: &CreateOptions) -> Result<SnapshotMeta, SnapshotError> {
    let started = Instant::now();
    let mut toml = dir.load()?;
    clean_leftovers(dir, &toml);
    let staging = Staging::new(dir, &toml)?;
    if let Err(e) = staging.create_layers(dir, &toml) {
        staging.discard();
        return Err(e);
    }
    let frozen = toml.clone();
    let meta = staging.meta(&toml, opts, PowerState::Off);
    for (d, l) in toml.disks.iter_mut().zip(&staging.layers) {
        if let Some(l) = l {
            d.current = dir.relative(l);
        }
    }
    let layers = staging.layers.clone();
    match staging.publish(dir, &frozen, meta, started) {
        Ok(m) => {
            dir.save(&toml)?;
            Ok(m)
        }
        Err(e) => {
            for l in layers.iter().flatten() {
                let _ = std::fs::remove_file(l);
            }
            Err(e)
        }
    }
}
