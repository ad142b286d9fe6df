//! `snapvm bench`: benchmarks that print a table, each figure next to a
//! baseline measured in the same run (QEMU on the same guest where it can
//! run here). One file per benchmark; shared helpers here and in
//! `engine.rs`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::api::{ApplyResult, ApplySnapshotRequest, CreateSnapshotRequest, JobState, LiveResult};
use crate::cli::api_client::{Client, ClientError};

mod apply;
mod boot;
mod clone;
mod disk;
mod engine;
mod merge;
mod net;
mod qemu_snapshot;
mod snapshot;

pub use self::apply::{apply, ApplyBench};
pub use self::boot::{boot, BootBench};
pub use self::clone::{clone_bench, CloneBench};
pub use self::disk::{disk, DiskBench};
pub use self::merge::{merge, MergeBench};
pub use self::net::{net, NetBench};
pub use self::snapshot::{snapshot, SnapshotBench};

/// Errors of a benchmark run.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A process could not be started.
    #[error("cannot start {what}: {source}")]
    Spawn {
        /// Which program.
        what: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The guest did not report what was expected.
    #[error("{what}: {message}")]
    Guest {
        /// Which program.
        what: String,
        /// What went wrong.
        message: String,
    },
}

pub(super) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// Guest memstamp MiB/s reported in serial output between byte offsets.
pub(super) fn guest_rates(serial: &Path, from: usize, to: usize) -> Vec<f64> {
    let s = std::fs::read_to_string(serial).unwrap_or_default();
    let part = s.get(from..to.min(s.len())).unwrap_or("");
    part.lines()
        .filter(|l| l.starts_with("TESTGUEST PASS"))
        .filter(|l| field(l, "gen").and_then(|g| g.parse::<u32>().ok()) >= Some(2))
        .filter_map(|l| field(l, "mibps").and_then(|v| v.parse().ok()))
        .collect()
}

pub(super) fn serial_len(serial: &Path) -> usize {
    std::fs::metadata(serial)
        .map(|m| m.len() as usize)
        .unwrap_or(0)
}

/// Runs `dd bs=1M conv=fdatasync` from `input` to a scratch file in `dir`
/// (`count` blocks, or all of `input`), deleted after; returns MiB/s over
/// `mib`.
pub(super) fn dd(
    input: &Path,
    dir: &Path,
    count: Option<u64>,
    mib: u64,
) -> Result<f64, BenchError> {
    let target = dir.join("dd.bin");
    let r = dd_to(input, &target, count, mib);
    let _ = std::fs::remove_file(&target);
    r
}

/// [`dd`] into `target`, which is kept.
pub(super) fn dd_to(
    input: &Path,
    target: &Path,
    count: Option<u64>,
    mib: u64,
) -> Result<f64, BenchError> {
    let mut cmd = Command::new("dd");
    cmd.arg(format!("if={}", input.display()))
        .arg(format!("of={}", target.display()))
        .args(["bs=1M", "conv=fdatasync", "status=none"]);
    if let Some(n) = count {
        cmd.arg(format!("count={n}"));
    }
    let t0 = Instant::now();
    let st = cmd.status().map_err(|source| BenchError::Spawn {
        what: "dd".into(),
        source,
    })?;
    let secs = t0.elapsed().as_secs_f64();
    if !st.success() {
        return Err(BenchError::Guest {
            what: "dd".into(),
            message: format!("exited with {st}"),
        });
    }
    Ok(mib as f64 / secs)
}

/// Bytes free for an unprivileged writer on the file system of `dir`.
pub(super) fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: an all-zero statvfs is a valid out-parameter.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// The snapshot files a benchmark keeps, as a user keeps them (or deletes
/// at once, to measure what keeping them costs). When the file system runs
/// short of room for the next one, the oldest go first, and are counted.
pub(super) struct KeptFiles {
    keep: bool,
    files: std::collections::VecDeque<std::path::PathBuf>,
    dropped: usize,
}

impl KeptFiles {
    pub(super) fn new(keep: bool) -> Self {
        Self {
            keep,
            files: Default::default(),
            dropped: 0,
        }
    }

    /// Keeps `file` (or deletes it), then makes room in `dir` for `next`
    /// more bytes plus 2 GiB to spare by deleting the oldest kept files.
    pub(super) fn add(&mut self, file: std::path::PathBuf, dir: &Path, next: u64) {
        if !self.keep {
            let _ = std::fs::remove_file(&file);
            return;
        }
        self.files.push_back(file);
        while free_bytes(dir).is_ok_and(|b| b < next + (2 << 30)) {
            let Some(old) = self.files.pop_front() else {
                break;
            };
            let _ = std::fs::remove_file(old);
            self.dropped += 1;
        }
    }

    /// How the files were treated, for the table's notes.
    pub(super) fn describe(&self) -> String {
        match (self.keep, self.dropped) {
            (false, _) => "each deleted right after its snapshot".into(),
            (true, 0) => "all kept".into(),
            (true, n) => format!("kept, but the {n} oldest deleted to leave room"),
        }
    }
}

pub(super) fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// The API client of the VM in `dir`.
pub(super) fn client(dir: &crate::vmdir::VmDir) -> Client {
    Client::new(&dir.api_socket())
}

fn api_err(what: &str) -> impl Fn(ClientError) -> BenchError + '_ {
    move |e| BenchError::Guest {
        what: what.to_string(),
        message: e.to_string(),
    }
}

/// Takes a live snapshot through the API; its result.
pub(super) fn take_live(
    dir: &crate::vmdir::VmDir,
    stop_and_copy: bool,
) -> Result<LiveResult, BenchError> {
    let req = CreateSnapshotRequest {
        stop_and_copy,
        ..Default::default()
    };
    let job = client(dir)
        .create_snapshot(&req)
        .map_err(api_err("snapshot"))?;
    wait_for_job(dir, &job.job, "snapshot")
}

/// Takes a live snapshot through the API; returns its id.
pub(super) fn snapshot_id(dir: &crate::vmdir::VmDir) -> Result<String, BenchError> {
    Ok(take_live(dir, false)?.snapshot.id)
}

/// Applies snapshot `id` through the API; the job's result.
pub(super) fn apply_snapshot(
    dir: &crate::vmdir::VmDir,
    id: &str,
    eager: bool,
) -> Result<ApplyResult, BenchError> {
    let req = ApplySnapshotRequest {
        eager,
        ..Default::default()
    };
    let job = client(dir)
        .apply_snapshot(id, &req)
        .map_err(api_err("apply"))?;
    wait_for_job(dir, &job.job, "apply")
}

/// Polls job `id` until it ends; its result, or its error as `what`'s.
pub(super) fn wait_for_job<T: serde::de::DeserializeOwned>(
    dir: &crate::vmdir::VmDir,
    id: &str,
    what: &str,
) -> Result<T, BenchError> {
    let berr = |message: String| BenchError::Guest {
        what: format!("job {what}"),
        message,
    };
    let client = client(dir);
    loop {
        let j = client.job(id).map_err(|e| berr(e.to_string()))?;
        match j.state {
            JobState::Succeeded => {
                return serde_json::from_value(j.result.unwrap_or_default())
                    .map_err(|e| berr(format!("unexpected result: {e}")))
            }
            JobState::Failed => return Err(berr(j.error.unwrap_or_else(|| "failed".into()))),
            JobState::Running => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}
