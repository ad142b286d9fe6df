//! What the page shows: the VMs of DIR (DIR itself when it holds a
//! vm.toml, else its subdirectories that do), each one's status (from its
//! VMM's API when it runs, from its directory when it is off, as
//! `snapvm status` does in vmm/src/cli/lifecycle.rs), its snapshot tree
//! with each snapshot's details (`snapvm snapshot show`), its jobs and the
//! tail of its serial console. Everything here blocks: the server calls it
//! on tokio's blocking threads. The page polls, so a VMM is asked with a
//! short timeout and no retries: one that does not answer in time is shown
//! as "not-answering" instead of holding up the others.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use snapshot::tree::{SnapshotMeta, Tree};

use super::error::RequestError;
use super::jobs::{is_recent, now_ms, LocalJobs};
use crate::api::{JobInfo, VmState, VmStatus};
use crate::cli::api_client::{Client, ClientError};
use crate::daemon::hardware::Hardware;
use crate::daemon::lock::is_running;
use crate::daemon::snapshots::manage::{self, SizeOnDisk};
use crate::daemon::status;
use crate::vmdir::VmDir;

/// How much of the end of logs/serial.log the page gets.
const CONSOLE_TAIL: u64 = 16 << 10;

/// How long a VMM may take to answer the page's polls (its status, its
/// jobs).
pub const POLL_TIMEOUT: Duration = Duration::from_secs(2);

/// The state of a VM whose VMM does not answer within [`POLL_TIMEOUT`].
pub const NOT_ANSWERING: &str = "not-answering";

/// A client for the page's polls of the VMM in `dir`.
fn poll_client(dir: &VmDir) -> Client {
    Client::with_timeout(&dir.api_socket(), POLL_TIMEOUT)
}

/// The VMs of a directory.
#[derive(Debug, Clone)]
pub struct Vms {
    root: PathBuf,
}

/// One VM as the list shows it.
#[derive(Debug, Clone, Serialize)]
pub struct VmView {
    /// Its key in URLs: the VM directory's file name.
    pub key: String,
    /// Its name (vm.toml), or the key when vm.toml does not read.
    pub name: String,
    /// The VM directory.
    pub dir: PathBuf,
    /// running, paused, stopping, stopped, changing (its VMM holds the
    /// lock but does not take requests: it is starting or stopping),
    /// not-answering (its VMM takes requests but does not answer within
    /// [`POLL_TIMEOUT`]) or invalid (vm.toml does not read).
    pub state: &'static str,
    /// The status document (the API's GET /vm), when vm.toml reads.
    pub status: Option<VmStatus>,
    /// Why the VM cannot be shown or reached.
    pub error: Option<String>,
    /// What this server is doing with the VM while it holds its lock.
    pub busy: Option<String>,
}

/// One snapshot with what `snapvm snapshot show` adds to its metadata.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotView {
    /// The tree's metadata.
    #[serde(flatten)]
    pub meta: SnapshotMeta,
    /// Space it takes.
    pub size_on_disk: Option<SizeOnDisk>,
    /// The hardware it was taken with.
    pub hardware: Option<Hardware>,
    /// What differs in the VM's hardware now.
    pub differences: Vec<String>,
    /// Independent disks it had attached (not captured).
    pub not_captured: Vec<String>,
    /// Why the details could not be read.
    pub details_error: Option<String>,
}

/// Everything the page shows of the selected VM.
#[derive(Debug, Clone, Serialize)]
pub struct VmDetail {
    /// The VM.
    pub vm: VmView,
    /// The snapshot "Now" hangs under (null: at the root).
    pub now: Option<String>,
    /// The snapshots, in creation order.
    pub snapshots: Vec<SnapshotView>,
    /// Why the tree could not be read.
    pub tree_error: Option<String>,
    /// Jobs running or ended in the last two minutes: the VMM's and this
    /// server's ("ui-" ids), oldest first.
    pub jobs: Vec<JobInfo>,
    /// The end of the serial console's log.
    pub console: String,
    /// This server's clock, ms since the Unix epoch (for job ages).
    pub now_ms: u64,
}

