//! The CLI's side of the control API: one HTTP/1.1 request per connection
//! over the VM's Unix socket, with the typed bodies of crate::api. The wire
//! format is plain HTTP (usable with `curl --unix-socket`); responses are
//! parsed with `httparse`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;
use snapshot::tree::Tree;

use crate::api::{
    ApplySnapshotRequest, CreateSnapshotRequest, DeleteSnapshotResponse, JobAccepted, JobInfo,
    SetStateRequest, TargetState, VmStatus,
};

/// Errors talking to a VMM.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing listens on the socket: the VM is not running.
    #[error("the VM is not running (no VMM answers on {0})")]
    NotRunning(PathBuf),
    /// The VMM took the request and closed the connection without an
    /// answer: it was stopping.
    #[error("the VMM on {0} closed the connection without answering (it is stopping)")]
    Closed(PathBuf),
    /// I/O on the socket failed.
    #[error("talking to the VMM on {path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// The response is not HTTP/JSON.
    #[error("malformed response from the VMM: {0}")]
    Malformed(String),
    /// The VMM answered with an error status.
    #[error("{message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The `error` field of the body.
        message: String,
    },
}

/// A VMM's API, reached through its socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// The client of the VMM listening on `socket` (run/api.sock).
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_path_buf(),
        }
    }

    fn call<B: Serialize, R: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&B>,
    ) -> Result<R, ClientError> {
        let body = body
            .map(serde_json::to_value)
            .transpose()
            .map_err(|e| ClientError::Malformed(format!("cannot encode the request: {e}")))?;
        let v = request(&self.socket, method, path, body.as_ref())?;
        serde_json::from_value(v.clone()).map_err(|e| ClientError::Malformed(format!("{e}: {v}")))
    }

    /// GET /vm.
    pub fn status(&self) -> Result<VmStatus, ClientError> {
        self.call::<(), _>("GET", "/vm", None)
    }

    /// PUT /vm/state.
    pub fn set_state(&self, state: TargetState) -> Result<VmStatus, ClientError> {
        self.call("PUT", "/vm/state", Some(&SetStateRequest { state }))
    }

    /// POST /snapshots.
    pub fn create_snapshot(&self, req: &CreateSnapshotRequest) -> Result<JobAccepted, ClientError> {
        self.call("POST", "/snapshots", Some(req))
    }

    /// POST /snapshots/{id}/apply.
    pub fn apply_snapshot(
        &self,
        id: &str,
        req: &ApplySnapshotRequest,
    ) -> Result<JobAccepted, ClientError> {
        self.call("POST", &format!("/snapshots/{id}/apply"), Some(req))
    }

    /// DELETE /snapshots/{id}.
    pub fn delete_snapshot(
        &self,
        id: &str,
        subtree: bool,
    ) -> Result<DeleteSnapshotResponse, ClientError> {
        let q = if subtree { "?subtree=true" } else { "" };
        self.call::<(), _>("DELETE", &format!("/snapshots/{id}{q}"), None)
    }

    /// GET /snapshots.
    pub fn tree(&self) -> Result<Tree, ClientError> {
        self.call::<(), _>("GET", "/snapshots", None)
    }

    /// GET /jobs/{id}.
    pub fn job(&self, id: &str) -> Result<JobInfo, ClientError> {
        self.call::<(), _>("GET", &format!("/jobs/{id}"), None)
    }
}

/// Sends one request; returns the JSON body of a 2xx response. A GET whose
/// connection is reset or closed unanswered (the VMM starting or stopping)
/// is retried briefly.
pub fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<Value, ClientError> {
    let mut attempt = 0;
    loop {
        match request_once(socket, method, path, body) {
            Err(e) if method == "GET" && attempt < 5 && is_transient(&e) => {
                attempt += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            other => return other,
        }
    }
}

/// Whether `e` is what a VMM that is starting or stopping gives: a reset,
/// or a connection closed without an answer.
fn is_transient(e: &ClientError) -> bool {
    match e {
        ClientError::Io { source, .. } => matches!(
            source.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
        ClientError::Closed(_) => true,
        _ => false,
    }
}

fn request_once(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> Result<Value, ClientError> {
    let io = |source| ClientError::Io {
        path: socket.to_path_buf(),
        source,
    };
    let mut s = UnixStream::connect(socket).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            ClientError::NotRunning(socket.to_path_buf())
        }
        _ => io(e),
    })?;
    s.set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(io)?;
    let payload = body.map(|b| b.to_string()).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        payload.len()
    );
    s.write_all(head.as_bytes()).map_err(io)?;
    s.write_all(payload.as_bytes()).map_err(io)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(io)?;
    if raw.is_empty() {
        return Err(ClientError::Closed(socket.to_path_buf()));
    }
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut headers);
    let off = match resp.parse(&raw) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Err(ClientError::Malformed("truncated".into())),
        Err(e) => return Err(ClientError::Malformed(e.to_string())),
    };
    let status = resp.code.unwrap_or(0);
    let text = String::from_utf8_lossy(&raw[off..]);
    let value: Value = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).map_err(|e| ClientError::Malformed(format!("{e}: {text}")))?
    };
    if (200..300).contains(&status) {
        Ok(value)
    } else {
        let message = value
            .get("error")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| format!("HTTP {status}"));
        Err(ClientError::Api { status, message })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;
    use std::os::unix::net::UnixListener;

    fn socket_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("snapvm-api-client-{name}-{}", std::process::id()))
    }

    /// A VMM that reads a request and exits without answering: the CLI
    /// says so (instead of "malformed response"), and a GET retried after
    /// the socket is gone says the VM is not running.
    #[test]
    fn a_connection_closed_unanswered_is_reported_as_a_stopping_vmm() {
        let path = socket_path("closed");
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).unwrap();
        let p = path.clone();
        let vmm = std::thread::spawn(move || {
            for _ in 0..2 {
                let (s, _) = listener.accept().unwrap();
                // Read the request head, then hang up.
                let mut r = std::io::BufReader::new(&s);
                let mut line = String::new();
                while r.read_line(&mut line).unwrap() > 0 && line != "\r\n" {
                    line.clear();
                }
            }
            std::fs::remove_file(&p).unwrap();
        });
        let put = request_once(&path, "PUT", "/vm/state", None);
        assert!(matches!(put, Err(ClientError::Closed(_))), "{put:?}");
        let get = request(&path, "GET", "/vm", None);
        vmm.join().unwrap();
        assert!(matches!(get, Err(ClientError::NotRunning(_))), "{get:?}");
        let text = ClientError::Closed(path).to_string();
        assert!(
            text.contains("closed the connection without answering"),
            "{text}"
        );
    }
}
