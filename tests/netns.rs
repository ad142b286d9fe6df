//! Network namespaces for the network tests: every test that uses a
//! network makes its own namespace, puts a bridge with the host-side
//! address and the guests' taps in it, starts the VMM inside it
//! (`ip netns exec`) and sends traffic only to addresses in it.

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::Duration;

use crate::{run_with_timeout, snapvm_bin, Finished};

/// A network namespace, deleted (with its bridges and taps) when dropped.
/// Drop it after the VMs running in it.
pub struct Netns {
    /// Its name (`ip netns list`).
    pub name: String,
}

impl Netns {
    /// Creates namespace `snapvm-TAG-PID` with its loopback up.
    pub fn new(tag: &str) -> Self {
        let name = format!("snapvm-{tag}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(std::process::Stdio::null())
            .status();
        let ns = Self { name };
        ns.ip_global(&["netns", "add", &ns.name]);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    fn ip_global(&self, args: &[&str]) {
        let r = run_with_timeout(Command::new("ip").args(args), Duration::from_secs(20));
        assert_eq!(r.code(), 0, "ip {args:?}: {r:?}");
    }

    /// `ip -n NS ARGS`, asserting success.
    pub fn ip(&self, args: &[&str]) -> Finished {
        let r = run_with_timeout(
            Command::new("ip").arg("-n").arg(&self.name).args(args),
            Duration::from_secs(20),
        );
        assert_eq!(r.code(), 0, "ip -n {} {args:?}: {r:?}", self.name);
        r
    }

    /// A command run inside the namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `PROGRAM ARGS` in the namespace to completion (`timeout` at most).
    pub fn exec(&self, program: &str, args: &[&str], timeout: Duration) -> Finished {
        run_with_timeout(self.command(program).args(args), timeout)
    }

    /// Runs `snapvm ARGS` in the namespace (the VMM it starts stays there).
    pub fn snapvm(&self, args: &[&str]) -> Finished {
        run_with_timeout(
            self.command(snapvm_bin()).args(args),
            Duration::from_secs(120),
        )
    }

    /// A bridge `name` with host-side address `cidr` (e.g. 10.91.0.1/24),
    /// up, accepting gratuitous ARP into its neighbour table (so a guest's
    /// announcement is visible there).
    pub fn bridge(&self, name: &str, cidr: &str) {
        self.ip(&["link", "add", name, "type", "bridge"]);
        self.ip(&["addr", "add", cidr, "dev", name]);
        self.ip(&["link", "set", name, "up"]);
        let r = self.exec(
            "sysctl",
            &["-qw", &format!("net.ipv4.conf.{name}.arp_accept=1")],
            Duration::from_secs(10),
        );
        assert_eq!(r.code(), 0, "{r:?}");
    }

    /// A tap `name` on bridge `bridge`, up.
    pub fn tap(&self, name: &str, bridge: &str) {
        self.ip(&["tuntap", "add", "dev", name, "mode", "tap"]);
        self.ip(&["link", "set", name, "master", bridge, "up"]);
    }

    /// The MAC address the namespace's neighbour table holds for `addr`,
    /// if any.
    pub fn neighbour(&self, addr: &str) -> Option<String> {
        let r = self.ip(&["neigh", "show", addr]);
        let words: Vec<&str> = r.stdout.split_whitespace().collect();
        let i = words.iter().position(|w| *w == "lladdr")?;
        words.get(i + 1).map(|s| s.to_string())
    }

    /// Forgets every neighbour on `dev`.
    pub fn flush_neighbours(&self, dev: &str) {
        self.ip(&["neigh", "flush", "dev", dev]);
    }

    /// `ping -c COUNT -i INTERVAL -W 1 ADDR` in the namespace; returns the
    /// replies received.
    pub fn ping(&self, addr: &str, count: u32, interval: &str) -> u32 {
        let r = self.exec(
            "ping",
            &[
                "-n",
                "-q",
                "-c",
                &count.to_string(),
                "-i",
                interval,
                "-W",
                "1",
                addr,
            ],
            Duration::from_secs(60 + u64::from(count)),
        );
        received(&r.stdout).unwrap_or_else(|| panic!("unreadable ping output: {r:?}"))
    }

    /// A UDP socket bound to `local` inside the namespace: a thread enters
    /// the namespace, makes the socket and leaves; the socket stays there.
    pub fn udp_socket(&self, local: &str) -> UdpSocket {
        let path = format!("/run/netns/{}", self.name);
        let local = local.to_string();
        std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            // SAFETY: setns on an open namespace file; it changes only this
            // short-lived thread's network namespace.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            UdpSocket::bind(&local).unwrap_or_else(|e| panic!("bind {local}: {e}"))
        })
        .join()
        .expect("setns thread")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The "N received" figure of ping's summary.
pub fn received(out: &str) -> Option<u32> {
    out.lines()
        .find(|l| l.contains("packets transmitted"))?
        .split(',')
        .find(|p| p.contains("received"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Sends `count` UDP datagrams (numbered, 64 bytes) to `to` at most one at
/// a time, waiting up to `wait` for each echo; returns how many came back
/// with the payload sent.
pub fn udp_echoes(sock: &UdpSocket, to: &str, count: u32, wait: Duration) -> u32 {
    sock.set_read_timeout(Some(wait)).unwrap();
    let mut ok = 0;
    let mut buf = [0u8; 256];
    for i in 0..count {
        let mut msg = [0u8; 64];
        msg[..4].copy_from_slice(&i.to_le_bytes());
        msg[4..].fill((i % 251) as u8);
        sock.send_to(&msg, to).unwrap();
        // Skip late echoes of earlier datagrams.
        while let Ok((n, _)) = sock.recv_from(&mut buf) {
            if n == msg.len() && buf[..n] == msg {
                ok += 1;
                break;
            }
        }
    }
    ok
}

#[cfg(test)]
mod tests {
    #[test]
    fn reads_pings_summary() {
        let out = "--- 10.0.0.2 ping statistics ---\n5 packets transmitted, 4 received, 20% packet loss, time 4005ms\n";
        assert_eq!(super::received(out), Some(4));
        assert_eq!(super::received("nothing"), None);
    }
}
