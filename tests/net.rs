//! Networking: virtio-net on TAP devices, kept across live snapshots,
//! applies and `start --from`. Every test makes its own network namespace
//! (tests/netns.rs) with a bridge holding the host-side address and the
//! guests' taps, starts the VMM inside it and sends traffic only to
//! addresses in it. The host's ping, a UDP socket in the namespace, the
//! bridge's neighbour table and busybox httpd are the checkers; the test
//! guest answers ARP, ICMP echo and UDP echo (guest-images/README.md,
//! "Network").

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::Value;
use snapvm_tests::netns::{received, udp_echoes, Netns};
use snapvm_tests::vmfiles::sha256;
use snapvm_tests::{field, linux_dir, snapvm, TestVm, LINUX_CMDLINE};

const T: Duration = Duration::from_secs(120);
/// Memory and disk workloads that keep verifying while the guest serves the
/// network from vCPU 0.
const GUEST: &str = "workload=memstamp disk=1 blocks=64 mem_mib=32 passes=0 rate=50";

fn mac_of(vm: &TestVm, i: usize) -> String {
    vm.status()["nets"][i]["mac"]
        .as_str()
        .unwrap_or_else(|| panic!("no nets[{i}].mac in {}", vm.status()))
        .to_string()
}

fn start_in(ns: &Netns, vm: &TestVm, more: &[&str]) {
    let mut args = vec!["start", vm.dir.to_str().unwrap()];
    args.extend_from_slice(more);
    let r = ns.snapvm(&args);
    assert_eq!(r.code(), 0, "{r:?}\nvmm.log:\n{}", vm.vmm_log_tail(30));
}

/// Waits until the namespace's neighbour table maps `addr` to `mac`
/// without the host sending anything: only the guest's announcement can
/// put it there after a flush.
fn wait_neighbour(ns: &Netns, addr: &str, mac: &str, vm: &TestVm) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if ns.neighbour(addr).as_deref() == Some(mac) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no neighbour entry {addr} -> {mac} (have {:?}): the guest did not announce itself\n{}",
            ns.neighbour(addr),
            vm.serial()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The guest answers ping and UDP echo, with `mac`.
fn answers(ns: &Netns, sock: &std::net::UdpSocket, addr: &str, mac: &str) {
    assert_eq!(ns.ping(addr, 5, "0.1"), 5, "ping {addr}");
    assert_eq!(
        udp_echoes(sock, &format!("{addr}:7"), 20, Duration::from_secs(2)),
        20,
        "UDP echo from {addr}"
    );
    assert_eq!(ns.neighbour(addr).as_deref(), Some(mac));
}

