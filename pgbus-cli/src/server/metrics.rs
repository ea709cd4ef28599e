//! `/metrics`: the snapshot in the Prometheus text format (version 0.0.4).

use std::fmt::Write;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;

use super::app::App;

/// One metric family: its help and type lines, then a sample per label value.
struct Family<'a> {
    out: &'a mut String,
}

impl<'a> Family<'a> {
    fn new(out: &'a mut String, name: &str, kind: &str, help: &str) -> Self {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        Self { out }
    }

    fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        let _ = write!(self.out, "{name}");
        if !labels.is_empty() {
            let labels: Vec<String> = labels
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect();
            let _ = write!(self.out, "{{{}}}", labels.join(","));
        }
        let _ = writeln!(self.out, " {value}");
    }
}

/// A family of one unlabelled sample.
fn single(out: &mut String, name: &str, kind: &str, help: &str, value: f64) {
    Family::new(out, name, kind, help).sample(name, &[], value);
}

/// Label values escape backslash, quote and newline.
fn escape(value: &str) -> String {
    value
        .replace('\\', r"\\")
        .replace('"', "\\\"")
        .replace('\n', r"\n")
}

pub(crate) async fn metrics(State(app): State<App>) -> impl IntoResponse {
    let snapshot = app.snapshots.latest();
    let mut out = String::new();
    single(
        &mut out,
        "pgbus_up",
        "gauge",
        "Whether the last snapshot could read the database.",
        f64::from(u8::from(snapshot.data.is_ok())),
    );
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
            let mut family = Family::new(&mut out, name, "gauge", help);
            for s in &data.queues {
                family.sample(name, &[("queue", s.queue.as_str())], field(s));
            }
        }
        let mut family = Family::new(
            &mut out,
            "pgbus_process_busy",
            "gauge",
            "Running jobs of a registered worker process.",
        );
        for p in &data.processes {
            let id = p.id.0.to_string();
            let pid = p.info.pid.to_string();
            let labels = [
                ("id", id.as_str()),
                ("hostname", p.info.hostname.as_str()),
                ("pid", pid.as_str()),
            ];
            family.sample("pgbus_process_busy", &labels, f64::from(p.busy));
        }
        single(
            &mut out,
            "pgbus_groups_in_flight",
            "gauge",
            "Groups with a message running now.",
            data.groups.len() as f64,
        );
        let mut family = Family::new(
            &mut out,
            "pgbus_topic_unrouted",
            "gauge",
            "Events of the event log that matched no binding.",
        );
        for t in &data.topics {
            family.sample(
                "pgbus_topic_unrouted",
                &[("routing_key", t.routing_key.as_str())],
                t.unrouted as f64,
            );
        }
        single(
            &mut out,
            "pgbus_batches_open",
            "gauge",
            "Batches with jobs still pending.",
            data.batches.len() as f64,
        );
    }
    let streams = &snapshot.streams;
    let per_process: [(&str, &str, &str, u64); 3] = [
        (
            "pgbus_stream_connections",
            "gauge",
            "SSE connections of this process.",
            streams.connections,
        ),
        (
            "pgbus_stream_frames_delivered_total",
            "counter",
            "Frames queued to SSE clients by this process.",
            streams.delivered,
        ),
        (
            "pgbus_stream_dropped_slow_total",
            "counter",
            "SSE clients dropped for not reading within the write deadline.",
            streams.dropped_slow,
        ),
    ];
    for (name, kind, help, value) in per_process {
        single(&mut out, name, kind, help, value as f64);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn label_values_cannot_break_the_line() {
        assert_eq!(super::escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
