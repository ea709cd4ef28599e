//! What the backend tells observers: the producer span of a send (whose trace context the
//! feature `otel` writes into the messages' headers) and, with the feature `metrics`, the
//! pool's connection gauge and the listener's reconnections (through the `metrics`
//! facade: the application installs the recorder).

use pgbus_core::{NewMessage, QueueName};
use tracing::Span;

/// The producer span of one send statement. Cheap when no subscriber wants it: the
/// fields are only evaluated for an enabled span.
pub(crate) fn send_span(queue: &QueueName, count: usize) -> Span {
    tracing::info_span!(
        target: "pgbus::send",
        "pgbus.send",
        otel.name = %format_args!("{queue} publish"),
        otel.kind = "producer",
        messaging.system = "pgbus",
        messaging.destination.name = %queue,
        messaging.operation = "publish",
        // Signed: OpenTelemetry integers are i64 (an unsigned field is exported as text).
        messaging.batch.message_count = i64::try_from(count).unwrap_or(i64::MAX),
    )
}

/// Records the trace context of `span` (or, if that span is disabled, of the caller's
/// current span) in each message's headers, so the worker that runs it continues the
/// trace. A batch of more than one message is marked [`TRACE_LINK`]: its jobs link to the
/// producer span rather than all being its children. Without the feature `otel`, and
/// when there is no valid OpenTelemetry context, the messages are left as they are.
///
/// [`TRACE_LINK`]: pgbus_core::trace::TRACE_LINK
#[cfg_attr(not(feature = "otel"), allow(unused_variables))]
pub(crate) fn inject(span: &Span, messages: &mut [NewMessage]) {
    #[cfg(feature = "otel")]
    {
        use opentelemetry::trace::TraceContextExt;
        use pgbus_core::trace::{inject_context, TRACEPARENT, TRACE_LINK};
        use tracing_opentelemetry::OpenTelemetrySpanExt;

        let cx = if span.is_disabled() {
            Span::current().context()
        } else {
            span.context()
        };
        if !cx.span().span_context().is_valid() {
            return;
        }
        let batch = messages.len() > 1;
        for message in messages {
            if message.headers.contains_key(TRACEPARENT) {
                continue;
            }
            inject_context(&cx, &mut message.headers);
            if batch && message.headers.contains_key(TRACEPARENT) {
                message
                    .headers
                    .insert(TRACE_LINK.to_owned(), "1".to_owned());
            }
        }
    }
}

/// One pooled connection in `pgbus_connections{role}`: counted when opened, uncounted when
/// dropped (closed, broken or reaped by the pool). Empty without the feature `metrics`.
pub(crate) struct CountedConnection {
    #[cfg(feature = "metrics")]
    role: String,
}

impl CountedConnection {
    /// Counts a connection just opened for `role`.
    #[cfg(feature = "metrics")]
    pub(crate) fn opened(role: &str) -> Self {
        metrics::gauge!("pgbus_connections", "role" => role.to_owned()).increment(1.0);
        CountedConnection {
            role: role.to_owned(),
        }
    }

    /// Counts nothing: the feature `metrics` is off.
    #[cfg(not(feature = "metrics"))]
    pub(crate) fn opened(_role: &str) -> Self {
        CountedConnection {}
    }
}

#[cfg(feature = "metrics")]
impl Drop for CountedConnection {
    fn drop(&mut self) {
        metrics::gauge!("pgbus_connections", "role" => self.role.clone()).decrement(1.0);
    }
}

/// The LISTEN connection was opened again after it had been open before.
pub(crate) fn listener_reconnected() {
    #[cfg(feature = "metrics")]
    metrics::counter!("pgbus_listener_reconnects_total").increment(1);
}
