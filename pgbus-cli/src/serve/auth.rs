//! The `--token` check: `Authorization: Bearer TOKEN` for scripts and scrapers; for a
//! browser, `/?token=TOKEN` once, which sets an HttpOnly, SameSite=Strict cookie.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, Request, State};
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

/// Lets a request through when it carries the token; a browser presenting it in the
/// query gets the cookie and is sent to the same path without it.
pub(crate) async fn require(State(token): State<Token>, request: Request, next: Next) -> Response {
    if bearer(&request).is_some_and(|t| token.matches(t))
        || cookie(&request).is_some_and(|t| token.matches(t))
    {
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
}
