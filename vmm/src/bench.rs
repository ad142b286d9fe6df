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
