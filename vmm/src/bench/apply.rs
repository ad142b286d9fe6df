//! `snapvm bench apply`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::*;

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
    /// Lazy, from a VM with other hardware (half the memory, one vCPU):
    /// the VMM builds a new VM for the snapshot's hardware.
    OtherHardware,
    /// All memory read before the vCPUs resume (the baseline).
    Eager,
}

impl ApplyMode {
    const ALL: [ApplyMode; 5] = [
        ApplyMode::Lazy,
        ApplyMode::AfterSnapshot,
        ApplyMode::DuringLoad,
        ApplyMode::OtherHardware,
        ApplyMode::Eager,
    ];

    fn label(self) -> &'static str {
        match self {
            ApplyMode::Lazy => "lazy",
            ApplyMode::AfterSnapshot => "lazy, after snapshot",
            ApplyMode::DuringLoad => "lazy, during a load",
            ApplyMode::OtherHardware => "lazy, other hardware",
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
            nets: vec![],
            link: true,
        };
        let dir = crate::vmdir::create(&vmdir, &req).map_err(|e| err(e.to_string()))?;
        crate::cli::lifecycle::start(&vmdir, false).map_err(|e| err(e.to_string()))?;
        let serial = dir.serial_log();
        let apply_job = |id: &str, eager: bool| apply_snapshot(&dir, id, eager);
        let result = (|| {
            let t0 = Instant::now();
            while guest_rates(&serial, 0, usize::MAX).len() < 2 {
                if t0.elapsed() > Duration::from_secs(300) {
                    return Err(err("memstamp did not get going".into()));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let id = snapshot_id(&dir)?;
            let other = other_hardware_snapshot(&vmdir, &dir, mib).map_err(err)?;
            // Back on the first snapshot's hardware.
            apply_job(&id, false)?;
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
                        ApplyMode::OtherHardware => {
                            apply_job(&other, false)?;
                            wait_loaded(&dir).map_err(err)?;
                            None
                        }
                        _ => None,
                    };
                    let mark = serial_len(&serial);
                    let t = Instant::now();
                    let r = apply_job(&id, mode == ApplyMode::Eager)?;
                    running.push(r.apply_ms as f64);
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
                        client(&dir)
                            .delete_snapshot(&extra, false)
                            .map_err(|e| err(e.to_string()))?;
                    }
                    // Let the background load finish before the next round.
                    let t = Instant::now();
                    loop {
                        std::thread::sleep(Duration::from_millis(100));
                        let st = client(&dir).status().map_err(|e| err(e.to_string()))?;
                        if st.memory_load.is_none() || t.elapsed() > Duration::from_secs(300) {
                            break;
                        }
                    }
                    std::thread::sleep(Duration::from_millis(300));
                }
                rows.push((mode, median(&mut running), median(&mut pass)));
            }
            let starts = measure_starts(&vmdir, &id, b.count).map_err(err)?;
            Ok((rows, starts))
        })();
        let _ = crate::cli::lifecycle::stop(&vmdir, true);
        let _ = std::fs::remove_dir_all(&root);
        let (rows, starts) = result?;
        let eager = rows
            .iter()
            .find(|r| r.0 == ApplyMode::Eager)
            .map_or(f64::NAN, |r| r.1);
        for &(mode, run, pass) in &rows {
            println!(
                "{:<10} {:<22} {:>16.1} {:>18.1} {:>10.3}",
                format!("{mib} MiB"),
                mode.label(),
                run,
                pass,
                run / eager
            );
        }
        let lazy = rows
            .iter()
            .find(|r| r.0 == ApplyMode::Lazy)
            .map_or(f64::NAN, |r| r.1);
        let other = rows
            .iter()
            .find(|r| r.0 == ApplyMode::OtherHardware)
            .map_or(f64::NAN, |r| r.1);
        println!(
            "{:<10} apply across hardware / same hardware = {:.1} / {:.1} = {:.2}",
            format!("{mib} MiB"),
            other,
            lazy,
            other / lazy
        );
        println!(
            "{:<10} {:<22} {:>16.1} {:>18} {:>10}",
            format!("{mib} MiB"),
            "start, boot (baseline)",
            starts.cold_ms,
            "-",
            "-"
        );
        println!(
            "{:<10} {:<22} {:>16.1} {:>18} {:>10}",
            format!("{mib} MiB"),
            "start --from",
            starts.from_ms,
            "-",
            "-"
        );
        println!(
            "{:<10} start --from / (boot + lazy apply) = {:.1} / ({:.1} + {:.1}) = {:.2}",
            format!("{mib} MiB"),
            starts.from_ms,
            starts.cold_ms,
            lazy,
            starts.from_ms / (starts.cold_ms + lazy)
        );
    }
    println!("(to running: apply request to vCPUs resumed, measured by the VMM; to next PASS: to the guest's next completed verification pass, which depends on where in its pass the snapshot was taken; vs eager: to running, against the eager load in the same run; start rows: `snapvm start` and `snapvm start --from` command time, process start to the guest running, the VM stopped before each)");
    Ok(())
}

