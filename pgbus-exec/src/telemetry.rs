//! What a worker tells observers: the job span each handler runs in (with the feature
//! `otel`, continuing or linked to the producer's trace from the message's headers) and,
//! with the feature `metrics`, its counters and histograms through the `metrics` facade
//! (the application installs the recorder; the names are listed in
//! `docs/observability.md`).

use std::time::{Duration, SystemTime};

use pgbus_core::{Message, QueueName};
use tracing::Span;

/// The consumer span a job's handler runs in: a root span (a job is not part of whatever
/// the worker loop runs in), continuing the producer's trace when the headers carry one.
pub(crate) fn job_span(message: &Message) -> Span {
    let span = tracing::info_span!(
        target: "pgbus::job",
        parent: None,
        "pgbus.job",
        otel.name = %format_args!("{} process", message.queue),
        otel.kind = "consumer",
        otel.status_code = tracing::field::Empty,
        messaging.system = "pgbus",
        messaging.destination.name = %message.queue,
        messaging.message.id = %message.id,
        messaging.operation = "process",
        // Signed: OpenTelemetry integers are i64 (an unsigned field is exported as text).
        messaging.pgbus.attempt = i64::from(message.attempts),
    );
    #[cfg(feature = "otel")]
    follow_producer(&span, &message.headers);
    span
}

/// Makes `span` a child of the producer's span in `headers`, or links it for a message
/// marked [`TRACE_LINK`](pgbus_core::trace::TRACE_LINK). Must run before the span is
/// first entered (the OpenTelemetry span is built then).
#[cfg(feature = "otel")]
fn follow_producer(span: &Span, headers: &pgbus_core::Headers) {
    use opentelemetry::trace::TraceContextExt;
    use pgbus_core::trace::{extract_context, TRACE_LINK};
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    if span.is_disabled() {
        return;
    }
    let cx = extract_context(headers);
    let producer = cx.span().span_context().clone();
    if !producer.is_valid() {
        return;
    }
    if headers.contains_key(TRACE_LINK) {
        span.add_link(producer);
    } else if let Err(err) = span.set_parent(cx) {
        // Only when no OpenTelemetry layer is installed: nothing would be exported anyway.
        tracing::trace!(target: "pgbus::job", error = %err, "could not continue the producer's trace");
    }
}

/// Marks the job span failed when the handler's outcome is a failure.
pub(crate) fn job_failed(span: &Span) {
    span.record("otel.status_code", "ERROR");
}

/// A handler starts: `pgbus_jobs_started_total` and `pgbus_job_queue_wait_seconds` (from
/// when the message was first sent, by the database's clock, to now).
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn job_started(queue: &QueueName, enqueued_at: SystemTime) {
    #[cfg(feature = "metrics")]
    {
        let wait = SystemTime::now()
            .duration_since(enqueued_at)
            .unwrap_or(Duration::ZERO);
        metrics::counter!("pgbus_jobs_started_total", "queue" => queue.as_str().to_owned())
            .increment(1);
        metrics::histogram!("pgbus_job_queue_wait_seconds", "queue" => queue.as_str().to_owned())
            .record(wait.as_secs_f64());
    }
}

/// A handler returned (or panicked, or timed out) after `took`:
/// `pgbus_job_duration_seconds`.
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn job_ran(queue: &QueueName, took: Duration) {
    #[cfg(feature = "metrics")]
    metrics::histogram!("pgbus_job_duration_seconds", "queue" => queue.as_str().to_owned())
        .record(took.as_secs_f64());
}

/// What a finished job's outcome was decided to mean, the `outcome` label of
/// `pgbus_jobs_finished_total`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Finished {
    /// Acked (to be written with the next ack batch).
    Ack,
    /// Acked by the handler in its own transaction.
    Committed,
    /// Dropped without a dead letter.
    Discarded,
    /// Given back to run again after a delay.
    Retry,
    /// Moved to the dead-letter queue (by the handler's choice or with its attempts used
    /// up).
    DeadLetter,
}

impl Finished {
    #[cfg_attr(not(feature = "metrics"), allow(dead_code))]
    fn label(self) -> &'static str {
        match self {
            Finished::Ack => "ack",
            Finished::Committed => "committed",
            Finished::Discarded => "discarded",
            Finished::Retry => "retry",
            Finished::DeadLetter => "dead_letter",
        }
    }
}

/// A job's outcome is decided: `pgbus_jobs_finished_total{queue,outcome}`.
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn job_finished(queue: &QueueName, finished: Finished) {
    #[cfg(feature = "metrics")]
    metrics::counter!(
        "pgbus_jobs_finished_total",
        "queue" => queue.as_str().to_owned(),
        "outcome" => finished.label(),
    )
    .increment(1);
}

/// One claim statement returned `count` messages after `took`: `pgbus_claim_batch_size`
/// and `pgbus_claim_duration_seconds`.
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn claimed(count: usize, took: Duration) {
    #[cfg(feature = "metrics")]
    {
        metrics::histogram!("pgbus_claim_batch_size").record(count as f64);
        metrics::histogram!("pgbus_claim_duration_seconds").record(took.as_secs_f64());
    }
}

/// `count` leases were extended: `pgbus_lease_extensions_total`.
#[cfg_attr(not(feature = "metrics"), allow(unused_variables))]
pub(crate) fn leases_extended(count: u64) {
    #[cfg(feature = "metrics")]
    metrics::counter!("pgbus_lease_extensions_total").increment(count);
}
