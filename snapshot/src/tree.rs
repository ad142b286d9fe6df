//! snapshots/tree.json: the snapshot tree of a VM (ids, names, parents,
//! times, power state, disk layers) and where "Now" hangs. Updated
//! atomically; a snapshot appears here only once all its files are durable.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Current tree format version.
pub const VERSION: u32 = 1;

/// Errors of the tree store.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    /// tree.json cannot be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// tree.json does not parse.
    #[error("{path}: invalid snapshot tree: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },
    /// No snapshot matches.
    #[error("no snapshot matches '{0}' (use an id, a unique id prefix or a unique name; `snapvm snapshot list` shows them)")]
    NotFound(String),
    /// The snapshot is cloned: its clones read its layers and memory.
    #[error("snapshot {snapshot} has clones that read its disks and memory: {}; delete them, or make them standalone with `snapvm clone detach DIR`, first", clones.iter().map(|c| c.display().to_string()).collect::<Vec<_>>().join(", "))]
    HasClones {
        /// The snapshot.
        snapshot: String,
        /// The clones' directories.
        clones: Vec<PathBuf>,
    },
    /// Several snapshots match.
    #[error("'{reference}' is ambiguous; it matches: {}", candidates.join(", "))]
    Ambiguous {
        /// The reference given.
        reference: String,
        /// "id (name)" of each match.
        candidates: Vec<String>,
    },
}

/// The VM's power state when a snapshot was taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PowerState {
    /// vCPUs were running.
    Running,
    /// vCPUs were paused.
    Paused,
    /// No VMM was running: configuration and disks only.
    Off,
}

/// One disk's layer frozen by a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskLayer {
    /// Disk name (as in vm.toml).
    pub name: String,
    /// The layer holding the disk's content at the snapshot instant,
    /// relative to the VM directory. Nothing writes it any more.
    pub layer: PathBuf,
}

/// A snapshot's metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// UUID.
    pub id: String,
    /// Name (not necessarily unique).
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Creation time, ms since the Unix epoch.
    pub created_ms: u64,
    /// Parent snapshot (None for a root).
    pub parent: Option<String>,
    /// Power state captured.
    pub power_state: PowerState,
    /// How long the guest was paused to take it (running snapshots).
    #[serde(default)]
    pub pause_us: Option<u64>,
    /// Guest memory bytes written to memory.bin (zero pages excluded).
    #[serde(default)]
    pub memory_bytes: u64,
    /// Wall time to complete, ms.
    #[serde(default)]
    pub duration_ms: u64,
    /// Frozen disk layers.
    pub disks: Vec<DiskLayer>,
    /// VM directories cloned from this snapshot (absolute): they read its
    /// disk layers and memory, so it cannot be deleted while they do.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub clones: Vec<PathBuf>,
}

/// The whole tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tree {
    /// Format version.
    pub version: u32,
    /// Snapshots in creation order.
    pub snapshots: Vec<SnapshotMeta>,
    /// The snapshot the VM's current state ("Now") hangs under.
    pub now: Option<String>,
    /// Disk layers no snapshot or VM uses any more (relative to the VM
    /// directory), waiting to be removed or merged.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retired: Vec<PathBuf>,
    /// The merge in progress, journaled before each step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merge: Option<crate::merge::MergeRecord>,
}

impl Default for Tree {
    fn default() -> Self {
        Self {
            version: VERSION,
            snapshots: Vec::new(),
            now: None,
            retired: Vec::new(),
            merge: None,
        }
    }
}

