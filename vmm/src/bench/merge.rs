//! `snapvm bench merge`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::*;
use crate::api::MergeOutcome;

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
                nets: vec![],
                link: true,
            };
            let dir = crate::vmdir::create(&vmdir, &req).map_err(|e| err(e.to_string()))?;
            let layer = dir.disks_dir().join("disk0.bench.qcow2");
            std::fs::create_dir_all(dir.disks_dir()).map_err(|e| err(e.to_string()))?;
            ::snapshot::disk::create_overlay(&base, &layer).map_err(|e| err(e.to_string()))?;
            {
                let d =
                    ::snapshot::disk::Disk::open(&layer, false).map_err(|e| err(e.to_string()))?;
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
            let r = client(&dir)
                .delete_snapshot(&id, false)
                .map_err(|e| berr(e.to_string()))?;
            let job = r.job.ok_or_else(|| berr("no merge job started".into()))?;
            let outcome: MergeOutcome = wait_for_job(&dir, &job, "merge")?;
            let result = outcome.report();
            let m1 = serial_len(&serial);
            let (mut disk_during, mut mem_during) =
                (disk_rates(&serial, m0, m1), mem_rates(&serial, m0, m1));
            let merge_mibps =
                result.copied_bytes as f64 / (1 << 20) as f64 / (result.duration_ms as f64 / 1e3);
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
                result.switch_us_max as f64 / 1000.0,
                (result.disk_bytes_before as f64 - result.disk_bytes_after as f64)
                    / (1 << 20) as f64,
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
