//! `snapvm bench clone`: N clones of one running snapshot, next to the way
//! without clones (export + `start --from`, the same snapshot) in the same
//! run.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::*;
use crate::daemon::snapshots::clone::{self, CloneOptions};

/// Parameters of `snapvm bench clone`.
pub struct CloneBench {
    /// The test guest.
    pub kernel: PathBuf,
    /// Directory for the VMs (default: the system temp dir).
    pub dir: PathBuf,
    /// Clones.
    pub count: usize,
    /// Guest memory in MiB.
    pub size_mib: u64,
    /// Export + start --from runs of the baseline.
    pub baseline: usize,
}

fn fail(what: &str, e: impl std::fmt::Display) -> BenchError {
    BenchError::Guest {
        what: what.into(),
        message: e.to_string(),
    }
}

/// Private (not shared) KiB of process `pid`.
fn private_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with("Private_Clean:") || l.starts_with("Private_Dirty:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum()
}

/// Allocated KiB of the files in `dir`.
fn allocated_kib(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|it| {
            it.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.blocks() / 2)
                .sum()
        })
        .unwrap_or(0)
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    match s.len() {
        0 => f64::NAN,
        n => s[((n - 1) as f64 * p).round() as usize],
    }
}

/// Waits for the first memstamp PASS after byte `from` of `serial`.
fn first_pass(serial: &Path, from: usize, what: &str) -> Result<Instant, BenchError> {
    wait_line(serial, from, "TESTGUEST PASS vcpu=0 gen=", what)
}

