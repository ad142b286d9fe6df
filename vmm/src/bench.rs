//! `snapvm bench`: benchmarks that print a table, each figure next to a
//! baseline measured in the same run (QEMU on the same guest).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

/// Parameters of `snapvm bench boot`.
pub struct BootBench {
    /// The test guest.
    pub kernel: PathBuf,
    /// Boots per engine.
    pub runs: usize,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u64,
}

/// How to start a guest: snapvm itself or the QEMU baseline.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Engine {
    Snapvm,
    Qemu,
}

impl Engine {
    fn name(self) -> &'static str {
        match self {
            Engine::Snapvm => "snapvm",
            Engine::Qemu => "qemu",
        }
    }

    fn command(self, kernel: &Path, cmdline: &str, vcpus: u8, mem_mib: u64) -> Command {
        match self {
            Engine::Snapvm => {
                let exe = std::env::current_exe().unwrap_or_else(|_| "snapvm".into());
                let mut c = Command::new(exe);
                c.arg("run")
                    .arg("--kernel")
                    .arg(kernel)
                    .args(["--cmdline", cmdline])
                    .args(["--vcpus", &vcpus.to_string()])
                    .args(["--memory", &format!("{mem_mib}M")]);
                c
            }
            Engine::Qemu => {
                let mut c = Command::new("qemu-system-x86_64");
                c.args(["-accel", "kvm", "-cpu", "qemu64,-cx16", "-M", "microvm"])
                    .args(["-m", &format!("{mem_mib}M"), "-smp", &vcpus.to_string()])
                    .args([
                        "-nodefaults",
                        "-no-user-config",
                        "-nographic",
                        "-serial",
                        "stdio",
                    ])
                    .args(["-device", "isa-debug-exit,iobase=0x501,iosize=1"])
                    .arg("-kernel")
                    .arg(kernel)
                    .args(["-append", &format!("{cmdline} vcpus={vcpus}")]);
                c
            }
        }
    }
}

