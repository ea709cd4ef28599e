//! Trace context in message headers: the names pgbus reads and writes, and (feature
//! `otel`) the conversion between headers and an OpenTelemetry [`Context`].
//!
//! A producer records its trace context in the message's headers with the process's
//! text-map propagator (W3C Trace Context writes [`TRACEPARENT`] and [`TRACESTATE`]); the
//! worker continues that trace when it runs the job. Producers in other languages do the
//! same by writing a `traceparent` header with their send. A message that carries
//! [`TRACE_LINK`] is linked to the producer's span instead of being its child: pgbus's own
//! batch sends set it, since one producer span followed by many jobs is a fan-out, not a
//! call.
//!
//! [`Context`]: https://docs.rs/opentelemetry/latest/opentelemetry/struct.Context.html

/// The W3C Trace Context header that carries the producer's trace and span ids.
pub const TRACEPARENT: &str = "traceparent";

/// The W3C Trace Context header that carries vendor-specific trace state.
pub const TRACESTATE: &str = "tracestate";

/// Present (any value; pgbus writes `"1"`) when the job's span should be linked to the
/// trace context in the headers rather than continue it as a child span. Set by batch
/// sends of more than one message.
pub const TRACE_LINK: &str = "pgbus-trace-link";

#[cfg(feature = "otel")]
pub use self::otel::{extract_context, inject_context};

#[cfg(feature = "otel")]
mod otel {
    use opentelemetry::propagation::{Extractor, Injector};
    use opentelemetry::trace::TraceContextExt;
    use opentelemetry::Context;

    use crate::Headers;

    struct Writer<'a>(&'a mut Headers);

    impl Injector for Writer<'_> {
        fn set(&mut self, key: &str, value: String) {
            // W3C writes an empty `tracestate` when there is none: nothing worth storing.
            if !value.is_empty() {
                self.0.insert(key.to_owned(), value);
            }
        }
    }

    struct Reader<'a>(&'a Headers);

    impl Extractor for Reader<'_> {
        fn get(&self, key: &str) -> Option<&str> {
            self.0.get(key).map(String::as_str)
        }

        fn keys(&self) -> Vec<&str> {
            self.0.keys().map(String::as_str).collect()
        }
    }

    /// Writes `cx` into `headers` with the process's global text-map propagator (set with
    /// `opentelemetry::global::set_text_map_propagator`; the default one writes nothing).
    /// Does nothing when `cx` holds no valid span, or when the headers already carry a
    /// [`TRACEPARENT`](super::TRACEPARENT): a context the producer set itself wins.
    pub fn inject_context(cx: &Context, headers: &mut Headers) {
        if !cx.span().span_context().is_valid() || headers.contains_key(super::TRACEPARENT) {
            return;
        }
        opentelemetry::global::get_text_map_propagator(|propagator| {
            propagator.inject_context(cx, &mut Writer(headers));
        });
    }

    /// Reads the trace context from `headers` with the process's global text-map
    /// propagator; a context without a valid span when there is none (or it is malformed:
    /// headers come from producers, and a bad one only loses the trace).
    pub fn extract_context(headers: &Headers) -> Context {
        opentelemetry::global::get_text_map_propagator(|propagator| {
            propagator.extract(&Reader(headers))
        })
    }
}
