//! The parts of a VM's status document (crate::api::VmStatus) read from
//! its directory: disks and their layers, merges. The VMM adds its own
//! figures; the CLI builds the document of a VM that is off from these.

use snapshot::tree::Tree;

use crate::api::{DiskStatus, JobInfo, LastExit, MergeStatus, NetStatus, VmState, VmStatus};
use crate::vmdir::{VmDir, VmToml};

/// The layers of every disk, top first.
pub fn disks(dir: &VmDir, toml: &VmToml) -> Vec<DiskStatus> {
    toml.disks
        .iter()
        .map(|d| {
            let current = dir.resolve(&d.current);
            let layers = snapshot::disk::resolve_chain(&current)
                .map(|c| c.iter().map(|l| l.path.display().to_string()).collect())
                .unwrap_or_else(|e| vec![format!("error: {e}")]);
            DiskStatus {
                name: d.name.clone(),
                current: d.current.clone(),
                readonly: d.readonly,
                independent: d.independent,
                layers,
            }
        })
        .collect()
}

/// The network adapters.
pub fn nets(toml: &VmToml) -> Vec<NetStatus> {
    toml.nets
        .iter()
        .map(|n| NetStatus {
            name: n.name.clone(),
            tap: n.tap.clone(),
            mac: n.mac.clone(),
        })
        .collect()
}

/// Merges in progress and layers waiting for one; `job` is the merge job
/// running, if any.
pub fn merges(dir: &VmDir, job: Option<JobInfo>) -> MergeStatus {
    let tree = Tree::load(&dir.tree_path()).unwrap_or_default();
    MergeStatus {
        job,
        in_progress: tree.merge,
        waiting: tree.retired,
    }
}

/// The whole status document of a VM that is off, read from its directory
/// (what `snapvm status` and the web view show for it).
pub fn offline(dir: &VmDir, toml: &VmToml) -> VmStatus {
    let last_exit: Option<LastExit> = std::fs::read_to_string(dir.last_exit_file())
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok());
    VmStatus {
        name: toml.name.clone(),
        vmdir: dir.root().to_path_buf(),
        state: VmState::Stopped,
        pid: None,
        uptime_s: None,
        memory_bytes: crate::config::parse_size(&toml.memory).unwrap_or(0),
        vcpus: toml.vcpus,
        disks: disks(dir, toml),
        nets: nets(toml),
        merges: merges(dir, None),
        memory_load: None,
        last_exit,
    }
}
