//! The control API's server: HTTP/1.1 (tiny_http) with JSON bodies on the
//! VM's Unix socket (run/api.sock, mode 0600). Routes, methods and bodies
//! are docs/api.yaml's; the bodies are the types of crate::api.

use std::io::Read;
use std::path::Path;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::Serialize;
use snapshot::tree::Tree;
use tiny_http::{Header, Method, Request, Response, Server};

use super::jobs::Jobs;
use crate::api::{
    ApplySnapshotRequest, CreateSnapshotRequest, DeleteSnapshotResponse, ErrorBody, JobAccepted,
    SetStateRequest, VmStatus,
};

/// Largest request body read.
const MAX_BODY: u64 = 1 << 20;

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
    #[error("{method} is not allowed on {path}; it allows {}", allow.join(", "))]
    MethodNotAllowed {
        /// The method used.
        method: String,
        /// The path.
        path: String,
        /// The methods the path allows (the `Allow` header).
        allow: &'static [&'static str],
    },
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
            ApiError::MethodNotAllowed { .. } => 405,
            ApiError::Conflict(_) => 409,
            ApiError::Internal(_) => 500,
        }
    }
}

/// What the API controls.
pub trait ApiBackend: Send + Sync {
    /// GET /vm.
    fn status(&self) -> VmStatus;
    /// PUT /vm/state.
    fn set_state(&self, req: SetStateRequest) -> Result<VmStatus, ApiError>;
    /// The job table (GET /jobs, GET /jobs/{id}).
    fn jobs(&self) -> &Arc<Jobs>;
    /// POST /snapshots: starts a snapshot job.
    fn create_snapshot(&self, req: CreateSnapshotRequest) -> Result<JobAccepted, ApiError>;
    /// POST /snapshots/{ref}/apply: starts an apply job.
    fn apply_snapshot(
        &self,
        reference: &str,
        req: ApplySnapshotRequest,
    ) -> Result<JobAccepted, ApiError>;
    /// GET /snapshots: the snapshot tree.
    fn snapshots(&self) -> Result<Tree, ApiError>;
    /// DELETE /snapshots/{ref}[?subtree=true]: removes the snapshot (and
    /// its descendants) and starts the merges it allows.
    fn delete_snapshot(
        &self,
        reference: &str,
        subtree: bool,
    ) -> Result<DeleteSnapshotResponse, ApiError>;
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
        let (status, body, allow) = match handle(&mut req, backend) {
            Ok((status, body)) => (status, body, None),
            Err(e) => {
                let allow = match &e {
                    ApiError::MethodNotAllowed { allow, .. } => Some(allow.join(", ")),
                    _ => None,
                };
                let body = serde_json::to_string(&ErrorBody {
                    error: e.to_string(),
                })
                .unwrap_or_default();
                (e.status(), body, allow)
            }
        };
        tracing::debug!("API {} {} -> {status}", req.method(), req.url());
        let mut resp = Response::from_string(body).with_status_code(status);
        let mut headers = vec![("Content-Type", "application/json".to_string())];
        headers.extend(allow.map(|a| ("Allow", a)));
        for (k, v) in headers {
            if let Ok(h) = Header::from_bytes(k.as_bytes(), v.as_bytes()) {
                resp = resp.with_header(h);
            }
        }
        if let Err(e) = req.respond(resp) {
            tracing::debug!("API client went away: {e}");
        }
    }
}

