//! `snapvm bench snapshot`.

use std::path::PathBuf;
use std::time::{Duration, Instant};

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

fn take_snapshot(dir: &crate::vmdir::VmDir, stop_and_copy: bool) -> Result<LiveResult, BenchError> {
    let r = take_live(dir, stop_and_copy)?;
    // Keep the disk from filling up: only the figures matter.
    let _ = std::fs::remove_file(dir.snapshot_dir(&r.snapshot.id).join("memory.bin"));
    Ok(r)
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
