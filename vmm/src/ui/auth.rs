//! Who may use the web view: whoever has the session token printed at
//! start. The rules, checked on every request before any handler runs:
//!
//! - `GET /?token=T` with the right token sets a cookie holding it
//!   (HttpOnly, SameSite=Strict) and redirects to `/`, so the token leaves
//!   the address bar; a wrong one gets the 401 page.
//! - Every other request needs the token, in the `X-Snapvm-Token` header
//!   or that cookie: otherwise 401 (a short page saying to open the URL
//!   printed at start, or a JSON error under /api/).
//! - A state-changing request (any method but GET and HEAD) needs the
//!   header, not only the cookie (a page of another site can make the
//!   browser send the cookie, but cannot read the token to set the header),
//!   and, when it has an `Origin`, that must be this server's own origin
//!   (`http://` and the Host header): otherwise 403.
//! - Bound to a loopback address, requests must name a loopback host
//!   (`localhost`, `127.0.0.1`, `[::1]`...), against DNS rebinding.
//!
//! Tokens are compared in constant time.

use std::io::Read;
use std::net::IpAddr;
use std::path::Path;

use axum::extract::Query;
use axum::http::{header, HeaderMap, Method, Uri};
use serde::Deserialize;

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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// 401: no token, or a wrong one.
    Unauthorized(String),
    /// 403: a token, but not allowed this way.
    Forbidden(String),
}

/// What to do with a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Let the handler answer.
    Pass,
    /// `/?token=` with the right token: set the cookie, redirect to `/`.
    Login,
    /// Refuse.
    Refuse(Refusal),
}

#[derive(Deserialize)]
struct TokenQuery {
    token: Option<String>,
}

/// The rules of one server.
#[derive(Debug, Clone)]
pub struct Auth {
    token: String,
    cookie: String,
    allow_remote: bool,
}

impl Auth {
    /// Rules for `token`; the cookie is named after the port, so servers
    /// on other ports of the same host keep theirs.
    pub fn new(token: String, port: u16, allow_remote: bool) -> Self {
        Self {
            token,
            cookie: format!("snapvm_ui_{port}"),
            allow_remote,
        }
    }

    /// The session token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The Set-Cookie value that carries the token.
    pub fn set_cookie(&self) -> String {
        format!(
            "{}={}; Path=/; HttpOnly; SameSite=Strict",
            self.cookie, self.token
        )
    }

    fn matches(&self, given: &str) -> bool {
        same_token(given.as_bytes(), self.token.as_bytes())
    }

