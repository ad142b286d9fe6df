//! `snapvm bench disk`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::*;

use super::engine::{run_until, Engine};

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
    use ::snapshot::disk::{create_overlay, create_qcow2};
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
