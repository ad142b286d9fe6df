//! `snapvm snapshot clone` and `snapvm clone detach`
//! (daemon/snapshots/clone.rs does the work).

use std::path::{Path, PathBuf};
use std::time::Instant;

use super::lifecycle::{self, LifecycleError};
use crate::daemon::lock::lock_stopped;
use crate::daemon::snapshots::clone::{self, CloneOptions, Cloned, Detached};
use crate::vmdir::VmDir;

/// Errors of the clone commands.
#[derive(Debug, thiserror::Error)]
pub enum CloneCmdError {
    /// Making or starting a clone failed.
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    /// `--count 0`.
    #[error("--count must be at least 1")]
    ZeroCount,
    /// A clone failed after others were made.
    #[error("clone {n} of {count} ({dir}): {source}")]
    Partway {
        /// Its number.
        n: usize,
        /// How many were asked for.
        count: usize,
        /// Its directory.
        dir: PathBuf,
        /// What went wrong.
        source: Box<LifecycleError>,
    },
}

/// The directories of `count` clones at `dest` (`dest-1` ... with a count).
fn destinations(dest: &Path, count: Option<usize>) -> Vec<PathBuf> {
    match count {
        None => vec![dest.to_path_buf()],
        Some(n) => (1..=n)
            .map(|i| {
                let mut name = dest.as_os_str().to_owned();
                name.push(format!("-{i}"));
                PathBuf::from(name)
            })
            .collect(),
    }
}

fn describe(c: &Cloned, started: Option<u32>) {
    let mut line = format!("cloned {}", c.dir.display());
    for (name, tap, mac) in &c.nets {
        line.push_str(&format!("; {name} on tap {tap}, MAC {mac}"));
    }
    match started {
        Some(pid) => line.push_str(&format!("; running (pid {pid})")),
        None if c.pending => line.push_str("; `snapvm start` continues from the snapshot"),
        None => line.push_str("; the snapshot was off: `snapvm start` boots it"),
    }
    println!("{line}");
    for d in &c.left_out {
        println!("  independent disk {d} of the snapshot is not attached to clones");
    }
}

/// `snapvm snapshot clone`.
pub fn clone(
    root: &Path,
    reference: &str,
    dest: &Path,
    count: Option<usize>,
    start: bool,
    tap: &str,
) -> Result<(), CloneCmdError> {
    if count == Some(0) {
        return Err(CloneCmdError::ZeroCount);
    }
    let dir = VmDir::open(root).map_err(LifecycleError::from)?;
    let opts = CloneOptions {
        tap_template: Some(tap.to_string()),
    };
    let dests = destinations(dest, count);
    let total = dests.len();
    let t0 = Instant::now();
    let mut made = Vec::new();
    for (i, d) in dests.iter().enumerate() {
        let c =
            clone::clone(&dir, reference, d, i + 1, &opts).map_err(|e| CloneCmdError::Partway {
                n: i + 1,
                count: total,
                dir: d.clone(),
                source: Box::new(LifecycleError::from(e)),
            })?;
        made.push(c);
    }
    let made_ms = t0.elapsed().as_millis();
    if !start {
        for c in &made {
            describe(c, None);
        }
        if total > 1 {
            println!("{total} clones in {made_ms} ms");
        }
        return Ok(());
    }
    // All at once: each VMM starts on its own.
    let dirs: Vec<PathBuf> = made.iter().map(|c| c.dir.clone()).collect();
    let results = lifecycle::start_all(&dirs);
    let mut first_error = None;
    for (i, (c, r)) in made.iter().zip(results).enumerate() {
        match r {
            Ok(st) => describe(c, st.pid),
            Err(e) => {
                describe(c, None);
                eprintln!("snapvm: clone {} did not start: {e}", c.dir.display());
                first_error.get_or_insert(CloneCmdError::Partway {
                    n: i + 1,
                    count: total,
                    dir: c.dir.clone(),
                    source: Box::new(e),
                });
            }
        }
    }
    if total > 1 {
        println!(
            "{total} clones made in {made_ms} ms, running after {} ms",
            t0.elapsed().as_millis()
        );
    }
    first_error.map_or(Ok(()), Err)
}

/// `snapvm clone detach`.
pub fn detach(root: &Path) -> Result<Detached, LifecycleError> {
    let dir = VmDir::open(root)?;
    let _lock = lock_stopped(&dir)?;
    let d = clone::detach(&dir)?;
    for f in &d.copied {
        println!("copied {}", f.display());
    }
    if d.copied_memory {
        println!("copied the snapshot's state and memory: `snapvm start` continues from them");
    }
    println!("{} is standalone", dir.root().display());
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_destinations() {
        assert_eq!(
            destinations(Path::new("/x/lab"), None),
            [PathBuf::from("/x/lab")]
        );
        assert_eq!(
            destinations(Path::new("/x/lab"), Some(2)),
            [PathBuf::from("/x/lab-1"), PathBuf::from("/x/lab-2")]
        );
    }
}