impl Vms {
    /// The VMs in `root`.
    pub fn new(root: &Path) -> Self {
        Self {
            root: root.to_path_buf(),
        }
    }

    /// The directory shown.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// (key, directory) of every VM, sorted by key.
    pub fn list(&self) -> Vec<(String, VmDir)> {
        let key = |p: &Path| {
            p.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| p.display().to_string())
        };
        if self.root.join("vm.toml").is_file() {
            return vec![(key(&self.root), VmDir::new(&self.root))];
        }
        let mut out: Vec<(String, VmDir)> = std::fs::read_dir(&self.root)
            .map(|entries| {
                entries
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.join("vm.toml").is_file())
                    .map(|p| (key(&p), VmDir::new(&p)))
                    .collect()
            })
            .unwrap_or_default();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The VM whose key is `key`.
    pub fn find(&self, key: &str) -> Result<VmDir, RequestError> {
        self.list()
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, d)| d)
            .ok_or_else(|| RequestError::NoSuchVm(key.to_string()))
    }
}

/// The VM's view: asks its VMM when it runs (once, without waiting: the
/// page asks again in a second).
pub fn view(key: &str, dir: &VmDir, jobs: &LocalJobs) -> VmView {
    let toml = match dir.load() {
        Ok(t) => t,
        Err(e) => {
            return VmView {
                key: key.to_string(),
                name: key.to_string(),
                dir: dir.root().to_path_buf(),
                state: "invalid",
                status: None,
                error: Some(e.to_string()),
                busy: None,
            }
        }
    };
    let busy = jobs.holding_lock(dir.root());
    let mut v = VmView {
        key: key.to_string(),
        name: toml.name.clone(),
        dir: dir.root().to_path_buf(),
        state: VmState::Stopped.as_str(),
        status: None,
        error: None,
        busy: busy
            .as_ref()
            .map(|j| format!("{} job {} runs (started here)", j.kind, j.id)),
    };
    // While a job of this server holds the lock, the VM is off (no VMM).
    if busy.is_none() && is_running(dir) {
        match poll_client(dir).status() {
            Ok(s) => {
                v.state = s.state.as_str();
                v.status = Some(s);
                return v;
            }
            Err(ClientError::NotRunning(_) | ClientError::Closed(_)) => v.state = "changing",
            Err(e @ ClientError::TimedOut { .. }) => {
                v.state = NOT_ANSWERING;
                v.error = Some(format!(
                    "{e}: it may be hung; what is shown is read from its directory"
                ));
            }
            Err(e) => {
                v.state = "changing";
                v.error = Some(e.to_string());
            }
        }
    }
    v.status = Some(status::offline(dir, &toml));
    v
}

/// The last [`CONSOLE_TAIL`] bytes of the serial log, from a line start.
pub fn console_tail(path: &Path) -> String {
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let from = len.saturating_sub(CONSOLE_TAIL);
    if f.seek(SeekFrom::Start(from)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    if f.take(CONSOLE_TAIL).read_to_end(&mut buf).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&buf);
    if from == 0 {
        return text.into_owned();
    }
    match text.find('\n') {
        Some(i) => text[i + 1..].to_string(),
        None => text.into_owned(),
    }
}

/// A snapshot with its details (`snapvm snapshot show`); its metadata
/// alone when they do not read.
fn snapshot_view(dir: &VmDir, meta: &SnapshotMeta) -> SnapshotView {
    match manage::show(dir, &meta.id) {
        Ok(d) => SnapshotView {
            meta: d.snapshot,
            size_on_disk: Some(d.size_on_disk),
            hardware: Some(d.hardware),
            differences: d.differences,
            not_captured: d.not_captured,
            details_error: None,
        },
        Err(e) => SnapshotView {
            meta: meta.clone(),
            size_on_disk: None,
            hardware: None,
            differences: vec![],
            not_captured: vec![],
            details_error: Some(e.to_string()),
        },
    }
}

