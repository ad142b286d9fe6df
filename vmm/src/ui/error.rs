//! Errors of `snapvm ui`: starting the server ([`UiError`]) and answering
//! a request ([`RequestError`], an HTTP status and a JSON `{"error": ...}`
//! body whose text is the VMM's or the CLI's own message, unchanged).

use std::net::SocketAddr;
use std::path::PathBuf;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use snapshot::tree::TreeError;

use crate::api::ErrorBody;
use crate::cli::api_client::ClientError;
use crate::cli::lifecycle::LifecycleError;
use crate::daemon::snapshots::SnapshotError;

/// Errors starting or running the web view.
#[derive(Debug, thiserror::Error)]
pub enum UiError {
    /// A non-loopback address without `--allow-remote`.
    #[error(
        "refusing to listen on {0}: it is not a loopback address, and anyone who reaches it \
         with the token controls every VM in the directory; listen on 127.0.0.1 (the default), \
         or add --allow-remote if you mean it"
    )]
    NotLoopback(SocketAddr),
    /// DIR is not a directory.
    #[error("{0} is not a directory (give a VM directory or a directory holding VM directories)")]
    NotADirectory(PathBuf),
    /// The session token could not be drawn.
    #[error("cannot read random bytes for the session token from {path}: {source}")]
    Token {
        /// The random source.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The async runtime could not be built.
    #[error("cannot start the web server's runtime: {0}")]
    Runtime(std::io::Error),
    /// The address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// Serving failed.
    #[error("the web server on {addr} failed: {source}")]
    Serve {
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
}

/// Why a request of the page failed, as an HTTP status and a message.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// No VM directory of that name in DIR.
    #[error("no VM '{0}' in this directory")]
    NoSuchVm(String),
    /// The request is malformed.
    #[error("{0}")]
    BadRequest(String),
    /// The VM is busy with an operation this server runs for it.
    #[error("{0}")]
    Busy(String),
    /// A CLI operation (or the VMM's API behind it) refused or failed.
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    /// A snapshot operation on the VM directory refused or failed.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The VMM's API refused or failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// `snapvm ARGS` run for the page failed; its own error message.
    #[error("{0}")]
    Command(String),
    /// `snapvm ARGS` could not be run at all.
    #[error("cannot run {exe}: {source}")]
    Spawn {
        /// The executable.
        exe: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A worker thread of the server failed.
    #[error("the operation's worker failed: {0}")]
    Worker(String),
}

fn client_status(e: &ClientError) -> StatusCode {
    match e {
        ClientError::Api { status, .. } => {
            StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY)
        }
        ClientError::NotRunning(_) | ClientError::Closed(_) => StatusCode::CONFLICT,
        ClientError::Io { .. } | ClientError::Malformed(_) => StatusCode::BAD_GATEWAY,
    }
}

fn snapshot_status(e: &SnapshotError) -> StatusCode {
    match e {
        SnapshotError::Tree(TreeError::NotFound(_)) => StatusCode::NOT_FOUND,
        SnapshotError::Tree(TreeError::Ambiguous { .. }) => StatusCode::BAD_REQUEST,
        SnapshotError::Tree(TreeError::HasClones { .. }) => StatusCode::CONFLICT,
        SnapshotError::VmDir(crate::vmdir::VmDirError::Exists(_)) => StatusCode::CONFLICT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl RequestError {
    /// The HTTP status of the answer.
    pub fn status(&self) -> StatusCode {
        match self {
            RequestError::NoSuchVm(_) => StatusCode::NOT_FOUND,
            RequestError::BadRequest(_) => StatusCode::BAD_REQUEST,
            RequestError::Busy(_) | RequestError::Command(_) => StatusCode::CONFLICT,
            RequestError::Client(e) => client_status(e),
            RequestError::Snapshot(e) => snapshot_status(e),
            RequestError::Lifecycle(e) => match e {
                LifecycleError::Client(c) => client_status(c),
                LifecycleError::Snapshot(s) => snapshot_status(s),
                LifecycleError::AlreadyRunning(..) | LifecycleError::NotRunning(_) => {
                    StatusCode::CONFLICT
                }
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            },
            RequestError::Spawn { .. } | RequestError::Worker(_) => {
                StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    }
}

impl IntoResponse for RequestError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.to_string(),
        };
        (self.status(), Json(body)).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_vmms_words_and_status_pass_through() {
        let e = RequestError::Client(ClientError::Api {
            status: 409,
            message: "a snapshot job is already running".into(),
        });
        assert_eq!(e.status(), StatusCode::CONFLICT);
        assert_eq!(e.to_string(), "a snapshot job is already running");
        let e = RequestError::Lifecycle(LifecycleError::Client(ClientError::Api {
            status: 404,
            message: "no job x".into(),
        }));
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        assert_eq!(e.to_string(), "no job x");
        let e = RequestError::Snapshot(SnapshotError::Tree(TreeError::NotFound("zz".into())));
        assert_eq!(e.status(), StatusCode::NOT_FOUND);
        assert!(e.to_string().starts_with("no snapshot matches 'zz'"), "{e}");
    }
}
