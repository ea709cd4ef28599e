//! The dashboard's JSON API (the console's is `jobs.rs`).
//!
//! - `GET /api/openapi.json`: the OpenAPI document of every `/api` route (`openapi.json`).
//! - `GET /api/overview`: the latest snapshot as JSON.
//! - `GET /api/live`: the snapshots as SSE `overview` events (no `id:`: a snapshot is not
//!   a cursor), one per refresh.
//! - `GET /api/queues/{queue}/dead?limit=N`: dead-lettered messages, an array like
//!   `pgbus dlq list --json` prints.
//! - `POST /api/queues/{queue}/dead/retry` and `.../discard`: `{"ids": [..]}` or
//!   `{"all": true}`.
//! - `POST /api/queues/{queue}/pause` and `.../resume`, written to the console's audit log.
//!
//! Every POST must be `Content-Type: application/json` (see `error::require_json`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::Stream;
use pgbus_core::{DeadLetters, MessageId, QueueAdmin, QueueName, Selection};
use serde::Deserialize;
use serde_json::json;

use super::app::App;
use super::auth::Actor;
use super::error::{bad_request, queue, require_json, ApiError};
use crate::support::audit::{self, dead_selection};
use crate::support::json::dead_json;

/// The OpenAPI 3.1 document of the API, written by hand (a test holds it to the routes).
const OPENAPI: &str = include_str!("openapi.json");

/// Most dead letters one request lists.
const DEAD_LISTED_MAX: usize = 1_000;

pub(crate) fn routes() -> Router<App> {
    Router::new()
        .route(
            "/api/openapi.json",
            get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }),
        )
        .route("/api/overview", get(overview))
        .route("/api/live", get(live))
        .route("/api/queues/{queue}/dead", get(dead))
        .route("/api/queues/{queue}/dead/{action}", post(dead_action))
        .route("/api/queues/{queue}/{action}", post(queue_action))
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

async fn dead_action(
    State(app): State<App>,
    Path((name, action)): Path<(String, String)>,
    actor: Actor,
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
    recorded(
        &app,
        &actor,
        &action,
        &queue,
        n,
        dead_selection(&ids, selection.all),
    )
    .await?;
    Ok(Json(json!({ "queue": queue.as_str(), action: n })).into_response())
}

/// Writes the audit entry of a change made already; a failure is a 500 that says the
/// change stands.
async fn recorded(
    app: &App,
    actor: &Actor,
    action: &str,
    queue: &QueueName,
    count: u64,
    detail: serde_json::Value,
) -> Result<(), ApiError> {
    audit::record(&app.backend, actor.0, action, queue, count, detail)
        .await
        .map_err(|err| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{err:#}")))
}

async fn queue_action(
    State(app): State<App>,
    Path((name, action)): Path<(String, String)>,
    actor: Actor,
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
    // After the change, so a refused one (no such queue) is not logged; the change is
    // not undone when the entry fails, the error says so.
    recorded(&app, &actor, &action, &queue, 0, json!({})).await?;
    Ok(Json(json!({ "queue": queue.as_str(), "paused": paused })).into_response())
}

#[cfg(test)]
mod tests {
    use super::OPENAPI;
    use serde_json::Value;

    /// The sources whose routers serve `/api`.
    const API_SOURCES: [&str; 2] = [include_str!("api.rs"), include_str!("jobs.rs")];

    /// Every `.route("/api/...", get(..)|post(..))` of the sources: (path, method).
    fn served_routes() -> Vec<(String, String)> {
        let mut routes = Vec::new();
        for source in API_SOURCES {
            // Not the tests (this one names routes in its comments).
            let source = source.split("#[cfg(test)]").next().unwrap_or(source);
            for (at, _) in source.match_indices(".route(") {
                let rest = source[at + ".route(".len()..].trim_start();
                let Some(rest) = rest.strip_prefix('"') else {
                    continue;
                };
                let Some((path, after)) = rest.split_once('"') else {
                    continue;
                };
                if !path.starts_with("/api") {
                    continue;
                }
                let method = ["get(", "post("]
                    .into_iter()
                    .filter_map(|m| after.find(m).map(|i| (i, m)))
                    .min()
                    .map(|(_, m)| m.trim_end_matches('(').to_owned())
                    .expect("a route's method");
                routes.push((path.to_owned(), method));
            }
        }
        routes
    }

    #[test]
    fn the_openapi_document_covers_every_api_route_and_no_other() {
        let document: Value = serde_json::from_str(OPENAPI).expect("openapi.json is JSON");
        assert_eq!(document["openapi"], "3.1.0");
        let paths = document["paths"].as_object().expect("paths");
        let served = served_routes();
        assert!(served.len() >= 11, "the routes were found: {served:?}");
        for (path, method) in &served {
            assert!(
                paths.get(path).and_then(|p| p.get(method)).is_some(),
                "{} {path} is served but not in openapi.json",
                method.to_uppercase()
            );
        }
        for (path, operations) in paths {
            for method in operations.as_object().expect("operations").keys() {
                assert!(
                    served.iter().any(|(p, m)| p == path && m == method),
                    "openapi.json documents {} {path}, which is not served",
                    method.to_uppercase()
                );
            }
        }
        // Every reference resolves.
        let text = OPENAPI;
        for (at, _) in text.match_indices("\"$ref\": \"#/") {
            let rest = &text[at + "\"$ref\": \"#/".len()..];
            let pointer = &rest[..rest.find('"').expect("a closing quote")];
            assert!(
                document.pointer(&format!("/{pointer}")).is_some(),
                "unresolved $ref #/{pointer}"
            );
        }
    }
}
