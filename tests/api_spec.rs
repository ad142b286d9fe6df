//! docs/api.yaml against a real validator, and a running VMM's real
//! answers against docs/api.yaml: every endpoint, its errors, optional
//! bodies, 405 with Allow. The validators (openapi-spec-validator,
//! openapi-core) run in the venv scripts/openapi-venv makes; the test
//! command (scripts/test, through scripts/setup-host) installs it.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use snapvm_tests::{run_with_timeout, Finished, TestVm};

const T: Duration = Duration::from_secs(120);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn openapi_check(args: &[&str]) -> Finished {
    run_with_timeout(
        Command::new(repo().join("scripts/openapi-check")).args(args),
        T,
    )
}

#[test]
fn the_spec_is_valid_openapi_3() {
    let spec = repo().join("docs/api.yaml");
    let r = openapi_check(&["spec", spec.to_str().unwrap()]);
    assert_eq!(r.code(), 0, "{r:?}");
    // The validator catches what made the old document invalid: an enum
    // value YAML reads as a boolean, and stray keys from a flow mapping.
    let text = std::fs::read_to_string(&spec).unwrap();
    let broken =
        std::env::temp_dir().join(format!("snapvm-api-broken-{}.yaml", std::process::id()));
    for (from, to) in [
        (
            r#"enum: ["running", "paused", "off"]"#,
            "enum: [running, paused, off]",
        ),
        (
            "summary: Status of the VM",
            "summary: Status of the VM\n      x: { description: a, b }",
        ),
    ] {
        assert!(text.contains(from), "the spec no longer has {from:?}");
        std::fs::write(&broken, text.replacen(from, to, 1)).unwrap();
        let r = openapi_check(&["spec", broken.to_str().unwrap()]);
        assert_eq!(r.code(), 1, "accepted a spec with {to:?}: {r:?}");
    }
    let _ = std::fs::remove_file(&broken);
}

/// A recorded request and its answer.
struct Exchange {
    status: u16,
    headers: Vec<(String, String)>,
    body: Value,
}