/// The API's resources.
#[derive(Debug, PartialEq, Eq)]
enum Route<'a> {
    Vm,
    VmState,
    Jobs,
    Job(&'a str),
    Snapshots,
    Snapshot(&'a str),
    Apply(&'a str),
}

impl<'a> Route<'a> {
    fn parse(path: &'a str) -> Option<Self> {
        let parts: Vec<&str> = path.trim_matches('/').split('/').collect();
        Some(match parts.as_slice() {
            ["vm"] => Route::Vm,
            ["vm", "state"] => Route::VmState,
            ["jobs"] => Route::Jobs,
            ["jobs", id] => Route::Job(id),
            ["snapshots"] => Route::Snapshots,
            ["snapshots", r] => Route::Snapshot(r),
            ["snapshots", r, "apply"] => Route::Apply(r),
            _ => return None,
        })
    }

    /// The methods the resource has (the `Allow` header of a 405).
    fn allowed(&self) -> &'static [&'static str] {
        match self {
            Route::Vm | Route::Jobs | Route::Job(_) => &["GET"],
            Route::VmState => &["PUT"],
            Route::Snapshots => &["GET", "POST"],
            Route::Snapshot(_) => &["DELETE"],
            Route::Apply(_) => &["POST"],
        }
    }
}

/// Reads the JSON body as `T`; None when there is none.
fn read_body<T: DeserializeOwned>(req: &mut Request) -> Result<Option<T>, ApiError> {
    let mut body = String::new();
    req.as_reader()
        .take(MAX_BODY)
        .read_to_string(&mut body)
        .map_err(|e| ApiError::BadRequest(format!("cannot read the request body: {e}")))?;
    parse_body(&body)
}

/// Parses a request body: a JSON object, or nothing (None).
fn parse_body<T: DeserializeOwned>(body: &str) -> Result<Option<T>, ApiError> {
    if body.trim().is_empty() {
        return Ok(None);
    }
    let value: serde_json::Value = serde_json::from_str(body)
        .map_err(|e| ApiError::BadRequest(format!("the body is not valid JSON: {e}")))?;
    if !value.is_object() {
        return Err(ApiError::BadRequest(format!(
            "the body must be a JSON object, not {value}"
        )));
    }
    serde_json::from_value(value)
        .map(Some)
        .map_err(|e| ApiError::BadRequest(format!("invalid request body: {e}")))
}

/// `subtree` of DELETE /snapshots/{ref}: absent or false, or true
/// (`subtree`, `subtree=true`, `subtree=1`).
fn subtree(query: &str) -> Result<bool, ApiError> {
    let mut on = false;
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        let (k, v) = kv.split_once('=').unwrap_or((kv, "true"));
        if k != "subtree" {
            return Err(ApiError::BadRequest(format!(
                "unknown query parameter '{k}'"
            )));
        }
        on = match v {
            "true" | "1" => true,
            "false" | "0" => false,
            other => {
                return Err(ApiError::BadRequest(format!(
                    "subtree must be true or false, not '{other}'"
                )))
            }
        };
    }
    Ok(on)
}

fn json<T: Serialize>(status: u16, v: T) -> Result<(u16, String), ApiError> {
    serde_json::to_string(&v)
        .map(|b| (status, b))
        .map_err(|e| ApiError::Internal(format!("cannot encode the answer: {e}")))
}

