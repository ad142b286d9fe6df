//! `snapvm bench snapshot`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::qemu_snapshot::{self, QemuFigures};
use super::*;

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
    /// Keep every memory.bin as a user would (else each is deleted right
    /// after its snapshot, to measure what keeping them costs).
    pub keep_files: bool,
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

fn shot(r: &LiveResult) -> Shot {
    let (s, st) = (&r.snapshot, &r.stats);
    Shot {
        pause_us: s.pause_us.unwrap_or(0) as f64,
        total_ms: s.duration_ms as f64,
        bytes: s.memory_bytes as f64,
        stream_us: st.stream_us as f64,
        faults: st.faults as f64,
        p50: st.fault_p50_us,
        p99: st.fault_p99_us,
        window_pages: st.window_pages as f64,
    }
}

fn take_snapshot(
    dir: &crate::vmdir::VmDir,
    stop_and_copy: bool,
    kept: &mut KeptFiles,
) -> Result<LiveResult, BenchError> {
    let r = take_live(dir, stop_and_copy)?;
    let file = dir.snapshot_dir(&r.snapshot.id).join("memory.bin");
    let next = r.snapshot.memory_bytes;
    kept.add(file, dir.root(), next);
    Ok(r)
}

fn stats(v: &mut [f64]) -> (f64, f64) {
    let med = median(v);
    let max = v.iter().cloned().fold(0.0, f64::max);
    (med, max)
}

/// dd of `mib` MiB (1 MiB blocks, fdatasync) to `dir` in the two ways a
/// memory.bin is written here (docs/kvm-backend.md: a block's first write
/// costs 3-5x a later one): (MiB/s into a new file written after another
/// one that is kept, so mostly onto new blocks; MiB/s into a new file
/// written right after that one was deleted, onto the blocks it freed).
fn dd_baselines(dir: &Path, mib: u64) -> Result<(f64, f64), BenchError> {
    let zero = Path::new("/dev/zero");
    let run = |name: &str| dd_to(zero, &dir.join(name), Some(mib), mib);
    let result = (|| {
        // The first takes whatever blocks were freed earlier.
        run("dd-first.bin")?;
        let new = run("dd-new.bin")?;
        let new_file = dir.join("dd-new.bin");
        std::fs::remove_file(&new_file).map_err(|e| BenchError::Guest {
            what: "dd baseline".into(),
            message: format!("cannot remove {}: {e}", new_file.display()),
        })?;
        let freed = run("dd-freed.bin")?;
        Ok((new, freed))
    })();
    for f in ["dd-first.bin", "dd-new.bin", "dd-freed.bin"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    result
}

/// "min / median / p90 / max" of `v`, with `prec` decimals.
fn spread(v: &[f64], prec: usize) -> String {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return "n/a".into();
    }
    let at = |p: f64| v[((v.len() - 1) as f64 * p).round() as usize];
    format!(
        "{:.prec$} / {:.prec$} / {:.prec$} / {:.prec$}",
        v[0],
        at(0.5),
        at(0.9),
        v[v.len() - 1]
    )
}

