//! `snapvm bench`: benchmarks that print a table, each figure next to a
//! baseline measured in the same run (QEMU on the same guest where it can
//! run here). One file per benchmark; shared helpers here and in
//! `engine.rs`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

mod apply;
mod boot;
mod disk;
mod engine;
mod merge;
mod snapshot;

pub use self::apply::{apply, ApplyBench};
pub use self::boot::{boot, BootBench};
pub use self::disk::{disk, DiskBench};
pub use self::merge::{merge, MergeBench};
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
/// (`count` blocks, or all of `input`); returns MiB/s over `mib`.
pub(super) fn dd(
    input: &Path,
    dir: &Path,
    count: Option<u64>,
    mib: u64,
) -> Result<f64, BenchError> {
    let target = dir.join("dd.bin");
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
    let _ = std::fs::remove_file(&target);
    if !st.success() {
        return Err(BenchError::Guest {
            what: "dd".into(),
            message: format!("exited with {st}"),
        });
    }
    Ok(mib as f64 / secs)
}

/// `dd` of `mib` MiB of zeroes to `dir`, with fdatasync: MiB/s.
pub(super) fn dd_mibps(dir: &Path, mib: u64) -> Result<f64, BenchError> {
    dd(Path::new("/dev/zero"), dir, Some(mib), mib)
}

pub(super) fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

pub(super) fn run_job(
    dir: &crate::vmdir::VmDir,
    path: &str,
    body: serde_json::Value,
) -> Result<serde_json::Value, BenchError> {
    let berr = |e: String| BenchError::Guest {
        what: format!("job {path}"),
        message: e,
    };
    let job = crate::cli::api_client::request(&dir.api_socket(), "POST", path, Some(&body))
        .map_err(|e| berr(e.to_string()))?;
    let id = job["job"].as_str().unwrap_or_default().to_string();
    wait_for_job(dir, &id, path)
}

/// Takes a live snapshot through the API; returns its id.
pub(super) fn snapshot_id(dir: &crate::vmdir::VmDir) -> Result<String, BenchError> {
    let snap = run_job(dir, "/snapshots", serde_json::json!({}))?;
    Ok(snap["snapshot"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string())
}

/// Polls job `id` until it ends; its result, or its error as `what`'s.
pub(super) fn wait_for_job(
    dir: &crate::vmdir::VmDir,
    id: &str,
    what: &str,
) -> Result<serde_json::Value, BenchError> {
    let berr = |e: String| BenchError::Guest {
        what: format!("job {what}"),
        message: e,
    };
    loop {
        let j =
            crate::cli::api_client::request(&dir.api_socket(), "GET", &format!("/jobs/{id}"), None)
                .map_err(|e| berr(e.to_string()))?;
        match j["state"].as_str() {
            Some("succeeded") => return Ok(j["result"].clone()),
            Some("failed") => {
                return Err(berr(j["error"].as_str().unwrap_or("failed").to_string()))
            }
            _ => std::thread::sleep(Duration::from_millis(2)),
        }
    }
}