impl Tree {
    /// Loads `path`; a missing file is an empty tree.
    pub fn load(path: &Path) -> Result<Self, TreeError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(source) => {
                return Err(TreeError::Io {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let t: Tree = serde_json::from_str(&text).map_err(|e| TreeError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        if t.version != VERSION {
            return Err(TreeError::Parse {
                path: path.to_path_buf(),
                message: format!(
                    "unsupported version {} (this snapvm reads {VERSION})",
                    t.version
                ),
            });
        }
        Ok(t)
    }

    /// Saves atomically.
    pub fn save(&self, path: &Path) -> Result<(), TreeError> {
        let text = serde_json::to_string_pretty(self).map_err(|e| TreeError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        crate::atomic_file::write_atomic(path, text.as_bytes()).map_err(|source| TreeError::Io {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Loads, changes and saves the tree at `path` under an exclusive lock
    /// (`<path>.lock`), so concurrent updaters (the VMM taking a snapshot,
    /// the CLI renaming one) never lose each other's changes.
    pub fn update<T>(
        path: &Path,
        f: impl FnOnce(&mut Tree) -> Result<T, TreeError>,
    ) -> Result<T, TreeError> {
        use std::os::fd::AsRawFd;
        let lock_path = path.with_extension("lock");
        let io = |source| TreeError::Io {
            path: lock_path.clone(),
            source,
        };
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(io)?;
        // SAFETY: flock on a descriptor we own; released when `lock` closes.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io(std::io::Error::last_os_error()));
        }
        let mut tree = Tree::load(path)?;
        let r = f(&mut tree)?;
        tree.save(path)?;
        Ok(r)
    }

    /// Finds a snapshot by id, unique id prefix or unique name.
    pub fn resolve(&self, reference: &str) -> Result<&SnapshotMeta, TreeError> {
        if let Some(s) = self.snapshots.iter().find(|s| s.id == reference) {
            return Ok(s);
        }
        let by_name: Vec<&SnapshotMeta> = self
            .snapshots
            .iter()
            .filter(|s| s.name == reference)
            .collect();
        let by_prefix: Vec<&SnapshotMeta> = if reference.len() >= 4 {
            self.snapshots
                .iter()
                .filter(|s| s.id.starts_with(reference))
                .collect()
        } else {
            vec![]
        };
        let mut all: Vec<&SnapshotMeta> = by_name.iter().chain(by_prefix.iter()).copied().collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all.dedup_by(|a, b| a.id == b.id);
        match all.len() {
            0 => Err(TreeError::NotFound(reference.into())),
            1 => Ok(all[0]),
            _ => Err(TreeError::Ambiguous {
                reference: reference.into(),
                candidates: all
                    .iter()
                    .map(|s| format!("{} ({})", s.id, s.name))
                    .collect(),
            }),
        }
    }

    /// Adds `meta` as the newest snapshot and moves "Now" under it.
    pub fn add(&mut self, meta: SnapshotMeta) {
        self.now = Some(meta.id.clone());
        self.snapshots.push(meta);
    }

    /// Mutable access to a snapshot by reference.
    pub fn resolve_mut(&mut self, reference: &str) -> Result<&mut SnapshotMeta, TreeError> {
        let id = self.resolve(reference)?.id.clone();
        self.snapshots
            .iter_mut()
            .find(|s| s.id == id)
            .ok_or(TreeError::NotFound(reference.into()))
    }

    /// Children of `id`.
    pub fn children(&self, id: &str) -> Vec<&SnapshotMeta> {
        self.snapshots
            .iter()
            .filter(|s| s.parent.as_deref() == Some(id))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    /// tree.json damaged: refused naming the file, or read; lookups on what
    /// reads never panic.
    #[test]
    fn fuzz_tree_json() {
        let dir = std::env::temp_dir().join(format!("snapvm-fuzz-tree-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tree.json");
        let mut t = Tree::default();
        t.add(meta("a1", "one", None));
        t.add(meta("b2", "two", Some("a1")));
        t.retired.push("disks/x.qcow2".into());
        t.save(&path).unwrap();
        let valid = std::fs::read(&path).unwrap();
        fuzzing::run("tree.json", 2000, 256, |u| {
            std::fs::write(&path, fuzzing::mutate(&valid, u)?).unwrap();
            match Tree::load(&path) {
                Ok(t) => {
                    let r: String = u.arbitrary()?;
                    let _ = t.resolve(&r);
                    for s in &t.snapshots {
                        let _ = t.children(&s.id);
                    }
                }
                Err(e) => assert!(e.to_string().contains("tree.json"), "{e}"),
            }
            Ok(())
        });
        let _ = std::fs::remove_dir_all(&dir);
    }

    use super::*;

    fn meta(id: &str, name: &str, parent: Option<&str>) -> SnapshotMeta {
        SnapshotMeta {
            id: id.into(),
            name: name.into(),
            description: String::new(),
            created_ms: 1,
            parent: parent.map(str::to_string),
            power_state: PowerState::Running,
            pause_us: Some(1500),
            memory_bytes: 0,
            duration_ms: 0,
            disks: vec![],
            clones: vec![],
        }
    }

    #[test]
    fn resolve_by_id_prefix_and_name() {
        let mut t = Tree::default();
        t.add(meta("aaaa1111-0000", "base", None));
        t.add(meta("aaaa2222-0000", "work", Some("aaaa1111-0000")));
        t.add(meta("bbbb3333-0000", "work", Some("aaaa2222-0000")));
        assert_eq!(t.now.as_deref(), Some("bbbb3333-0000"));
        assert_eq!(t.resolve("aaaa1111-0000").unwrap().name, "base");
        assert_eq!(t.resolve("base").unwrap().id, "aaaa1111-0000");
        assert_eq!(t.resolve("bbbb").unwrap().id, "bbbb3333-0000");
        let e = t.resolve("work").unwrap_err().to_string();
        assert!(
            e.contains("ambiguous")
                && e.contains("aaaa2222-0000 (work)")
                && e.contains("bbbb3333-0000 (work)"),
            "{e}"
        );
        assert!(matches!(
            t.resolve("aaaa"),
            Err(TreeError::Ambiguous { .. })
        ));
        assert!(matches!(t.resolve("zzzz"), Err(TreeError::NotFound(_))));
        assert_eq!(t.children("aaaa1111-0000").len(), 1);
    }

    #[test]
    fn concurrent_updates_are_not_lost() {
        let p = std::env::temp_dir().join(format!("snapvm-tree-upd-{}.json", std::process::id()));
        let _ = std::fs::remove_file(&p);
        let threads: Vec<_> = (0..8)
            .map(|i| {
                let p = p.clone();
                std::thread::spawn(move || {
                    Tree::update(&p, |t| {
                        t.add(meta(&format!("id-{i}"), "x", None));
                        Ok(())
                    })
                    .unwrap()
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(Tree::load(&p).unwrap().snapshots.len(), 8);
        std::fs::remove_file(&p).unwrap();
        let _ = std::fs::remove_file(p.with_extension("lock"));
    }

    #[test]
    fn save_load_and_missing_file() {
        let p = std::env::temp_dir().join(format!("snapvm-tree-{}.json", std::process::id()));
        let _ = std::fs::remove_file(&p);
        assert_eq!(Tree::load(&p).unwrap(), Tree::default());
        let mut t = Tree::default();
        t.add(meta("x", "y", None));
        t.save(&p).unwrap();
        assert_eq!(Tree::load(&p).unwrap(), t);
        std::fs::write(&p, "{nope").unwrap();
        assert!(Tree::load(&p)
            .unwrap_err()
            .to_string()
            .contains("invalid snapshot tree"));
        std::fs::remove_file(&p).unwrap();
    }
}