/// Runs the guest until a line starting with `until` (or the end); returns
/// the lines and the time to that line.
fn run_until(
    engine: Engine,
    cmd: &mut Command,
    until: &str,
    timeout: Duration,
) -> Result<(Vec<String>, Duration), BenchError> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|source| BenchError::Spawn {
            what: engine.name().into(),
            source,
        })?;
    let stdout = child.stdout.take().ok_or_else(|| BenchError::Guest {
        what: engine.name().into(),
        message: "no stdout".into(),
    })?;
    let mut lines = Vec::new();
    let mut at = None;
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        let hit = line.starts_with(until);
        lines.push(line);
        if hit {
            at = Some(start.elapsed());
            break;
        }
        if start.elapsed() > timeout {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    match at {
        Some(t) => Ok((lines, t)),
        None => Err(BenchError::Guest {
            what: engine.name().into(),
            message: format!("no '{until}' line; output: {lines:?}"),
        }),
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

struct BootFigures {
    ready_ms: Vec<f64>,
    mibps: Vec<f64>,
}

fn measure(engine: Engine, b: &BootBench) -> Result<BootFigures, BenchError> {
    let mut ready_ms = Vec::new();
    for _ in 0..b.runs {
        let mut cmd = engine.command(&b.kernel, "workload=idle", b.vcpus, b.memory_mib);
        let (_, t) = run_until(engine, &mut cmd, "TESTGUEST READY", Duration::from_secs(60))?;
        ready_ms.push(t.as_secs_f64() * 1000.0);
    }
    let area = (b.memory_mib / 2).max(16);
    let mut cmd = engine.command(
        &b.kernel,
        &format!("workload=memstamp mem_mib={area} passes=6"),
        b.vcpus,
        b.memory_mib,
    );
    let (lines, _) = run_until(engine, &mut cmd, "TESTGUEST DONE", Duration::from_secs(120))?;
    // Generation 1 includes the host's first touch of every page; the
    // steady state is what the workload sees afterwards.
    let mibps = lines
        .iter()
        .filter(|l| l.starts_with("TESTGUEST PASS"))
        .filter(|l| field(l, "gen").and_then(|g| g.parse::<u32>().ok()) >= Some(2))
        .filter_map(|l| field(l, "mibps").and_then(|v| v.parse::<f64>().ok()))
        .collect();
    Ok(BootFigures { ready_ms, mibps })
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// Runs `snapvm bench boot` and prints its table.
pub fn boot(b: &BootBench) -> Result<(), BenchError> {
    println!(
        "snapvm bench boot: test guest {}, {} vCPUs, {} MiB, {} boots per engine",
        b.kernel.display(),
        b.vcpus,
        b.memory_mib,
        b.runs
    );
    let mut ours = measure(Engine::Snapvm, b)?;
    let qemu = match measure(Engine::Qemu, b) {
        Ok(q) => Some(q),
        Err(e) => {
            println!("(baseline unavailable: {e})");
            None
        }
    };
    let mut qemu = qemu;
    let row = |name: &str, a: f64, base: Option<f64>, unit: &str| {
        let (b, r) = match base {
            Some(x) => (format!("{x:.1}"), format!("{:.2}", a / x)),
            None => ("n/a".into(), "n/a".into()),
        };
        println!("{name:<38} {a:>10.1} {b:>12} {r:>10}   {unit}");
    };
    println!(
        "{:<38} {:>10} {:>12} {:>10}",
        "metric", "snapvm", "qemu", "ratio"
    );
    let min = |v: &[f64]| v.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    let qm = qemu.as_mut().map(|q| median(&mut q.ready_ms));
    row(
        "start -> READY, median",
        median(&mut ours.ready_ms),
        qm,
        "ms",
    );
    row(
        "start -> READY, min",
        min(&ours.ready_ms),
        qemu.as_ref().map(|q| min(&q.ready_ms)),
        "ms",
    );
    row(
        "start -> READY, max",
        max(&ours.ready_ms),
        qemu.as_ref().map(|q| max(&q.ready_ms)),
        "ms",
    );
    let qm = qemu.as_mut().map(|q| median(&mut q.mibps));
    row(
        "memstamp per vCPU, median",
        median(&mut ours.mibps),
        qm,
        "MiB/s",
    );
    println!("(ratio = snapvm / qemu; lower is better for times, higher for MiB/s)");
    Ok(())
}

/// Parameters of `snapvm bench disk`.
pub struct DiskBench {
    /// The test guest.
    pub kernel: PathBuf,
    /// Directory for the scratch images.
    pub dir: PathBuf,
    /// 4 KiB blocks per image.
    pub blocks: u64,
    /// Requests per measurement.
    pub requests: u64,
}

const MODES: [&str; 4] = ["seqread", "randread", "seqwrite", "randwrite"];

/// The guest's throughput for one mode on `disk`, in MiB/s.
fn guest_disk_mibps(
    b: &DiskBench,
    disk: &Path,
    mode: &str,
    requests: u64,
) -> Result<f64, BenchError> {
    let mut cmd = Engine::Snapvm.command(
        &b.kernel,
        &format!(
            "workload=diskbench mode={mode} blocks={} requests={requests} seed=5",
            b.blocks
        ),
        1,
        128,
    );
    cmd.arg("--disk").arg(disk);
    let (lines, _) = run_until(
        Engine::Snapvm,
        &mut cmd,
        "TESTGUEST BENCH",
        Duration::from_secs(600),
    )?;
    let line = lines.last().map(String::as_str).unwrap_or_default();
    let bytes: f64 = field(line, "bytes")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let ns: f64 = field(line, "ns")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    if ns <= 0.0 {
        return Err(BenchError::Guest {
            what: "snapvm".into(),
            message: format!("no diskbench result: {lines:?}"),
        });
    }
    Ok(bytes / ns * 1e9 / (1 << 20) as f64)
}

/// The host's own throughput on the same file, same pattern, one 4 KiB
/// pread/pwrite at a time, in MiB/s.
fn host_disk_mibps(file: &Path, mode: &str, requests: u64, blocks: u64) -> Result<f64, BenchError> {
    use std::os::unix::fs::FileExt;
    let err = |source| BenchError::Spawn {
        what: format!("host I/O on {}", file.display()),
        source,
    };
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(file)
        .map_err(err)?;
    let file_blocks = (f.metadata().map_err(err)?.len() / 4096).clamp(1, blocks);
    let write = mode.ends_with("write");
    let random = mode.starts_with("rand");
    let mut buf = vec![0x5au8; 4096];
    let mut x: u64 = 5 | 1;
    let t0 = Instant::now();
    for n in 0..requests {
        let b = if random {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 17) % file_blocks
        } else {
            n % file_blocks
        };
        if write {
            f.write_all_at(&buf, b * 4096).map_err(err)?;
        } else {
            f.read_exact_at(&mut buf, b * 4096).map_err(err)?;
        }
    }
    if write {
        f.sync_data().map_err(err)?;
    }
    let s = t0.elapsed().as_secs_f64();
    Ok((requests * 4096) as f64 / s / (1 << 20) as f64)
}

/// Runs `snapvm bench disk` and prints its table.
pub fn disk(b: &DiskBench) -> Result<(), BenchError> {
    use snapshot::disk::{create_overlay, create_qcow2};
    let io = |what: &str| {
        let what = what.to_string();
        move |source| BenchError::Spawn { what, source }
    };
    let dir = b
        .dir
        .join(format!("snapvm-bench-disk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(io("scratch directory"))?;
    let size = b.blocks * 4096;
    let filled: Vec<u8> = (0..size)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();

    let raw = dir.join("disk.raw");
    std::fs::write(&raw, &filled).map_err(io("raw image"))?;
    let q1 = dir.join("single.qcow2");
    create_qcow2(&q1, size).map_err(|e| BenchError::Guest {
        what: "qcow2".into(),
        message: e.to_string(),
    })?;
    // Allocate every cluster of the single-layer image (untimed).
    guest_disk_mibps(b, &q1, "seqwrite", b.blocks)?;
    let base = dir.join("base.raw");
    std::fs::write(&base, &filled).map_err(io("base image"))?;
    let mid = dir.join("mid.qcow2");
    let top = dir.join("top.qcow2");
    for (below, above) in [(&base, &mid), (&mid, &top)] {
        create_overlay(below, above).map_err(|e| BenchError::Guest {
            what: "overlay".into(),
            message: e.to_string(),
        })?;
    }

    println!(
        "snapvm bench disk: 4 KiB requests, queue depth 1, {} requests over {} MiB, 1 vCPU",
        b.requests,
        size >> 20
    );
    println!(
        "{:<22} {:<10} {:>12} {:>12} {:>11}",
        "image", "mode", "guest MiB/s", "host MiB/s", "guest/host"
    );
    let layouts: [(&str, &Path); 3] = [
        ("raw", &raw),
        ("qcow2, 1 layer", &q1),
        ("qcow2, 3 layers", &top),
    ];
    for (name, path) in layouts {
        for mode in MODES {
            let g = guest_disk_mibps(b, path, mode, b.requests)?;
            let h = host_disk_mibps(path, mode, b.requests, b.blocks)?;
            println!("{name:<22} {mode:<10} {g:>12.1} {h:>12.1} {:>11.3}", g / h);
        }
    }
    println!("(host = pread/pwrite of the same file from the host, same pattern, same run)");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
