//! Who may talk to `pgbus serve`. With `--token`: requests carrying it, as
//! `Authorization: Bearer TOKEN` for scripts and scrapers, or for a browser `/?token=TOKEN`
//! once, which sets an HttpOnly, SameSite=Strict cookie. Without one (loopback only):
//! requests addressed to a loopback host name, which keeps out web pages that reach the
//! port through DNS rebinding.
//!
//! Each request also learns who made it ([`Actor`]), for the console's audit log.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;

use axum::extract::{FromRequestParts, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};

const COOKIE: &str = "pgbus_token";

/// The token every protected request must carry.
#[derive(Clone)]
pub(crate) struct Token(Arc<str>);

impl Token {
    pub(crate) fn new(token: String) -> anyhow::Result<Self> {
        if token.len() < 8 {
            anyhow::bail!("the token must be at least 8 characters");
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            anyhow::bail!("the token must be printable ASCII without spaces");
        }
        Ok(Self(token.into()))
    }

    fn matches(&self, given: &str) -> bool {
        constant_time_eq(self.0.as_bytes(), given.as_bytes())
    }
}

/// Who made a request, as the audit log names them: `token` when it carried `--token`,
/// `loopback` on a server without one (which serves loopback only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(feature = "dashboard"), allow(dead_code))]
pub(crate) struct Actor(pub(crate) &'static str);

impl Actor {
    const TOKEN: Actor = Actor("token");
    const LOOPBACK: Actor = Actor("loopback");
}

impl<S: Send + Sync> FromRequestParts<S> for Actor {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        // [`require`] marks the requests it let through; without a token nothing does.
        Ok(parts
            .extensions
            .get::<Actor>()
            .copied()
            .unwrap_or(Actor::LOOPBACK))
    }
}

/// Compares without an early exit, so response timing does not reveal a prefix.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn bearer(request: &Request) -> Option<&str> {
    request
        .headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

fn cookie(request: &Request) -> Option<&str> {
    request
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

fn query_token(request: &Request) -> Option<String> {
    let Query(mut query) = Query::<HashMap<String, String>>::try_from_uri(request.uri()).ok()?;
    query.remove("token")
}

/// The access rule of a listening address: beyond loopback a token is required (`hint`
/// names where to give it); the token, checked, if one was given.
pub(crate) fn listen_token(
    addr: std::net::SocketAddr,
    token: Option<String>,
    hint: &str,
) -> anyhow::Result<Option<Token>> {
    if token.is_none() && !addr.ip().is_loopback() {
        anyhow::bail!("listening on {addr}, beyond this machine, needs {hint}");
    }
    token.map(Token::new).transpose()
}

/// Lets a request through when it carries the token; a browser presenting it in the
/// query gets the cookie and is sent to the same path without it.
pub(crate) async fn require(
    State(token): State<Token>,
    mut request: Request,
    next: Next,
) -> Response {
    if bearer(&request).is_some_and(|t| token.matches(t))
        || cookie(&request).is_some_and(|t| token.matches(t))
    {
        request.extensions_mut().insert(Actor::TOKEN);
        return next.run(request).await;
    }
    if query_token(&request).is_some_and(|t| token.matches(&t)) {
        let mut response = Redirect::to(request.uri().path()).into_response();
        let cookie = format!(
            "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict",
            token.0.as_ref()
        );
        if let Ok(value) = HeaderValue::from_str(&cookie) {
            response.headers_mut().insert(header::SET_COOKIE, value);
        }
        return response;
    }
    let mut response = (
        StatusCode::UNAUTHORIZED,
        "a token is required: Authorization: Bearer TOKEN, or open /?token=TOKEN\n",
    )
        .into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"pgbus\""),
    );
    response
}

/// Without a token the server listens on loopback only, yet a web page can still reach it
/// by DNS rebinding: its own host name made to resolve to 127.0.0.1, so the browser treats
/// the dashboard's API as the page's origin. Such requests name that host in `Host`; they
/// are refused. (With a token this is moot: the page does not have it.)
pub(crate) async fn loopback_host(request: Request, next: Next) -> Response {
    let host = match request.headers().get(header::HOST) {
        Some(value) => value.to_str().ok(),
        // HTTP/2 carries the authority in the URI.
        None => request.uri().authority().map(|a| a.as_str()),
    };
    if host.is_none_or(is_loopback_host) {
        return next.run(request).await;
    }
    (
        StatusCode::MISDIRECTED_REQUEST,
        "without --token pgbus serves only requests to localhost or a loopback address\n",
    )
        .into_response()
}

/// `localhost`, a `.localhost` name, or a loopback address, with or without a port.
fn is_loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(bracketed) => bracketed.split_once(']').map_or("", |(ip, _)| ip),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    name == "localhost"
        || name.ends_with(".localhost")
        || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        let token = Token::new("s3cret-token".into()).unwrap();
        assert!(token.matches("s3cret-token"));
        assert!(!token.matches("s3cret-toke"));
        assert!(!token.matches("s3cret-token!"));
        assert!(!token.matches(""));
        assert!(Token::new("short".into()).is_err());
        assert!(Token::new("has a space".into()).is_err());
    }

    #[test]
    fn loopback_host_names() {
        for host in [
            "localhost",
            "localhost:8080",
            "LOCALHOST.:8080",
            "app.localhost:1",
            "127.0.0.1",
            "127.0.0.1:8080",
            "127.1.2.3:80",
            "[::1]",
            "[::1]:8080",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "10.0.0.1:8080",
            "[::2]:8080",
            "[::1",
            "",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }
}