    fn cookie_token<'a>(&self, headers: &'a HeaderMap) -> Option<&'a str> {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| kv.trim().split_once('='))
            .find(|(k, _)| *k == self.cookie)
            .map(|(_, v)| v)
    }

    /// Decides about a request.
    pub fn check(&self, method: &Method, uri: &Uri, headers: &HeaderMap) -> Verdict {
        let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
        if !self.allow_remote && !host.is_some_and(is_loopback_host) {
            return Verdict::Refuse(Refusal::Forbidden(format!(
                "request for host '{}' refused: this server answers only for loopback names",
                host.unwrap_or("")
            )));
        }
        let state_changing = !matches!(*method, Method::GET | Method::HEAD);
        if uri.path() == "/" && !state_changing {
            if let Ok(Query(TokenQuery { token: Some(t) })) = Query::try_from_uri(uri) {
                return if self.matches(&t) {
                    Verdict::Login
                } else {
                    Verdict::Refuse(Refusal::Unauthorized(
                        "wrong token: open the URL `snapvm ui` printed when it started".into(),
                    ))
                };
            }
        }
        if state_changing {
            if let Some(origin) = headers.get(header::ORIGIN) {
                let own = host.map(|h| format!("http://{h}"));
                if origin.to_str().ok() != own.as_deref() {
                    return Verdict::Refuse(Refusal::Forbidden(
                        "cross-origin request refused".into(),
                    ));
                }
            }
        }
        let header_token = headers
            .get(TOKEN_HEADER)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|t| self.matches(t));
        let cookie_token = self.cookie_token(headers).is_some_and(|t| self.matches(t));
        if !header_token && !cookie_token {
            return Verdict::Refuse(Refusal::Unauthorized(
                "missing or wrong token: open the URL `snapvm ui` printed when it started".into(),
            ));
        }
        if state_changing && !header_token {
            return Verdict::Refuse(Refusal::Forbidden(
                "state-changing requests need the X-Snapvm-Token header (the page sends it)".into(),
            ));
        }
        Verdict::Pass
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
        Auth::new(TOKEN.into(), 8470, false)
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8470"));
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn check(method: Method, uri: &str, pairs: &[(&'static str, &str)]) -> Verdict {
        auth().check(&method, &uri.parse().unwrap(), &headers(pairs))
    }

    fn unauthorized(v: &Verdict) -> bool {
        matches!(v, Verdict::Refuse(Refusal::Unauthorized(_)))
    }

    fn forbidden(v: &Verdict) -> bool {
        matches!(v, Verdict::Refuse(Refusal::Forbidden(_)))
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
    fn the_page_needs_the_token_once_then_the_cookie() {
        let cookie = format!("snapvm_ui_8470={TOKEN}");
        assert_eq!(
            check(Method::GET, &format!("/?token={TOKEN}"), &[]),
            Verdict::Login
        );
        assert!(unauthorized(&check(Method::GET, "/?token=nope", &[])));
        assert!(unauthorized(&check(Method::GET, "/", &[])));
        assert!(unauthorized(&check(Method::GET, "/app.js", &[])));
        assert_eq!(
            check(Method::GET, "/", &[("cookie", &cookie)]),
            Verdict::Pass
        );
        let others = format!("a=b; snapvm_ui_8470={TOKEN}; c=d");
        assert_eq!(
            check(Method::GET, "/", &[("cookie", &others)]),
            Verdict::Pass
        );
        // Another port's cookie is not this server's.
        let other_port = format!("snapvm_ui_9999={TOKEN}");
        assert!(unauthorized(&check(
            Method::GET,
            "/",
            &[("cookie", &other_port)]
        )));
        assert!(auth().set_cookie().contains("HttpOnly; SameSite=Strict"));
    }

    #[test]
    fn the_api_needs_the_token_and_changes_need_the_header_and_our_origin() {
        let cookie = format!("snapvm_ui_8470={TOKEN}");
        assert!(unauthorized(&check(Method::GET, "/api/vms", &[])));
        assert!(unauthorized(&check(
            Method::GET,
            "/api/vms",
            &[(TOKEN_HEADER, "x")]
        )));
        assert_eq!(
            check(Method::GET, "/api/vms", &[(TOKEN_HEADER, TOKEN)]),
            Verdict::Pass
        );
        assert_eq!(
            check(Method::GET, "/api/vms", &[("cookie", &cookie)]),
            Verdict::Pass
        );
        let post = "/api/vms/a/start";
        assert!(unauthorized(&check(Method::POST, post, &[])));
        assert!(forbidden(&check(
            Method::POST,
            post,
            &[("cookie", &cookie)]
        )));
        assert_eq!(
            check(Method::POST, post, &[(TOKEN_HEADER, TOKEN)]),
            Verdict::Pass
        );
        assert_eq!(
            check(
                Method::DELETE,
                "/api/vms/a/snapshots/x",
                &[(TOKEN_HEADER, TOKEN), ("origin", "http://127.0.0.1:8470")]
            ),
            Verdict::Pass
        );
        for origin in ["http://evil.example", "http://127.0.0.1:8471", "null"] {
            let v = check(
                Method::PATCH,
                "/api/vms/a/snapshots/x",
                &[(TOKEN_HEADER, TOKEN), ("origin", origin)],
            );
            assert_eq!(
                v,
                Verdict::Refuse(Refusal::Forbidden("cross-origin request refused".into())),
                "{origin}"
            );
        }
        // A token in the query of a POST is no login.
        assert!(unauthorized(&check(
            Method::POST,
            &format!("/?token={TOKEN}"),
            &[]
        )));
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
        assert!(forbidden(&auth().check(&Method::GET, &uri, &h)));
        let remote = Auth::new(TOKEN.into(), 8470, true);
        assert_eq!(remote.check(&Method::GET, &uri, &h), Verdict::Pass);
    }
}
