//! `snapvm bench net`: the test guest's network (ip=, a ring-3 polling
//! driver, guest-images/README.md) under snapvm next to QEMU's virtio-net
//! on the same guest and the same kind of tap, in the same run; then what
//! live snapshots and applies do to a stream of echoes.
//!
//! Everything happens in a network namespace of the benchmark's own: the
//! process enters it first, so the VMM, QEMU and ping started from here
//! are inside, with the bridge, the taps and the host-side address; no
//! traffic leaves it.

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

/// Parameters of `snapvm bench net`.
pub struct NetBench {
    /// The test guest.
    pub kernel: PathBuf,
    /// Directory for the VM (default: the system temp dir).
    pub dir: PathBuf,
    /// Round trips measured per method.
    pub count: usize,
    /// Live snapshots (and applies) measured.
    pub snapshots: usize,
}

const HOST: &str = "10.99.0.1";
const SNAPVM_GUEST: &str = "10.99.0.2";
const QEMU_GUEST: &str = "10.99.0.3";

fn fail(what: &str, message: impl std::fmt::Display) -> BenchError {
    BenchError::Guest {
        what: what.into(),
        message: message.to_string(),
    }
}

fn sh(what: &str, cmd: &mut Command) -> Result<String, BenchError> {
    let out = cmd.output().map_err(|source| BenchError::Spawn {
        what: what.into(),
        source,
    })?;
    if !out.status.success() {
        return Err(fail(what, String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The benchmark's namespace; this process (its main thread, and every
/// process and thread it starts afterwards) runs inside it.
struct Namespace {
    name: String,
}

impl Namespace {
    fn enter() -> Result<Self, BenchError> {
        let name = format!("snapvm-bench-net-{}", std::process::id());
        sh(
            "ip netns add",
            Command::new("ip").args(["netns", "add", &name]),
        )?;
        let ns = Self { name };
        let path = format!("/run/netns/{}", ns.name);
        let f = std::fs::File::open(&path).map_err(|source| BenchError::Spawn {
            what: path.clone(),
            source,
        })?;
        // SAFETY: setns on an open namespace file; moves this thread into
        // the benchmark's network namespace.
        if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(fail("setns", std::io::Error::last_os_error()));
        }
        let ip = |args: &[&str]| {
            sh(
                &format!("ip {}", args.join(" ")),
                Command::new("ip").args(args),
            )
        };
        ip(&["link", "set", "lo", "up"])?;
        ip(&["link", "add", "br0", "type", "bridge"])?;
        ip(&["addr", "add", &format!("{HOST}/24"), "dev", "br0"])?;
        ip(&["link", "set", "br0", "up"])?;
        for tap in ["stap0", "qtap0"] {
            ip(&["tuntap", "add", "dev", tap, "mode", "tap"])?;
            ip(&["link", "set", tap, "master", "br0", "up"])?;
        }
        Ok(ns)
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Round trips and rates of one guest.
#[derive(Default)]
struct Figures {
    ping_ms: Vec<f64>,
    udp_ms: Vec<f64>,
    udp_lost: usize,
    echoes_per_s: f64,
}

fn ping_rtts(addr: &str, count: usize) -> Result<Vec<f64>, BenchError> {
    let out = sh(
        "ping",
        Command::new("ping").args([
            "-n",
            "-c",
            &count.to_string(),
            "-i",
            "0.01",
            "-W",
            "1",
            addr,
        ]),
    )?;
    Ok(out
        .lines()
        .filter_map(|l| {
            l.split("time=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect())
}

fn socket() -> Result<UdpSocket, BenchError> {
    let s = UdpSocket::bind(format!("{HOST}:0")).map_err(|e| fail("UDP socket", e))?;
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| fail("UDP socket", e))?;
    Ok(s)
}

fn datagram(seq: u64, sent_ns: u64) -> [u8; 64] {
    let mut m = [0u8; 64];
    m[..8].copy_from_slice(&seq.to_le_bytes());
    m[8..16].copy_from_slice(&sent_ns.to_le_bytes());
    m
}

fn parse(buf: &[u8]) -> Option<(u64, u64)> {
    if buf.len() != 64 {
        return None;
    }
    let seq = u64::from_le_bytes(buf[..8].try_into().ok()?);
    let sent = u64::from_le_bytes(buf[8..16].try_into().ok()?);
    Some((seq, sent))
}

/// One echo at a time: round trips (ms) and how many got no answer.
fn udp_rtts(sock: &UdpSocket, to: &str, count: usize) -> Result<(Vec<f64>, usize), BenchError> {
    let t0 = Instant::now();
    let (mut rtts, mut lost) = (Vec::new(), 0);
    let mut buf = [0u8; 128];
    for seq in 0..count as u64 {
        let sent = t0.elapsed().as_nanos() as u64;
        sock.send_to(&datagram(seq, sent), to)
            .map_err(|e| fail("UDP send", e))?;
        loop {
            match sock.recv_from(&mut buf) {
                Ok((n, _)) if parse(&buf[..n]).map(|p| p.0) == Some(seq) => {
                    rtts.push((t0.elapsed().as_nanos() as u64 - sent) as f64 / 1e6);
                    break;
                }
                Ok(_) => continue,
                Err(_) => {
                    lost += 1;
                    break;
                }
            }
        }
    }
    Ok((rtts, lost))
}

/// Echoes per second with `window` datagrams in flight, over `secs`.
fn udp_rate(sock: &UdpSocket, to: &str, window: u64, secs: f64) -> Result<f64, BenchError> {
    let t0 = Instant::now();
    let mut buf = [0u8; 128];
    let (mut next, mut echoed) = (0u64, 0u64);
    for _ in 0..window {
        sock.send_to(&datagram(next, 0), to)
            .map_err(|e| fail("UDP send", e))?;
        next += 1;
    }
    while t0.elapsed().as_secs_f64() < secs {
        match sock.recv_from(&mut buf) {
            Ok((n, _)) if parse(&buf[..n]).is_some() => echoed += 1,
            Ok(_) => continue,
            // A lost datagram: put another in flight.
            Err(_) => {}
        }
        sock.send_to(&datagram(next, 0), to)
            .map_err(|e| fail("UDP send", e))?;
        next += 1;
    }
    // Drain what is still in flight before the next measurement.
    while sock.recv_from(&mut buf).is_ok() {}
    Ok(echoed as f64 / t0.elapsed().as_secs_f64())
}

fn measure(addr: &str, b: &NetBench) -> Result<Figures, BenchError> {
    let sock = socket()?;
    let to = format!("{addr}:7");
    // Warm up: ARP resolved, caches hot.
    udp_rtts(&sock, &to, 20)?;
    let ping_ms = ping_rtts(addr, b.count)?;
    let (udp_ms, udp_lost) = udp_rtts(&sock, &to, b.count)?;
    let echoes_per_s = udp_rate(&sock, &to, 8, 3.0)?;
    Ok(Figures {
        ping_ms,
        udp_ms,
        udp_lost,
        echoes_per_s,
    })
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    match s.len() {
        0 => f64::NAN,
        n => s[((n - 1) as f64 * p).round() as usize],
    }
}

/// A stream of echoes, one every `every`, while `during` runs: datagrams
/// sent, answered, and the longest round trip (ms).
fn stream_during<T>(
    sock: &UdpSocket,
    to: &str,
    every: Duration,
    during: impl FnOnce() -> Result<T, BenchError>,
) -> Result<(u64, u64, f64, T), BenchError> {
    let stop = Arc::new(AtomicBool::new(false));
    let rx = sock.try_clone().map_err(|e| fail("UDP socket", e))?;
    let t0 = Instant::now();
    let done = stop.clone();
    let receiver = std::thread::spawn(move || {
        let mut buf = [0u8; 128];
        let (mut got, mut worst) = (0u64, 0f64);
        let mut quiet_since: Option<Instant> = None;
        loop {
            match rx.recv_from(&mut buf) {
                Ok((n, _)) => {
                    if let Some((_, sent)) = parse(&buf[..n]) {
                        got += 1;
                        let rtt = (t0.elapsed().as_nanos() as u64).saturating_sub(sent);
                        worst = worst.max(rtt as f64 / 1e6);
                    }
                }
                Err(_) => {
                    // Stopped, and nothing more for a second: the rest is lost.
                    if done.load(Ordering::SeqCst) {
                        let q = *quiet_since.get_or_insert_with(Instant::now);
                        if q.elapsed() > Duration::from_secs(1) {
                            break;
                        }
                    }
                }
            }
        }
        (got, worst)
    });
    let tx = sock.try_clone().map_err(|e| fail("UDP socket", e))?;
    let (to2, halt) = (to.to_string(), stop.clone());
    let sender = std::thread::spawn(move || {
        let mut seq = 0u64;
        while !halt.load(Ordering::SeqCst) {
            let _ = tx.send_to(&datagram(seq, t0.elapsed().as_nanos() as u64), &to2);
            seq += 1;
            std::thread::sleep(every);
        }
        seq
    });
    std::thread::sleep(Duration::from_millis(200));
    let result = during();
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::SeqCst);
    let sent = sender.join().unwrap_or(0);
    let (got, worst) = receiver.join().unwrap_or((0, f64::NAN));
    Ok((sent, got, worst, result?))
}

/// Sends an echo every 0.5 ms from now until one comes back: the time to
/// that reply.
fn first_reply(sock: &UdpSocket, to: &str, timeout: Duration) -> Result<Duration, BenchError> {
    let t0 = Instant::now();
    sock.set_read_timeout(Some(Duration::from_micros(500)))
        .map_err(|e| fail("UDP socket", e))?;
    let mut buf = [0u8; 128];
    let mut seq = 1u64 << 40;
    let r = loop {
        if t0.elapsed() > timeout {
            break Err(fail("apply", format!("no echo within {timeout:?}")));
        }
        sock.send_to(&datagram(seq, 0), to)
            .map_err(|e| fail("UDP send", e))?;
        seq += 1;
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            if parse(&buf[..n]).is_some_and(|(s, _)| s >= 1 << 40) {
                break Ok(t0.elapsed());
            }
        }
    };
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .map_err(|e| fail("UDP socket", e))?;
    r
}

fn wait_line(log: &std::path::Path, prefix: &str, what: &str) -> Result<(), BenchError> {
    let t0 = Instant::now();
    loop {
        let s = std::fs::read_to_string(log).unwrap_or_default();
        if s.lines().any(|l| l.starts_with(prefix)) {
            return Ok(());
        }
        if let Some(f) = s.lines().find(|l| l.starts_with("TESTGUEST FAIL")) {
            return Err(fail(what, f));
        }
        if t0.elapsed() > Duration::from_secs(60) {
            return Err(fail(
                what,
                format!("no '{prefix}' line in {}", log.display()),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// QEMU on the same guest, its virtio-net (in QEMU's own process, no
/// vhost) on tap qtap0.
fn qemu(b: &NetBench, root: &std::path::Path) -> Result<Figures, BenchError> {
    let log = root.join("qemu-serial.log");
    let child = Command::new("qemu-system-x86_64")
        .args([
            "-accel",
            "kvm",
            "-cpu",
            "qemu64,-cx16",
            "-M",
            "microvm,acpi=off",
        ])
        .args(["-m", "64M", "-smp", "1", "-nodefaults", "-no-user-config"])
        .args(["-nographic", "-serial"])
        .arg(format!("file:{}", log.display()))
        .args(["-global", "virtio-mmio.force-legacy=false"])
        .args([
            "-netdev",
            "tap,id=n0,ifname=qtap0,script=no,downscript=no,vhost=off",
        ])
        .args([
            "-device",
            "virtio-net-device,netdev=n0,mac=52:54:00:99:00:03",
        ])
        .arg("-kernel")
        .arg(&b.kernel)
        .args([
            "-append",
            &format!("workload=idle ip={QEMU_GUEST}/24 vcpus=1"),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|source| BenchError::Spawn {
            what: "qemu-system-x86_64".into(),
            source,
        })?;
    let _guard = engine::KillOnDrop(child);
    wait_line(&log, "TESTGUEST NET up", "qemu")?;
    measure(QEMU_GUEST, b)
}

/// What snapshots and applies do to the network.
struct Disruption {
    sent: u64,
    answered: u64,
    worst_ms: f64,
    base_sent: u64,
    base_answered: u64,
    base_worst_ms: f64,
    pauses_ms: Vec<f64>,
    first_reply_ms: Vec<f64>,
    first_reply_after_job_ms: Vec<f64>,
}

fn snapvm_vm(b: &NetBench, root: &std::path::Path) -> Result<(Figures, Disruption), BenchError> {
    let vmdir = root.join("vm");
    let req = crate::vmdir::CreateRequest {
        kernel: b.kernel.clone(),
        initrd: None,
        cmdline: format!("workload=idle ip={SNAPVM_GUEST}/24"),
        memory: "64M".into(),
        vcpus: 1,
        pin_vcpus: crate::machine::backend_quirks::PinVcpus::Auto,
        huge_pages: crate::machine::backend_quirks::HugePages::Auto,
        disks: vec![],
        nets: vec![crate::config::NetArg {
            tap: "stap0".into(),
            mac: Some([0x52, 0x54, 0, 0x99, 0, 2]),
        }],
        link: true,
    };
    let dir = crate::vmdir::create(&vmdir, &req).map_err(|e| fail("snapvm create", e))?;
    crate::cli::lifecycle::start(&vmdir, false).map_err(|e| fail("snapvm start", e))?;
    let result = (|| {
        wait_line(&dir.serial_log(), "TESTGUEST NET up", "snapvm")?;
        let figures = measure(SNAPVM_GUEST, b)?;
        let sock = socket()?;
        let to = format!("{SNAPVM_GUEST}:7");
        let every = Duration::from_millis(1);
        let gap = Duration::from_millis(300);
        // The same stream without snapshots, as long: the baseline.
        let (base_sent, base_answered, base_worst_ms, ()) =
            stream_during(&sock, &to, every, || {
                std::thread::sleep(gap * b.snapshots as u32);
                Ok(())
            })?;
        let (sent, answered, worst_ms, (pauses_ms, first_id)) =
            stream_during(&sock, &to, every, || {
                let mut pauses = Vec::new();
                let mut first = None;
                for _ in 0..b.snapshots {
                    let r = take_live(&dir, false)?;
                    pauses.push(r.snapshot.pause_us.unwrap_or(0) as f64 / 1000.0);
                    first.get_or_insert(r.snapshot.id);
                    std::thread::sleep(gap);
                }
                Ok((pauses, first))
            })?;
        let id = first_id.ok_or_else(|| fail("snapshot", "none taken"))?;
        let (mut first_reply_ms, mut first_reply_after_job_ms) = (Vec::new(), Vec::new());
        for _ in 0..b.snapshots {
            let t0 = Instant::now();
            apply_snapshot(&dir, &id, false)?;
            let job = t0.elapsed();
            let d = first_reply(&sock, &to, Duration::from_secs(5))?;
            first_reply_ms.push((job + d).as_secs_f64() * 1000.0);
            first_reply_after_job_ms.push(d.as_secs_f64() * 1000.0);
            std::thread::sleep(gap);
        }
        Ok((
            figures,
            Disruption {
                sent,
                answered,
                worst_ms,
                base_sent,
                base_answered,
                base_worst_ms,
                pauses_ms,
                first_reply_ms,
                first_reply_after_job_ms,
            },
        ))
    })();
    let _ = crate::cli::lifecycle::stop(&vmdir, true);
    result
}

/// Runs `snapvm bench net` and prints its table.
pub fn net(b: &NetBench) -> Result<(), BenchError> {
    println!(
        "snapvm bench net: test guest (workload=idle, 1 vCPU, ring-3 polling driver) on a tap on a bridge,"
    );
    println!(
        "in namespace snapvm-bench-net-{}; {} round trips per method; QEMU's virtio-net (no vhost) in the same run",
        std::process::id(),
        b.count
    );
    let root = b
        .dir
        .join(format!("snapvm-bench-net-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).map_err(|e| fail(&root.display().to_string(), e))?;
    let ns = Namespace::enter()?;
    let q = match qemu(b, &root) {
        Ok(q) => Some(q),
        Err(e) => {
            println!("(QEMU baseline unavailable: {e})");
            None
        }
    };
    let ours = snapvm_vm(b, &root);
    drop(ns);
    let _ = std::fs::remove_dir_all(&root);
    let (s, d) = ours?;

    println!();
    println!(
        "{:<40} {:>10} {:>10} {:>8}",
        "metric", "snapvm", "qemu", "ratio"
    );
    let row = |name: &str, a: f64, base: Option<f64>| {
        let (bs, r) = match base {
            Some(x) => (format!("{x:.3}"), format!("{:.2}", a / x)),
            None => ("n/a".into(), "n/a".into()),
        };
        println!("{name:<40} {a:>10.3} {bs:>10} {r:>8}");
    };
    let qv = |f: &dyn Fn(&Figures) -> f64| q.as_ref().map(f);
    row(
        "ping round trip p50 (ms)",
        percentile(&s.ping_ms, 0.5),
        qv(&|f| percentile(&f.ping_ms, 0.5)),
    );
    row(
        "ping round trip p99 (ms)",
        percentile(&s.ping_ms, 0.99),
        qv(&|f| percentile(&f.ping_ms, 0.99)),
    );
    row(
        "UDP echo round trip p50 (ms)",
        percentile(&s.udp_ms, 0.5),
        qv(&|f| percentile(&f.udp_ms, 0.5)),
    );
    row(
        "UDP echo round trip p99 (ms)",
        percentile(&s.udp_ms, 0.99),
        qv(&|f| percentile(&f.udp_ms, 0.99)),
    );
    row(
        "UDP echoes lost (of the round trips)",
        s.udp_lost as f64,
        qv(&|f| f.udp_lost as f64),
    );
    row(
        "UDP echoes/s, 8 in flight",
        s.echoes_per_s,
        qv(&|f| f.echoes_per_s),
    );
    println!("(ratio = snapvm / qemu: lower is better for round trips, higher for echoes/s)");

    println!();
    println!(
        "snapvm, a UDP echo every 1 ms: {} live snapshots 300 ms apart, next to the same stream without",
        d.pauses_ms.len()
    );
    println!("{:<40} {:>10} {:>10}", "", "snapshots", "without");
    println!(
        "{:<40} {:>10} {:>10}",
        "datagrams sent", d.sent, d.base_sent
    );
    println!(
        "{:<40} {:>10} {:>10}",
        "lost",
        d.sent - d.answered.min(d.sent),
        d.base_sent - d.base_answered.min(d.base_sent)
    );
    println!(
        "{:<40} {:>10.2} {:>10.2}",
        "longest round trip (ms)", d.worst_ms, d.base_worst_ms
    );
    println!(
        "{:<40} {:>10.3}",
        "snapshot pause, median (ms)",
        percentile(&d.pauses_ms, 0.5)
    );
    println!(
        "{:<40} {:>10.3}",
        "snapshot pause, max (ms)",
        percentile(&d.pauses_ms, 1.0)
    );
    println!();
    println!(
        "snapvm, {} applies of the first snapshot (lazy), echoes sent every 0.5 ms once the apply returned",
        d.first_reply_ms.len()
    );
    println!(
        "{:<40} {:>10.2}",
        "apply request -> first echo, median (ms)",
        percentile(&d.first_reply_ms, 0.5)
    );
    println!(
        "{:<40} {:>10.2}",
        "apply request -> first echo, max (ms)",
        percentile(&d.first_reply_ms, 1.0)
    );
    println!(
        "{:<40} {:>10.2}",
        "apply done -> first echo, median (ms)",
        percentile(&d.first_reply_after_job_ms, 0.5)
    );
    println!("(target: first reply <= 50 ms after the apply; no loss beyond the pause window)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datagrams_round_trip_and_percentiles() {
        let d = datagram(7, 123456789);
        assert_eq!(parse(&d), Some((7, 123456789)));
        assert_eq!(parse(&d[..10]), None);
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 51.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert!(percentile(&[], 0.5).is_nan());
    }
}
