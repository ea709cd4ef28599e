//! `--otlp-endpoint`: the spans of pgbus's own targets (sends, jobs) exported over OTLP
//! (HTTP/protobuf) by a batch processor on the SDK's thread, with the W3C propagator, so a
//! `pgbus send` and the `pgbus work` that runs its job are one trace. The exporter is
//! flushed when the [`Telemetry`] guard is dropped, at the end of `main`.

use anyhow::Context;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing::Subscriber;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// Flushes and stops the exporter when dropped.
pub(crate) struct Telemetry(SdkTracerProvider);

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Err(err) = self.0.shutdown() {
            tracing::warn!(target: "pgbus::cli", error = %err, "could not flush the traces to the OTLP endpoint");
        }
    }
}

/// The tracing layer that exports to `endpoint` (the collector's base URL, as in
/// `OTEL_EXPORTER_OTLP_ENDPOINT`: spans go to `<endpoint>/v1/traces`), and its guard.
/// Must be called outside the async runtime: the exporter's blocking HTTP client starts
/// a runtime of its own.
pub(crate) fn otlp_layer<S>(endpoint: &str) -> anyhow::Result<(impl Layer<S>, Telemetry)>
where
    S: Subscriber + for<'span> LookupSpan<'span>,
{
    if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
        anyhow::bail!("--otlp-endpoint must be an http:// or https:// URL");
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
        .build()
        .context("setting up the OTLP exporter")?;
    let provider = SdkTracerProvider::builder()
        .with_resource(Resource::builder().with_service_name("pgbus").build())
        .with_batch_exporter(exporter)
        .build();
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let layer = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("pgbus"))
        // pgbus's own spans only: the exporter's HTTP client traces too, and exporting
        // its spans would feed the exporter its own work.
        .with_filter(Targets::new().with_target("pgbus", tracing::Level::INFO));
    Ok((layer, Telemetry(provider)))
}
