//! `snapvm bench boot`.

use std::path::PathBuf;
use std::time::Duration;

use super::*;

use super::engine::{run_until, Engine};

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
