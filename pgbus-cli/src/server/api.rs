//! The dashboard page and its JSON API.
//!
//! - `GET /`: the dashboard (one static page; no build step).
//! - `GET /api/overview`: the latest snapshot as JSON.
//! - `GET /api/live`: the snapshots as SSE `overview` events (no `id:`: a snapshot is not
//!   a cursor), one per refresh.
//! - `GET /api/queues/{queue}/dead?limit=N`: dead-lettered messages, an array like
//!   `pgbus dlq list --json` prints.
//! - `POST /api/queues/{queue}/dead/retry` and `.../discard`: `{"ids": [..]}` or
//!   `{"all": true}`.
//! - `POST /api/queues/{queue}/pause` and `.../resume`.
//!
//! Every POST must be `Content-Type: application/json`: a cross-site form cannot send
//! that without a CORS preflight, which this server never grants, so another page open
//! in the browser cannot retry or discard on the user's behalf.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::Stream;
use pgbus_core::{DeadLetters, Error, MessageId, QueueAdmin, QueueName, Selection};
use serde::Deserialize;
use serde_json::json;

use super::app::App;
use crate::support::json::dead_json;

const DASHBOARD: &str = include_str!("dashboard.html");

/// Most dead letters one request lists.
const DEAD_LISTED_MAX: usize = 1_000;

pub(crate) fn routes() -> Router<App> {
    Router::new()
        .route("/", get(|| async { Html(DASHBOARD) }))
        .route("/api/overview", get(overview))
        .route("/api/live", get(live))
        .route("/api/queues/{queue}/dead", get(dead))
        .route("/api/queues/{queue}/dead/{action}", post(dead_action))
        .route("/api/queues/{queue}/{action}", post(queue_action))
}

/// An API error: a status and one line of JSON saying why.
struct ApiError(StatusCode, String);

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
        Self(status, err.report().to_string())
    }
}

fn bad_request(why: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, why.into())
}

fn json_response(body: std::sync::Arc<str>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn overview(State(app): State<App>) -> Response {
    json_response(app.snapshots.latest().json.clone())
}

async fn live(State(app): State<App>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    use futures_util::StreamExt;
    let stop = app.stop.clone();
    // The current snapshot at once, then each new one.
    let snapshots = futures_util::stream::unfold(
        (app.snapshots.subscribe(), true),
        |(mut rx, first)| async move {
            if !first {
                rx.changed().await.ok()?;
            }
            let snapshot = rx.borrow_and_update().clone();
            Some((snapshot, (rx, false)))
        },
    );
    let events = snapshots
        .map(|snapshot| Ok(Event::default().event("overview").data(&*snapshot.json)))
        // Ends with the server, so a graceful stop does not wait for dashboards.
        .take_until(async move { stop.cancelled().await });
    Sse::new(events).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

fn queue(name: String) -> Result<QueueName, ApiError> {
    QueueName::new(name).map_err(ApiError::from)
}

async fn dead(
    State(app): State<App>,
    Path(name): Path<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let queue = queue(name)?;
    let limit = match query.get("limit") {
        None => 100,
        Some(text) => text
            .parse::<usize>()
            .map_err(|_| bad_request(format!("limit {text:?} is not a number")))?
            .min(DEAD_LISTED_MAX),
    };
    let dead = app.backend.list_dead(&queue, limit).await?;
    Ok(Json(dead_json(&dead)).into_response())
}

/// The body of a retry or discard.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeadSelection {
    #[serde(default)]
    ids: Vec<i64>,
    #[serde(default)]
    all: bool,
}

fn require_json(headers: &HeaderMap) -> Result<(), ApiError> {
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

async fn dead_action(
    State(app): State<App>,
    Path((name, action)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    require_json(&headers)?;
    let queue = queue(name)?;
    let selection: DeadSelection = serde_json::from_slice(&body).map_err(|e| {
        bad_request(format!(
            "expected {{\"ids\": [..]}} or {{\"all\": true}}: {e}"
        ))
    })?;
    let ids: Vec<MessageId> = selection.ids.iter().copied().map(MessageId).collect();
    let which = match (selection.all, ids.is_empty()) {
        (true, true) => Selection::All,
        (false, false) => Selection::Ids(&ids),
        _ => return Err(bad_request("give either ids or all, not both or neither")),
    };
    let n = match action.as_str() {
        "retry" => app.backend.retry_dead(&queue, which).await?,
        "discard" => app.backend.discard_dead(&queue, which).await?,
        other => {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("no dead-letter action {other:?} (retry or discard)"),
            ))
        }
    };
    Ok(Json(json!({ "queue": queue.as_str(), action: n })).into_response())
}

async fn queue_action(
    State(app): State<App>,
    Path((name, action)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    require_json(&headers)?;
    let queue = queue(name)?;
    let paused = match action.as_str() {
        "pause" => true,
        "resume" => false,
        other => {
            return Err(ApiError(
                StatusCode::NOT_FOUND,
                format!("no queue action {other:?} (pause or resume)"),
            ))
        }
    };
    app.backend.set_paused(&queue, paused).await?;
    Ok(Json(json!({ "queue": queue.as_str(), "paused": paused })).into_response())
}
