//! `/metrics`: the snapshot in the Prometheus text format, rendered by
//! `metrics-exporter-prometheus` (the exporter `pgbus work --metrics-listen` uses too).
//!
//! Every scrape records the latest snapshot into a recorder of its own and renders it: the
//! page shows exactly what the database held at the last snapshot, with no series left
//! behind for a dropped queue or a process gone, and only `pgbus_up 0` when the snapshot
//! could not read the database.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use metrics::{counter, describe_counter, describe_gauge, gauge};
use metrics_exporter_prometheus::PrometheusBuilder;

use super::app::App;

pub(crate) async fn metrics(State(app): State<App>) -> impl IntoResponse {
    let recorder = PrometheusBuilder::new().build_recorder();
    let handle = recorder.handle();
    metrics::with_local_recorder(&recorder, || record(&app));
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        handle.render(),
    )
}

/// Records the latest snapshot into the current (scrape's own) recorder.
fn record(app: &App) {
    let snapshot = app.snapshots.latest();
    describe_gauge!(
        "pgbus_up",
        "Whether the last snapshot could read the database."
    );
    gauge!("pgbus_up").set(f64::from(u8::from(snapshot.data.is_ok())));
    if let Ok(data) = &snapshot.data {
        type Field = fn(&pgbus_core::QueueStats) -> f64;
        let per_queue: [(&str, &str, Field); 8] = [
            (
                "pgbus_queue_ready",
                "Messages visible now and not leased.",
                |s| s.ready as f64,
            ),
            (
                "pgbus_queue_in_flight",
                "Messages claimed under a live lease.",
                |s| s.in_flight as f64,
            ),
            (
                "pgbus_queue_scheduled",
                "Messages visible later (delayed or backing off).",
                |s| s.scheduled as f64,
            ),
            (
                "pgbus_queue_dead_lettered",
                "Messages in the dead-letter queue.",
                |s| s.dead_lettered as f64,
            ),
            (
                "pgbus_queue_oldest_ready_age_seconds",
                "Wait of the oldest ready message.",
                |s| s.oldest_ready_age.map_or(0.0, |a| a.as_secs_f64()),
            ),
            ("pgbus_queue_paused", "Whether the queue is paused.", |s| {
                f64::from(u8::from(s.paused))
            }),
            (
                "pgbus_queue_breaker_open",
                "Whether the queue's circuit breaker is open.",
                |s| f64::from(u8::from(s.breaker_open_for.is_some())),
            ),
            (
                "pgbus_queue_breaker_open_seconds",
                "How long until an open breaker closes.",
                |s| s.breaker_open_for.map_or(0.0, |a| a.as_secs_f64()),
            ),
        ];
        for (name, help, field) in per_queue {
            describe_gauge!(name, help);
            for s in &data.queues {
                gauge!(name, "queue" => s.queue.as_str().to_owned()).set(field(s));
            }
        }
        describe_gauge!(
            "pgbus_process_busy",
            "Running jobs of a registered worker process."
        );
        for p in &data.processes {
            gauge!(
                "pgbus_process_busy",
                "id" => p.id.0.to_string(),
                "hostname" => p.info.hostname.clone(),
                "pid" => p.info.pid.to_string(),
            )
            .set(f64::from(p.busy));
        }
        describe_gauge!(
            "pgbus_groups_in_flight",
            "Groups with a message running now."
        );
        gauge!("pgbus_groups_in_flight").set(data.groups.len() as f64);
        describe_gauge!(
            "pgbus_topic_unrouted",
            "Events of the event log that matched no binding."
        );
        for t in &data.topics {
            gauge!("pgbus_topic_unrouted", "routing_key" => t.routing_key.as_str().to_owned())
                .set(t.unrouted as f64);
        }
        describe_gauge!("pgbus_batches_open", "Batches with jobs still pending.");
        gauge!("pgbus_batches_open").set(data.batches.len() as f64);
    }
    let streams = &snapshot.streams;
    describe_gauge!(
        "pgbus_stream_connections",
        "SSE connections of this process."
    );
    gauge!("pgbus_stream_connections").set(streams.connections as f64);
    describe_counter!(
        "pgbus_stream_frames_delivered_total",
        "Frames queued to SSE clients by this process."
    );
    counter!("pgbus_stream_frames_delivered_total").absolute(streams.delivered);
    describe_counter!(
        "pgbus_stream_dropped_slow_total",
        "SSE clients dropped for not reading within the write deadline."
    );
    counter!("pgbus_stream_dropped_slow_total").absolute(streams.dropped_slow);
}
