//! `snapvm ui` in a real browser: Debian's chromium, headless, driven
//! through chromedriver (WebDriver) while the self-verifying test guest
//! runs. The page takes snapshots, applies one and deletes one by clicks,
//! and shows the tree, "Now" and the merge follow; the guest never fails.
//! The token travels in the URL's fragment only (never served, never in a
//! cookie) and leaves the address bar; API requests without it, or from
//! another origin, are refused.
//!
//! Needs /usr/bin/chromium and /usr/bin/chromedriver (scripts/setup-host
//! installs them). Leaves a screenshot of the tree page in
//! target/test-artifacts/ui-tree.png.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;
use snapvm_tests::{snapvm_bin, TestVm, Watched};

const T: Duration = Duration::from_secs(120);
/// How long the page may take to show something (it polls every second).
const WAIT: Duration = Duration::from_secs(60);
/// memstamp on vCPUs 1-2, diskstamp on vCPU 0 over 4 MiB of the disk.
const LAB: &str = "workload=memstamp disk=1 blocks=1024 mem_mib=32 passes=0 rate=50";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";

fn artifacts() -> PathBuf {
    let d = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// chromedriver in a process group of its own, killed with the browsers
/// it started (also when the test fails) when dropped.
struct Driver(Child);

impl Drop for Driver {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group our own child leads.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGKILL) };
        let _ = self.0.wait();
    }
}

/// The `snapvm ui` server, killed when dropped.
struct UiServer(Watched);

impl Drop for UiServer {
    fn drop(&mut self) {
        let _ = self.0.child.kill();
        let _ = self.0.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// chromedriver on a free port; returns it and its URL once it answers.
fn chromedriver() -> (Driver, String) {
    for bin in [CHROMEDRIVER, CHROMIUM] {
        assert!(
            Path::new(bin).exists(),
            "{bin} is missing: run scripts/setup-host (it installs Debian's chromium and chromium-driver)"
        );
    }
    let port = free_port();
    let child = Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {CHROMEDRIVER}: {e}; run scripts/setup-host"));
    let driver = Driver(child);
    let deadline = Instant::now() + WAIT;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "chromedriver did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    (driver, format!("http://127.0.0.1:{port}"))
}

/// One HTTP/1.1 request to the UI server: (status, body).
fn http(addr: &str, method: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(T)).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n"
    );
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    req += "\r\n";
    s.write_all(req.as_bytes()).unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {raw:?}"));
    let body = raw.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    (status, body.to_string())
}

/// Saves a screenshot of the page, scrolled to its top, as `name` in the
/// artifacts folder.
async fn screenshot(c: &Client, name: &str) -> PathBuf {
    let path = artifacts().join(name);
    let _ = c.execute("window.scrollTo(0, 0)", vec![]).await;
    match c.screenshot().await {
        Ok(png) => std::fs::write(&path, png).unwrap(),
        Err(e) => eprintln!("no screenshot {name}: {e}"),
    }
    path
}

