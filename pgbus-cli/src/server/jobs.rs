//! The console's JSON API: the job browser, one job's story, actions and the audit log,
//! over `pgbus_pg::console` (the same queries `pgbus job` runs, printed in the same shapes).
//!
//! - `GET /api/jobs?queue=Q&state=S&...`: one page of a listing plus the queue's counts.
//! - `GET /api/jobs/{id}`: everything about one job; `GET /api/jobs/{id}/payload`: its whole
//!   payload as a download.
//! - `POST /api/jobs/actions`: an action on ids, or on a filter bounded by what a listing
//!   saw; written to the audit log with who asked ([`Actor`]).
//! - `GET /api/audit`: the audit log, newest first.
//!
//! Bad input is a 400 with one line of JSON saying why; nothing is changed by a refused
//! request. `openapi.json` documents every route.

use std::collections::BTreeMap;
use std::time::SystemTime;

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use pgbus_core::{ContentType, MessageId};
use pgbus_pg::console::{
    Action, Bound, Console, Cursor, JobFilter, JobState, Order, PayloadMatch, Target, MAX_PAGE,
};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::app::App;
use super::auth::Actor;
use super::error::{bad_request, not_found, queue, require_json, ApiError};
use crate::support::json::{audit_json, job_detail_json, job_list_json};

/// Jobs on a page when the request does not say.
const DEFAULT_PAGE: usize = 50;
/// Most ids one action names (a larger selection is a filter with its bound).
const MAX_ACTION_IDS: usize = 10_000;
/// Audit entries per request when it does not say, and at most.
const DEFAULT_AUDIT: usize = 50;
const MAX_AUDIT: usize = 500;

/// The parameters of a filter, as `GET /api/jobs` and an action's `"filter"` take them.
const FILTER_PARAMETERS: &str = "queue, state, id, group, priority, min_attempts, error, payload";

pub(crate) fn routes() -> Router<App> {
    Router::new()
        .route("/api/jobs", get(list))
        .route("/api/jobs/actions", post(act))
        .route("/api/jobs/{id}", get(job))
        .route("/api/jobs/{id}/payload", get(payload))
        .route("/api/audit", get(audit))
}

fn console(app: &App) -> Console {
    Console::new(app.backend.clone())
}

