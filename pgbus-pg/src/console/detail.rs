//! One job wherever it is: the hot table, the dead letters or the archive, each by its
//! primary key.

use std::time::SystemTime;

use pgbus_core::{
    ContentType, Headers, MessageId, ProcessId, QueueName, Result, EVENT_ID_HEADER,
    ROUTING_KEY_HEADER,
};
use tokio_postgres::types::Json;
use tokio_postgres::Row;

use super::payload::{truncate, Stored};
use super::stmt::Stmt;
use super::types::{
    AttemptError, EventOrigin, Holder, JobDetail, JobState, JobSummary, ERRORS_KEPT,
    PAYLOAD_SHOWN_MAX,
};
use crate::backend::PgBackend;
use crate::error::db;
use crate::headers::headers_from;

/// The job `$1` in each table (the first found wins: an id is in one table at a time), with
/// its queue's `max_attempts` and, while its lease is live, the registered process that
/// holds it.
const JOB: &str = "
SELECT j.*, q.max_attempts
FROM (
    SELECT 0 AS place, m.id, m.queue,
           CASE WHEN m.lease_until > now() THEN 'in_flight'
                WHEN m.visible_at > now() THEN 'scheduled'
                ELSE 'ready' END AS state,
           m.priority, m.group_key, m.attempts, m.enqueued_at, m.visible_at AS at,
           m.lease_until, m.last_error AS error, m.content_type, m.headers, m.payload,
           m.errors, m.batch_id, m.unique_key, m.limit_key,
           p.id AS holder_id, p.hostname AS holder_host, p.pid AS holder_pid
    FROM pgbus.messages m
    LEFT JOIN pgbus.processes p ON p.id = m.leased_by AND m.lease_until > now()
    WHERE m.id = $1
    UNION ALL
    SELECT 1, d.id, d.queue, 'dead', d.priority, d.group_key, d.attempts, d.enqueued_at,
           d.failed_at, NULL, d.error, d.content_type, d.headers, d.payload, d.errors, NULL,
           NULL, d.limit_key, NULL, NULL, NULL
    FROM pgbus.dead_letters d
    WHERE d.id = $1
    UNION ALL
    SELECT 2, a.id, a.queue, 'archived', a.priority, a.group_key, a.attempts, a.enqueued_at,
           a.acked_at, NULL, a.errors -> -1 ->> 'error', a.content_type, a.headers, a.payload,
           a.errors, NULL, NULL, NULL, NULL, NULL, NULL
    FROM pgbus.archive a
    WHERE a.id = $1
) j
LEFT JOIN pgbus.queues q ON q.name = j.queue
ORDER BY j.place
LIMIT 1";

/// The whole payload of job `$1`, from the same tables in the same order as [`JOB`].
const PAYLOAD: &str = "
SELECT content_type, payload FROM (
    SELECT 0 AS place, content_type, payload FROM pgbus.messages WHERE id = $1
    UNION ALL
    SELECT 1, content_type, payload FROM pgbus.dead_letters WHERE id = $1
    UNION ALL
    SELECT 2, content_type, payload FROM pgbus.archive WHERE id = $1
) j
ORDER BY place
LIMIT 1";

pub(super) fn job_stmt(id: MessageId) -> Stmt {
    Stmt::new("job", JOB).bind(id.0)
}

pub(super) fn payload_stmt(id: MessageId) -> Stmt {
    Stmt::new("payload", PAYLOAD).bind(id.0)
}

pub(super) async fn job(backend: &PgBackend, id: MessageId) -> Result<Option<JobDetail>> {
    let rows = job_stmt(id)
        .rows(&**backend.conn().await?)
        .await
        .map_err(|e| db("reading a job", e))?;
    rows.first().map(detail_from).transpose()
}

pub(super) async fn payload(
    backend: &PgBackend,
    id: MessageId,
) -> Result<Option<(ContentType, Vec<u8>)>> {
    let rows = payload_stmt(id)
        .rows(&**backend.conn().await?)
        .await
        .map_err(|e| db("reading a payload", e))?;
    rows.first()
        .map(|row| Ok((ContentType::from_mime(row.get(0))?, row.get(1))))
        .transpose()
}

