//! How the JSON API answers a request it cannot serve, and the checks every API module
//! shares (a JSON body, a queue name), so `api.rs` and `jobs.rs` refuse input alike.

use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use pgbus_core::{Error, QueueName};
use serde_json::json;

/// An API error: a status and one line of JSON saying why (`{"error": "..."}`).
pub(crate) struct ApiError(pub(crate) StatusCode, pub(crate) String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(json!({ "error": self.1 }))).into_response()
    }
}

impl From<Error> for ApiError {
    fn from(err: Error) -> Self {
        let status = match &err {
            Error::QueueNotFound(_) | Error::DeadLetterNotFound { .. } => StatusCode::NOT_FOUND,
            Error::InvalidQueueName { .. } | Error::InvalidArgument(_) => StatusCode::BAD_REQUEST,
            _ if err.is_transient() => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self(status, err.report())
    }
}

/// 400 with `why`.
pub(crate) fn bad_request(why: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, why.into())
}

/// 404 with `why`.
pub(crate) fn not_found(why: impl Into<String>) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, why.into())
}

/// Every POST must be `Content-Type: application/json`: a cross-site form cannot send
/// that without a CORS preflight, which this server never grants, so another page open in
/// the browser cannot act on the user's behalf.
pub(crate) fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
    let json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("application/json"));
    if json {
        Ok(())
    } else {
        Err(ApiError(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "POST requests must be Content-Type: application/json".into(),
        ))
    }
}

/// A queue name from a path or a parameter, checked.
pub(crate) fn queue(name: String) -> Result<QueueName, ApiError> {
    QueueName::new(name).map_err(ApiError::from)
}
