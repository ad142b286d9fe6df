//! The control API: HTTP/1.1 with JSON bodies on the VM's Unix socket
//! (run/api.sock, mode 0600). docs/api.yaml describes it (OpenAPI 3).

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Value};
use tiny_http::{Header, Method, Request, Response, Server};

use crate::jobs::Jobs;

/// An API error, mapped to an HTTP status with a JSON `{"error": ...}` body.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// 400: the request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// 404: no such resource.
    #[error("{0}")]
    NotFound(String),
    /// 405: the resource exists but not with this method.
    #[error("{0}")]
    MethodNotAllowed(String),
    /// 409: the request does not fit the VM's current state.
    #[error("{0}")]
    Conflict(String),
    /// 500: the VMM failed.
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    fn status(&self) -> u16 {
        match self {
            ApiError::BadRequest(_) => 400,
            ApiError::NotFound(_) => 404,
            ApiError::MethodNotAllowed(_) => 405,
            ApiError::Conflict(_) => 409,
            ApiError::Internal(_) => 500,
        }
    }
}

/// What the API controls.
pub trait ApiBackend: Send + Sync {
    /// GET /vm.
    fn status(&self) -> Value;
    /// PUT /vm/state with "running", "paused" or "stopped".
    fn set_state(&self, target: &str) -> Result<Value, ApiError>;
    /// The job table.
    fn jobs(&self) -> &Arc<Jobs>;
    /// POST /snapshots: starts a snapshot job; returns `{"job": id}`.
    fn create_snapshot(
        &self,
        name: Option<String>,
        description: String,
        stop_and_copy: bool,
    ) -> Result<Value, ApiError>;
    /// POST /snapshots/{ref}/apply: starts an apply job; returns `{"job": id}`.
    fn apply_snapshot(
        &self,
        reference: &str,
        save_current: Option<Option<String>>,
        eager: bool,
    ) -> Result<Value, ApiError>;
    /// GET /snapshots: the snapshot tree.
    fn snapshots(&self) -> Result<Value, ApiError>;
    /// DELETE /snapshots/{ref}[?subtree=true]: removes the snapshot (and
    /// its descendants) and starts the merges it allows; returns the
    /// deleted snapshots and `{"job": id}` of the merge job (or null).
    fn delete_snapshot(&self, reference: &str, subtree: bool) -> Result<Value, ApiError>;
}

/// Binds the API socket with mode 0600 (removing a stale one).
pub fn bind(path: &Path) -> std::io::Result<Server> {
    let _ = std::fs::remove_file(path);
    let server = Server::http_unix(path).map_err(std::io::Error::other)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(server)
}

/// Serves requests until the server is unblocked or dropped.
pub fn serve(server: &Server, backend: &dyn ApiBackend) {
    for mut req in server.incoming_requests() {
        let (status, body) = match handle(&mut req, backend) {
            Ok((status, body)) => (status, body),
            Err(e) => (e.status(), json!({ "error": e.to_string() })),
        };
        tracing::debug!("API {} {} -> {status}", req.method(), req.url());
        let mut resp = Response::from_string(body.to_string()).with_status_code(status);
        if let Ok(h) = Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..]) {
            resp = resp.with_header(h);
        }
        if let Err(e) = req.respond(resp) {
            tracing::debug!("API client went away: {e}");
        }
    }
}

fn read_json(req: &mut Request) -> Result<Value, ApiError> {
    let mut body = String::new();
    req.as_reader()
        .take(1 << 20)
        .read_to_string(&mut body)
        .map_err(|e| ApiError::BadRequest(format!("cannot read the request body: {e}")))?;
    serde_json::from_str(&body)
        .map_err(|e| ApiError::BadRequest(format!("the body is not valid JSON: {e}")))
}

fn handle(req: &mut Request, backend: &dyn ApiBackend) -> Result<(u16, Value), ApiError> {
    let url = req.url().split('?').next().unwrap_or("").to_string();
    let parts: Vec<&str> = url.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    match (parts.as_slice(), &method) {
        (["vm"], Method::Get) => Ok((200, backend.status())),
        (["vm", "state"], Method::Put) => {
            let body = read_json(req)?;
            let target = body.get("state").and_then(Value::as_str).ok_or_else(|| {
                ApiError::BadRequest(
                    "expected {\"state\": \"running\" | \"paused\" | \"stopped\"}".into(),
                )
            })?;
            Ok((200, backend.set_state(target)?))
        }
        (["jobs"], Method::Get) => Ok((200, json!(backend.jobs().list()))),
        (["snapshots"], Method::Get) => Ok((200, backend.snapshots()?)),
        (["snapshots"], Method::Post) => {
            let body = read_json(req)?;
            let text = |k: &str| -> Result<Option<String>, ApiError> {
                match body.get(k) {
                    None | Some(Value::Null) => Ok(None),
                    Some(Value::String(s)) => Ok(Some(s.clone())),
                    Some(_) => Err(ApiError::BadRequest(format!("'{k}' must be a string"))),
                }
            };
            let name = text("name")?;
            let description = text("description")?.unwrap_or_default();
            let stop_and_copy = match body.get("stop_and_copy") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => {
                    return Err(ApiError::BadRequest(
                        "'stop_and_copy' must be a boolean".into(),
                    ))
                }
            };
            Ok((
                202,
                backend.create_snapshot(name, description, stop_and_copy)?,
            ))
        }
        (["snapshots", reference, "apply"], Method::Post) => {
            let body = read_json(req)?;
            let save_current = match body.get("save_current") {
                None | Some(Value::Null) | Some(Value::Bool(false)) => None,
                Some(Value::Bool(true)) => Some(None),
                Some(Value::String(n)) => Some(Some(n.clone())),
                Some(_) => {
                    return Err(ApiError::BadRequest(
                        "'save_current' must be a boolean or a name".into(),
                    ))
                }
            };
            let eager = matches!(body.get("eager"), Some(Value::Bool(true)));
            Ok((202, backend.apply_snapshot(reference, save_current, eager)?))
        }
        (["snapshots", reference], Method::Delete) => {
            let query = req.url().split_once('?').map(|(_, q)| q).unwrap_or("");
            let subtree = query
                .split('&')
                .any(|kv| kv == "subtree=true" || kv == "subtree=1" || kv == "subtree");
            Ok((200, backend.delete_snapshot(reference, subtree)?))
        }
        (["jobs", id], Method::Get) => backend
            .jobs()
            .get(id)
            .map(|j| (200, json!(j)))
            .ok_or_else(|| ApiError::NotFound(format!("no job {id}"))),
        (
            ["vm"]
            | ["vm", "state"]
            | ["jobs"]
            | ["jobs", _]
            | ["snapshots"]
            | ["snapshots", _]
            | ["snapshots", _, "apply"],
            m,
        ) => Err(ApiError::MethodNotAllowed(format!(
            "{m} is not allowed on {url}"
        ))),
        _ => Err(ApiError::NotFound(format!("no such endpoint: {url}"))),
    }
}
