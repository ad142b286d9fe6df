//! `snapvm ui`: a local web view of the VMs of a directory, in the manner
//! of Hyper-V Manager: their power state and hardware, each one's snapshot
//! tree drawn as a tree, snapshot details, jobs and merges with their
//! progress, the tail of the serial console, and buttons for what the CLI
//! does (start, stop, pause, resume; snapshot, apply, rename, describe,
//! delete, export).
//!
//! The server is axum on a small tokio runtime ([`server`]); it reads VMs
//! that are off from their directories and reaches running ones through
//! their VMM's API with the CLI's client ([`vms`]); the buttons run the
//! CLI's own functions ([`actions`]), long ones as jobs ([`jobs`]). Who may
//! use it is [`auth`]'s: a session token printed at start, and a loopback
//! address unless `--allow-remote`. The page (assets/) is plain HTML, CSS
//! and JavaScript embedded in the binary, with no build step.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use self::actions::Context;
use self::auth::Auth;
use self::error::UiError;
use self::jobs::LocalJobs;
use self::server::AppState;
use self::vms::Vms;
use crate::hooks::Hooks;

pub mod actions;
pub mod auth;
pub mod error;
pub mod jobs;
pub mod server;
pub mod vms;

/// The default address: loopback only.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:8470";

/// Blocking threads are many (each request that waits on a VMM or a
/// `snapvm` command holds one), async workers few.
const WORKERS: usize = 2;

/// What `snapvm ui` was given.
#[derive(Debug, Clone)]
pub struct UiOptions {
    /// A VM directory, or a directory holding VM directories.
    pub dir: PathBuf,
    /// Where to listen.
    pub listen: SocketAddr,
    /// Allow a non-loopback `listen`.
    pub allow_remote: bool,
}

/// Refuses a non-loopback address unless remote access is allowed.
pub fn check_listen(addr: SocketAddr, allow_remote: bool) -> Result<(), UiError> {
    if addr.ip().is_loopback() || allow_remote {
        Ok(())
    } else {
        Err(UiError::NotLoopback(addr))
    }
}

/// The address a browser on this machine opens for `bound`.
pub fn url_addr(bound: SocketAddr) -> SocketAddr {
    match bound.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::from(([127, 0, 0, 1], bound.port()))
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, bound.port()))
        }
        _ => bound,
    }
}

/// Serves the web view until the process is stopped (Ctrl-C). Prints
/// `snapvm ui: open http://ADDR/?token=TOKEN` with the port actually bound.
pub fn run(opts: UiOptions, hooks: Hooks) -> Result<(), UiError> {
    check_listen(opts.listen, opts.allow_remote)?;
    let root = std::fs::canonicalize(&opts.dir)
        .ok()
        .filter(|p| p.is_dir())
        .ok_or_else(|| UiError::NotADirectory(opts.dir.clone()))?;
    let token = auth::new_token()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKERS)
        .thread_name("ui")
        .enable_all()
        .build()
        .map_err(UiError::Runtime)?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(opts.listen)
            .await
            .map_err(|source| UiError::Bind {
                addr: opts.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| UiError::Bind {
            addr: opts.listen,
            source,
        })?;
        let state = Arc::new(AppState {
            auth: Auth::new(token.clone(), addr.port(), opts.allow_remote),
            vms: Vms::new(&root),
            ctx: Context {
                jobs: LocalJobs::new(),
                hooks: Arc::new(hooks),
                root: root.clone(),
            },
        });
        println!("snapvm ui: open http://{}/?token={token}", url_addr(addr));
        eprintln!(
            "snapvm ui: showing the VMs in {} on {addr}; Ctrl-C stops the server (the VMs keep running)",
            root.display()
        );
        axum::serve(listener, server::router(state))
            .await
            .map_err(|source| UiError::Serve { addr, source })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_unless_remote_is_allowed() {
        let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let v6: SocketAddr = "[::1]:8470".parse().unwrap();
        let all: SocketAddr = "0.0.0.0:8470".parse().unwrap();
        assert!(check_listen(local, false).is_ok());
        assert!(check_listen(v6, false).is_ok());
        let e = check_listen(all, false).unwrap_err();
        assert!(e.to_string().contains("--allow-remote"), "{e}");
        assert!(check_listen(all, true).is_ok());
        assert_eq!(url_addr(all).to_string(), "127.0.0.1:8470");
        assert_eq!(url_addr("[::]:1".parse().unwrap()).to_string(), "[::1]:1");
        assert_eq!(url_addr(v6), v6);
        assert!(DEFAULT_LISTEN.parse::<SocketAddr>().is_ok());
    }
}