/// The query string as text pairs; a malformed one is a 400 in the API's JSON.
fn params(
    query: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> Result<BTreeMap<String, String>, ApiError> {
    query
        .map(|Query(params)| params)
        .map_err(|rejection| bad_request(rejection.body_text()))
}

/// The job id of a path.
fn job_id(path: Result<Path<String>, PathRejection>) -> Result<MessageId, ApiError> {
    let Path(text) = path.map_err(|rejection| bad_request(rejection.body_text()))?;
    text.parse()
        .map(MessageId)
        .map_err(|_| bad_request(format!("{text:?} is not a job id")))
}

/// A number parameter: absent (or empty) is `None`.
fn number<T: std::str::FromStr>(
    params: &mut BTreeMap<String, String>,
    name: &str,
    what: &str,
) -> Result<Option<T>, ApiError> {
    match params.remove(name).filter(|text| !text.is_empty()) {
        None => Ok(None),
        Some(text) => text
            .parse()
            .map(Some)
            .map_err(|_| bad_request(format!("{name} {text:?} is not {what}"))),
    }
}

/// A page size or entry count: `default` when absent, at most `max`, never 0.
fn limit(
    params: &mut BTreeMap<String, String>,
    default: usize,
    max: usize,
) -> Result<usize, ApiError> {
    match number::<usize>(params, "limit", "a number")? {
        None => Ok(default),
        Some(0) => Err(bad_request("limit must be at least 1")),
        Some(n) => Ok(n.min(max)),
    }
}

/// A filter from its parameters, every one of them used: an unknown one is refused, so a
/// misspelt filter cannot widen a listing, or an action, to the whole state. Empty values
/// are absent (a form's blank inputs).
fn filter(mut params: BTreeMap<String, String>) -> Result<JobFilter, ApiError> {
    let mut text = |name: &str| params.remove(name).filter(|value| !value.is_empty());
    let queue = queue(text("queue").ok_or_else(|| bad_request("queue is required"))?)?;
    let state = text("state").ok_or_else(|| {
        bad_request("state is required (ready, scheduled, in_flight, dead or archived)")
    })?;
    let mut filter = JobFilter::new(queue, JobState::parse(&state)?);
    filter.group_key = text("group");
    filter.error_contains = text("error");
    filter.payload = text("payload")
        .map(|text| PayloadMatch::parse(&text))
        .transpose()?;
    filter.id = number(&mut params, "id", "a job id")?.map(MessageId);
    filter.priority = number(&mut params, "priority", "a priority (-32768 to 32767)")?;
    filter.min_attempts = number(&mut params, "min_attempts", "a count")?;
    if let Some(unknown) = params.keys().next() {
        return Err(bad_request(format!(
            "unknown filter parameter {unknown:?} ({FILTER_PARAMETERS})"
        )));
    }
    Ok(filter)
}

/// `GET /api/jobs`: one page and the queue's counts, as `pgbus job list --json` prints them.
async fn list(
    State(app): State<App>,
    query: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let mut params = params(query)?;
    let order = match params.remove("order").as_deref() {
        None | Some("" | "newest") => Order::NewestFirst,
        Some("oldest") => Order::OldestFirst,
        Some(other) => {
            return Err(bad_request(format!(
                "order {other:?} is not newest or oldest"
            )))
        }
    };
    let cursor = params
        .remove("cursor")
        .filter(|c| !c.is_empty())
        .map(Cursor);
    let limit = limit(&mut params, DEFAULT_PAGE, MAX_PAGE)?;
    let filter = filter(params)?;
    let console = console(&app);
    let (page, counts) = tokio::try_join!(
        console.list(&filter, order, cursor.as_ref(), limit),
        console.counts(&filter.queue),
    )?;
    Ok(Json(job_list_json(&page, &counts)))
}

/// `GET /api/jobs/{id}`.
async fn job(
    State(app): State<App>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = job_id(path)?;
    match console(&app).job(id).await? {
        Some(detail) => Ok(Json(job_detail_json(&detail))),
        None => Err(not_found(format!("no job {id}"))),
    }
}

/// `GET /api/jobs/{id}/payload`: the bytes as sent, to save (never shown inline, so a
/// payload cannot be rendered as a page of this origin).
async fn payload(
    State(app): State<App>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = job_id(path)?;
    let Some((content_type, bytes)) = console(&app).payload(id).await? else {
        return Err(not_found(format!("no job {id}")));
    };
    let extension = match content_type {
        ContentType::Json => "json",
        ContentType::MessagePack => "msgpack",
        _ => "bin",
    };
    let disposition = format!("attachment; filename=\"job-{id}.{extension}\"");
    let mut response = bytes.into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(content_type.mime()),
    );
    if let Ok(value) = HeaderValue::from_str(&disposition) {
        headers.insert(header::CONTENT_DISPOSITION, value);
    }
    Ok(response)
}

/// The body of `POST /api/jobs/actions`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionRequest {
    action: String,
    ids: Option<Vec<i64>>,
    filter: Option<Map<String, Value>>,
    bound: Option<String>,
    at: Option<String>,
    priority: Option<i64>,
}

