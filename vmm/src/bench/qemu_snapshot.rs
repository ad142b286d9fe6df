//! The QEMU column of `snapvm bench snapshot`: QEMU's background snapshot
//! (`migrate` with the `background-snapshot` capability, userfaultfd
//! write-protect, QEMU 6.0 and later) of the same test guest, memory size,
//! vCPUs and memstamp workload, into the same directory, in the same run.
//!
//! QMP is spoken directly: line-delimited JSON over its UNIX socket with
//! serde_json. The `qapi` crate would bring QEMU's whole generated schema
//! (qapi-qmp, qapi-qga, qapi-spec) and its own I/O stack for the four
//! commands used here.

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::engine::{Engine, KillOnDrop};
use super::{guest_rates, median, serial_len, KeptFiles};

/// At most this many QEMU snapshots per size: each writes all of RAM.
pub(super) const MAX_SNAPSHOTS: usize = 10;

/// Why the QEMU column could not be measured.
#[derive(Debug, thiserror::Error)]
pub(super) enum QemuSnapshotError {
    /// qemu-system-x86_64 could not be started.
    #[error("cannot start qemu-system-x86_64: {0}")]
    Spawn(#[source] std::io::Error),
    /// A file of the run could not be created, read or synced.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// QEMU ended on its own.
    #[error("qemu-system-x86_64 exited ({status}) {when}; stderr: {stderr}")]
    Exited {
        /// Its exit status.
        status: ExitStatus,
        /// What the bench was waiting for.
        when: &'static str,
        /// The end of its stderr.
        stderr: String,
    },
    /// The QMP socket failed.
    #[error("QMP socket {path}: {source}")]
    Qmp {
        /// The socket.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// QMP answered something that is not QMP.
    #[error("QMP socket {path}: unexpected message {line:?}")]
    Reply {
        /// The socket.
        path: PathBuf,
        /// The message.
        line: String,
    },
    /// QEMU refused a command (e.g. the capability on an older QEMU).
    #[error("QMP {command} refused: {class}: {desc}")]
    Refused {
        /// The command.
        command: String,
        /// QMP's error class.
        class: String,
        /// QMP's description.
        desc: String,
    },
    /// The snapshot ended as `failed` or `cancelled`.
    #[error("background snapshot into {file} {status}: {desc}")]
    Failed {
        /// The snapshot file.
        file: PathBuf,
        /// The migration status.
        status: String,
        /// QMP's `error-desc`.
        desc: String,
    },
    /// Something did not happen in time.
    #[error("{what} not within {secs} s (serial log {log})")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// The limit.
        secs: u64,
        /// QEMU's serial log.
        log: PathBuf,
    },
    /// The guest reported a failure.
    #[error("guest: {line} (serial log {log})")]
    Guest {
        /// Its FAIL line.
        line: String,
        /// QEMU's serial log.
        log: PathBuf,
    },
}

type Result<T> = std::result::Result<T, QemuSnapshotError>;

/// QEMU's figures for one memory size.
pub(super) struct QemuFigures {
    /// `major.minor.micro` from the QMP greeting.
    pub version: String,
    /// Snapshots taken.
    pub count: usize,
    /// QMP `downtime` (whole ms): the vCPUs' pause.
    pub pause_med: f64,
    pub pause_max: f64,
    /// QMP `total-time` (ms), median: ends with the last byte in the pipe.
    pub total_med: f64,
    /// `migrate` sent -> `cat` exited and the file fsynced (ms), median.
    pub synced_med: f64,
    /// Snapshot file size (MiB), mean.
    pub mib_written: f64,
    /// memstamp MiB/s per vCPU before and during the snapshots (medians).
    pub before: f64,
    pub during: f64,
}

/// A QMP connection: commands out, replies in, events skipped.
struct Qmp {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path, qemu: &mut KillOnDrop, stderr: &Path) -> Result<Qmp> {
        let t0 = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(source) if t0.elapsed() > Duration::from_secs(30) => {
                    return Err(QemuSnapshotError::Qmp {
                        path: path.into(),
                        source,
                    })
                }
                Err(_) => {
                    exited(qemu, stderr, "before its QMP socket appeared")?;
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        let io = |source| QemuSnapshotError::Qmp {
            path: path.into(),
            source,
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        Ok(Qmp {
            path: path.into(),
            reader: BufReader::new(stream),
            writer,
        })
    }

    fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .map_err(|source| QemuSnapshotError::Qmp {
                path: self.path.clone(),
                source,
            })?;
        match serde_json::from_str::<Value>(&line) {
            Ok(v) if n > 0 && v.is_object() => Ok(v),
            _ => Err(QemuSnapshotError::Reply {
                path: self.path.clone(),
                line,
            }),
        }
    }

