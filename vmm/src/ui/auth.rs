//! Who may use the web view: whoever has the session token printed at
//! start. The rules, checked on every request before any handler runs:
//!
//! - The token is never in a cookie (a browser sends a cookie of
//!   `localhost` to every port of it, so any other local server would get
//!   it), nor in anything served. `snapvm ui` prints
//!   `http://HOST:PORT/#token=T`: the fragment never reaches a server; the
//!   page's script (vmm/src/ui/assets/app.js) takes it from there, keeps it
//!   in `sessionStorage` (per origin, port included), clears it from the
//!   address bar and sends it in the `X-Snapvm-Token` header.
//! - So `/`, `/app.js` and `/style.css` are served to anyone: they hold no
//!   secret.
//! - Every request under `/api/` (GET too) needs the right token in that
//!   header: otherwise 401.
//! - A state-changing request (any method but GET and HEAD) that has an
//!   `Origin` must come from this server's own origin (`http://` and the
//!   Host header): otherwise 403.
//! - Bound to a loopback address, requests must name a loopback host
//!   (`localhost`, `127.0.0.1`, `[::1]`...), against DNS rebinding: else 403.
//!
//! Tokens are compared in constant time.

use std::io::Read;
use std::net::IpAddr;
use std::path::Path;

use axum::http::{header, HeaderMap, Method, StatusCode, Uri};

use super::error::UiError;

/// The header the page sends the token in.
pub const TOKEN_HEADER: &str = "x-snapvm-token";

/// 32 random bytes from the kernel, as 64 hex digits.
pub fn new_token() -> Result<String, UiError> {
    let path = Path::new("/dev/urandom");
    let mut bytes = [0u8; 32];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|source| UiError::Token {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Whether `a` equals `b`, in a time that depends only on their lengths.
pub fn same_token(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The Host header names no loopback address (DNS rebinding), on a
    /// loopback-only server.
    #[error("request for host '{0}' refused: this server answers only for loopback names")]
    ForeignHost(String),
    /// A state-changing request whose Origin is not this server's.
    #[error("cross-origin request refused")]
    CrossOrigin,
    /// An API request without the X-Snapvm-Token header.
    #[error(
        "missing token: the API needs the X-Snapvm-Token header (the page sends it once opened \
         with the URL `snapvm ui` printed when it started)"
    )]
    MissingToken,
    /// An API request whose X-Snapvm-Token header is not the token.
    #[error("wrong token: open the URL `snapvm ui` printed when it started")]
    WrongToken,
}

impl Refusal {
    /// The HTTP status of the answer.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::ForeignHost(_) | Refusal::CrossOrigin => StatusCode::FORBIDDEN,
            Refusal::MissingToken | Refusal::WrongToken => StatusCode::UNAUTHORIZED,
        }
    }
}

/// Whether `path` is the JSON API's (everything that reads or changes a
/// VM), which needs the token.
pub fn is_api(path: &str) -> bool {
    path == "/api" || path.starts_with("/api/")
}

/// The rules of one server.
#[derive(Debug, Clone)]
pub struct Auth {
    token: String,
    allow_remote: bool,
}

impl Auth {
    /// Rules for `token`.
    pub fn new(token: String, allow_remote: bool) -> Self {
        Self {
            token,
            allow_remote,
        }
    }

    /// The session token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Decides about a request: `Ok` lets the handler answer.
    pub fn check(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> Result<(), Refusal> {
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        if !self.allow_remote && !host.is_some_and(is_loopback_host) {
            return Err(Refusal::ForeignHost(host.unwrap_or("").to_string()));
        }
        let state_changing = !matches!(*method, Method::GET | Method::HEAD);
        if state_changing {
            if let Some(origin) = headers.get(header::ORIGIN) {
                let own = host.map(|h| format!("http://{h}"));
                if origin.to_str().ok() != own.as_deref() {
                    return Err(Refusal::CrossOrigin);
                }
            }
        }
        if !is_api(uri.path()) {
            return Ok(());
        }
        let given = headers.get(TOKEN_HEADER).ok_or(Refusal::MissingToken)?;
        if same_token(given.as_bytes(), self.token.as_bytes()) {
            Ok(())
        } else {
            Err(Refusal::WrongToken)
        }
    }
}

/// Whether the host part of a Host header names this machine's loopback.
pub fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        // [v6]:port or [v6]
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    const TOKEN: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