/// The views of `vms`, each asked on a thread of its own, so that VMMs
/// that do not answer cost [`POLL_TIMEOUT`] once, not once each.
pub fn views(vms: &[(String, VmDir)], jobs: &LocalJobs) -> Vec<VmView> {
    std::thread::scope(|s| {
        let asked: Vec<_> = vms
            .iter()
            .map(|(k, d)| (k, d, s.spawn(move || view(k, d, jobs))))
            .collect();
        asked
            .into_iter()
            .map(|(k, d, h)| {
                h.join().unwrap_or_else(|_| VmView {
                    key: k.clone(),
                    name: k.clone(),
                    dir: d.root().to_path_buf(),
                    state: "invalid",
                    status: None,
                    error: Some("reading its status failed (see the server's output)".into()),
                    busy: None,
                })
            })
            .collect()
    })
}

/// The VMM's jobs (GET /jobs) that run or ended recently.
fn vmm_jobs(dir: &VmDir) -> Vec<JobInfo> {
    let now = now_ms();
    poll_client(dir)
        .jobs()
        .unwrap_or_default()
        .into_iter()
        .filter(|j| is_recent(j, now))
        .collect()
}

/// Everything about one VM.
pub fn detail(key: &str, dir: &VmDir, jobs: &LocalJobs) -> VmDetail {
    let vm = view(key, dir, jobs);
    let (tree, tree_error) = match Tree::load(&dir.tree_path()) {
        Ok(t) => (t, None),
        Err(e) => (Tree::default(), Some(e.to_string())),
    };
    let mut all_jobs = if vm.status.as_ref().is_some_and(|s| s.pid.is_some()) {
        vmm_jobs(dir)
    } else {
        vec![]
    };
    all_jobs.extend(jobs.for_vm(dir.root()));
    all_jobs.sort_by_key(|j| j.started_ms);
    VmDetail {
        snapshots: tree
            .snapshots
            .iter()
            .map(|s| snapshot_view(dir, s))
            .collect(),
        now: tree.now.clone(),
        tree_error,
        jobs: all_jobs,
        console: console_tail(&dir.serial_log()),
        vm,
        now_ms: now_ms(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("snapvm-ui-vms-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn vms_are_the_subdirectories_with_a_vm_toml_or_the_directory_itself() {
        let root = scratch("list");
        for d in ["b", "a", "not-a-vm"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::write(root.join("a/vm.toml"), "").unwrap();
        std::fs::write(root.join("b/vm.toml"), "").unwrap();
        let vms = Vms::new(&root);
        let keys: Vec<String> = vms.list().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["a", "b"]);
        assert_eq!(vms.find("b").unwrap().root(), root.join("b"));
        assert!(matches!(vms.find("../a"), Err(RequestError::NoSuchVm(_))));
        assert!(matches!(
            vms.find("not-a-vm"),
            Err(RequestError::NoSuchVm(_))
        ));
        let one = Vms::new(&root.join("a"));
        assert_eq!(one.list().len(), 1);
        assert!(one.find("a").is_ok());
        // An unreadable vm.toml is shown as such, not hidden.
        let v = view("a", &VmDir::new(&root.join("a")), &LocalJobs::default());
        assert_eq!(v.state, "invalid");
        assert!(v.error.is_some());
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn the_console_tail_starts_at_a_line() {
        let root = scratch("console");
        let log = root.join("serial.log");
        assert_eq!(console_tail(&log), "");
        std::fs::write(&log, "one\ntwo\n").unwrap();
        assert_eq!(console_tail(&log), "one\ntwo\n");
        let long: String = (0..5000).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&log, &long).unwrap();
        let tail = console_tail(&log);
        assert!(tail.len() as u64 <= CONSOLE_TAIL);
        assert!(tail.starts_with("line "), "{}", &tail[..20]);
        assert!(tail.ends_with("line 4999\n"));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