/// Runs `snapvm bench snapshot` and prints its table.
pub fn snapshot(b: &SnapshotBench) -> Result<(), BenchError> {
    println!(
        "snapvm bench snapshot: test guest, 2 vCPUs running memstamp at full speed over half of memory, {} snapshots per size",
        b.count
    );
    println!(
        "storage: {} (baseline: dd of the same size, 1 MiB blocks, conv=fdatasync, same run, onto new blocks and onto freed ones)",
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
            nets: vec![],
            link: true,
        };
        let err = |e: String| BenchError::Guest {
            what: format!("{mib} MiB VM"),
            message: e,
        };
        let dir = crate::vmdir::create(&vmdir, &req).map_err(|e| err(e.to_string()))?;
        crate::cli::lifecycle::start(&vmdir, false).map_err(|e| err(e.to_string()))?;
        let serial = dir.serial_log();
        let mut kept = KeptFiles::new(b.keep_files);
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
                live.push(shot(&take_snapshot(&dir, false, &mut kept)?));
                during.extend(guest_rates(&serial, m, serial_len(&serial)));
                std::thread::sleep(Duration::from_millis(200));
            }
            let mut stop_copy = Vec::new();
            for _ in 0..b.count.min(5) {
                stop_copy.push(shot(&take_snapshot(&dir, true, &mut kept)?));
                std::thread::sleep(Duration::from_millis(200));
            }
            let dd = dd_baselines(&root, (live[0].bytes / (1 << 20) as f64).max(16.0) as u64)?;
            Ok((before.split_off(0), during, live, stop_copy, dd))
        })();
        let _ = crate::cli::lifecycle::stop(&vmdir, true);
        let _ = std::fs::remove_dir_all(&root);
        let (mut before, mut during, live, stop_copy, (dd_new, dd_freed)) = result?;
        // The baseline written the way memory.bin was: kept files land on
        // new blocks, a file written after a delete on the freed ones.
        let dd = if b.keep_files { dd_new } else { dd_freed };
        let files = kept.describe();
        // QEMU after snapvm's VM is gone: one VM at a time, same directory,
        // its files treated as snapvm's.
        let mut qemu_kept = KeptFiles::new(b.keep_files);
        let qemu = qemu_snapshot::measure(&b.kernel, &root, mib, b.count, &mut qemu_kept);
        let qemu_files = qemu_kept.describe();
        let _ = std::fs::remove_dir_all(&root);

        let mut pauses: Vec<f64> = live.iter().map(|s| s.pause_us / 1000.0).collect();
        let (p_med, p_max) = stats(&mut pauses);
        let mut sc: Vec<f64> = stop_copy.iter().map(|s| s.pause_us / 1000.0).collect();
        let (sc_med, sc_max) = stats(&mut sc);
        let totals: Vec<f64> = live.iter().map(|s| s.total_ms).collect();
        let total_med = median(&mut totals.clone());
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
        let mut e2e: Vec<f64> = live
            .iter()
            .map(|s| s.bytes / (1 << 20) as f64 / (s.total_ms / 1e3))
            .collect();
        let (stream, whole) = (median(&mut rates), median(&mut e2e));

        // Cells: snapvm live, stop-and-copy, QEMU ("n/a" when it could not run).
        let q = qemu.as_ref().ok();
        let row = |name: &str,
                   prec: usize,
                   live: Option<f64>,
                   sc: Option<f64>,
                   qf: Option<fn(&QemuFigures) -> f64>| {
            let cell = |v: Option<f64>| v.map(|x| format!("{x:.prec$}")).unwrap_or_default();
            let qc = match (qf, q) {
                (None, _) => String::new(),
                (Some(f), Some(q)) => cell(Some(f(q))),
                (Some(_), None) => "n/a".into(),
            };
            let line = format!("  {name:<46} {:>12} {:>14} {qc:>17}", cell(live), cell(sc));
            println!("{}", line.trim_end());
        };
        let ours = |name: &str, prec: usize, v: f64| row(name, prec, Some(v), None, None);
        // min/median/p90/max of snapvm's figures over the series.
        let spread_row =
            |name: &str, v: &[f64], prec: usize| println!("  {name:<46}  {}", spread(v, prec));
        // snapvm / QEMU, or n/a (QEMU's pause is whole ms and may be 0).
        let ratio = |name: &str, snapvm: f64, f: fn(&QemuFigures) -> f64| {
            let r = match q.map(f) {
                Some(x) if x > 0.0 => format!("{:.3}", snapvm / x),
                _ => "n/a".into(),
            };
            println!("  {name:<46} {r:>12}");
        };
        println!();
        println!("guest memory {mib} MiB (+32), memstamp over {area} MiB");
        println!(
            "  {:<46} {:>12} {:>14} {:>17}",
            "", "live", "stop-and-copy", "QEMU bg-snapshot"
        );
        row(
            "pause, median (ms)",
            3,
            Some(p_med),
            Some(sc_med),
            Some(|q| q.pause_med),
        );
        row(
            "pause, max (ms)",
            3,
            Some(p_max),
            Some(sc_max),
            Some(|q| q.pause_max),
        );
        ours(
            "pause ratio live / stop-and-copy (median)",
            4,
            p_med / sc_med,
        );
        ratio("pause ratio snapvm live / QEMU (median)", p_med, |q| {
            q.pause_med
        });
        row(
            "snapshot total time, median (ms)",
            0,
            Some(total_med),
            None,
            Some(|q| q.total_med),
        );
        row(
            "  incl. fsync of the file, median (ms)",
            0,
            Some(total_med),
            None,
            Some(|q| q.synced_med),
        );
        spread_row("snapvm total (ms): min/median/p90/max", &totals, 0);
        ours(
            "  the first of the series (ms)",
            0,
            totals.first().copied().unwrap_or(f64::NAN),
        );
        ratio(
            "total time ratio snapvm live / QEMU (median)",
            total_med,
            |q| q.total_med,
        );
        ratio("  both incl. fsync", total_med, |q| q.synced_med);
        row(
            "memory written per snapshot (MiB)",
            0,
            Some(mib_written),
            None,
            Some(|q| q.mib_written),
        );
        ours("streaming to memory.bin, median (MiB/s)", 0, stream);
        ours("end to end incl. checksums+fsync (MiB/s)", 0, whole);
        ours("dd, new file beside a kept one (MiB/s)", 0, dd_new);
        ours("dd, new file on blocks just freed (MiB/s)", 0, dd_freed);
        ours(
            if b.keep_files {
                "end to end / dd beside a kept one"
            } else {
                "end to end / dd on freed blocks"
            },
            2,
            whole / dd,
        );
        let e2e_dd: Vec<f64> = e2e.iter().map(|x| x / dd).collect();
        spread_row("  min/median/p90/max", &e2e_dd, 2);
        ours("write faults served per snapshot (mean)", 0, faults);
        ours(
            "fault service p50, median over snapshots (us)",
            1,
            median(&mut p50),
        );
        ours(
            "fault service p99, median over snapshots (us)",
            1,
            median(&mut p99),
        );
        spread_row("fault p99 (us): min/median/p90/max", &p99, 0);
        spread_row("pause (ms): min/median/p90/max", &pauses, 3);
        ours(
            "pages re-protected in the pause (median)",
            0,
            median(&mut window),
        );
        row(
            "memstamp MiB/s per vCPU before",
            0,
            Some(g_before),
            None,
            Some(|q| q.before),
        );
        row(
            "memstamp MiB/s per vCPU during snapshots",
            0,
            Some(g_during),
            None,
            Some(|q| q.during),
        );
        row(
            "during / before",
            2,
            Some(g_during / g_before),
            None,
            Some(|q| q.during / q.before),
        );
        println!("  (snapvm's memory.bin files: {files})");
        match &qemu {
            Ok(q) => println!(
                "  (QEMU {}: {} snapshots, `migrate` with background-snapshot to `exec:cat > FILE` in the same directory; files {qemu_files})",
                q.version, q.count
            ),
            Err(e) => println!("  (QEMU bg-snapshot n/a: {e})"),
        }
    }
    println!();
    println!(
        "(QEMU's pause is QMP `downtime` (whole ms) and its total time QMP `total-time`, which ends with the last byte in cat's pipe; \
         the fsync rows add cat's exit and an fsync of the file, which snapvm's total already includes. \
         QEMU takes at most {} snapshots per size, each writing all of RAM.)",
        qemu_snapshot::MAX_SNAPSHOTS
    );
    Ok(())
}