/// Waits for a line starting with `prefix` after byte `from` of `serial`.
fn wait_line(serial: &Path, from: usize, prefix: &str, what: &str) -> Result<Instant, BenchError> {
    let t0 = Instant::now();
    loop {
        let s = std::fs::read_to_string(serial).unwrap_or_default();
        let tail = s.get(from..).unwrap_or("");
        if tail.contains("TESTGUEST FAIL") {
            return Err(fail(
                what,
                tail.lines().find(|l| l.contains("FAIL")).unwrap_or(""),
            ));
        }
        if tail.lines().any(|l| l.starts_with(prefix)) {
            return Ok(Instant::now());
        }
        if t0.elapsed() > Duration::from_secs(300) {
            return Err(fail(what, format!("no '{prefix}' line within 300 s")));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

struct Run {
    create_ms: Vec<f64>,
    running_ms: Vec<f64>,
    pass_ms: Vec<f64>,
    all_running_ms: f64,
    private_kib: u64,
    shared_kib: u64,
}

fn pid_of(dir: &Path) -> Option<u32> {
    std::fs::read_to_string(crate::vmdir::VmDir::new(dir).pid_file())
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Makes every VM (`make` creates VM `i` and returns its directory and
/// the snapshot to continue from, None for a clone's own pending start),
/// then starts them all at once, and measures.
fn run_all(
    n: usize,
    mut make: impl FnMut(usize) -> Result<(PathBuf, Option<String>), BenchError>,
    shared_dir: Option<&Path>,
) -> Result<(Run, Vec<PathBuf>), BenchError> {
    let mut create_ms = Vec::new();
    let mut made = Vec::new();
    let t_all = Instant::now();
    for i in 1..=n {
        let t = Instant::now();
        made.push(make(i)?);
        create_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    // All at once, each start timed on its own thread.
    let started: Vec<Result<(Instant, f64), BenchError>> = std::thread::scope(|s| {
        let handles: Vec<_> = made
            .iter()
            .map(|(dir, from)| {
                s.spawn(move || {
                    let t = Instant::now();
                    crate::cli::lifecycle::start_from(dir, false, from.as_deref())
                        .map_err(|e| fail(&dir.display().to_string(), e))?;
                    Ok((t, t.elapsed().as_secs_f64() * 1000.0))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(fail("start", "thread panicked")))
            })
            .collect()
    });
    let all_running_ms = t_all.elapsed().as_secs_f64() * 1000.0;
    let made: Vec<PathBuf> = made.into_iter().map(|(d, _)| d).collect();
    let mut starts = Vec::new();
    let mut running_ms = Vec::new();
    for r in started {
        match r {
            Ok((t, ms)) => {
                starts.push(t);
                running_ms.push(ms);
            }
            Err(e) => {
                stop_all(&made);
                return Err(e);
            }
        }
    }
    let mut pass_ms = Vec::new();
    for (dir, t) in made.iter().zip(&starts) {
        let serial = crate::vmdir::VmDir::new(dir).serial_log();
        let at = first_pass(&serial, 0, &dir.display().to_string())?;
        pass_ms.push(at.duration_since(*t).as_secs_f64() * 1000.0);
    }
    // Memory once each guest has read its read-only data at least once
    // (its first check of it), so that every VM has touched what it uses.
    for dir in &made {
        let serial = crate::vmdir::VmDir::new(dir).serial_log();
        let from = std::fs::metadata(&serial)
            .map(|m| m.len() as usize)
            .unwrap_or(0);
        wait_line(
            &serial,
            from,
            "TESTGUEST PASS vcpu=0 workload=keep",
            &dir.display().to_string(),
        )?;
    }
    let private_kib = made.iter().filter_map(|d| pid_of(d)).map(private_kib).sum();
    let shared_kib = shared_dir.map(allocated_kib).unwrap_or(0);
    Ok((
        Run {
            create_ms,
            running_ms,
            pass_ms,
            all_running_ms,
            private_kib,
            shared_kib,
        },
        made,
    ))
}

fn stop_all(dirs: &[PathBuf]) {
    for d in dirs {
        let _ = crate::cli::lifecycle::stop(d, true);
        let _ = std::fs::remove_dir_all(d);
    }
}

/// Runs `snapvm bench clone` and prints its table.
pub fn clone_bench(b: &CloneBench) -> Result<(), BenchError> {
    let keep = b.size_mib / 2;
    println!(
        "snapvm bench clone: {} clones of a running {} MiB test guest (1 vCPU; {keep} MiB read-only data, memstamp over 16 MiB),",
        b.count, b.size_mib
    );
    println!(
        "next to export + start --from of the same snapshot ({} times) in the same run",
        b.baseline
    );
    let root = b
        .dir
        .join(format!("snapvm-bench-clone-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let shared = PathBuf::from(format!(
        "/dev/shm/snapvm-bench-clone-{}",
        std::process::id()
    ));
    std::env::set_var("SNAPVM_SHARED_DIR", &shared);
    let vmdir = root.join("src");
    let req = crate::vmdir::CreateRequest {
        kernel: b.kernel.clone(),
        initrd: None,
        cmdline: format!("workload=memstamp mem_mib=16 passes=0 keep_mib={keep}"),
        memory: format!("{}M", b.size_mib),
        vcpus: 1,
        pin_vcpus: crate::machine::backend_quirks::PinVcpus::Auto,
        huge_pages: crate::machine::backend_quirks::HugePages::Auto,
        disks: vec![],
        nets: vec![],
        link: true,
    };
    let dir = crate::vmdir::create(&vmdir, &req).map_err(|e| fail("create", e))?;
    crate::cli::lifecycle::start(&vmdir, false).map_err(|e| fail("start", e))?;
    let result = (|| {
        first_pass(&dir.serial_log(), 0, "source")?;
        let src_rss = pid_of(&vmdir)
            .and_then(|p| {
                std::fs::read_to_string(format!("/proc/{p}/smaps_rollup"))
                    .ok()?
                    .lines()
                    .find(|l| l.starts_with("Rss:"))?
                    .split_whitespace()
                    .nth(1)?
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0);
        let snap = take_live(&dir, false)?.snapshot;
        let _ = crate::cli::lifecycle::stop(&vmdir, true);
        let touched_kib = snap.memory_bytes / 1024;

        let opts = CloneOptions::default();
        let (clones, made) = run_all(
            b.count,
            |i| {
                let d = root.join(format!("clone-{i}"));
                clone::clone(&dir, &snap.id, &d, i, &opts)
                    .map(|c| (c.dir, None))
                    .map_err(|e| fail("clone", e))
            },
            Some(&shared),
        )?;
        stop_all(&made);
        let (exports, made) = run_all(
            b.baseline,
            |i| {
                let d = root.join(format!("export-{i}"));
                crate::daemon::snapshots::export::export(&dir, &snap.id, &d)
                    .map(|m| (d, Some(m.id)))
                    .map_err(|e| fail("export", e))
            },
            None,
        )?;
        stop_all(&made);
        Ok((clones, exports, touched_kib, src_rss))
    })();
    let _ = crate::cli::lifecycle::stop(&vmdir, true);
    let _ = std::fs::remove_dir_all(&root);
    let _ = std::fs::remove_dir_all(&shared);
    let (c, e, touched_kib, src_rss) = result?;

    println!();
    println!(
        "{:<44} {:>12} {:>14} {:>8}",
        "per VM", "clone", "export+from", "ratio"
    );
    let row = |name: &str, a: f64, x: f64| {
        println!("{name:<44} {a:>12.1} {x:>14.1} {:>8.3}", a / x);
    };
    row(
        "make it, p50 (ms)",
        percentile(&c.create_ms, 0.5),
        percentile(&e.create_ms, 0.5),
    );
    row(
        "start -> running, p50 (ms)",
        percentile(&c.running_ms, 0.5),
        percentile(&e.running_ms, 0.5),
    );
    row(
        "start -> running, p95 (ms)",
        percentile(&c.running_ms, 0.95),
        percentile(&e.running_ms, 0.95),
    );
    row(
        "start -> first PASS, p50 (ms)",
        percentile(&c.pass_ms, 0.5),
        percentile(&e.pass_ms, 0.5),
    );
    row(
        "host memory per VM (MiB)",
        (c.private_kib + c.shared_kib) as f64 / 1024.0 / b.count as f64,
        (e.private_kib + e.shared_kib) as f64 / 1024.0 / b.baseline.max(1) as f64,
    );
    println!();
    println!(
        "{} clones: made (the first stages the snapshot's memory on tmpfs: {:.0} ms) and all running in {:.0} ms; export + start --from of {}: {:.0} ms",
        b.count,
        c.create_ms.first().copied().unwrap_or(0.0),
        c.all_running_ms,
        b.baseline,
        e.all_running_ms
    );
    println!(
        "{} clones: host memory {:.0} MiB ({:.0} private + {:.0} staged) = {:.2} x one VM's touched memory ({:.0} MiB; the source VMM's RSS was {:.0} MiB)",
        b.count,
        (c.private_kib + c.shared_kib) as f64 / 1024.0,
        c.private_kib as f64 / 1024.0,
        c.shared_kib as f64 / 1024.0,
        (c.private_kib + c.shared_kib) as f64 / touched_kib.max(1) as f64,
        touched_kib as f64 / 1024.0,
        src_rss as f64 / 1024.0
    );
    println!("(targets: 20 clones of 1 GiB running within 1 s in all; their memory under 2 x one VM's touched memory)");
    Ok(())
}