impl Exchange {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends raw HTTP/1.1 requests (no snapvm code involved) and records each
/// exchange as a line for `openapi-check exchanges`.
struct Recorder {
    socket: PathBuf,
    lines: Vec<String>,
}

impl Recorder {
    fn send(&mut self, method: &str, target: &str, body: Option<&str>) -> Exchange {
        let mut s = UnixStream::connect(&self.socket).unwrap();
        let payload = body.unwrap_or("");
        let request_body = body_json(body_text(body));
        write!(
            s,
            "{method} {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{payload}",
            payload.len()
        )
        .unwrap();
        let mut raw = String::new();
        s.read_to_string(&mut raw).unwrap();
        let (head, text) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
        let mut lines = head.lines();
        let status: u16 = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("not HTTP: {raw}"));
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            .collect();
        let body: Value = if text.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
        };
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        let header_map: serde_json::Map<String, Value> = headers
            .iter()
            .map(|(k, v)| (k.clone(), Value::from(v.clone())))
            .collect();
        self.lines.push(
            json!({
                "method": method,
                "path": path,
                "query": query,
                "status": status,
                "request_body": request_body,
                "response_body": body,
                "response_headers": header_map,
            })
            .to_string(),
        );
        Exchange {
            status,
            headers,
            body,
        }
    }

    fn wait_job(&mut self, id: &str) -> Exchange {
        let deadline = Instant::now() + T;
        loop {
            let j = self.send("GET", &format!("/jobs/{id}"), None);
            assert_eq!(j.status, 200, "{}", j.body);
            if j.body["state"] != "running" {
                return j;
            }
            assert!(Instant::now() < deadline, "job {id} did not end");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

fn body_text(body: Option<&str>) -> Option<&str> {
    body.filter(|b| !b.trim().is_empty())
}

/// The request body as JSON for the checker (invalid JSON as a string).
fn body_json(body: Option<&str>) -> Value {
    match body {
        None => Value::Null,
        Some(b) => serde_json::from_str(b).unwrap_or_else(|_| Value::from(b)),
    }
}

#[test]
fn a_running_vmm_answers_as_the_spec_says() {
    let vm = TestVm::create(
        "apispec",
        "workload=memstamp disk=1 blocks=64 mem_mib=8 passes=0 rate=50",
        "64M",
        2,
        4,
    );
    vm.ok(&["start"]);
    vm.wait_serial(0, "workload=diskstamp gen=", 1, T);
    let mut r = Recorder {
        socket: vm.dir.join("run/api.sock"),
        lines: Vec::new(),
    };
    assert_eq!(r.send("GET", "/vm", None).status, 200);
    assert_eq!(r.send("GET", "/jobs", None).status, 200);
    assert_eq!(r.send("GET", "/snapshots", None).status, 200);
    let paused = r.send("PUT", "/vm/state", Some(r#"{"state":"paused"}"#));
    assert_eq!(
        (paused.status, &paused.body["state"]),
        (200, &json!("paused"))
    );
    assert_eq!(
        r.send("PUT", "/vm/state", Some(r#"{"state":"paused"}"#))
            .status,
        409
    );
    assert_eq!(
        r.send("PUT", "/vm/state", Some(r#"{"state":"running"}"#))
            .status,
        200
    );
    for bad in [
        r#"{"state":"flying"}"#,
        r#"{"colour":"red"}"#,
        "{\"state\":",
        "",
    ] {
        let e = r.send("PUT", "/vm/state", Some(bad));
        assert_eq!(e.status, 400, "{bad}: {}", e.body);
        assert!(e.body["error"].is_string());
    }

    // POST /snapshots without a body: a snapshot with a generated name.
    let job = r.send("POST", "/snapshots", None);
    assert_eq!(job.status, 202, "{}", job.body);
    let done = r.wait_job(job.body["job"].as_str().unwrap());
    assert_eq!(done.body["state"], "succeeded", "{}", done.body);
    let first = done.body["result"]["snapshot"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    // A conflict while a job runs, then a named paused snapshot.
    let job = r.send(
        "POST",
        "/snapshots",
        Some(r#"{"name":"second","description":"d"}"#),
    );
    assert_eq!(job.status, 202);
    let busy = r.send("POST", "/snapshots", Some("{}"));
    assert!(busy.status == 409 || busy.status == 202, "{}", busy.body);
    if busy.status == 202 {
        r.wait_job(busy.body["job"].as_str().unwrap());
    }
    let second = r.wait_job(job.body["job"].as_str().unwrap());
    assert_eq!(second.body["state"], "succeeded", "{}", second.body);
    assert_eq!(
        r.send("POST", "/snapshots", Some("[]")).status,
        400,
        "a body that is not an object"
    );

    // Apply without a body, and with save_current.
    let job = r.send("POST", &format!("/snapshots/{first}/apply"), None);
    assert_eq!(job.status, 202, "{}", job.body);
    let applied = r.wait_job(job.body["job"].as_str().unwrap());
    assert_eq!(applied.body["state"], "succeeded", "{}", applied.body);
    assert_eq!(applied.body["result"]["power_state"], "running");
    let job = r.send(
        "POST",
        &format!("/snapshots/{}/apply", &first[..8]),
        Some(r#"{"save_current":"kept"}"#),
    );
    assert_eq!(job.status, 202, "{}", job.body);
    let applied = r.wait_job(job.body["job"].as_str().unwrap());
    assert_eq!(applied.body["result"]["saved_current"]["name"], "kept");
    assert_eq!(
        r.send("POST", "/snapshots/nonexistent/apply", None).status,
        404
    );
    assert_eq!(
        r.send(
            "POST",
            &format!("/snapshots/{first}/apply"),
            Some(r#"{"eager":"yes"}"#)
        )
        .status,
        400
    );
    assert_eq!(r.send("GET", "/vm", None).status, 200);

    // Delete (a merge job may follow), bad references and parameters.
    let del = r.send("DELETE", &format!("/snapshots/{first}?subtree=false"), None);
    assert_eq!(del.status, 200, "{}", del.body);
    if let Some(j) = del.body["job"].as_str() {
        let merged = r.wait_job(j);
        assert_eq!(merged.body["state"], "succeeded", "{}", merged.body);
    }
    assert_eq!(r.send("DELETE", "/snapshots/nonexistent", None).status, 404);
    assert_eq!(
        r.send("DELETE", "/snapshots/second?subtree=maybe", None)
            .status,
        400
    );
    assert_eq!(r.send("GET", "/jobs/0000", None).status, 404);
    assert_eq!(r.send("GET", "/nope", None).status, 404);
    assert_eq!(r.send("GET", "/snapshots", None).status, 200);

    // 405 names the methods a path has.
    for (method, path, allow) in [
        ("DELETE", "/vm", "GET"),
        ("GET", "/vm/state", "PUT"),
        ("PUT", "/snapshots", "GET, POST"),
        ("GET", "/snapshots/x", "DELETE"),
        ("GET", "/snapshots/x/apply", "POST"),
        ("POST", "/jobs", "GET"),
        ("DELETE", "/jobs/x", "GET"),
    ] {
        let e = r.send(method, path, None);
        assert_eq!(e.status, 405, "{method} {path}");
        assert_eq!(e.header("Allow"), Some(allow), "{method} {path}");
    }

    let stop = r.send("PUT", "/vm/state", Some(r#"{"state":"stopped"}"#));
    assert_eq!(
        (stop.status, &stop.body["state"]),
        (200, &json!("stopping"))
    );

    let file = vm.root.join("exchanges.jsonl");
    std::fs::write(&file, r.lines.join("\n") + "\n").unwrap();
    let spec = repo().join("docs/api.yaml");
    let check = openapi_check(&["exchanges", spec.to_str().unwrap(), file.to_str().unwrap()]);
    assert_eq!(check.code(), 0, "{check:?}");
    assert!(
        check
            .stdout
            .contains(&format!("{} exchanges checked", r.lines.len())),
        "{check:?}"
    );
}