#[test]
fn the_guest_answers_across_live_snapshots_an_apply_and_start_from() {
    let ns = Netns::new("net1");
    ns.bridge("br0", "10.91.0.1/24");
    ns.tap("tap0", "br0");
    let vm = TestVm::create("net1", &format!("{GUEST} ip=10.91.0.2/24"), "256M", 2, 8);
    // A MAC is generated and kept.
    vm.ok2(&["net", "attach"], &["--tap", "tap0"]);
    let mac = mac_of(&vm, 0);
    let b0 = u8::from_str_radix(&mac[..2], 16).unwrap();
    assert_eq!(b0 & 0x03, 0x02, "locally administered unicast: {mac}");

    start_in(&ns, &vm, &[]);
    let up = vm.wait_serial(0, "TESTGUEST NET up", 1, T);
    assert!(up.contains(&format!("mac={mac}")), "{up}");
    let sock = ns.udp_socket("10.91.0.1:0");
    answers(&ns, &sock, "10.91.0.2", &mac);
    let st = vm.status();
    assert_eq!(st["nets"][0]["tap"], "tap0", "{st}");

    // During live snapshots: a ping train and UDP echoes run while three
    // snapshots are taken. Requests sent in the pause wait in the tap.
    let pinger = ns
        .command("ping")
        .args([
            "-n",
            "-q",
            "-c",
            "300",
            "-i",
            "0.01",
            "-W",
            "2",
            "10.91.0.2",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let udp = sock.try_clone().unwrap();
    let echoer = std::thread::spawn(move || {
        udp_echoes(&udp, "10.91.0.2:7", 300, Duration::from_millis(500))
    });
    std::thread::sleep(Duration::from_millis(300));
    let snaps: Vec<String> = (1..=3)
        .map(|i| {
            let id = vm.take(&format!("s{i}"));
            std::thread::sleep(Duration::from_millis(300));
            id
        })
        .collect();
    let echoed = echoer.join().unwrap();
    let out = pinger.wait_with_output().unwrap();
    let pings = received(&String::from_utf8_lossy(&out.stdout)).unwrap();
    assert!(
        pings >= 295,
        "{pings}/300 pings answered across 3 live snapshots"
    );
    assert!(
        echoed >= 295,
        "{echoed}/300 UDP echoes across 3 live snapshots"
    );
    assert!(vm.serial().contains("workload=diskstamp gen="));

    // Apply s1 in place: the guest continues with the same MAC, announces
    // itself (the flushed neighbour entry comes back without the host
    // asking), answers, and its memory and disk passes still verify.
    ns.flush_neighbours("br0");
    let mark = vm.serial().len();
    vm.apply_and_verify(&snaps[0], &[], T);
    let after = vm.wait_serial(mark, "TESTGUEST NET announce", 1, T);
    assert!(after.contains("ack=0"), "{after}");
    wait_neighbour(&ns, "10.91.0.2", &mac, &vm);
    answers(&ns, &sock, "10.91.0.2", &mac);

    // Off, then on again from s2: a new VMM on the same tap, same MAC.
    vm.ok(&["stop"]);
    ns.flush_neighbours("br0");
    let mark = vm.serial().len();
    start_in(&ns, &vm, &["--from", "s2"]);
    let after = vm.wait_serial(mark, "TESTGUEST NET announce", 1, T);
    assert!(!after.contains("READY"), "continued, not rebooted: {after}");
    wait_neighbour(&ns, "10.91.0.2", &mac, &vm);
    answers(&ns, &sock, "10.91.0.2", &mac);
    vm.wait_serial(mark, "workload=diskstamp gen=", 1, T);
    vm.wait_serial(mark, "vcpu=1 gen=", 1, T);
}

/// The sequence numbers of the guest's "NET ping ... ok" lines in `text`.
fn ping_seqs(text: &str) -> Vec<u64> {
    text.lines()
        .filter(|l| l.contains("TESTGUEST NET ping") && l.ends_with(" ok"))
        .filter_map(|l| field(l, "seq")?.parse().ok())
        .collect()
}

#[test]
fn two_guests_on_a_bridge_ping_each_other_across_a_revert() {
    let ns = Netns::new("net2");
    ns.bridge("br0", "10.92.0.1/24");
    ns.tap("tapa", "br0");
    ns.tap("tapb", "br0");
    let root = std::env::temp_dir().join(format!("snapvm-t-net2-{}", std::process::id()));
    let a = TestVm::create_with(
        &root.join("a"),
        "workload=memstamp mem_mib=16 passes=0 rate=50 ip=10.92.0.2/24 peer=10.92.0.3",
        "128M",
        2,
        0,
        &["--net", "tap=tapa,mac=52:54:00:92:00:02"],
    );
    let b = TestVm::create_with(
        &root.join("b"),
        "workload=idle ip=10.92.0.3/24 peer=10.92.0.2",
        "64M",
        1,
        0,
        &["--net", "tap=tapb"],
    );
    assert_eq!(mac_of(&a, 0), "52:54:00:92:00:02");
    start_in(&ns, &a, &[]);
    start_in(&ns, &b, &[]);
    a.wait_serial(0, "TESTGUEST NET ping peer=10.92.0.3", 3, T);
    b.wait_serial(0, "TESTGUEST NET ping peer=10.92.0.2", 3, T);

    let snap = a.take("a1");
    let at_snap = *ping_seqs(&a.serial()).last().unwrap();
    // A goes on pinging past the snapshot...
    let deadline = Instant::now() + T;
    while ping_seqs(&a.serial()).last().copied().unwrap_or(0) < at_snap + 5 {
        assert!(
            Instant::now() < deadline,
            "A stopped pinging:\n{}",
            a.serial()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // ...is reverted: its sequence numbers start again from the snapshot's,
    // and the two ping each other again.
    let (mark_a, mark_b) = (a.serial().len(), b.serial().len());
    let r = a.ok2(&["snapshot", "apply"], &[&snap]);
    assert!(r.stdout.contains("the VM is running"), "{r:?}");
    a.wait_serial(mark_a, "TESTGUEST NET ping peer=10.92.0.3", 3, T);
    let seqs = ping_seqs(&a.serial()[mark_a..]);
    assert!(
        seqs[0] <= at_snap + 2,
        "A continued from the snapshot (seq {} after the apply, {at_snap} at the snapshot)",
        seqs[0]
    );
    b.wait_serial(mark_b, "TESTGUEST NET ping peer=10.92.0.2", 3, T);
    assert!(a.serial()[mark_a..].contains("TESTGUEST NET announce"));
    // The host reaches both.
    assert_eq!(ns.ping("10.92.0.2", 3, "0.1"), 3);
    assert_eq!(ns.ping("10.92.0.3", 3, "0.1"), 3);
    drop((a, b));
    let _ = std::fs::remove_dir_all(&root);
}

/// The numbers of the Linux guest's successful fetches in `text` (with the
/// served file's checksum; any other checksum fails the test).
fn fetches(text: &str, want: &str) -> Vec<u64> {
    // Complete lines only: the guest may be in the middle of one.
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .filter(|l| l.starts_with("SNAPVM-LINUX FETCH") && !l.ends_with("failed"))
        .map(|l| {
            assert_eq!(
                field(l, "sha256"),
                Some(want),
                "fetched a different file: {l}"
            );
            field(l, "n").unwrap().parse().unwrap()
        })
        .collect()
}

fn wait_fetch(vm: &TestVm, from: usize, after_n: u64, want: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let s = vm.serial();
        assert!(!s.contains("SNAPVM-LINUX FAIL"), "{s}");
        if let Some(n) = fetches(&s[from..], want).into_iter().find(|n| *n > after_n) {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "no fetch after n={after_n}:\n{}\nvmm.log:\n{}",
            &s[from..],
            vm.vmm_log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn linux_fetches_over_http_across_a_live_snapshot_and_a_revert() {
    let ns = Netns::new("net3");
    ns.bridge("br0", "10.93.0.1/24");
    ns.tap("tap0", "br0");
    let root = std::env::temp_dir().join(format!("snapvm-t-net3-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let www = root.join("www");
    std::fs::create_dir_all(&www).unwrap();
    let mut blob = vec![0u8; 192 << 10];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut blob))
        .unwrap();
    std::fs::write(www.join("blob"), &blob).unwrap();
    let want = sha256(&www.join("blob"));
    let _httpd = KillOnDrop(
        ns.command("busybox")
            .args(["httpd", "-f", "-p", "10.93.0.1:8000", "-h"])
            .arg(&www)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let linux = linux_dir();
    let dir = root.join("vm");
    let cmdline =
        format!("{LINUX_CMDLINE} snapvm.ip=10.93.0.2/24 snapvm.fetch=http://10.93.0.1:8000/blob");
    let r = snapvm(&[
        "create",
        dir.to_str().unwrap(),
        "--kernel",
        linux.join("vmlinux").to_str().unwrap(),
        "--initrd",
        linux.join("initramfs.cpio").to_str().unwrap(),
        "--cmdline",
        &cmdline,
        "--memory",
        "256M",
        "--vcpus",
        "2",
        "--net",
        "tap=tap0",
    ]);
    assert_eq!(r.code(), 0, "{r:?}");
    let vm = TestVm {
        dir,
        root: root.clone(),
    };
    let mac = mac_of(&vm, 0);
    start_in(&ns, &vm, &[]);
    let first = wait_fetch(&vm, 0, 0, &want);
    assert!(
        vm.serial().contains(&format!("mac={mac}")),
        "{}",
        vm.serial()
    );

    // Live snapshot between fetches; the guest goes on fetching.
    let snap = vm.take("fetching");
    let at_snap = fetches(&vm.serial(), &want).into_iter().max().unwrap();
    let later = wait_fetch(&vm, 0, at_snap + 2, &want);
    assert!(later > first);

    // Revert: the guest's fetch counter goes back to the snapshot's and it
    // fetches the same file again (a transfer cut by the revert may fail).
    let mark = vm.serial().len();
    let r = vm.ok2(&["snapshot", "apply"], &[&snap]);
    assert!(r.stdout.contains("the VM is running"), "{r:?}");
    let n = wait_fetch(&vm, mark, 0, &want);
    assert!(
        n <= at_snap + 2,
        "continued from the snapshot: fetch n={n} after the apply, n={at_snap} at the snapshot, {later} before the apply"
    );
    let tail = &vm.serial()[mark..];
    assert!(!tail.contains("SNAPVM-LINUX init"), "not rebooted: {tail}");
    let st: Value = vm.status();
    assert_eq!(st["nets"][0]["mac"], mac.as_str());
}

/// A helper process (a web server) killed when the test ends, passed or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn bad_network_options_are_refused_and_change_nothing() {
    let ns = Netns::new("net4");
    ns.bridge("br0", "10.94.0.1/24");
    let root = std::env::temp_dir().join(format!("snapvm-t-net4-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).unwrap();
    let guest = snapvm_tests::testguest();
    let create = |dir: &str, nets: &[&str]| {
        let d = root.join(dir);
        let mut args = vec![
            "create",
            d.to_str().unwrap(),
            "--kernel",
            guest.to_str().unwrap(),
            "--memory",
            "64M",
        ];
        for n in nets {
            args.extend(["--net", n]);
        }
        snapvm(&args)
    };
    for (net, says) in [
        ("tap=a/b", "a/b"),
        (
            "tap=an-interface-name-too-long",
            "an-interface-name-too-long",
        ),
        ("tap=t0,mac=01:00:00:00:00:01", "01:00:00:00:00:01"),
        ("tap=t0,mac=52:54:00:00:01", "52:54:00:00:01"),
        ("mac=52:54:00:00:00:01", "mac=52:54:00:00:00:01"),
        ("tap=t0,speed=10", "speed=10"),
    ] {
        let r = create("bad", &[net]);
        assert_ne!(r.code(), 0, "--net {net} accepted: {r:?}");
        assert!(r.stderr.contains(says), "--net {net}: {r:?}");
        assert!(
            !root.join("bad").exists(),
            "--net {net} left a VM directory"
        );
    }
    let r = create("bad", &["tap=t0", "tap=t0"]);
    assert_ne!(r.code(), 0, "{r:?}");
    assert!(r.stderr.contains("t0"), "{r:?}");

    assert_eq!(create("vm", &["tap=t0"]).code(), 0);
    let vm = TestVm {
        dir: root.join("vm"),
        root: root.clone(),
    };
    let toml = || std::fs::read_to_string(vm.dir.join("vm.toml")).unwrap();
    let before = toml();
    let r = vm.cli2(&["net", "attach"], &["--tap", "t0"]);
    assert_ne!(r.code(), 0, "{r:?}");
    assert!(
        r.stderr.contains("t0") && r.stderr.contains("net0"),
        "{r:?}"
    );
    let r = vm.cli2(&["net", "detach"], &["net7"]);
    assert_ne!(r.code(), 0, "{r:?}");
    assert!(
        r.stderr.contains("net7") && r.stderr.contains("net0"),
        "{r:?}"
    );
    let r = vm.cli2(
        &["net", "attach"],
        &["--tap", "t1", "--mac", "ff:ff:ff:ff:ff:ff"],
    );
    assert_ne!(r.code(), 0, "{r:?}");
    assert_eq!(toml(), before, "refused commands changed vm.toml");

    // A name that is taken by something that is not a tap (the bridge):
    // start fails naming it, and no VMM is left behind.
    vm.ok2(&["net", "detach"], &["net0"]);
    vm.ok2(&["net", "attach"], &["--tap", "br0"]);
    let r = ns.snapvm(&["start", vm.dir.to_str().unwrap()]);
    assert_ne!(r.code(), 0, "{r:?}");
    assert!(
        r.stderr.contains("br0") && r.stderr.contains("not a TAP"),
        "{r:?}"
    );
    assert_eq!(vm.status()["state"], "stopped", "{}", vm.status());

    // Running: adapters cannot change.
    vm.ok2(&["net", "detach"], &["net0"]);
    vm.ok2(&["net", "attach"], &["--tap", "t0"]);
    start_in(&ns, &vm, &[]);
    let r = vm.cli2(&["net", "attach"], &["--tap", "t1"]);
    assert_ne!(r.code(), 0, "{r:?}");
    assert!(r.stderr.contains("is running"), "{r:?}");
    let r = vm.cli2(&["net", "detach"], &["net0"]);
    assert!(r.stderr.contains("is running"), "{r:?}");
    // The VMM created t0 in the namespace; it goes away with the VMM.
    assert!(ns.ip(&["link", "show"]).stdout.contains("t0"));
    vm.ok(&["stop"]);
    assert!(!ns.ip(&["link", "show"]).stdout.contains("t0:"));
}
