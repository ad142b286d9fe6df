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
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| BenchError::Spawn {
            what: engine.name().into(),
            source,
        })?;
    let stdout = child.stdout.take().ok_or_else(|| BenchError::Guest {
        what: engine.name().into(),
        message: "no stdout".into(),
    })?;
    let stderr = child.stderr.take();
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut e) = stderr {
            let _ = std::io::Read::read_to_string(&mut e, &mut s);
        }
        s
    });
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
    let errors = errors.join().unwrap_or_default();
    match at {
        Some(t) => Ok((lines, t)),
        None => Err(BenchError::Guest {
            what: engine.name().into(),
            message: format!(
                "no '{until}' line; output: {lines:?}; stderr: {}",
                errors.trim()
            ),
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
        // The host's writes go to a copy: they would clobber qcow2 metadata.
        let host_copy = dir.join("host-copy");
        std::fs::copy(path, &host_copy).map_err(io("copy for the host baseline"))?;
        for mode in MODES {
            let g = guest_disk_mibps(b, path, mode, b.requests)?;
            let h = host_disk_mibps(&host_copy, mode, b.requests, b.blocks)?;
            println!("{name:<22} {mode:<10} {g:>12.1} {h:>12.1} {:>11.3}", g / h);
        }
    }
    println!(
        "(host = pread/pwrite of a copy of the same file from the host, same pattern, same run)"
    );
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Parameters of `snapvm bench snapshot`.
pub struct SnapshotBench {
    /// The test guest.
    pub kernel: PathBuf,
    /// Directory for the VM (and so its snapshots: the storage measured).
    pub dir: PathBuf,
    /// Guest memory sizes in MiB.
    pub sizes_mib: Vec<u64>,
    /// Snapshots per size.
    pub count: usize,
}

/// One snapshot's figures from the job result.
struct Shot {
    pause_us: f64,
    total_ms: f64,
    bytes: f64,
    stream_us: f64,
    faults: f64,
    p50: f64,
    p99: f64,
    window_pages: f64,
}

fn shot(r: &serde_json::Value) -> Shot {
    let s = &r["snapshot"];
    let st = &r["stats"];
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0);
    Shot {
        pause_us: f(&s["pause_us"]),
        total_ms: f(&s["duration_ms"]),
        bytes: f(&s["memory_bytes"]),
        stream_us: f(&st["stream_us"]),
        faults: f(&st["faults"]),
        p50: f(&st["fault_p50_us"]),
        p99: f(&st["fault_p99_us"]),
        window_pages: f(&st["window_pages"]),
    }
}

fn take_snapshot(
    dir: &crate::vmdir::VmDir,
    stop_and_copy: bool,
) -> Result<serde_json::Value, BenchError> {
    let r = run_job(
        dir,
        "/snapshots",
        serde_json::json!({ "stop_and_copy": stop_and_copy }),
    )?;
    // Keep the disk from filling up: only the figures matter.
    if let Some(sid) = r["snapshot"]["id"].as_str() {
        let _ = std::fs::remove_file(dir.root().join("snapshots").join(sid).join("memory.bin"));
    }
    Ok(r)
}

/// Guest memstamp MiB/s reported in serial output between byte offsets.
fn guest_rates(serial: &Path, from: usize, to: usize) -> Vec<f64> {
    let s = std::fs::read_to_string(serial).unwrap_or_default();
    let part = s.get(from..to.min(s.len())).unwrap_or("");
    part.lines()
        .filter(|l| l.starts_with("TESTGUEST PASS"))
        .filter(|l| field(l, "gen").and_then(|g| g.parse::<u32>().ok()) >= Some(2))
        .filter_map(|l| field(l, "mibps").and_then(|v| v.parse().ok()))
        .collect()
}

fn serial_len(serial: &Path) -> usize {
    std::fs::metadata(serial)
        .map(|m| m.len() as usize)
        .unwrap_or(0)
}

/// Runs `dd bs=1M conv=fdatasync` from `input` to a scratch file in `dir`
/// (`count` blocks, or all of `input`); returns MiB/s over `mib`.
fn dd(input: &Path, dir: &Path, count: Option<u64>, mib: u64) -> Result<f64, BenchError> {
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
fn dd_mibps(dir: &Path, mib: u64) -> Result<f64, BenchError> {
    dd(Path::new("/dev/zero"), dir, Some(mib), mib)
}

fn stats(v: &mut [f64]) -> (f64, f64) {
    let med = median(v);
    let max = v.iter().cloned().fold(0.0, f64::max);
    (med, max)
}

/// Runs `snapvm bench snapshot` and prints its table.
pub fn snapshot(b: &SnapshotBench) -> Result<(), BenchError> {
    println!(
        "snapvm bench snapshot: test guest, 2 vCPUs running memstamp at full speed over half of memory, {} snapshots per size",
        b.count
    );
    println!(
        "storage: {} (baseline: dd of the same size, 1 MiB blocks, conv=fdatasync, same run)",
        b.dir.display()
    );
    for &mib in &b.sizes_mib {
        let root = b
            .dir
            .join(format!("snapvm-bench-snap-{}-{mib}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let vmdir = root.join("vm");
        let area = mib / 2;
        let req = crate::vmdir::CreateRequest {
            kernel: b.kernel.clone(),
            initrd: None,
            cmdline: format!("workload=memstamp mem_mib={area} passes=0"),
            memory: format!("{}M", mib + 32),
            vcpus: 2,
            pin_vcpus: crate::machine::backend_quirks::PinVcpus::Auto,
            huge_pages: crate::machine::backend_quirks::HugePages::Auto,
            disks: vec![],
            link: true,
        };
        let err = |e: String| BenchError::Guest {
            what: format!("{mib} MiB VM"),
            message: e,
        };
        let dir = crate::vmdir::create(&vmdir, &req).map_err(|e| err(e.to_string()))?;
        crate::cli::lifecycle::start(&vmdir, false).map_err(|e| err(e.to_string()))?;
        let serial = dir.serial_log();
        let result = (|| {
            // Warm up: every page touched (gen 1), steady state reached.
            let t0 = Instant::now();
            while guest_rates(&serial, 0, usize::MAX).len() < 4 {
                if t0.elapsed() > Duration::from_secs(120) {
                    return Err(err("memstamp did not reach steady state".into()));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let mark = serial_len(&serial);
            std::thread::sleep(Duration::from_millis(1500));
            let mut before = guest_rates(&serial, mark, usize::MAX);
            let mut live = Vec::new();
            let mut during = Vec::new();
            for _ in 0..b.count {
                let m = serial_len(&serial);
                live.push(shot(&take_snapshot(&dir, false)?));
                during.extend(guest_rates(&serial, m, serial_len(&serial)));
                std::thread::sleep(Duration::from_millis(200));
            }
            let mut stop_copy = Vec::new();
            for _ in 0..b.count.min(5) {
                stop_copy.push(shot(&take_snapshot(&dir, true)?));
                std::thread::sleep(Duration::from_millis(200));
            }
            let dd = dd_mibps(&root, (live[0].bytes / (1 << 20) as f64).max(16.0) as u64)?;
            Ok((before.split_off(0), during, live, stop_copy, dd))
        })();
        let _ = crate::cli::lifecycle::stop(&vmdir, true);
        let _ = std::fs::remove_dir_all(&root);
        let (mut before, mut during, live, stop_copy, dd) = result?;

        let mut pauses: Vec<f64> = live.iter().map(|s| s.pause_us / 1000.0).collect();
        let (p_med, p_max) = stats(&mut pauses);
        let mut sc: Vec<f64> = stop_copy.iter().map(|s| s.pause_us / 1000.0).collect();
        let (sc_med, sc_max) = stats(&mut sc);
        let mut totals: Vec<f64> = live.iter().map(|s| s.total_ms).collect();
        let mut rates: Vec<f64> = live
            .iter()
            .filter(|s| s.stream_us > 0.0)
            .map(|s| s.bytes / (1 << 20) as f64 / (s.stream_us / 1e6))
            .collect();
        let faults: f64 = live.iter().map(|s| s.faults).sum::<f64>() / live.len() as f64;
        let mut p50: Vec<f64> = live.iter().map(|s| s.p50).collect();
        let mut p99: Vec<f64> = live.iter().map(|s| s.p99).collect();
        let mut window: Vec<f64> = live.iter().map(|s| s.window_pages).collect();
        let mib_written =
            live.iter().map(|s| s.bytes).sum::<f64>() / live.len() as f64 / (1 << 20) as f64;
        let g_before = median(&mut before);
        let g_during = median(&mut during);
        println!();
        println!("guest memory {mib} MiB (+32), memstamp over {area} MiB");
        println!("  {:<44} {:>12} {:>12}", "", "live", "stop-and-copy");
        println!(
            "  {:<44} {:>12.3} {:>12.1}",
            "pause, median (ms)", p_med, sc_med
        );
        println!(
            "  {:<44} {:>12.3} {:>12.1}",
            "pause, max (ms)", p_max, sc_max
        );
        println!(
            "  {:<44} {:>12.4}",
            "pause ratio live / stop-and-copy (median)",
            p_med / sc_med
        );
        println!(
            "  {:<44} {:>12.0}",
            "snapshot total time, median (ms)",
            median(&mut totals)
        );
        println!(
            "  {:<44} {:>12.0}",
            "memory written per snapshot (MiB)", mib_written
        );
        let mut e2e: Vec<f64> = live
            .iter()
            .map(|s| s.bytes / (1 << 20) as f64 / (s.total_ms / 1e3))
            .collect();
        let (stream, whole) = (median(&mut rates), median(&mut e2e));
        println!(
            "  {:<44} {:>12.0}",
            "streaming to memory.bin, median (MiB/s)", stream
        );
        println!(
            "  {:<44} {:>12.0}",
            "end to end incl. checksums+fsync (MiB/s)", whole
        );
        println!(
            "  {:<44} {:>12.0}",
            "dd to the same file system (MiB/s)", dd
        );
        println!("  {:<44} {:>12.2}", "end to end / dd", whole / dd);
        println!(
            "  {:<44} {:>12.0}",
            "write faults served per snapshot (mean)", faults
        );
        println!(
            "  {:<44} {:>12.1}",
            "fault service p50, median over snapshots (us)",
            median(&mut p50)
        );
        println!(
            "  {:<44} {:>12.1}",
            "fault service p99, median over snapshots (us)",
            median(&mut p99)
        );
        println!(
            "  {:<44} {:>12.0}",
            "pages re-protected in the pause (median)",
            median(&mut window)
        );
        println!(
            "  {:<44} {:>12.0}",
            "memstamp MiB/s per vCPU before", g_before
        );
        println!(
            "  {:<44} {:>12.0}",
            "memstamp MiB/s per vCPU during snapshots", g_during
        );
        println!("  {:<44} {:>12.2}", "during / before", g_during / g_before);
    }
    println!();
    println!(
        "(QEMU's background-snapshot baseline is not run by this command; see the issue notes.)"
    );
    Ok(())
}

/// Parameters of `snapvm bench apply`.
pub struct ApplyBench {
    /// The test guest.
    pub kernel: PathBuf,
    /// Directory for the VM.
    pub dir: PathBuf,
    /// Guest memory sizes in MiB.
    pub sizes_mib: Vec<u64>,
    /// Applies per mode and size.
    pub count: usize,
    /// Huge pages for the guest's RAM (to measure the kvm_pvm workaround).
    pub huge_pages: crate::machine::backend_quirks::HugePages,
}

fn run_job(
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
fn snapshot_id(dir: &crate::vmdir::VmDir) -> Result<String, BenchError> {
    let snap = run_job(dir, "/snapshots", serde_json::json!({}))?;
    Ok(snap["snapshot"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string())
}

/// Polls job `id` until it ends; its result, or its error as `what`'s.
fn wait_for_job(
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

/// The situations `snapvm bench apply` measures an apply in.
#[derive(Clone, Copy, PartialEq, Eq)]
enum ApplyMode {
    /// Lazy, the previous apply's load complete.
    Lazy,
    /// Lazy, right after a live snapshot (whose write-protect faults leave
    /// the pages the guest wrote meanwhile mapped 4 KiB at a time).
    AfterSnapshot,
    /// Lazy, 50 ms after another apply, whose load is still running.
    DuringLoad,
    /// All memory read before the vCPUs resume (the baseline).
    Eager,
}

impl ApplyMode {
    const ALL: [ApplyMode; 4] = [
        ApplyMode::Lazy,
        ApplyMode::AfterSnapshot,
        ApplyMode::DuringLoad,
        ApplyMode::Eager,
    ];

    fn label(self) -> &'static str {
        match self {
            ApplyMode::Lazy => "lazy",
            ApplyMode::AfterSnapshot => "lazy, after snapshot",
            ApplyMode::DuringLoad => "lazy, during a load",
            ApplyMode::Eager => "eager (baseline)",
        }
    }
}

/// Runs `snapvm bench apply` and prints its table.
pub fn apply(b: &ApplyBench) -> Result<(), BenchError> {
    println!(
        "snapvm bench apply: test guest, 2 vCPUs, memstamp (200 MiB/s per vCPU) over half of memory; {} applies per mode (median); guest RAM on {}",
        b.count,
        if crate::machine::backend_quirks::huge_pages(b.huge_pages) { "huge pages" } else { "4 KiB pages" }
    );
    println!(
        "{:<10} {:<22} {:>16} {:>18} {:>10}",
        "memory", "mode", "to running (ms)", "to next PASS (ms)", "vs eager"
    );
    for &mib in &b.sizes_mib {
        let root = b
            .dir
            .join(format!("snapvm-bench-apply-{}-{mib}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let vmdir = root.join("vm");
        let err = |e: String| BenchError::Guest {
            what: format!("{mib} MiB VM"),
            message: e,
        };
        let req = crate::vmdir::CreateRequest {
            kernel: b.kernel.clone(),
            initrd: None,
            cmdline: format!("workload=memstamp mem_mib={} passes=0 rate=200", mib / 2),
            memory: format!("{}M", mib + 32),
            vcpus: 2,
            pin_vcpus: crate::machine::backend_quirks::PinVcpus::Auto,
            huge_pages: b.huge_pages,
            disks: vec![],
            link: true,
        };
        let dir = crate::vmdir::create(&vmdir, &req).map_err(|e| err(e.to_string()))?;
        crate::cli::lifecycle::start(&vmdir, false).map_err(|e| err(e.to_string()))?;
        let serial = dir.serial_log();
        let apply_job = |id: &str, eager: bool| {
            run_job(
                &dir,
                &format!("/snapshots/{id}/apply"),
                serde_json::json!({ "eager": eager }),
            )
        };
        let result = (|| {
            let t0 = Instant::now();
            while guest_rates(&serial, 0, usize::MAX).len() < 2 {
                if t0.elapsed() > Duration::from_secs(300) {
                    return Err(err("memstamp did not get going".into()));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let id = snapshot_id(&dir)?;
            let mut rows = Vec::new();
            for mode in ApplyMode::ALL {
                let (mut running, mut pass) = (Vec::new(), Vec::new());
                for _ in 0..b.count {
                    let extra = match mode {
                        ApplyMode::AfterSnapshot => Some(snapshot_id(&dir)?),
                        ApplyMode::DuringLoad => {
                            apply_job(&id, false)?;
                            std::thread::sleep(Duration::from_millis(50));
                            None
                        }
                        _ => None,
                    };
                    let mark = serial_len(&serial);
                    let t = Instant::now();
                    let r = apply_job(&id, mode == ApplyMode::Eager)?;
                    running.push(r["apply_ms"].as_f64().unwrap_or(f64::NAN));
                    loop {
                        let s = std::fs::read_to_string(&serial).unwrap_or_default();
                        if s.get(mark..).is_some_and(|t| t.contains("TESTGUEST PASS")) {
                            break;
                        }
                        if t.elapsed() > Duration::from_secs(120) {
                            return Err(err("no PASS line after apply".into()));
                        }
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    pass.push(t.elapsed().as_secs_f64() * 1000.0);
                    if let Some(extra) = extra {
                        // Only the memory and state go (no disks to merge).
                        crate::cli::api_client::request(
                            &dir.api_socket(),
                            "DELETE",
                            &format!("/snapshots/{extra}"),
                            None,
                        )
                        .map_err(|e| err(e.to_string()))?;
                    }
                    // Let the background load finish before the next round.
                    let t = Instant::now();
                    loop {
                        std::thread::sleep(Duration::from_millis(100));
                        let st =
                            crate::cli::api_client::request(&dir.api_socket(), "GET", "/vm", None)
                                .map_err(|e| err(e.to_string()))?;
                        if st["memory_load"].is_null() || t.elapsed() > Duration::from_secs(300) {
                            break;
                        }
                    }
                    std::thread::sleep(Duration::from_millis(300));
                }
                rows.push((mode, median(&mut running), median(&mut pass)));
            }
            Ok(rows)
        })();
        let _ = crate::cli::lifecycle::stop(&vmdir, true);
        let _ = std::fs::remove_dir_all(&root);
        let rows = result?;
        let eager = rows
            .iter()
            .find(|r| r.0 == ApplyMode::Eager)
            .map_or(f64::NAN, |r| r.1);
        for (mode, run, pass) in rows {
            println!(
                "{:<10} {:<22} {:>16.1} {:>18.1} {:>10.3}",
                format!("{mib} MiB"),
                mode.label(),
                run,
                pass,
                run / eager
            );
        }
    }
    println!("(to running: apply request to vCPUs resumed, measured by the VMM; to next PASS: to the guest's next completed verification pass, which depends on where in its pass the snapshot was taken; vs eager: to running, against the eager load in the same run)");
    Ok(())
}

/// Parameters of `snapvm bench merge`.
pub struct MergeBench {
    /// The test guest.
    pub kernel: PathBuf,
    /// Directory for the VM and its disk layers.
    pub dir: PathBuf,
    /// Sizes of the layer to merge, MiB.
    pub sizes_mib: Vec<u64>,
}

/// diskstamp MiB/s per pass reported in serial output between offsets.
fn disk_rates(serial: &Path, from: usize, to: usize) -> Vec<f64> {
    let s = std::fs::read_to_string(serial).unwrap_or_default();
    let part = s.get(from..to.min(s.len())).unwrap_or("");
    part.lines()
        .filter(|l| l.starts_with("TESTGUEST PASS") && l.contains("workload=diskstamp"))
        .filter_map(|l| {
            let blocks: f64 = field(l, "blocks")?.parse().ok()?;
            let ns: f64 = field(l, "ns")?.parse().ok()?;
            Some(blocks * 4096.0 / (1 << 20) as f64 / (ns / 1e9))
        })
        .collect()
}

/// Memstamp rates of vCPU 1 only (vCPU 0 runs diskstamp).
fn mem_rates(serial: &Path, from: usize, to: usize) -> Vec<f64> {
    let s = std::fs::read_to_string(serial).unwrap_or_default();
    let part = s.get(from..to.min(s.len())).unwrap_or("");
    part.lines()
        .filter(|l| l.starts_with("TESTGUEST PASS vcpu=1 "))
        .filter(|l| field(l, "gen").and_then(|g| g.parse::<u32>().ok()) >= Some(2))
        .filter_map(|l| field(l, "mibps").and_then(|v| v.parse().ok()))
        .collect()
}

/// `dd` copy of `src` to `dir` (read + write + fdatasync, what a merge
/// does): MiB/s over `mib`.
fn dd_copy_mibps(src: &Path, dir: &Path, mib: u64) -> Result<f64, BenchError> {
    dd(src, dir, None, mib)
}

/// Runs `snapvm bench merge` and prints its table: a snapshot whose disk
/// layer holds SIZE MiB is deleted while the guest runs, so that layer is
/// merged into the running VM's working layer.
pub fn merge(b: &MergeBench) -> Result<(), BenchError> {
    println!(
        "snapvm bench merge: test guest, vCPU 0 diskstamp over 1 MiB, vCPU 1 memstamp over 64 MiB; delete of a snapshot whose layer holds SIZE MiB, merged into the running VM's working layer"
    );
    println!(
        "storage: {} (baseline: dd copy of the layer file, 1 MiB blocks, conv=fdatasync, same run)",
        b.dir.display()
    );
    println!(
        "{:<8} {:>10} {:>10} {:>8} {:>11} {:>11} {:>12} {:>10}",
        "size",
        "merge MiB/s",
        "dd MiB/s",
        "ratio",
        "disk during",
        "mem during",
        "switch (ms)",
        "net freed MiB"
    );
    for &mib in &b.sizes_mib {
        let root = b
            .dir
            .join(format!("snapvm-bench-merge-{}-{mib}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).map_err(|source| BenchError::Spawn {
            what: format!("mkdir {}", root.display()),
            source,
        })?;
        let err = |e: String| BenchError::Guest {
            what: format!("{mib} MiB merge"),
            message: e,
        };
        let result = (|| {
            // Base image, then the layer to merge, filled from the host.
            let base = root.join("base.raw");
            let f = std::fs::File::create(&base).map_err(|e| err(e.to_string()))?;
            f.set_len((mib + 32) << 20)
                .map_err(|e| err(e.to_string()))?;
            let vmdir = root.join("vm");
            let req = crate::vmdir::CreateRequest {
                kernel: b.kernel.clone(),
                initrd: None,
                cmdline: "workload=memstamp disk=1 blocks=256 mem_mib=64 passes=0".into(),
                memory: "160M".into(),
                vcpus: 2,
                pin_vcpus: crate::machine::backend_quirks::PinVcpus::Auto,
                huge_pages: crate::machine::backend_quirks::HugePages::Auto,
                disks: vec![crate::config::DiskConfig {
                    path: base.clone(),
                    readonly: false,
                }],
                link: true,
            };
            let dir = crate::vmdir::create(&vmdir, &req).map_err(|e| err(e.to_string()))?;
            let layer = dir.disks_dir().join("disk0.bench.qcow2");
            std::fs::create_dir_all(dir.disks_dir()).map_err(|e| err(e.to_string()))?;
            snapshot::disk::create_overlay(&base, &layer).map_err(|e| err(e.to_string()))?;
            {
                let d =
                    snapshot::disk::Disk::open(&layer, false).map_err(|e| err(e.to_string()))?;
                let mut buf = vec![0u8; 1 << 20];
                for i in 0..mib {
                    buf.iter_mut()
                        .enumerate()
                        .for_each(|(j, b)| *b = (i as usize + j) as u8 | 1);
                    d.write_at(&buf, (16 + i) << 20)
                        .map_err(|e| err(e.to_string()))?;
                }
                d.flush().map_err(|e| err(e.to_string()))?;
            }
            let mut t = dir.load().map_err(|e| err(e.to_string()))?;
            t.disks[0].current = PathBuf::from("disks/disk0.bench.qcow2");
            dir.save(&t).map_err(|e| err(e.to_string()))?;

            crate::cli::lifecycle::start(&vmdir, false).map_err(|e| err(e.to_string()))?;
            let serial = dir.serial_log();
            let t0 = Instant::now();
            while mem_rates(&serial, 0, usize::MAX).len() < 3
                || disk_rates(&serial, 0, usize::MAX).len() < 2
            {
                if t0.elapsed() > Duration::from_secs(120) {
                    return Err(err("the workloads did not get going".into()));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let id = snapshot_id(&dir)?;
            let dd = dd_copy_mibps(&layer, &root, mib)?;
            let mark = serial_len(&serial);
            std::thread::sleep(Duration::from_secs(3));
            let (mut disk_before, mut mem_before) = (
                disk_rates(&serial, mark, usize::MAX),
                mem_rates(&serial, mark, usize::MAX),
            );
            let berr = |e: String| err(format!("delete: {e}"));
            let m0 = serial_len(&serial);
            let r = crate::cli::api_client::request(
                &dir.api_socket(),
                "DELETE",
                &format!("/snapshots/{id}"),
                None,
            )
            .map_err(|e| berr(e.to_string()))?;
            let job = r["job"].as_str().unwrap_or_default().to_string();
            let result = wait_for_job(&dir, &job, "merge")?;
            let m1 = serial_len(&serial);
            let (mut disk_during, mut mem_during) =
                (disk_rates(&serial, m0, m1), mem_rates(&serial, m0, m1));
            let f = |k: &str| result[k].as_f64().unwrap_or(f64::NAN);
            let merge_mibps = f("copied_bytes") / (1 << 20) as f64 / (f("duration_ms") / 1e3);
            let ratio = |d: &mut Vec<f64>, b: &mut Vec<f64>| {
                if d.is_empty() || b.is_empty() {
                    f64::NAN
                } else {
                    median(d) / median(b)
                }
            };
            Ok((
                merge_mibps,
                dd,
                ratio(&mut disk_during, &mut disk_before),
                ratio(&mut mem_during, &mut mem_before),
                f("switch_us_max") / 1000.0,
                (f("disk_bytes_before") - f("disk_bytes_after")) / (1 << 20) as f64,
            ))
        })();
        let _ = crate::cli::lifecycle::stop(&root.join("vm"), true);
        let _ = std::fs::remove_dir_all(&root);
        let (m, dd, disk, mem, switch, freed) = result?;
        println!(
            "{:<8} {:>10.0} {:>10.0} {:>8.2} {:>11.2} {:>11.2} {:>12.3} {:>10.0}",
            format!("{mib} MiB"),
            m,
            dd,
            m / dd,
            disk,
            mem,
            switch,
            freed
        );
    }
    println!("(merge MiB/s: bytes copied / job time, incl. the final fsync and switch; disk/mem during: guest diskstamp and memstamp throughput during the merge / before it, NaN when no pass completed during the merge; switch: time guest disk I/O waited for the final switch of the backing file, vCPUs keep running)");
    Ok(())
}
