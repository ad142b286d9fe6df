//! Snapshot operations on a VM directory: take a live (running or paused)
//! snapshot, take a powered-off one, prepare a restore, and clean up what
//! an interrupted snapshot left behind.
//!
//! Files (DESIGN.md §4): `snapshots/tree.json`, `snapshots/<id>/vm.toml`,
//! `state.bin`, `memory.bin`; disk layers `disks/<disk>.<id8>.qcow2`. A
//! snapshot is assembled in `snapshots/<id>.partial/` and renamed into place
//! only when every file is durable; only then does it enter tree.json.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use snapshot::atomic_file::sync_dir;
use snapshot::disk::{create_overlay_sized, probe_format, DiskError};
use snapshot::live::{LiveError, LiveStats};
use snapshot::memory_file::{MemoryFile, MemoryFileError, MemoryFileWriter};
use snapshot::state_file::{self, StateFileError};
use snapshot::tree::{DiskLayer, PowerState, SnapshotMeta, Tree, TreeError};

use crate::jobs::JobHandle;
use crate::vm::{MachineState, Vm, VmError};
use crate::vmdir::{VmDir, VmDirError, VmToml};

/// Errors of snapshot operations.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The tree store failed.
    #[error(transparent)]
    Tree(#[from] TreeError),
    /// A disk layer could not be created or switched.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// The VM directory is unusable.
    #[error(transparent)]
    VmDir(#[from] VmDirError),
    /// Memory streaming failed.
    #[error(transparent)]
    Live(#[from] LiveError),
    /// memory.bin is unusable.
    #[error(transparent)]
    MemoryFile(#[from] MemoryFileError),
    /// state.bin is unusable.
    #[error(transparent)]
    StateFile(#[from] StateFileError),
    /// The VM could not be paused, saved or restored.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A snapshot file could not be written.
    #[error("{what} {path}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The snapshot has no memory (taken powered off) where one is needed.
    #[error("snapshot {0} was taken with the VM off; it has no memory to restore")]
    NoMemory(String),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.to_path_buf();
    move |source| SnapshotError::Io { what, path, source }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `snapshots/` of a VM directory.
pub fn snapshots_dir(dir: &VmDir) -> PathBuf {
    dir.root().join("snapshots")
}

/// `snapshots/tree.json`.
pub fn tree_path(dir: &VmDir) -> PathBuf {
    snapshots_dir(dir).join("tree.json")
}

/// Test hook: milliseconds to sleep per 2 MiB chunk while streaming
/// memory, to make a window for crash tests.
pub const STREAM_DELAY_ENV: &str = "SNAPVM_TEST_STREAM_DELAY_MS";

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

/// A snapshot being assembled.
struct Staging {
    id: String,
    partial: PathBuf,
    layers: Vec<PathBuf>,
}

impl Staging {
    fn new(dir: &VmDir, toml: &VmToml) -> Result<Self, SnapshotError> {
        let id = uuid::Uuid::new_v4().to_string();
        let snaps = snapshots_dir(dir);
        std::fs::create_dir_all(&snaps).map_err(io_err("cannot create", &snaps))?;
        let partial = snaps.join(format!("{id}.partial"));
        std::fs::create_dir(&partial).map_err(io_err("cannot create", &partial))?;
        let layers = toml
            .disks
            .iter()
            .map(|d| {
                dir.disks_dir()
                    .join(format!("{}.{}.qcow2", d.name, &id[..8]))
            })
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
            let cur = dir.resolve(&d.current);
            let format = probe_format(&cur)?;
            let size = std::fs::metadata(&cur)
                .map_err(io_err("cannot stat", &cur))?
                .len();
            let size = if format == snapshot::disk::DiskFormat::Raw {
                size
            } else {
                snapshot::disk::Disk::open(&cur, true)?.size()
            };
            create_overlay_sized(&cur, format, size, new)?;
        }
        Ok(())
    }

    /// Removes everything (on failure before the disks were forked).
    fn discard(&self) {
        let _ = std::fs::remove_dir_all(&self.partial);
        for l in &self.layers {
            let _ = std::fs::remove_file(l);
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
        let cfg = self.partial.join("vm.toml");
        let text = toml::to_string_pretty(frozen).map_err(|e| SnapshotError::Io {
            what: "cannot encode",
            path: cfg.clone(),
            source: std::io::Error::other(e.to_string()),
        })?;
        snapshot::atomic_file::write_atomic(&cfg, text.as_bytes())
            .map_err(io_err("cannot write", &cfg))?;
        // The frozen disk layers must be durable too.
        for d in &frozen.disks {
            let p = dir.resolve(&d.current);
            std::fs::File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(io_err("cannot fsync", &p))?;
        }
        sync_dir(&self.partial).map_err(io_err("cannot fsync", &self.partial))?;
        let final_dir = snapshots_dir(dir).join(&self.id);
        std::fs::rename(&self.partial, &final_dir).map_err(io_err("cannot publish", &final_dir))?;
        sync_dir(&snapshots_dir(dir)).map_err(io_err("cannot fsync", &snapshots_dir(dir)))?;
        meta.duration_ms = started.elapsed().as_millis() as u64;
        Ok(Tree::update(&tree_path(dir), |tree| {
            meta.parent = tree.now.clone();
            tree.add(meta.clone());
            Ok(meta)
        })?)
    }
}

fn meta_for(
    staging: &Staging,
    toml: &VmToml,
    opts: &CreateOptions,
    power: PowerState,
) -> SnapshotMeta {
    SnapshotMeta {
        id: staging.id.clone(),
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
        disks: toml
            .disks
            .iter()
            .map(|d| DiskLayer {
                name: d.name.clone(),
                layer: d.current.clone(),
            })
            .collect(),
    }
}

fn relative(dir: &VmDir, p: &Path) -> PathBuf {
    p.strip_prefix(dir.root())
        .map(Path::to_path_buf)
        .unwrap_or_else(|_| p.to_path_buf())
}

/// Result of a live snapshot.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LiveResult {
    /// The published snapshot.
    pub snapshot: SnapshotMeta,
    /// Streaming figures.
    pub stats: LiveStats,
}

/// Takes a snapshot of a VM whose VMM runs: `running` says whether its
/// vCPUs run (they are paused for the capture and resumed) or are paused
/// (they stay paused). `toml` is updated to the new working layers.
pub fn create_live(
    vm: &Mutex<Vm>,
    dir: &VmDir,
    toml: &Mutex<VmToml>,
    running: bool,
    opts: &CreateOptions,
    job: &JobHandle,
) -> Result<LiveResult, SnapshotError> {
    let started = Instant::now();
    let frozen = toml.lock().unwrap_or_else(|e| e.into_inner()).clone();
    clean_leftovers(dir, &frozen);
    let staging = Staging::new(dir, &frozen)?;
    if let Err(e) = staging.create_layers(dir, &frozen) {
        staging.discard();
        return Err(e);
    }
    let lock = || vm.lock().unwrap_or_else(|e| e.into_inner());
    let layout = lock().memory_layout();
    job.set_total(layout.iter().map(|(_, s)| s).sum());
    let memfile = match MemoryFileWriter::create(&staging.partial.join("memory.bin"), &layout) {
        Ok(f) => f,
        Err(e) => {
            staging.discard();
            return Err(e.into());
        }
    };
    let power = if running {
        PowerState::Running
    } else {
        PowerState::Paused
    };
    let mut meta = meta_for(&staging, &frozen, opts, power);

    // Phase 1: protect memory while the guest runs (a lazy load from an
    // apply completes first).
    if let Err(e) = lock().finish_lazy_load() {
        staging.discard();
        return Err(e.into());
    }
    let mut armed = match lock().tracker().arm() {
        Ok(a) => a,
        Err(e) => {
            staging.discard();
            return Err(e.into());
        }
    };
    if let Some(ms) = std::env::var(STREAM_DELAY_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
    {
        armed.set_chunk_delay(std::time::Duration::from_millis(ms));
    }
    // Phase 2: the pause.
    let (state, pause_us) = {
        let vm = lock();
        let t0 = Instant::now();
        if running {
            vm.pause();
        }
        let disks = vm.quiesce_devices();
        let captured = vm.save_state(disks).and_then(|state| {
            for (i, l) in staging.layers.iter().enumerate() {
                vm.fork_disk(i, l)?;
            }
            Ok(state)
        });
        let frozen_ok = match captured {
            Ok(state) => armed
                .freeze(memfile)
                .map(|_| state)
                .map_err(SnapshotError::from),
            Err(e) => Err(e.into()),
        };
        vm.unquiesce_devices();
        if running && !opts.stop_and_copy {
            vm.resume();
        }
        let pause_us = t0.elapsed().as_micros() as u64;
        match frozen_ok {
            Ok(s) => (s, (pause_us, t0)),
            Err(e) => {
                if running && opts.stop_and_copy {
                    vm.resume();
                }
                armed.abort();
                // Disks that were forked keep their new layer (a valid chain).
                let forked: Vec<bool> = staging.layers.iter().map(|l| is_in_use(&vm, l)).collect();
                drop(vm);
                update_layers(dir, toml, &staging.layers, &forked);
                let _ = std::fs::remove_dir_all(&staging.partial);
                for (l, f) in staging.layers.iter().zip(forked) {
                    if !f {
                        let _ = std::fs::remove_file(l);
                    }
                }
                return Err(e);
            }
        }
    };
    let (mut pause_us, paused_at) = pause_us;
    if !opts.stop_and_copy {
        tracing::info!("snapshot {}: paused for {pause_us} us", staging.id);
    }
    // The VM now writes the new layers.
    let all = vec![true; staging.layers.len()];
    update_layers(dir, toml, &staging.layers, &all);

    // Phase 3: stream memory while the guest runs.
    let streamed = armed.stream(&|done, _| job.set_done(done));
    if running && opts.stop_and_copy {
        lock().resume();
        pause_us = paused_at.elapsed().as_micros() as u64;
    }
    meta.pause_us = Some(pause_us);
    let result = streamed
        .map_err(SnapshotError::from)
        .and_then(|(stats, file)| {
            let written = file.finish()?;
            state_file::write(&staging.partial.join("state.bin"), &state)?;
            meta.memory_bytes = written;
            Ok(stats)
        });
    let stats = match result {
        Ok(s) => s,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging.partial);
            return Err(e);
        }
    };
    let snapshot = match staging.publish(dir, &frozen, meta, started) {
        Ok(m) => m,
        Err(e) => {
            return Err(e);
        }
    };
    Ok(LiveResult { snapshot, stats })
}

fn is_in_use(vm: &Vm, layer: &Path) -> bool {
    vm.disk_tops().iter().any(|t| t.as_deref() == Some(layer))
}

/// Points vm.toml at the new working layers of the disks that were forked.
fn update_layers(dir: &VmDir, toml: &Mutex<VmToml>, layers: &[PathBuf], forked: &[bool]) {
    let mut t = toml.lock().unwrap_or_else(|e| e.into_inner());
    for ((d, l), f) in t.disks.iter_mut().zip(layers).zip(forked) {
        if *f {
            d.current = relative(dir, l);
        }
    }
    if let Err(e) = dir.save(&t) {
        tracing::error!("cannot record the new disk layers in vm.toml: {e}");
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
    let meta = meta_for(&staging, &toml, opts, PowerState::Off);
    for (d, l) in toml.disks.iter_mut().zip(&staging.layers) {
        d.current = relative(dir, l);
    }
    let layers = staging.layers.clone();
    match staging.publish(dir, &frozen, meta, started) {
        Ok(m) => {
            dir.save(&toml)?;
            Ok(m)
        }
        Err(e) => {
            for l in layers {
                let _ = std::fs::remove_file(l);
            }
            Err(e)
        }
    }
}

/// Removes `snapshots/<id>.partial` directories and the disk layers they
/// created that nothing uses, left by a snapshot interrupted by a crash.
/// Returns the ids cleaned up.
pub fn clean_leftovers(dir: &VmDir, toml: &VmToml) -> Vec<String> {
    let mut cleaned = Vec::new();
    let Ok(entries) = std::fs::read_dir(snapshots_dir(dir)) else {
        return cleaned;
    };
    let tree = Tree::load(&tree_path(dir)).unwrap_or_default();
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(id) = name.strip_suffix(".partial") else {
            // A snapshot directory no longer in the tree: a delete was
            // interrupted after the tree was updated.
            let orphan = e.path().is_dir()
                && uuid::Uuid::parse_str(&name).is_ok()
                && !tree.snapshots.iter().any(|s| s.id == name);
            if orphan {
                let _ = std::fs::remove_dir_all(e.path());
                tracing::warn!("removed the files of deleted snapshot {name}");
            }
            continue;
        };
        let _ = std::fs::remove_dir_all(e.path());
        for d in &toml.disks {
            let layer =
                dir.disks_dir()
                    .join(format!("{}.{}.qcow2", d.name, id.get(..8).unwrap_or(id)));
            let rel = relative(dir, &layer);
            let used = toml.disks.iter().any(|x| x.current == rel)
                || tree
                    .snapshots
                    .iter()
                    .any(|s| s.disks.iter().any(|l| l.layer == rel));
            if !used && layer.exists() {
                let _ = std::fs::remove_file(&layer);
            }
        }
        tracing::warn!("removed incomplete snapshot {id} left by an interrupted snapshot");
        cleaned.push(id.to_string());
    }
    cleaned
}

/// What a restore needs, prepared on disk.
pub struct PreparedRestore {
    /// The snapshot.
    pub snapshot: SnapshotMeta,
    /// Its machine state (None for a powered-off snapshot).
    pub state: Option<MachineState>,
    /// Its memory.bin.
    pub memory: PathBuf,
    config: VmToml,
    previous_toml: VmToml,
    previous_tree: Tree,
    new_layers: Vec<PathBuf>,
}

/// Makes the VM directory continue from snapshot `reference`: its
/// configuration, new empty working layers over its disk layers, "Now"
/// under it. state.bin and memory.bin's header are checked first, so a
/// corrupt snapshot changes nothing. Undo with [`PreparedRestore::rollback`].
pub fn prepare_restore(dir: &VmDir, reference: &str) -> Result<PreparedRestore, SnapshotError> {
    let prepared = load_restore(dir, reference)?;
    if let Err(e) = prepared.commit(dir) {
        prepared.rollback(dir);
        return Err(e);
    }
    Ok(prepared)
}

/// The reading half of [`prepare_restore`]: checks the snapshot's files,
/// loads its state and creates the new working layers, but records
/// nothing yet ([`PreparedRestore::commit`] does, so that an apply can
/// write the metadata while it replaces the VM's state).
pub fn load_restore(dir: &VmDir, reference: &str) -> Result<PreparedRestore, SnapshotError> {
    let tp = tree_path(dir);
    let tree = Tree::load(&tp)?;
    let snap = tree.resolve(reference)?.clone();
    let sdir = snapshots_dir(dir).join(&snap.id);
    let memory = sdir.join("memory.bin");
    let state = match snap.power_state {
        PowerState::Off => None,
        _ => {
            let s: MachineState = state_file::read(&sdir.join("state.bin"))?;
            MemoryFile::open(&memory)?.check_layout(&s.memory)?;
            Some(s)
        }
    };
    let cfg = sdir.join("vm.toml");
    let text = std::fs::read_to_string(&cfg).map_err(io_err("cannot read", &cfg))?;
    let mut snap_toml: VmToml = toml::from_str(&text).map_err(|e| SnapshotError::Io {
        what: "invalid",
        path: cfg.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let previous_toml = dir.load()?;
    let tag = &uuid::Uuid::new_v4().to_string()[..8];
    let mut new_layers = Vec::new();
    for (d, frozen) in snap_toml.disks.iter_mut().zip(&snap.disks) {
        let base = dir.resolve(&frozen.layer);
        let new = dir.disks_dir().join(format!("{}.{tag}.qcow2", d.name));
        let format = probe_format(&base)?;
        let size = snapshot::disk::Disk::open(&base, true)?.size();
        if let Err(e) = create_overlay_sized(&base, format, size, &new) {
            for l in &new_layers {
                let _ = std::fs::remove_file(l);
            }
            return Err(e.into());
        }
        d.current = relative(dir, &new);
        new_layers.push(new);
    }
    snap_toml.name = previous_toml.name.clone();
    Ok(PreparedRestore {
        snapshot: snap,
        state,
        memory,
        config: snap_toml,
        previous_toml,
        previous_tree: tree,
        new_layers,
    })
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
        Tree::update(&tree_path(dir), |t| {
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
        if let Err(e) = Tree::update(&tree_path(dir), |t| {
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

/// What `snapshot delete` removed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeleteResult {
    /// The snapshots removed from the tree.
    pub deleted: Vec<SnapshotMeta>,
    /// Disk layers now waiting to be removed or merged.
    pub retired: Vec<PathBuf>,
}

/// Removes snapshot `reference` (with `subtree`, also all its descendants)
/// from the tree and deletes its saved state and memory. Its children hang
/// under its parent from now on, and so does "Now" if it hung under a
/// deleted snapshot. Its disk layers are retired: [`crate::merges::run`]
/// removes or merges them. Nothing the VM or another snapshot reads
/// changes.
pub fn delete(dir: &VmDir, reference: &str, subtree: bool) -> Result<DeleteResult, SnapshotError> {
    let result = Tree::update(&tree_path(dir), |t| {
        let target = t.resolve(reference)?.clone();
        let mut gone = vec![target.id.clone()];
        if subtree {
            let mut i = 0;
            while i < gone.len() {
                let kids: Vec<String> = t.children(&gone[i]).iter().map(|c| c.id.clone()).collect();
                gone.extend(kids);
                i += 1;
            }
        }
        let deleted: Vec<SnapshotMeta> = t
            .snapshots
            .iter()
            .filter(|s| gone.contains(&s.id))
            .cloned()
            .collect();
        for s in t.snapshots.iter_mut() {
            if s.parent.as_deref() == Some(target.id.as_str()) {
                s.parent = target.parent.clone();
            }
        }
        if t.now.as_ref().is_some_and(|n| gone.contains(n)) {
            t.now = target.parent.clone();
        }
        t.snapshots.retain(|s| !gone.contains(&s.id));
        let retired: Vec<PathBuf> = deleted
            .iter()
            .flat_map(|s| s.disks.iter().map(|d| d.layer.clone()))
            .collect();
        for r in &retired {
            if !t.retired.contains(r) {
                t.retired.push(r.clone());
            }
        }
        Ok(DeleteResult { deleted, retired })
    })?;
    let sdir = snapshots_dir(dir);
    for s in &result.deleted {
        let d = sdir.join(&s.id);
        if let Err(e) = std::fs::remove_dir_all(&d) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(io_err("cannot remove", &d)(e));
            }
        }
    }
    sync_dir(&sdir).map_err(io_err("cannot sync", &sdir))?;
    Ok(result)
}

/// Renames snapshot `reference`.
pub fn rename(dir: &VmDir, reference: &str, name: &str) -> Result<SnapshotMeta, SnapshotError> {
    Ok(Tree::update(&tree_path(dir), |t| {
        let s = t.resolve_mut(reference)?;
        s.name = name.to_string();
        Ok(s.clone())
    })?)
}

/// Sets the description of snapshot `reference`.
pub fn describe(dir: &VmDir, reference: &str, text: &str) -> Result<SnapshotMeta, SnapshotError> {
    Ok(Tree::update(&tree_path(dir), |t| {
        let s = t.resolve_mut(reference)?;
        s.description = text.to_string();
        Ok(s.clone())
    })?)
}

fn file_size(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map(|m| m.blocks() * 512).unwrap_or(0)
}

/// Details of snapshot `reference`: its metadata, children, whether "Now"
/// hangs under it, and its size on disk (files and frozen disk layers).
pub fn show(dir: &VmDir, reference: &str) -> Result<serde_json::Value, SnapshotError> {
    let tree = Tree::load(&tree_path(dir))?;
    let s = tree.resolve(reference)?;
    let sdir = snapshots_dir(dir).join(&s.id);
    let files: u64 = ["vm.toml", "state.bin", "memory.bin"]
        .iter()
        .map(|f| file_size(&sdir.join(f)))
        .sum();
    let layers: u64 = s
        .disks
        .iter()
        .map(|d| file_size(&dir.resolve(&d.layer)))
        .sum();
    let children: Vec<&str> = tree.children(&s.id).iter().map(|c| c.id.as_str()).collect();
    Ok(serde_json::json!({
        "snapshot": s,
        "children": children,
        "now_here": tree.now.as_deref() == Some(s.id.as_str()),
        "size_on_disk": { "files": files, "disk_layers": layers, "total": files + layers },
    }))
}

/// Result of applying a snapshot to a running VMM.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ApplyResult {
    /// The snapshot applied.
    pub applied: SnapshotMeta,
    /// The snapshot of the state before, with --save-current.
    pub saved_current: Option<SnapshotMeta>,
    /// The power state the VM continues in.
    pub power_state: PowerState,
    /// Time from the request to the guest running again (or being ready).
    pub apply_ms: u64,
}

/// Applies snapshot `reference` to the VM whose VMM runs, in place: with
/// `save_current`, first takes a snapshot of the current state (named by
/// the inner option). Returns the power state to continue in; the caller
/// resumes the vCPUs for a running snapshot. A snapshot taken powered off
/// leaves the VM's disks and configuration set and returns `Off` (the
/// caller stops the VMM).
#[allow(clippy::too_many_arguments)]
pub fn apply_live(
    vm: &Mutex<Vm>,
    dir: &VmDir,
    toml: &Mutex<VmToml>,
    running: bool,
    reference: &str,
    save_current: Option<Option<String>>,
    eager: bool,
    job: &JobHandle,
) -> Result<ApplyResult, SnapshotError> {
    let t0 = Instant::now();
    // Resolve first: a bad reference must not take a snapshot.
    let target = Tree::load(&tree_path(dir))?.resolve(reference)?.clone();
    let saved_current = match save_current {
        Some(name) => {
            let opts = CreateOptions {
                name: name.or_else(|| Some(format!("before applying {}", target.name))),
                ..Default::default()
            };
            Some(create_live(vm, dir, toml, running, &opts, job)?.snapshot)
        }
        None => None,
    };
    let t0 = if saved_current.is_some() {
        Instant::now()
    } else {
        t0
    };
    let mut prepared = load_restore(dir, &target.id)?;
    tracing::debug!(
        "apply: snapshot {} read and working layers created in {} us",
        target.id,
        t0.elapsed().as_micros()
    );
    let vmg = vm.lock().unwrap_or_else(|e| e.into_inner());
    if running {
        vmg.pause();
    }
    let Some(state) = prepared.state.take() else {
        // Powered off: disks and configuration are set; the VM goes off.
        if let Err(e) = prepared.commit(dir) {
            prepared.rollback(dir);
            if running {
                vmg.resume();
            }
            return Err(e);
        }
        *toml.lock().unwrap_or_else(|e| e.into_inner()) = dir.load()?;
        return Ok(ApplyResult {
            applied: prepared.snapshot.clone(),
            saved_current,
            power_state: PowerState::Off,
            apply_ms: t0.elapsed().as_millis() as u64,
        });
    };
    // The metadata is written (fsyncs) while the VM's state is replaced.
    let (applied, committed) = std::thread::scope(|s| {
        let commit = s.spawn(|| prepared.commit(dir));
        let applied = vmg.apply(state, &prepared.memory, prepared.new_layers(), eager);
        (applied, commit.join())
    });
    let committed = committed.unwrap_or_else(|_| {
        Err(SnapshotError::Io {
            what: "cannot record the apply in",
            path: tree_path(dir),
            source: std::io::Error::other("the metadata writer panicked"),
        })
    });
    if let Err(e) = applied {
        // The VM's state may be half replaced: keep it paused, say so.
        prepared.rollback(dir);
        return Err(e.into());
    }
    if let Err(e) = committed {
        // The VM already runs on the new layers: they stay. It stays
        // paused; vm.toml and the tree may still name the previous state.
        tracing::error!(
            "applied snapshot {} but could not record it: {e}",
            target.id
        );
        return Err(e);
    }
    *toml.lock().unwrap_or_else(|e| e.into_inner()) = dir.load()?;
    let power = prepared.snapshot.power_state;
    if power == PowerState::Running {
        vmg.resume();
    }
    Ok(ApplyResult {
        applied: prepared.snapshot.clone(),
        saved_current,
        power_state: power,
        apply_ms: t0.elapsed().as_millis() as u64,
    })
}

/// Copies `src` to `dst` keeping holes: only non-zero 4 KiB blocks are
/// written (memory.bin is mostly holes; std::fs::copy may fill them).
fn copy_sparse(src: &Path, dst: &Path) -> Result<(), SnapshotError> {
    use std::os::unix::fs::FileExt;
    let input = std::fs::File::open(src).map_err(io_err("cannot open", src))?;
    let len = input.metadata().map_err(io_err("cannot stat", src))?.len();
    let out = std::fs::File::create(dst).map_err(io_err("cannot create", dst))?;
    out.set_len(len).map_err(io_err("cannot size", dst))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        input
            .read_exact_at(&mut buf[..n], off)
            .map_err(io_err("cannot read", src))?;
        for (i, block) in buf[..n].chunks(4096).enumerate() {
            if block.iter().any(|b| *b != 0) {
                out.write_all_at(block, off + i as u64 * 4096)
                    .map_err(io_err("cannot write", dst))?;
            }
        }
        off += n as u64;
    }
    out.sync_all().map_err(io_err("cannot fsync", dst))
}

/// Writes the content of the disk chain topped by `layer` into a sparse raw
/// image `dst` (the flattened disk of an export).
fn flatten_disk(layer: &Path, dst: &Path) -> Result<(), SnapshotError> {
    use std::os::unix::fs::FileExt;
    let disk = snapshot::disk::Disk::open(layer, true)?;
    let size = disk.size();
    let out = std::fs::File::create(dst).map_err(io_err("cannot create", dst))?;
    out.set_len(size).map_err(io_err("cannot size", dst))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        disk.read_at(&mut buf[..n], off)
            .map_err(io_err("cannot read", layer))?;
        if buf[..n].iter().any(|b| *b != 0) {
            out.write_all_at(&buf[..n], off)
                .map_err(io_err("cannot write", dst))?;
        }
        off += n as u64;
    }
    out.sync_all().map_err(io_err("cannot fsync", dst))
}

/// Exports snapshot `reference` of `dir` as a standalone VM directory at
/// `dest`: its configuration, kernel, flattened disks, and (for a running
/// or paused snapshot) its state and memory as the new VM's only snapshot.
/// A snapshot is not a backup; an export is. Returns the snapshot's id in
/// the new VM (`snapvm start DEST --from ID` continues from it).
pub fn export(dir: &VmDir, reference: &str, dest: &Path) -> Result<SnapshotMeta, SnapshotError> {
    let tree = Tree::load(&tree_path(dir))?;
    let snap = tree.resolve(reference)?.clone();
    if dest.join("vm.toml").exists() {
        return Err(VmDirError::Exists(dest.to_path_buf()).into());
    }
    let sdir = snapshots_dir(dir).join(&snap.id);
    let cfg = sdir.join("vm.toml");
    let text = std::fs::read_to_string(&cfg).map_err(io_err("cannot read", &cfg))?;
    let mut t: VmToml = toml::from_str(&text).map_err(|e| SnapshotError::Io {
        what: "invalid",
        path: cfg.clone(),
        source: std::io::Error::other(e.to_string()),
    })?;
    let staging = dest.with_extension("partial");
    let _ = std::fs::remove_dir_all(&staging);
    let sd = VmDir::new(&staging);
    for d in [
        sd.kernel_dir(),
        sd.disks_dir(),
        sd.logs_dir(),
        sd.run_dir(),
        snapshots_dir(&sd).join(&snap.id),
    ] {
        std::fs::create_dir_all(&d).map_err(io_err("cannot create", &d))?;
    }
    let result = (|| {
        let copy_into = |src: &Path, name: &str| -> Result<PathBuf, SnapshotError> {
            let to = sd.kernel_dir().join(name);
            std::fs::copy(src, &to).map_err(io_err("cannot copy", src))?;
            Ok(PathBuf::from("kernel").join(name))
        };
        let fname = |p: &Path| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "image".into())
        };
        t.kernel = copy_into(&dir.resolve(&t.kernel), &fname(&t.kernel))?;
        if let Some(i) = t.initrd.clone() {
            t.initrd = Some(copy_into(&dir.resolve(&i), &fname(&i))?);
        }
        let mut layers = Vec::new();
        for (d, frozen) in t.disks.iter_mut().zip(&snap.disks) {
            let rel = PathBuf::from("disks").join(format!("{}.raw", d.name));
            flatten_disk(&dir.resolve(&frozen.layer), &staging.join(&rel))?;
            d.base = rel.clone();
            d.current = rel.clone();
            layers.push(DiskLayer {
                name: d.name.clone(),
                layer: rel,
            });
        }
        t.name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| t.name.clone());
        sd.save(&t)?;
        let out = snapshots_dir(&sd).join(&snap.id);
        let frozen_cfg = toml::to_string_pretty(&t).map_err(|e| SnapshotError::Io {
            what: "cannot encode",
            path: out.join("vm.toml"),
            source: std::io::Error::other(e.to_string()),
        })?;
        snapshot::atomic_file::write_atomic(&out.join("vm.toml"), frozen_cfg.as_bytes())
            .map_err(io_err("cannot write", &out.join("vm.toml")))?;
        if snap.power_state != PowerState::Off {
            copy_sparse(&sdir.join("state.bin"), &out.join("state.bin"))?;
            copy_sparse(&sdir.join("memory.bin"), &out.join("memory.bin"))?;
            // Check what was written before calling it an export.
            MemoryFile::open(&out.join("memory.bin"))?.verify_all()?;
        }
        let mut meta = snap.clone();
        meta.parent = None;
        meta.disks = layers;
        let mut new_tree = Tree::default();
        new_tree.add(meta.clone());
        new_tree.save(&tree_path(&sd))?;
        Ok(meta)
    })();
    match result {
        Ok(meta) => {
            std::fs::rename(&staging, dest).map_err(io_err("cannot publish", dest))?;
            Ok(meta)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staging);
            Err(e)
        }
    }
}