impl ActionRequest {
    fn action(&self) -> Result<Action, ApiError> {
        let action = match self.action.as_str() {
            "retry" => Action::RetryNow,
            "reschedule" => {
                let at = self
                    .at
                    .as_deref()
                    .ok_or_else(|| bad_request("reschedule needs \"at\" (RFC 3339, UTC)"))?;
                Action::Reschedule(rfc3339(at)?)
            }
            "priority" => {
                let priority = self
                    .priority
                    .ok_or_else(|| bad_request("priority needs \"priority\" (a number)"))?;
                Action::SetPriority(i16::try_from(priority).map_err(|_| {
                    bad_request(format!("priority {priority} is not in -32768..=32767"))
                })?)
            }
            "cancel" => Action::Cancel,
            "dead_letter" => Action::DeadLetter,
            "discard" => Action::Discard,
            other => {
                return Err(bad_request(format!(
                    "unknown action {other:?} (retry, reschedule, priority, cancel, \
                     dead_letter or discard)"
                )))
            }
        };
        if self.at.is_some() && !matches!(action, Action::Reschedule(_)) {
            return Err(bad_request("\"at\" goes with reschedule only"));
        }
        if self.priority.is_some() && !matches!(action, Action::SetPriority(_)) {
            return Err(bad_request(
                "\"priority\" goes with the priority action only",
            ));
        }
        Ok(action)
    }

    fn target(self) -> Result<Target, ApiError> {
        match (self.ids, self.filter, self.bound) {
            (Some(ids), None, None) => {
                if ids.is_empty() {
                    return Err(bad_request("ids is empty"));
                }
                if ids.len() > MAX_ACTION_IDS {
                    return Err(bad_request(format!(
                        "{} ids: at most {MAX_ACTION_IDS} per action (act on a filter instead)",
                        ids.len()
                    )));
                }
                Ok(Target::Ids(ids.into_iter().map(MessageId).collect()))
            }
            (None, Some(fields), Some(bound)) => Ok(Target::Filter(
                filter(filter_params(fields)?)?,
                Bound(bound),
            )),
            (None, Some(_), None) => Err(bad_request(
                "a filter needs \"bound\", from the listing it acts on, so the action \
                 touches only what was listed",
            )),
            _ => Err(bad_request(
                "give either \"ids\" or \"filter\" with its \"bound\"",
            )),
        }
    }
}

/// An action's `"filter"` object as the listing's text parameters (numbers as written).
fn filter_params(fields: Map<String, Value>) -> Result<BTreeMap<String, String>, ApiError> {
    fields
        .into_iter()
        .filter(|(_, value)| !value.is_null())
        .map(|(name, value)| match value {
            Value::String(text) => Ok((name, text)),
            Value::Number(n) => Ok((name, n.to_string())),
            _ => Err(bad_request(format!(
                "filter field {name:?} must be a string or a number"
            ))),
        })
        .collect()
}

/// An RFC 3339 time in UTC (`2026-12-07T10:00:00Z`, fractions allowed).
fn rfc3339(text: &str) -> Result<SystemTime, ApiError> {
    humantime::parse_rfc3339(text).map_err(|e| {
        bad_request(format!(
            "\"at\" {text:?} is not an RFC 3339 time in UTC such as 2026-12-07T10:00:00Z: {e}"
        ))
    })
}

/// `POST /api/jobs/actions`: `{"action": .., "count": n}`.
async fn act(
    State(app): State<App>,
    actor: Actor,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    require_json(&headers)?;
    let request: ActionRequest = serde_json::from_slice(&body)
        .map_err(|e| bad_request(format!("not an action request: {e}")))?;
    let action = request.action()?;
    let target = request.target()?;
    let count = console(&app).act(actor.0, &action, &target).await?;
    Ok(Json(json!({ "action": action.name(), "count": count })))
}

/// `GET /api/audit?limit=&before=`.
async fn audit(
    State(app): State<App>,
    query: Result<Query<BTreeMap<String, String>>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let mut params = params(query)?;
    let limit = limit(&mut params, DEFAULT_AUDIT, MAX_AUDIT)?;
    let before = number::<i64>(&mut params, "before", "an audit entry id")?;
    if let Some(unknown) = params.keys().next() {
        return Err(bad_request(format!(
            "unknown parameter {unknown:?} (limit, before)"
        )));
    }
    let entries = console(&app).audit(limit, before).await?;
    Ok(Json(audit_json(&entries)))
}
