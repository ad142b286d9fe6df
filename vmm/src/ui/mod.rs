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
//! use it is [`auth`]'s: a session token printed at start (in the URL's
//! fragment, which no browser sends to a server), and a loopback address
//! unless `--allow-remote`. The page (vmm/src/ui/assets/) is plain HTML,
//! CSS and JavaScript embedded in the binary, with no build step. Ctrl-C
//! stops the server once the requests under way are answered and the jobs
//! started from the page have ended.

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

/// Serves the web view until Ctrl-C. Prints
/// `snapvm ui: open http://ADDR/#token=TOKEN` with the port actually bound.
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
    let jobs = LocalJobs::new();
    let served = rt.block_on(async {
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
            auth: Auth::new(token.clone(), opts.allow_remote),
            vms: Vms::new(&root),
            ctx: Context {
                jobs: jobs.clone(),
                hooks: Arc::new(hooks),
                root: root.clone(),
            },
        });
        println!("snapvm ui: open http://{}/#token={token}", url_addr(addr));
        eprintln!(
            "snapvm ui: showing the VMs in {} on {addr}; Ctrl-C stops the server (the VMs keep running)",
            root.display()
        );
        axum::serve(listener, server::router(state))
            .with_graceful_shutdown(ctrl_c())
            .await
            .map_err(|source| UiError::Serve { addr, source })?;
        finish_jobs(&jobs).await;
        Ok(())
    });
    // Handlers still waiting on a VMM are not waited for.
    rt.shutdown_background();
    served
}

/// Resolves at Ctrl-C (never, if it cannot be caught).
async fn ctrl_c() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Waits for the jobs started from the page (merges of a VM that is off,
/// exports), saying so; a second Ctrl-C stops without waiting.
async fn finish_jobs(jobs: &Arc<LocalJobs>) {
    let running = jobs.running();
    if running.is_empty() {
        return;
    }
    let names: Vec<String> = running
        .iter()
        .map(|j| format!("{} {}", j.kind, j.id))
        .collect();
    eprintln!(
        "snapvm ui: waiting for the job(s) started from the page to end: {} (Ctrl-C again stops without waiting)",
        names.join(", ")
    );
    let all = jobs.clone();
    tokio::select! {
        _ = tokio::task::spawn_blocking(move || all.wait_all()) => {
            eprintln!("snapvm ui: the jobs ended");
        }
        _ = ctrl_c() => {
            eprintln!(
                "snapvm ui: stopped without waiting: an interrupted merge is finished at the \
                 VM's next start; an interrupted export leaves its destination absent (and a \
                 .partial directory beside it)"
            );
        }
    }
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