fn handle(req: &mut Request, backend: &dyn ApiBackend) -> Result<(u16, String), ApiError> {
    let url = req.url().to_string();
    let (path, query) = url.split_once('?').unwrap_or((&url, ""));
    let route = Route::parse(path)
        .ok_or_else(|| ApiError::NotFound(format!("no such endpoint: {path}")))?;
    let method = req.method().clone();
    match (&route, &method) {
        (Route::Vm, Method::Get) => json(200, backend.status()),
        (Route::VmState, Method::Put) => {
            let body = read_body::<SetStateRequest>(req)?.ok_or_else(|| {
                ApiError::BadRequest(
                    "expected {\"state\": \"running\" | \"paused\" | \"stopped\"}".into(),
                )
            })?;
            json(200, backend.set_state(body)?)
        }
        (Route::Jobs, Method::Get) => json(200, backend.jobs().list()),
        (Route::Job(id), Method::Get) => match backend.jobs().get(id) {
            Some(j) => json(200, j),
            None => Err(ApiError::NotFound(format!("no job {id}"))),
        },
        (Route::Snapshots, Method::Get) => json(200, backend.snapshots()?),
        (Route::Snapshots, Method::Post) => {
            let body = read_body(req)?.unwrap_or_default();
            json(202, backend.create_snapshot(body)?)
        }
        (Route::Apply(reference), Method::Post) => {
            let body = read_body(req)?.unwrap_or_default();
            json(202, backend.apply_snapshot(reference, body)?)
        }
        (Route::Snapshot(reference), Method::Delete) => {
            json(200, backend.delete_snapshot(reference, subtree(query)?)?)
        }
        (r, m) => Err(ApiError::MethodNotAllowed {
            method: m.to_string(),
            path: path.to_string(),
            allow: r.allowed(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Paths, queries and bodies as a client might send them: parsed or
    /// refused with a message, never a panic.
    #[test]
    fn fuzz_paths_queries_and_bodies() {
        let bodies = [
            r#"{"name":"a","description":"b","stop_and_copy":false}"#,
            r#"{"save_current":"x","eager":true}"#,
            r#"{"state":"paused"}"#,
            r#"{}"#,
        ];
        fuzzing::run("API paths, queries and bodies", 3000, 256, |u| {
            let path: String = match u.int_in_range(0..=2)? {
                0 => u.arbitrary()?,
                1 => format!("/snapshots/{}", u.arbitrary::<String>()?),
                _ => format!(
                    "/snapshots/{}/{}",
                    u.arbitrary::<String>()?,
                    u.arbitrary::<String>()?
                ),
            };
            if let Some(r) = Route::parse(&path) {
                assert!(!r.allowed().is_empty());
            }
            let _ = subtree(&u.arbitrary::<String>()?);
            let body = match u.arbitrary::<bool>()? {
                true => u.arbitrary::<String>()?,
                false => {
                    let v = fuzzing::mutate(u.choose(&bodies)?.as_bytes(), u)?;
                    String::from_utf8_lossy(&v).into_owned()
                }
            };
            let _ = parse_body::<CreateSnapshotRequest>(&body);
            let _ = parse_body::<ApplySnapshotRequest>(&body);
            let _ = parse_body::<SetStateRequest>(&body);
            Ok(())
        });
    }

    #[test]
    fn routes_and_their_methods() {
        assert_eq!(Route::parse("/vm"), Some(Route::Vm));
        assert_eq!(
            Route::parse("/snapshots/abc/apply"),
            Some(Route::Apply("abc"))
        );
        assert_eq!(Route::parse("/snapshots/a/b/c"), None);
        assert_eq!(
            Route::parse("/snapshots").unwrap().allowed(),
            ["GET", "POST"]
        );
        let e = ApiError::MethodNotAllowed {
            method: "DELETE".into(),
            path: "/vm".into(),
            allow: Route::Vm.allowed(),
        };
        assert_eq!(e.to_string(), "DELETE is not allowed on /vm; it allows GET");
    }

    #[test]
    fn bodies_are_objects_and_may_be_optional() {
        assert_eq!(parse_body::<ApplySnapshotRequest>(" ").unwrap(), None);
        let named = parse_body::<ApplySnapshotRequest>(r#"{"save_current":"x"}"#).unwrap();
        assert_eq!(named.unwrap().save_current.wanted(), Some(Some("x".into())));
        let e = parse_body::<ApplySnapshotRequest>("[]").unwrap_err();
        assert!(e.to_string().contains("must be a JSON object"), "{e}");
        let e = parse_body::<SetStateRequest>(r#"{"state":"#).unwrap_err();
        assert!(e.to_string().contains("not valid JSON"), "{e}");
        let e = parse_body::<SetStateRequest>(r#"{"colour":"red"}"#).unwrap_err();
        assert!(e.to_string().contains("invalid request body"), "{e}");
    }

    #[test]
    fn the_subtree_flag() {
        assert_eq!(subtree(""), Ok(false));
        assert_eq!(subtree("subtree"), Ok(true));
        assert_eq!(subtree("subtree=1"), Ok(true));
        assert_eq!(subtree("subtree=false"), Ok(false));
        assert!(subtree("subtree=maybe").is_err());
        assert!(subtree("force=1").is_err());
    }
}
