//! Debug aid of live snapshots: memory at the snapshot instant compared
//! with what memory.bin holds once written
//! ([`super::ArmedSnapshot::check_against_instant`]).

use std::path::PathBuf;

use super::GuestRegion;
use crate::memory_file::{MemoryFileWriter, CHUNK_SIZE, PAGE_SIZE};

/// Where to report, and guest memory at the instant.
pub(super) struct InstantCheck {
    report: PathBuf,
    golden: Vec<Vec<u8>>,
}

/// Compares what memory.bin holds for `regions` with `golden` (their
/// content at the snapshot instant); a report line.
fn compare_with_file(
    file: &std::fs::File,
    regions: &[GuestRegion],
    golden: &[Vec<u8>],
) -> std::io::Result<String> {
    use std::os::unix::fs::FileExt;
    let mut changed = Vec::new();
    let mut detail = String::new();
    let mut buf = vec![0u8; CHUNK_SIZE as usize];
    for (r, g) in regions.iter().zip(golden) {
        let mut off = 0;
        while off < r.len {
            let len = (CHUNK_SIZE as usize).min(r.len - off);
            file.read_exact_at(&mut buf[..len], r.gpa + off as u64)?;
            for (p, (a, b)) in g[off..off + len]
                .chunks(PAGE_SIZE as usize)
                .zip(buf[..len].chunks(PAGE_SIZE as usize))
                .enumerate()
            {
                if a != b {
                    let gpa = r.gpa + (off + p * PAGE_SIZE as usize) as u64;
                    if detail.is_empty() {
                        let diff: Vec<String> = a
                            .iter()
                            .zip(b)
                            .enumerate()
                            .filter(|(_, (x, y))| x != y)
                            .take(8)
                            .map(|(i, (x, y))| format!("+{i:#x}:{x:#04x}->{y:#04x}"))
                            .collect();
                        detail = format!(" first page {gpa:#x}: {}", diff.join(" "));
                    }
                    changed.push(gpa);
                }
            }
            off += len;
        }
    }
    let first: Vec<String> = changed.iter().take(16).map(|g| format!("{g:#x}")).collect();
    Ok(format!(
        "{} page(s) differ from memory at the instant: [{}]{detail}",
        changed.len(),
        first.join(", ")
    ))
}

impl InstantCheck {
    /// A check reporting to `report`.
    pub(super) fn new(report: PathBuf) -> Self {
        Self {
            report,
            golden: Vec::new(),
        }
    }

    /// Copies guest memory; the guest must be paused.
    pub(super) fn copy_instant(&mut self, regions: &[GuestRegion]) {
        self.golden = regions
            .iter()
            .map(|r| {
                // SAFETY: guest RAM, mapped for the VM's lifetime; the
                // guest is paused and the devices quiesced.
                unsafe { std::slice::from_raw_parts(r.host as *const u8, r.len) }.to_vec()
            })
            .collect();
    }

    /// Appends [`compare_with_file`]'s finding to the report file.
    pub(super) fn report(&self, f: &MemoryFileWriter, regions: &[GuestRegion]) {
        self.append(f, regions, &self.golden);
    }

    fn append(&self, f: &MemoryFileWriter, regions: &[GuestRegion], golden: &[Vec<u8>]) {
        use std::io::Write;
        let path = &self.report;
        let line = match compare_with_file(f.file(), regions, golden) {
            Ok(l) => l,
            Err(e) => format!("cannot compare: {e}"),
        };
        if !line.starts_with("0 page(s)") {
            tracing::error!("snapshot check: {}: {line}", f.path().display());
        }
        if let Ok(mut out) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
        {
            let _ = writeln!(
                out,
                "pid {} {}: {line}",
                std::process::id(),
                f.path().display()
            );
        }
    }
}