fn detail_from(row: &Row) -> Result<JobDetail> {
    let headers = headers_from(row);
    let bytes: &[u8] = row.get("payload");
    let mime: &str = row.get("content_type");
    let stored = Stored {
        mime,
        bytes,
        total: bytes.len(),
    };
    let (payload, payload_truncated) = truncate(stored.pretty(), PAYLOAD_SHOWN_MAX);
    let summary = JobSummary {
        id: MessageId(row.get("id")),
        queue: QueueName::new(row.get::<_, String>("queue"))?,
        state: JobState::parse(row.get("state"))?,
        priority: row.get("priority"),
        group_key: row.get("group_key"),
        attempts: count(row.get("attempts")),
        enqueued_at: row.get("enqueued_at"),
        at: row.get("at"),
        lease_until: row.get("lease_until"),
        last_error: row.get("error"),
        payload_preview: stored.preview(),
    };
    let holder = row.get::<_, Option<i64>>("holder_id").map(|id| Holder {
        id: ProcessId(id),
        hostname: row.get("holder_host"),
        pid: row.get("holder_pid"),
    });
    let errors: Option<Json<serde_json::Value>> = row.get("errors");
    Ok(JobDetail {
        max_attempts: row.get::<_, Option<i32>>("max_attempts").map_or(0, count),
        content_type: ContentType::from_mime(mime)?,
        payload_bytes: bytes.len(),
        payload,
        payload_truncated,
        event: event_origin(&headers),
        headers,
        errors: errors.map(|Json(v)| attempt_errors(&v)).unwrap_or_default(),
        held_by: holder,
        batch_id: row.get("batch_id"),
        unique_key: row.get("unique_key"),
        limit_key: row.get("limit_key"),
        summary,
    })
}

fn count(n: i32) -> u32 {
    u32::try_from(n).unwrap_or(0)
}

/// An event copy's envelope headers, when both are there.
fn event_origin(headers: &Headers) -> Option<EventOrigin> {
    Some(EventOrigin {
        routing_key: headers.get(ROUTING_KEY_HEADER)?.clone(),
        event_id: headers.get(EVENT_ID_HEADER)?.clone(),
    })
}

/// The attempt history, `[{"attempt": 3, "error": "...", "at": "2026-12-06T22:00:00Z"}]`,
/// oldest first, the last [`ERRORS_KEPT`]. It is written by SQL (and could be by hand), so
/// an entry that does not have this shape is skipped rather than failing the read.
fn attempt_errors(history: &serde_json::Value) -> Vec<AttemptError> {
    let entries = history.as_array().map(Vec::as_slice).unwrap_or_default();
    let mut errors: Vec<AttemptError> = entries.iter().filter_map(attempt_error).collect();
    let extra = errors.len().saturating_sub(ERRORS_KEPT);
    errors.drain(..extra);
    errors
}

fn attempt_error(entry: &serde_json::Value) -> Option<AttemptError> {
    let attempt = u32::try_from(entry.get("attempt")?.as_u64()?).ok()?;
    // A nack without error text may record a null or missing one.
    let error = match entry.get("error") {
        None | Some(serde_json::Value::Null) => String::new(),
        Some(text) => text.as_str()?.to_owned(),
    };
    let at = chrono::DateTime::parse_from_rfc3339(entry.get("at")?.as_str()?).ok()?;
    Some(AttemptError {
        attempt,
        error,
        at: SystemTime::from(at),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn history_skips_malformed_entries_and_keeps_the_last() {
        let mut entries = vec![
            json!("not an object"),
            json!({"attempt": -1, "error": "x", "at": "2026-12-06T22:00:00Z"}),
            json!({"attempt": 1, "error": 5, "at": "2026-12-06T22:00:00Z"}),
            json!({"attempt": 1, "error": "x", "at": "yesterday"}),
        ];
        for n in 1..=12 {
            let at = "2026-12-06T22:00:00.5+01:00";
            entries.push(json!({"attempt": n, "error": format!("e{n}"), "at": at}));
        }
        entries.push(json!({"attempt": 13, "error": null, "at": "2026-12-06T22:00:00Z"}));
        let errors = attempt_errors(&serde_json::Value::Array(entries));
        let attempts: Vec<u32> = errors.iter().map(|e| e.attempt).collect();
        assert_eq!(attempts, (4..=13).collect::<Vec<_>>());
        assert_eq!(errors[0].error, "e4");
        assert_eq!(errors[9].error, "");
        assert!(attempt_errors(&json!({"attempt": 1})).is_empty());
    }
}