/// Medians of `snapvm start` (a cold boot) and `snapvm start --from`
/// (an empty VM, then the same lazy apply), each timed from the command to
/// the guest running, the VM stopped before each.
struct Starts {
    cold_ms: f64,
    from_ms: f64,
}

/// Takes a snapshot of the VM with other hardware (half the memory, one
/// vCPU): stops it, changes its configuration, starts it; returns the id.
fn other_hardware_snapshot(
    vmdir: &Path,
    dir: &crate::vmdir::VmDir,
    mib: u64,
) -> Result<String, String> {
    use crate::daemon::hardware::{change_config, ConfigChange};
    crate::cli::lifecycle::stop(vmdir, false).map_err(|e| e.to_string())?;
    let change = ConfigChange {
        memory: Some(format!("{}M", mib / 2 + 32)),
        vcpus: Some(1),
        cmdline: Some(format!(
            "workload=memstamp mem_mib={} passes=0 rate=200",
            mib / 4
        )),
        ..Default::default()
    };
    change_config(dir, &change).map_err(|e| e.to_string())?;
    crate::cli::lifecycle::start(vmdir, false).map_err(|e| e.to_string())?;
    let serial = dir.serial_log();
    let mark = serial_len(&serial);
    let t0 = Instant::now();
    while guest_rates(&serial, mark, usize::MAX).is_empty() {
        if t0.elapsed() > Duration::from_secs(300) {
            return Err("memstamp did not get going on the other hardware".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    snapshot_id(dir).map_err(|e| e.to_string())
}

/// Waits for an apply's background memory load to end.
fn wait_loaded(dir: &crate::vmdir::VmDir) -> Result<(), String> {
    let t = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let st = client(dir).status().map_err(|e| e.to_string())?;
        if st.memory_load.is_none() || t.elapsed() > Duration::from_secs(300) {
            return Ok(());
        }
    }
}

fn measure_starts(vmdir: &Path, snapshot: &str, count: usize) -> Result<Starts, String> {
    use crate::cli::lifecycle::{start, start_from, stop};
    let (mut cold, mut from) = (Vec::new(), Vec::new());
    for _ in 0..count {
        stop(vmdir, true).map_err(|e| e.to_string())?;
        let t = Instant::now();
        start(vmdir, false).map_err(|e| e.to_string())?;
        cold.push(t.elapsed().as_secs_f64() * 1000.0);
        stop(vmdir, true).map_err(|e| e.to_string())?;
        let t = Instant::now();
        start_from(vmdir, false, Some(snapshot)).map_err(|e| e.to_string())?;
        from.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    Ok(Starts {
        cold_ms: median(&mut cold),
        from_ms: median(&mut from),
    })
}
