//! The web view's HTTP server (axum): the page and its assets, the JSON API
//! the page calls, and the guard every request passes first (the rules of
//! vmm/src/ui/auth.rs).
//!
//! | route | what |
//! | --- | --- |
//! | `GET /` | the page (no secret in it: the token stays in the URL's fragment) |
//! | `GET /app.js`, `GET /style.css` | its assets |
//! | `GET /api/vms` | `{dir, vms: [VmView]}` |
//! | `GET /api/vms/{vm}` | `VmDetail`: status, snapshot tree, jobs, console |
//! | `POST /api/vms/{vm}/start\|stop\|pause\|resume` | power |
//! | `POST /api/vms/{vm}/snapshots` | `{name?, description?}`: take one |
//! | `POST /api/vms/{vm}/snapshots/{id}/apply` | `{save_first?}` |
//! | `PATCH /api/vms/{vm}/snapshots/{id}` | `{name?, description?}` |
//! | `DELETE /api/vms/{vm}/snapshots/{id}[?subtree=true]` | delete |
//! | `POST /api/vms/{vm}/snapshots/{id}/export` | `{path}` |
//!
//! Actions answer with `actions::Done` (a job to follow, or what was
//! done); errors with `{"error": "..."}` in the VMM's or the CLI's words.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderValue, StatusCode, Uri};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::actions::{self, ApplyBody, Context, Done, EditBody, ExportBody, Power, SnapshotBody};
use super::auth::Auth;
use super::error::RequestError;
use super::vms::{self, VmDetail, VmView, Vms};
use crate::api::ErrorBody;

const INDEX_HTML: &str = include_str!("assets/index.html");
const APP_JS: &str = include_str!("assets/app.js");
const STYLE_CSS: &str = include_str!("assets/style.css");

/// What every handler shares.
pub struct AppState {
    /// The token rules.
    pub auth: Auth,
    /// The VMs shown.
    pub vms: Vms,
    /// What actions need.
    pub ctx: Context,
}

/// The router with its guard.
pub fn router(state: Arc<AppState>) -> Router {
    let vm = "/api/vms/{vm}";
    let snap = "/api/vms/{vm}/snapshots/{id}";
    Router::new()
        .route("/", get(|| async { asset("text/html", INDEX_HTML) }))
        .route(
            "/app.js",
            get(|| async { asset("text/javascript", APP_JS) }),
        )
        .route("/style.css", get(|| async { asset("text/css", STYLE_CSS) }))
        .route("/api/vms", get(list_vms))
        .route(vm, get(vm_detail))
        .route(&format!("{vm}/start"), post(start))
        .route(&format!("{vm}/stop"), post(stop))
        .route(&format!("{vm}/pause"), post(pause))
        .route(&format!("{vm}/resume"), post(resume))
        .route(&format!("{vm}/snapshots"), post(take_snapshot))
        .route(&format!("{snap}/apply"), post(apply))
        .route(snap, axum::routing::patch(edit).delete(delete))
        .route(&format!("{snap}/export"), post(export))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(state.clone(), guard))
        .with_state(state)
}

/// Adds the headers every answer carries: nothing is cached, framed,
/// sniffed or sent as a referrer; scripts and styles come from here only.
fn harden(resp: &mut Response) {
    let h = resp.headers_mut();
    for (k, v) in [
        (header::CACHE_CONTROL, "no-store"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
             connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
        ),
    ] {
        h.insert(k, HeaderValue::from_static(v));
    }
}

fn json_error(status: StatusCode, message: String) -> Response {
    (status, Json(ErrorBody { error: message })).into_response()
}

async fn guard(State(s): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let mut resp = match s.auth.check(req.method(), req.uri(), req.headers()) {
        Ok(()) => next.run(req).await,
        Err(refusal) => json_error(refusal.status(), refusal.to_string()),
    };
    harden(&mut resp);
    resp
}

fn asset(content_type: &'static str, text: &'static str) -> Response {
    let ct = format!("{content_type}; charset=utf-8");
    ([(header::CONTENT_TYPE, ct)], text).into_response()
}

async fn not_found(uri: Uri) -> Response {
    json_error(
        StatusCode::NOT_FOUND,
        format!("no such page or endpoint: {}", uri.path()),
    )
}

/// Runs blocking work (files, the VMM's API, `snapvm` commands) off the
/// async workers.
async fn blocking<T, F>(f: F) -> Result<T, RequestError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, RequestError> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(RequestError::Worker)?
}

/// A JSON body as `T`; an empty body is `T::default()` when `optional`.
fn body<T: DeserializeOwned + Default>(bytes: &[u8], optional: bool) -> Result<T, RequestError> {
    if optional && bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(bytes).map_err(RequestError::InvalidBody)
}

