//! How a benchmark starts the test guest: snapvm itself or QEMU, and
//! reading its serial lines until a marker.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::BenchError;

/// How to start a guest: snapvm itself or the QEMU baseline.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Engine {
    Snapvm,
    Qemu,
}

impl Engine {
    pub(super) fn name(self) -> &'static str {
        match self {
            Engine::Snapvm => "snapvm",
            Engine::Qemu => "qemu",
        }
    }

    pub(super) fn command(self, kernel: &Path, cmdline: &str, vcpus: u8, mem_mib: u64) -> Command {
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

/// A QEMU (or other) child process, killed and reaped when dropped.
pub(super) struct KillOnDrop(pub(super) Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs the guest until a line starting with `until` (or the end); returns
/// the lines and the time to that line.
pub(super) fn run_until(
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