/// The page's error text (empty when none).
async fn page_error(c: &Client) -> String {
    match c.find(Locator::Id("error")).await {
        Ok(e) => e
            .prop("textContent")
            .await
            .ok()
            .flatten()
            .unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// Fails the test with what the page shows: its error and a screenshot.
async fn fail(c: &Client, vm: &TestVm, what: String) -> ! {
    let shot = screenshot(c, "ui-failure.png").await;
    panic!(
        "{what}\npage error: {:?}\nscreenshot: {}\nserial (end):\n{}\nvmm.log (end):\n{}",
        page_error(c).await,
        shot.display(),
        vm.serial()
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .join("\n"),
        vm.vmm_log_tail(30)
    );
}

/// Polls `$cond` (an expression giving an Option) until it is Some, for
/// [`WAIT`] at most; fails the test with `$what` otherwise.
macro_rules! wait_for {
    ($c:expr, $vm:expr, $what:expr, $cond:expr) => {{
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(v) = $cond {
                break v;
            }
            if Instant::now() > deadline {
                fail($c, $vm, format!("not within {:?}: {}", WAIT, $what)).await;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }};
}

/// The attribute `name` of the first element matching `css`.
async fn attr(c: &Client, css: &str, name: &str) -> Option<String> {
    c.find(Locator::Css(css))
        .await
        .ok()?
        .attr(name)
        .await
        .ok()?
}

/// Whether an element matches `css`.
async fn exists(c: &Client, css: &str) -> bool {
    c.find(Locator::Css(css)).await.is_ok()
}

/// Clicks the element matching `css` once it is there and enabled (the
/// page redraws the tree when it changes, so a click may need a retry).
async fn click(c: &Client, vm: &TestVm, css: &str) {
    wait_for!(c, vm, format!("click {css}"), {
        match c.find(Locator::Css(css)).await {
            Ok(e) if e.is_enabled().await.unwrap_or(false) => e.click().await.ok(),
            _ => None,
        }
    })
}

/// Fails if the page shows an error.
async fn no_error(c: &Client, vm: &TestVm, after: &str) {
    let e = page_error(c).await;
    if !e.is_empty() {
        fail(c, vm, format!("the page shows an error after {after}: {e}")).await;
    }
}

/// Takes a snapshot named `name` by typing and clicking; returns its id
/// once its node is in the tree with "Now" under it.
async fn snapshot_by_click(c: &Client, vm: &TestVm, name: &str) -> String {
    let input = wait_for!(c, vm, "the snapshot name field", {
        c.find(Locator::Id("snap-name")).await.ok()
    });
    input.clear().await.unwrap();
    input.send_keys(name).await.unwrap();
    click(c, vm, "#btn-snapshot").await;
    let node = format!("g.node[data-name='{name}']");
    let id = wait_for!(c, vm, format!("node {name} in the tree"), {
        attr(c, &node, "data-id").await
    });
    wait_for!(c, vm, format!("Now under {name}"), {
        attr(c, "g[data-now='1']", "data-parent")
            .await
            .filter(|p| *p == id)
    });
    no_error(c, vm, &format!("snapshot {name}")).await;
    id
}

/// The ids of the merge entries the page lists.
async fn merge_ids(c: &Client) -> Vec<String> {
    let mut out = vec![];
    for e in c
        .find_all(Locator::Css("#merges li.merge"))
        .await
        .unwrap_or_default()
    {
        let id = e.attr("data-id").await.ok().flatten().unwrap_or_default();
        let state = e
            .attr("data-state")
            .await
            .ok()
            .flatten()
            .unwrap_or_default();
        // An entry the page replaced while it was read has no attributes
        // left: it says nothing.
        if !state.is_empty() {
            out.push(format!("{state}:{id}"));
        }
    }
    out
}

#[test]
fn the_web_view_snapshots_applies_and_deletes_by_clicks() {
    let vm = TestVm::create("ui", LAB, "128M", 3, 8);
    vm.ok(&["start"]);
    vm.wait_serial(0, "workload=diskstamp gen=1", 1, T);
    let (_driver, driver_url) = chromedriver();

    let mut ui = UiServer(Watched::spawn(
        Command::new(snapvm_bin())
            .arg("ui")
            .arg(&vm.root)
            .args(["--listen", "127.0.0.1:0"]),
    ));
    let line =
        ui.0.wait_for("snapvm ui: open ", T)
            .unwrap_or_else(|| panic!("snapvm ui printed no URL: {:?}", ui.0.seen));
    let url = line["snapvm ui: open ".len()..].trim().to_string();
    let (base, token) = url.split_once("/#token=").expect("URL with #token=");
    let addr = base.trim_start_matches("http://").to_string();
    assert!(
        addr.starts_with("127.0.0.1:") && !addr.ends_with(":0"),
        "{url}"
    );
    assert_eq!(token.len(), 64, "{url}");

    // The page and its assets are served to anyone and hold no token; the
    // API needs the token header (a cookie is none), changes this server's
    // origin too; a reference the tree does not know is refused in the
    // CLI's words.
    for path in ["/", "/app.js", "/style.css"] {
        let (st, body) = http(&addr, "GET", path, &[]);
        assert_eq!(st, 200, "{path}: {body}");
        assert!(!body.contains(token), "{path} holds the token");
    }
    assert_eq!(http(&addr, "GET", "/api/vms", &[]).0, 401);
    let cookie = format!("snapvm_ui={token}");
    assert_eq!(
        http(&addr, "GET", "/api/vms", &[("Cookie", &cookie)]).0,
        401
    );
    let (st, _) = http(&addr, "POST", "/api/vms/vm/pause", &[]);
    assert!(st == 401 || st == 403, "{st}");
    let wrong = "0".repeat(64);
    let (st, _) = http(
        &addr,
        "POST",
        "/api/vms/vm/pause",
        &[("X-Snapvm-Token", &wrong)],
    );
    assert!(st == 401 || st == 403, "{st}");
    let (st, body) = http(
        &addr,
        "POST",
        "/api/vms/vm/pause",
        &[("X-Snapvm-Token", token), ("Origin", "http://evil.example")],
    );
    assert_eq!(st, 403, "{body}");
    assert!(body.contains("cross-origin request refused"), "{body}");
    assert_eq!(vm.status()["state"], "running", "nothing was paused");
    let (st, body) = http(&addr, "GET", "/api/vms", &[("X-Snapvm-Token", token)]);
    assert_eq!(st, 200, "{body}");
    assert!(body.contains("\"key\":\"vm\""), "{body}");
    let (st, body) = http(
        &addr,
        "POST",
        "/api/vms/vm/snapshots/no-such-snapshot/apply",
        &[("X-Snapvm-Token", token)],
    );
    assert_eq!(st, 404, "{body}");
    assert!(
        body.contains("no snapshot matches 'no-such-snapshot'"),
        "the CLI's words: {body}"
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1400,900"],
            }),
        );
        let c = ClientBuilder::new(HttpConnector::new())
            .capabilities(caps)
            .connect(&driver_url)
            .await
            .unwrap_or_else(|e| panic!("chromedriver at {driver_url} gave no session: {e}"));

        // The URL printed opens the page, which takes the token out of the
        // address bar once loaded.
        c.goto(&url).await.unwrap();
        let item = "li.vm[data-name='vm']";
        wait_for!(&c, &vm, "the VM listed as running", {
            attr(&c, item, "data-state")
                .await
                .filter(|s| s == "running")
        });
        let here = c.current_url().await.unwrap();
        assert!(!here.as_str().contains("token="), "{here}");
        // The list shows what runs, with its hardware.
        let facts = wait_for!(&c, &vm, "the VM's facts in the list", {
            match c.find(Locator::Css(&format!("{item} .vm-facts"))).await {
                Ok(e) => e.text().await.ok().filter(|t| t.contains("up ")),
                Err(_) => None,
            }
        });
        for part in ["128 MiB", "3 vCPUs", "disk", "adapter"] {
            assert!(facts.contains(part), "{part} in {facts:?}");
        }
        click(&c, &vm, item).await;
        wait_for!(&c, &vm, "the VM's pane", {
            match c.find(Locator::Id("vm-name")).await {
                Ok(e) => e.text().await.ok().filter(|t| t == "vm"),
                Err(_) => None,
            }
        });

        // Two snapshots by clicks: each appears with Now under it.
        let one = snapshot_by_click(&c, &vm, "ui-one").await;
        let two = snapshot_by_click(&c, &vm, "ui-two").await;
        assert_ne!(one, two);
        let parent_of_two = attr(&c, &format!("g.node[data-id='{two}']"), "data-parent").await;
        assert_eq!(parent_of_two.as_deref(), Some(one.as_str()));

        // Apply the first: Now moves under it; the guest goes on verifying.
        let mark = vm.serial().len();
        click(&c, &vm, &format!("g.node[data-id='{one}']")).await;
        click(&c, &vm, "#btn-apply").await;
        click(&c, &vm, "#confirm-ok").await;
        wait_for!(&c, &vm, "Now under ui-one after the apply", {
            attr(&c, "g[data-now='1']", "data-parent")
                .await
                .filter(|p| *p == one)
        });
        no_error(&c, &vm, "the apply").await;
        vm.wait_serial(mark, "workload=diskstamp gen=", 1, T);
        screenshot(&c, "ui-tree.png").await;

        // Let the merge the apply started end, so the delete's shows.
        wait_for!(&c, &vm, "no merge running before the delete", {
            let ids = merge_ids(&c).await;
            (!ids
                .iter()
                .any(|m| m.starts_with("running:") || m.starts_with("in-progress:")))
            .then_some(ids)
        });
        let before = merge_ids(&c).await;

        // Delete the second: the dialog says what merges; the page shows
        // the merge (running, or done if it was quicker than a poll) and
        // the node vanishes.
        click(&c, &vm, &format!("g.node[data-id='{two}']")).await;
        click(&c, &vm, "#btn-delete").await;
        let plan = wait_for!(&c, &vm, "the delete confirmation", {
            match c.find(Locator::Id("dialog-list")).await {
                Ok(e) => e.text().await.ok().filter(|t| !t.is_empty()),
                Err(_) => None,
            }
        });
        assert!(plan.contains("\"ui-two\""), "{plan}");
        assert!(
            plan.contains("merges") || plan.contains("removed"),
            "the dialog says what becomes of the disk layer: {plan}"
        );
        click(&c, &vm, "#confirm-ok").await;
        let seen = wait_for!(&c, &vm, "the delete's merge in #merges", {
            let now = merge_ids(&c).await;
            now.into_iter().find(|m| {
                m.starts_with("running:") || m.starts_with("in-progress:") || !before.contains(m)
            })
        });
        eprintln!("merge seen: {seen}");
        wait_for!(&c, &vm, "node ui-two gone", {
            (!exists(&c, &format!("g.node[data-id='{two}']")).await).then_some(())
        });
        wait_for!(&c, &vm, "the merge finished", {
            let ids = merge_ids(&c).await;
            (!ids.iter().any(|m| {
                m.starts_with("running:")
                    || m.starts_with("in-progress:")
                    || m.starts_with("waiting:")
            }))
            .then_some(())
        });
        no_error(&c, &vm, "the delete").await;
        assert_eq!(
            attr(&c, "g[data-now='1']", "data-parent").await.as_deref(),
            Some(one.as_str()),
            "Now stays under ui-one"
        );
        screenshot(&c, "ui-after-delete.png").await;
        let _ = c.close().await;
    });

    // The guest kept verifying all along.
    let mark = vm.serial().len();
    vm.wait_serial(mark, "TESTGUEST PASS", 2, T);
    assert_eq!(vm.serial().matches("TESTGUEST FAIL").count(), 0);
    let tree = vm.tree();
    let names: Vec<&str> = tree["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, ["ui-one"], "{tree}");
    assert!(
        ui.0.child.try_wait().unwrap().is_none(),
        "the server still runs"
    );
}