#[derive(Serialize)]
struct VmList {
    dir: std::path::PathBuf,
    vms: Vec<VmView>,
}

async fn list_vms(State(s): State<Arc<AppState>>) -> Result<Json<VmList>, RequestError> {
    blocking(move || {
        let vms = vms::views(&s.vms.list(), &s.ctx.jobs);
        Ok(Json(VmList {
            dir: s.vms.root().to_path_buf(),
            vms,
        }))
    })
    .await
}

async fn vm_detail(
    State(s): State<Arc<AppState>>,
    Path(vm): Path<String>,
) -> Result<Json<VmDetail>, RequestError> {
    blocking(move || {
        let dir = s.vms.find(&vm)?;
        Ok(Json(vms::detail(&vm, &dir, &s.ctx.jobs)))
    })
    .await
}

async fn power(s: Arc<AppState>, vm: String, what: Power) -> Result<Json<Done>, RequestError> {
    blocking(move || {
        let dir = s.vms.find(&vm)?;
        actions::power(&s.ctx, &dir, what).map(Json)
    })
    .await
}

async fn start(State(s): State<Arc<AppState>>, Path(vm): Path<String>) -> impl IntoResponse {
    power(s, vm, Power::Start).await
}

async fn stop(State(s): State<Arc<AppState>>, Path(vm): Path<String>) -> impl IntoResponse {
    power(s, vm, Power::Stop).await
}

async fn pause(State(s): State<Arc<AppState>>, Path(vm): Path<String>) -> impl IntoResponse {
    power(s, vm, Power::Pause).await
}

async fn resume(State(s): State<Arc<AppState>>, Path(vm): Path<String>) -> impl IntoResponse {
    power(s, vm, Power::Resume).await
}

async fn take_snapshot(
    State(s): State<Arc<AppState>>,
    Path(vm): Path<String>,
    bytes: Bytes,
) -> Result<Json<Done>, RequestError> {
    let b: SnapshotBody = body(&bytes, true)?;
    blocking(move || {
        let dir = s.vms.find(&vm)?;
        actions::snapshot(&s.ctx, &dir, b).map(Json)
    })
    .await
}

async fn apply(
    State(s): State<Arc<AppState>>,
    Path((vm, id)): Path<(String, String)>,
    bytes: Bytes,
) -> Result<Json<Done>, RequestError> {
    let b: ApplyBody = body(&bytes, true)?;
    blocking(move || {
        let dir = s.vms.find(&vm)?;
        actions::apply(&s.ctx, &dir, &id, b).map(Json)
    })
    .await
}