    fn auth() -> Auth {
        Auth::new(TOKEN.into(), false)
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8470"));
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn check(method: Method, uri: &str, pairs: &[(&'static str, &str)]) -> Result<(), Refusal> {
        auth().check(&method, &uri.parse().unwrap(), &headers(pairs))
    }

    #[test]
    fn tokens_are_random_hex_and_compared_whole() {
        let a = new_token().unwrap();
        assert_eq!(a.len(), 64);
        assert!(a.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(a, new_token().unwrap());
        assert!(same_token(b"abc", b"abc"));
        assert!(!same_token(b"abc", b"abd"));
        assert!(!same_token(b"abc", b"ab"));
        assert!(!same_token(b"", b"a"));
    }

    #[test]
    fn the_page_and_its_assets_need_no_token() {
        for path in ["/", "/app.js", "/style.css", "/?token=nope"] {
            assert_eq!(check(Method::GET, path, &[]), Ok(()), "{path}");
        }
        assert!(is_api("/api/vms") && is_api("/api"));
        assert!(!is_api("/apis") && !is_api("/app.js"));
    }

    #[test]
    fn the_api_needs_the_header_and_changes_our_origin() {
        assert_eq!(
            check(Method::GET, "/api/vms", &[]),
            Err(Refusal::MissingToken)
        );
        assert_eq!(
            check(Method::GET, "/api/vms", &[(TOKEN_HEADER, "x")]),
            Err(Refusal::WrongToken)
        );
        assert_eq!(
            check(Method::GET, "/api/vms", &[(TOKEN_HEADER, &TOKEN[1..])]),
            Err(Refusal::WrongToken)
        );
        assert_eq!(
            check(Method::GET, "/api/vms", &[(TOKEN_HEADER, TOKEN)]),
            Ok(())
        );
        // A cookie is no token, whatever its name.
        for cookie in [
            format!("snapvm_ui_8470={TOKEN}"),
            format!("x-snapvm-token={TOKEN}"),
            format!("token={TOKEN}"),
        ] {
            assert_eq!(
                check(Method::GET, "/api/vms", &[("cookie", &cookie)]),
                Err(Refusal::MissingToken),
                "{cookie}"
            );
        }
        // Nor is the query.
        assert_eq!(
            check(Method::GET, &format!("/api/vms?token={TOKEN}"), &[]),
            Err(Refusal::MissingToken)
        );
        let post = "/api/vms/a/start";
        assert_eq!(check(Method::POST, post, &[]), Err(Refusal::MissingToken));
        assert_eq!(check(Method::POST, post, &[(TOKEN_HEADER, TOKEN)]), Ok(()));
        assert_eq!(
            check(
                Method::DELETE,
                "/api/vms/a/snapshots/x",
                &[(TOKEN_HEADER, TOKEN), ("origin", "http://127.0.0.1:8470")]
            ),
            Ok(())
        );
        for origin in ["http://evil.example", "http://127.0.0.1:8471", "null"] {
            assert_eq!(
                check(
                    Method::PATCH,
                    "/api/vms/a/snapshots/x",
                    &[(TOKEN_HEADER, TOKEN), ("origin", origin)],
                ),
                Err(Refusal::CrossOrigin),
                "{origin}"
            );
        }
        assert_eq!(
            Refusal::CrossOrigin.to_string(),
            "cross-origin request refused"
        );
        assert_eq!(Refusal::CrossOrigin.status(), StatusCode::FORBIDDEN);
        assert_eq!(Refusal::MissingToken.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(Refusal::WrongToken.status(), StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn only_loopback_host_names_unless_remote_is_allowed() {
        for h in [
            "127.0.0.1:8470",
            "localhost:8470",
            "[::1]:8470",
            "LOCALHOST",
            "127.1.2.3:1",
        ] {
            assert!(is_loopback_host(h), "{h}");
        }
        for h in [
            "evil.example:8470",
            "10.0.0.1:8470",
            "[fe80::1]:1",
            "",
            "localhost.evil:1",
        ] {
            assert!(!is_loopback_host(h), "{h}");
        }
        let mut h = HeaderMap::new();
        h.insert(
            header::HOST,
            HeaderValue::from_static("rebound.example:8470"),
        );
        h.insert(TOKEN_HEADER, HeaderValue::from_static(TOKEN));
        let uri: Uri = "/api/vms".parse().unwrap();
        let refused = auth().check(&Method::GET, &uri, &h);
        assert_eq!(
            refused,
            Err(Refusal::ForeignHost("rebound.example:8470".into()))
        );
        assert_eq!(refused.unwrap_err().status(), StatusCode::FORBIDDEN);
        // The page too: a rebinding site gets nothing from this server.
        let page: Uri = "/".parse().unwrap();
        assert!(auth().check(&Method::GET, &page, &h).is_err());
        let remote = Auth::new(TOKEN.into(), true);
        assert_eq!(remote.check(&Method::GET, &uri, &h), Ok(()));
    }
}