    /// The greeting's QEMU version.
    fn greeting(&mut self) -> Result<String> {
        let g = self.read()?;
        let v = &g["QMP"]["version"]["qemu"];
        if v.is_null() {
            return Err(QemuSnapshotError::Reply {
                path: self.path.clone(),
                line: g.to_string(),
            });
        }
        Ok(format!("{}.{}.{}", v["major"], v["minor"], v["micro"]))
    }

    /// Runs `command`; its `return` value.
    fn execute(&mut self, command: &str, arguments: Value) -> Result<Value> {
        let mut msg = json!({ "execute": command });
        if !arguments.is_null() {
            msg["arguments"] = arguments;
        }
        let mut line = msg.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(|source| QemuSnapshotError::Qmp {
                path: self.path.clone(),
                source,
            })?;
        loop {
            let mut v = self.read()?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(r) = v.get_mut("return") {
                return Ok(r.take());
            }
            let e = &v["error"];
            return Err(QemuSnapshotError::Refused {
                command: command.into(),
                class: e["class"].as_str().unwrap_or("?").into(),
                desc: e["desc"].as_str().unwrap_or(&v.to_string()).into(),
            });
        }
    }
}

/// An error if QEMU has exited.
fn exited(qemu: &mut KillOnDrop, stderr: &Path, when: &'static str) -> Result<()> {
    match qemu.0.try_wait() {
        Ok(Some(status)) => {
            let s = std::fs::read_to_string(stderr).unwrap_or_default();
            let tail: Vec<&str> = s.lines().rev().take(5).collect();
            Err(QemuSnapshotError::Exited {
                status,
                when,
                stderr: tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
            })
        }
        _ => Ok(()),
    }
}

/// Whether process `pid` has a child: the `exec:` snapshot's `cat`,
/// which QEMU reaps when it closes the stream.
fn has_child(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.flatten().any(|t| {
        std::fs::read_to_string(t.path().join("children")).is_ok_and(|c| !c.trim().is_empty())
    })
}

/// `path` quoted for /bin/sh (QEMU runs an `exec:` URI with `sh -c`).
fn sh_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

/// QEMU on `kernel` with `mib` + 32 MiB, 2 vCPUs, memstamp over `mib` / 2
/// at full speed (as snapvm's side); `count` background snapshots
/// (at most [`MAX_SNAPSHOTS`]) into files in `dir`, kept or deleted as
/// `kept` says (as snapvm's side).
pub(super) fn measure(
    kernel: &Path,
    dir: &Path,
    mib: u64,
    count: usize,
    kept: &mut KeptFiles,
) -> Result<QemuFigures> {
    std::fs::create_dir_all(dir).map_err(file_err_of(dir))?;
    let serial = dir.join("qemu-serial.log");
    let stderr = dir.join("qemu-stderr.log");
    // A UNIX socket path is limited to 108 bytes; the bench directory may be deep.
    let sock = std::env::temp_dir().join(format!(
        "snapvm-bench-qmp-{}-{mib}.sock",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&sock);
    let cmdline = format!("workload=memstamp mem_mib={} passes=0", mib / 2);
    let mut cmd = Engine::Qemu.command(kernel, &cmdline, 2, mib + 32);
    cmd.arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", sock.display()))
        .stdin(Stdio::null())
        .stdout(File::create(&serial).map_err(file_err_of(&serial))?)
        .stderr(File::create(&stderr).map_err(file_err_of(&stderr))?);
    let mut qemu = KillOnDrop(cmd.spawn().map_err(QemuSnapshotError::Spawn)?);
    let result = run(&mut qemu, &sock, &serial, &stderr, dir, count, kept);
    drop(qemu);
    let _ = std::fs::remove_file(&sock);
    result
}

fn run(
    qemu: &mut KillOnDrop,
    sock: &Path,
    serial: &Path,
    stderr: &Path,
    dir: &Path,
    count: usize,
    kept: &mut KeptFiles,
) -> Result<QemuFigures> {
    let timeout = |what, secs| QemuSnapshotError::Timeout {
        what,
        secs,
        log: serial.into(),
    };
    // Warm up as snapvm's side does: every page touched, steady state.
    let t0 = Instant::now();
    while guest_rates(serial, 0, usize::MAX).len() < 4 {
        exited(qemu, stderr, "before memstamp reached steady state")?;
        let s = std::fs::read_to_string(serial).unwrap_or_default();
        if let Some(l) = s.lines().find(|l| l.starts_with("TESTGUEST FAIL")) {
            return Err(QemuSnapshotError::Guest {
                line: l.into(),
                log: serial.into(),
            });
        }
        if t0.elapsed() > Duration::from_secs(120) {
            return Err(timeout("memstamp steady state", 120));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut qmp = Qmp::connect(sock, qemu, stderr)?;
    let version = qmp.greeting()?;
    qmp.execute("qmp_capabilities", Value::Null)?;
    let caps = json!({ "capabilities": [{ "capability": "background-snapshot", "state": true }] });
    qmp.execute("migrate-set-capabilities", caps)?;
    let mark = serial_len(serial);
    std::thread::sleep(Duration::from_millis(1500));
    let mut before = guest_rates(serial, mark, usize::MAX);

    let (mut pause, mut total, mut synced, mut during) = (vec![], vec![], vec![], vec![]);
    let mut bytes = 0.0;
    let count = count.clamp(1, MAX_SNAPSHOTS);
    for i in 0..count {
        // 7.2 has no `file:` URI; `cat` writes the stream into the directory.
        let file = dir.join(format!("qemu-bg-snapshot-{i}.bin"));
        let m = serial_len(serial);
        let start = Instant::now();
        let uri = format!("exec:cat > {}", sh_quote(&file));
        qmp.execute("migrate", json!({ "uri": uri }))?;
        let info = loop {
            let r = qmp.execute("query-migrate", Value::Null)?;
            match r["status"].as_str().unwrap_or("") {
                "completed" => break r,
                s @ ("failed" | "cancelled") => {
                    let _ = std::fs::remove_file(&file);
                    return Err(QemuSnapshotError::Failed {
                        file,
                        status: s.into(),
                        desc: r["error-desc"].as_str().unwrap_or("no error-desc").into(),
                    });
                }
                _ if start.elapsed() > Duration::from_secs(600) => {
                    return Err(timeout("background snapshot completed", 600))
                }
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        // QEMU's total-time ends when the last byte is in cat's pipe;
        // snapvm's includes an fsync, so the same is timed here.
        let t = Instant::now();
        while has_child(qemu.0.id()) && t.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(1));
        }
        File::open(&file)
            .and_then(|f| f.sync_all())
            .map_err(file_err_of(&file))?;
        synced.push(start.elapsed().as_secs_f64() * 1000.0);
        let len = std::fs::metadata(&file).map_err(file_err_of(&file))?.len();
        bytes += len as f64;
        kept.add(file, dir, len);
        let num = |k: &str| info[k].as_f64().unwrap_or(f64::NAN);
        pause.push(num("downtime"));
        total.push(num("total-time"));
        during.extend(guest_rates(serial, m, serial_len(serial)));
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(QemuFigures {
        version,
        count,
        pause_med: median(&mut pause),
        pause_max: pause.iter().cloned().fold(0.0, f64::max),
        total_med: median(&mut total),
        synced_med: median(&mut synced),
        mib_written: bytes / count as f64 / (1 << 20) as f64,
        before: median(&mut before),
        during: median(&mut during),
    })
}

fn file_err_of(path: &Path) -> impl Fn(std::io::Error) -> QemuSnapshotError + '_ {
    move |source| QemuSnapshotError::File {
        path: path.into(),
        source,
    }
}