async fn edit(
    State(s): State<Arc<AppState>>,
    Path((vm, id)): Path<(String, String)>,
    bytes: Bytes,
) -> Result<Json<Done>, RequestError> {
    let b: EditBody = body(&bytes, false)?;
    blocking(move || {
        let dir = s.vms.find(&vm)?;
        actions::edit(&dir, &id, b).map(Json)
    })
    .await
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteQuery {
    #[serde(default)]
    subtree: bool,
}

async fn delete(
    State(s): State<Arc<AppState>>,
    Path((vm, id)): Path<(String, String)>,
    uri: Uri,
) -> Result<Json<Done>, RequestError> {
    let Query(q) = Query::<DeleteQuery>::try_from_uri(&uri).map_err(RequestError::InvalidQuery)?;
    blocking(move || {
        let dir = s.vms.find(&vm)?;
        actions::delete(&s.ctx, &dir, &id, q.subtree).map(Json)
    })
    .await
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExportJson {
    path: Option<std::path::PathBuf>,
}

async fn export(
    State(s): State<Arc<AppState>>,
    Path((vm, id)): Path<(String, String)>,
    bytes: Bytes,
) -> Result<Json<Done>, RequestError> {
    let b: ExportJson = body(&bytes, false)?;
    let path = b.path.unwrap_or_default();
    blocking(move || {
        let dir = s.vms.find(&vm)?;
        actions::export(&s.ctx, &dir, &id, ExportBody { path }).map(Json)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hooks::Hooks;
    use crate::ui::auth::TOKEN_HEADER;
    use crate::ui::jobs::LocalJobs;
    use axum::body::Body;
    use axum::http::Method;
    use tower::ServiceExt;

    const TOKEN: &str = "ffeeddccbbaa99887766554433221100ffeeddccbbaa99887766554433221100";

    fn app(root: &std::path::Path) -> Router {
        router(Arc::new(AppState {
            auth: Auth::new(TOKEN.into(), false),
            vms: Vms::new(root),
            ctx: Context {
                jobs: LocalJobs::new(),
                hooks: Arc::new(Hooks::default()),
                root: root.to_path_buf(),
            },
        }))
    }

    fn scratch(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("snapvm-ui-srv-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    async fn send(
        app: Router,
        method: Method,
        uri: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, axum::http::HeaderMap, String) {
        let mut req = axum::http::Request::builder()
            .method(method)
            .uri(uri)
            .header("host", "127.0.0.1:8470");
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = app.oneshot(req.body(Body::empty()).unwrap()).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (
            status,
            headers,
            String::from_utf8_lossy(&bytes).into_owned(),
        )
    }

    #[tokio::test]
    async fn the_page_is_served_to_anyone_and_holds_no_token() {
        let root = scratch("page");
        let (st, h, page) = send(app(&root), Method::GET, "/", &[]).await;
        assert_eq!(st, StatusCode::OK);
        assert!(page.contains("<script src=\"/app.js\""), "{page}");
        assert!(h[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("text/html"));
        assert!(h[header::CONTENT_SECURITY_POLICY]
            .to_str()
            .unwrap()
            .contains("frame-ancestors"));
        assert!(h.get(header::SET_COOKIE).is_none());
        // Whatever the request carries, nothing served holds the token.
        for (path, hdrs) in [
            ("/", vec![]),
            ("/", vec![(TOKEN_HEADER, TOKEN)]),
            ("/?token=x", vec![]),
            ("/app.js", vec![(TOKEN_HEADER, TOKEN)]),
            ("/style.css", vec![]),
        ] {
            let (st, h, text) = send(app(&root), Method::GET, path, &hdrs).await;
            assert_eq!(st, StatusCode::OK, "{path}");
            assert!(!text.contains(TOKEN), "{path} holds the token");
            assert!(h.get(header::SET_COOKIE).is_none(), "{path}");
        }
        let (_, _, js) = send(app(&root), Method::GET, "/app.js", &[]).await;
        assert!(js.contains("X-Snapvm-Token") && js.contains("sessionStorage"));
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[tokio::test]
    async fn api_requests_without_the_token_or_from_elsewhere_are_refused() {
        let root = scratch("refuse");
        let (st, _, text) = send(app(&root), Method::GET, "/api/vms", &[]).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
        assert!(text.contains("\"error\""), "{text}");
        let (st, _, text) = send(
            app(&root),
            Method::GET,
            "/api/vms",
            &[(TOKEN_HEADER, TOKEN)],
        )
        .await;
        assert_eq!(st, StatusCode::OK, "{text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["vms"], serde_json::json!([]));
        let post = "/api/vms/none/start";
        let (st, _, _) = send(app(&root), Method::POST, post, &[]).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
        // A cookie holding the token is no token (for GET neither).
        let cookie = format!("snapvm_ui_8470={TOKEN}");
        let (st, _, _) = send(app(&root), Method::POST, post, &[("cookie", &cookie)]).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
        let (st, _, _) = send(app(&root), Method::GET, "/api/vms", &[("cookie", &cookie)]).await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
        let (st, _, _) = send(
            app(&root),
            Method::GET,
            "/api/vms",
            &[(TOKEN_HEADER, &TOKEN[..63])],
        )
        .await;
        assert_eq!(st, StatusCode::UNAUTHORIZED);
        let foreign = [(TOKEN_HEADER, TOKEN), ("origin", "http://evil.example")];
        let (st, _, text) = send(app(&root), Method::POST, post, &foreign).await;
        assert_eq!(st, StatusCode::FORBIDDEN);
        assert!(text.contains("cross-origin request refused"), "{text}");
        // Through the guard, the handler answers: no such VM.
        let own = [(TOKEN_HEADER, TOKEN), ("origin", "http://127.0.0.1:8470")];
        let (st, _, text) = send(app(&root), Method::POST, post, &own).await;
        assert_eq!(st, StatusCode::NOT_FOUND, "{text}");
        assert!(text.contains("no VM 'none'"), "{text}");
        let (st, _, _) = send(
            app(&root),
            Method::GET,
            "/api/nothing",
            &[(TOKEN_HEADER, TOKEN)],
        )
        .await;
        assert_eq!(st, StatusCode::NOT_FOUND);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn bodies_may_be_empty_only_where_optional() {
        let b: SnapshotBody = body(b"", true).unwrap();
        assert!(b.name.is_none());
        assert!(body::<EditBody>(b"", false).is_err());
        let e = body::<ApplyBody>(b"{\"save_first\": 3}", true).unwrap_err();
        assert!(e.to_string().starts_with("invalid request body"), "{e}");
    }
}
