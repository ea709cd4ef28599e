//! The JSON shapes that more than one output shares (`stats --json`, `dlq list --json`,
//! `cron list --json` and the dashboard API), held by `tests/golden/json_shapes.json`.

use std::time::SystemTime;

use pgbus_core::{BatchInfo, DeadMessage, ProcessRecord, QueueName, QueueStats, TopicStats};
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
