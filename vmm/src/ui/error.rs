//! Errors of `snapvm ui`: starting the server ([`UiError`]) and answering
//! a request ([`RequestError`], an HTTP status and a JSON `{"error": ...}`
//! body whose text is the VMM's or the CLI's own message, unchanged).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitStatus;

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
    /// The request's JSON body does not parse as the endpoint's.
    #[error("invalid request body: {0}")]
    InvalidBody(serde_json::Error),
    /// The request's query string does not parse as the endpoint's.
    #[error("invalid query: {0}")]
    InvalidQuery(axum::extract::rejection::QueryRejection),
    /// A rename to an empty (or blank) name.
    #[error("a snapshot's name cannot be empty")]
    EmptyName,
    /// A PATCH with neither a name nor a description.
    #[error("give a new name, a new description, or both")]
    NothingToEdit,
    /// An export without a path.
    #[error("give the new VM directory to export to")]
    NoExportPath,
    /// A relative export path that climbs out of the directory shown.
    #[error(
        "the export path {} has a '..' component: give a path under the directory shown, \
         or an absolute one",
        .0.display()
    )]
    ExportPathClimbs(PathBuf),
    /// The VM is busy with an operation this server runs for it.
    #[error(
        "the {kind} job {job} started from this page works on {} (it holds the VM's lock); \
         wait until it ends",
        .vm.display()
    )]
    Busy {
        /// The job's id.
        job: String,
        /// What it does (merge, export).
        kind: String,
        /// The VM directory.
        vm: PathBuf,
    },
    /// A CLI operation (or the VMM's API behind it) refused or failed.
    #[error(transparent)]
    Lifecycle(#[from] LifecycleError),
    /// A snapshot operation on the VM directory refused or failed.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// The VMM's API refused or failed.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// `snapvm ARGS` run for the page failed: its own "snapvm: error: ..."
    /// words, or how it exited when it said nothing.
    #[error("{}", command_failure(.command, .status, .message.as_deref()))]
    Command {
        /// The command line, for the message.
        command: String,
        /// How it exited.
        status: ExitStatus,
        /// Its error message.
        message: Option<String>,
    },
    /// `snapvm ARGS` could not be run at all.
    #[error("cannot run {exe}: {source}")]
    Spawn {
        /// The executable.
        exe: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The worker thread of the request panicked or was cancelled.
    #[error("the operation's worker failed: {0}")]
    Worker(tokio::task::JoinError),
}

fn command_failure(command: &str, status: &ExitStatus, message: Option<&str>) -> String {
    match message {
        Some(m) => m.to_string(),
        None => format!("`{command}` exited with {status}"),
    }
}

fn client_status(e: &ClientError) -> StatusCode {
    match e {
        ClientError::Api { status, .. } => {
            StatusCode::from_u16(*status).unwrap_or(StatusCode::BAD_GATEWAY)
        }
        ClientError::NotRunning(_) | ClientError::Closed(_) => StatusCode::CONFLICT,
        ClientError::TimedOut { .. } => StatusCode::GATEWAY_TIMEOUT,
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
            RequestError::InvalidBody(_)
            | RequestError::InvalidQuery(_)
            | RequestError::EmptyName
            | RequestError::NothingToEdit
            | RequestError::NoExportPath
            | RequestError::ExportPathClimbs(_) => StatusCode::BAD_REQUEST,
            RequestError::Busy { .. } | RequestError::Command { .. } => StatusCode::CONFLICT,
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

    #[test]
    fn each_refusal_names_what_was_wrong() {
        use std::os::unix::process::ExitStatusExt;
        let e = RequestError::ExportPathClimbs(PathBuf::from("../elsewhere"));
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert!(e.to_string().contains("../elsewhere"), "{e}");
        let e = RequestError::Busy {
            job: "ui-1".into(),
            kind: "merge".into(),
            vm: PathBuf::from("/vms/a"),
        };
        assert_eq!(e.status(), StatusCode::CONFLICT);
        assert!(e.to_string().starts_with("the merge job ui-1 "), "{e}");
        let failed = |message: Option<&str>| RequestError::Command {
            command: "snapvm start -- /vms/a".into(),
            status: ExitStatus::from_raw(1 << 8),
            message: message.map(str::to_string),
        };
        assert_eq!(
            failed(Some("the VM is running")).to_string(),
            "the VM is running"
        );
        let e = failed(None).to_string();
        assert!(e.starts_with("`snapvm start -- /vms/a` exited with"), "{e}");
        let e = RequestError::InvalidBody(serde_json::from_str::<u8>("x").unwrap_err());
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert!(e.to_string().starts_with("invalid request body: "), "{e}");
        let e = RequestError::Client(ClientError::TimedOut {
            path: PathBuf::from("/vms/a/run/api.sock"),
            after: std::time::Duration::from_secs(2),
        });
        assert_eq!(e.status(), StatusCode::GATEWAY_TIMEOUT);
    }
}
