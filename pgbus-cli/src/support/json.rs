//! The JSON shapes that more than one output shares (`stats --json`, `dlq list --json`,
//! `cron list --json`, `job ... --json` and the dashboard API), held by
//! `tests/golden/json_shapes.json`.

use std::time::SystemTime;

use pgbus_core::{BatchInfo, DeadMessage, ProcessRecord, QueueName, QueueStats, TopicStats};
use pgbus_pg::console::{AuditEntry, Count, JobDetail, JobState, JobSummary, Page};
use pgbus_pg::ScheduleInfo;
use serde_json::{json, Value};

use crate::support::time::{millis, rfc3339};

/// Queue statistics as `stats --json` and the dashboard API show them.
pub(crate) fn queues_json(queues: &[QueueStats]) -> Value {
    queues
        .iter()
        .map(|s| {
            json!({
                "queue": s.queue.as_str(),
                "paused": s.paused,
                "depth": s.depth(),
                "ready": s.ready,
                "in_flight": s.in_flight,
                "scheduled": s.scheduled,
                "dead_lettered": s.dead_lettered,
                "oldest_ready_age_ms": s.oldest_ready_age.map(millis),
                "breaker_open_for_ms": s.breaker_open_for.map(millis),
                "processed_per_minute": s.processed_per_minute,
                "failed_per_minute": s.failed_per_minute,
            })
        })
        .collect()
}

/// Worker processes as `stats --json` and the dashboard API show them.
pub(crate) fn processes_json(processes: &[ProcessRecord], now: SystemTime) -> Value {
    processes
        .iter()
        .map(|p| {
            json!({
                "id": p.id.0,
                "hostname": p.info.hostname,
                "pid": p.info.pid,
                "queues": p.info.queues.iter().map(QueueName::as_str).collect::<Vec<_>>(),
                "mode": p.info.mode,
                "capacity": p.info.capacity,
                "busy": p.busy,
                "started_at": rfc3339(p.started_at),
                "heartbeat_age_ms": millis(now.duration_since(p.heartbeat_at).unwrap_or_default()),
            })
        })
        .collect()
}

/// Dead-lettered messages as `dlq list --json` and the dashboard API show them. A payload
/// that does not decode in its codec is shown as text, never dropped.
pub(crate) fn dead_json(dead: &[DeadMessage]) -> Value {
    dead.iter()
        .map(|d| {
            let payload = d
                .content_type
                .decode::<Value>(&d.payload)
                .unwrap_or_else(|_| String::from_utf8_lossy(&d.payload).into_owned().into());
            json!({
                "id": d.id.0,
                "attempts": d.attempts,
                "failed_at": rfc3339(d.failed_at),
                "enqueued_at": rfc3339(d.enqueued_at),
                "error": d.error,
                "group": d.group_key,
                "payload": payload,
            })
        })
        .collect()
}

/// Open batches for `stats --json`.
pub(crate) fn batches_json(batches: &[BatchInfo]) -> serde_json::Value {
    batches
        .iter()
        .map(|b| {
            json!({
                "id": b.id.0,
                "queue": b.queue.as_str(),
                "total": b.total,
                "pending": b.pending,
                "succeeded": b.succeeded(),
                "dead_lettered": b.dead_lettered,
                "created_at": rfc3339(b.created_at),
            })
        })
        .collect()
}

/// Per routing key counts over the event log, for `stats --json` and the dashboard.
pub(crate) fn topics_json(topics: &[TopicStats]) -> Value {
    topics
        .iter()
        .map(|t| {
            json!({
                "routing_key": t.routing_key.as_str(),
                "published": t.published,
                "unrouted": t.unrouted,
                "copies": t.copies,
                "last_published_at": rfc3339(t.last_published_at),
            })
        })
        .collect()
}

/// The declared recurring tasks, for `cron list --json` and the dashboard.
pub(crate) fn schedules_json(schedules: &[ScheduleInfo]) -> serde_json::Value {
    schedules
        .iter()
        .map(|s| {
            json!({
                "task": s.task,
                "queue": s.queue,
                "schedule": s.schedule,
                "missed": s.missed,
                "last_at": s.last_at.map(rfc3339),
                "next_at": s.next_at.map(rfc3339),
            })
        })
        .collect()
}

/// One job of a listing, as `job list --json` and `GET /api/jobs` show it.
pub(crate) fn job_summary_json(job: &JobSummary) -> Value {
    json!({
        "id": job.id.0,
        "queue": job.queue.as_str(),
        "state": job.state.as_str(),
        "priority": job.priority,
        "group": job.group_key,
        "attempts": job.attempts,
        "enqueued_at": rfc3339(job.enqueued_at),
        "at": rfc3339(job.at),
        "lease_until": job.lease_until.map(rfc3339),
        "last_error": job.last_error,
        "payload_preview": job.payload_preview,
    })
}

/// A page of a listing: `{"jobs": [..], "next": cursor or null, "bound": ..}` (the bound is
/// what a bulk action by this filter passes back, so it touches only what was listed).
pub(crate) fn page_json(page: &Page) -> Value {
    json!({
        "jobs": page.jobs.iter().map(job_summary_json).collect::<Vec<_>>(),
        "next": page.next.as_ref().map(|c| c.0.as_str()),
        "bound": page.bound.0,
    })
}

/// Per-state counts: `{"ready": {"n": 12, "exact": true}, ..}` (`exact: false` means at
/// least `n`).
pub(crate) fn counts_json(counts: &[(JobState, Count)]) -> Value {
    counts
        .iter()
        .map(|(state, count)| {
            (
                state.as_str().to_owned(),
                json!({ "n": count.n, "exact": count.exact }),
            )
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}

/// A listing with its queue's counts, as `job list --json` and `GET /api/jobs` show it:
/// [`page_json`] plus `"counts"` ([`counts_json`]).
pub(crate) fn job_list_json(page: &Page, counts: &[(JobState, Count)]) -> Value {
    let mut value = page_json(page);
    if let Value::Object(fields) = &mut value {
        fields.insert("counts".into(), counts_json(counts));
    }
    value
}

/// Everything about one job, as `job show --json` and `GET /api/jobs/{id}` show it.
pub(crate) fn job_detail_json(job: &JobDetail) -> Value {
    let mut value = job_summary_json(&job.summary);
    let extra = json!({
        "max_attempts": job.max_attempts,
        "content_type": job.content_type.mime(),
        "payload_bytes": job.payload_bytes,
        "payload": job.payload,
        "payload_truncated": job.payload_truncated,
        "headers": job.headers,
        "errors": job.errors.iter().map(|e| json!({
            "attempt": e.attempt,
            "error": e.error,
            "at": rfc3339(e.at),
        })).collect::<Vec<_>>(),
        "held_by": job.held_by.as_ref().map(|h| json!({
            "process": h.id.0,
            "hostname": h.hostname,
            "pid": h.pid,
        })),
        "batch": job.batch_id,
        "unique_key": job.unique_key,
        "limit_key": job.limit_key,
        "event": job.event.as_ref().map(|e| json!({
            "routing_key": e.routing_key,
            "event_id": e.event_id,
        })),
    });
    if let (Value::Object(fields), Value::Object(more)) = (&mut value, extra) {
        fields.extend(more);
    }
    value
}

/// The audit log, newest first.
pub(crate) fn audit_json(entries: &[AuditEntry]) -> Value {
    entries
        .iter()
        .map(|e| {
            json!({
                "id": e.id,
                "at": rfc3339(e.at),
                "actor": e.actor,
                "action": e.action,
                "queue": e.queue,
                "count": e.count,
                "detail": e.detail,
            })
        })
        .collect()
}
