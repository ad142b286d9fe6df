//! The CLI's side of the control API: one HTTP/1.1 request per connection
//! over the VM's Unix socket, with the typed bodies of crate::api. The wire
//! format is plain HTTP (usable with `curl --unix-socket`); responses are
//! parsed with `httparse`.
//!
//! [`Client::new`] waits long for an answer and retries a GET that meets a
//! VMM starting or stopping (what the CLI wants); [`Client::with_timeout`]
//! gives up after a short time and never retries (what a caller that polls
//! many VMMs wants, vmm/src/ui/vms.rs).

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
    /// The VMM did not accept or answer within the timeout of a client
    /// made with [`Client::with_timeout`] (it is hung, or very busy).
    #[error("the VMM on {path} did not answer within {} ms", after.as_millis())]
    TimedOut {
        /// The socket.
        path: PathBuf,
        /// The timeout.
        after: Duration,
    },
    /// The VMM answered with an error status.
    #[error("{message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The `error` field of the body.
        message: String,
    },
}

/// How long a [`Client::new`] waits for an answer.
const ANSWER_WAIT: Duration = Duration::from_secs(120);

/// A VMM's API, reached through its socket.
#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
    /// Set by [`Client::with_timeout`].
    timeout: Option<Duration>,
}

impl Client {
    /// The client of the VMM listening on `socket` (run/api.sock): it waits
    /// up to two minutes for an answer and retries a GET that meets a VMM
    /// starting or stopping (see [`request`]).
    pub fn new(socket: &Path) -> Self {
        Self {
            socket: socket.to_path_buf(),
            timeout: None,
        }
    }

    /// A client that gives up when the VMM does not accept, take or answer
    /// a request within `timeout` ([`ClientError::TimedOut`]), and never
    /// retries: for callers that poll, which a hung VMM must not stall.
    pub fn with_timeout(socket: &Path, timeout: Duration) -> Self {
        Self {
            socket: socket.to_path_buf(),
            timeout: Some(timeout),
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
        let v = match self.timeout {
            None => request(&self.socket, method, path, body.as_ref())?,
            Some(t) => request_once(&self.socket, method, path, body.as_ref(), Some(t))?,
        };
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

    /// GET /jobs.
    pub fn jobs(&self) -> Result<Vec<JobInfo>, ClientError> {
        self.call::<(), _>("GET", "/jobs", None)
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
        match request_once(socket, method, path, body, None) {
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

/// Connects to `socket` as `UnixStream::connect` does, but with `timeout`
/// as the socket's send timeout from the start: on Linux it also bounds
/// connect(2), which otherwise waits for as long as the listener's queue
/// is full (a VMM that does not accept).
fn connect_within(socket: &Path, timeout: Duration) -> std::io::Result<UnixStream> {
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::ffi::OsStrExt;
    let bytes = socket.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "the socket path is too long",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, b) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *b as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket that nothing else owns; the stream
    // closes it.
    let stream = unsafe { UnixStream::from_raw_fd(fd) };
    stream.set_write_timeout(Some(timeout))?;
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len();
    // SAFETY: `addr` is a valid sockaddr_un whose first `len` bytes hold
    // the family and the path; the descriptor is the stream's.
    let r = unsafe {
        libc::connect(
            stream.as_raw_fd(),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            len as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

/// One request, not retried. With `timeout`, connecting, sending and each
/// wait for the answer give up after it ([`ClientError::TimedOut`]);
/// without, the answer is awaited for [`ANSWER_WAIT`].
fn request_once(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<&Value>,
    timeout: Option<Duration>,
) -> Result<Value, ClientError> {
    let io = |source: std::io::Error| match (timeout, source.kind()) {
        (Some(after), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            ClientError::TimedOut {
                path: socket.to_path_buf(),
                after,
            }
        }
        _ => ClientError::Io {
            path: socket.to_path_buf(),
            source,
        },
    };
    let connected = match timeout {
        None => UnixStream::connect(socket),
        Some(t) => connect_within(socket, t),
    };
    let mut s = connected.map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            ClientError::NotRunning(socket.to_path_buf())
        }
        _ => io(e),
    })?;
    s.set_read_timeout(Some(timeout.unwrap_or(ANSWER_WAIT)))
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
        let put = request_once(&path, "PUT", "/vm/state", None, None);
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

    /// A listener on `path` whose queue holds one connection (backlog 0),
    /// that never accepts: a hung VMM.
    fn hung_vmm(path: &Path) -> UnixListener {
        use std::os::fd::AsRawFd;
        let _ = std::fs::remove_file(path);
        let l = UnixListener::bind(path).unwrap();
        // SAFETY: listen(2) again on the listener's own descriptor: Linux
        // takes the new backlog.
        assert_eq!(unsafe { libc::listen(l.as_raw_fd(), 0) }, 0);
        l
    }

    /// A VMM that takes the connection and never answers, and one that
    /// does not even take it (its queue is full): a client with a timeout
    /// gives up on both after about that time, without retrying.
    #[test]
    fn a_client_with_a_timeout_gives_up_on_a_hung_vmm() {
        let path = socket_path("hung");
        let listener = hung_vmm(&path);
        let t = Duration::from_millis(200);
        let c = Client::with_timeout(&path, t);
        let timed_out = |r: &Result<VmStatus, ClientError>| match r {
            Err(ClientError::TimedOut { after, .. }) => *after == t,
            _ => false,
        };
        // The queue takes this connection; nothing answers.
        let started = std::time::Instant::now();
        let r = c.status();
        assert!(timed_out(&r), "{r:?}");
        let took = started.elapsed();
        assert!(took >= t / 2 && took < Duration::from_secs(2), "{took:?}");
        // That connection stays in the queue, unaccepted, and fills it:
        // now connect(2) itself waits.
        let started = std::time::Instant::now();
        let r = c.status();
        assert!(timed_out(&r), "{r:?}");
        let took = started.elapsed();
        assert!(took >= t / 2 && took < Duration::from_secs(2), "{took:?}");
        let text = r.unwrap_err().to_string();
        assert!(text.contains("did not answer within 200 ms"), "{text}");
        drop(listener);
        std::fs::remove_file(&path).unwrap();
        let gone = c.status();
        assert!(matches!(gone, Err(ClientError::NotRunning(_))), "{gone:?}");
    }
}
