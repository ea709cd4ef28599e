//! OpenTelemetry trace propagation on PostgreSQL: a send records the producer span's trace
//! context in the message's headers, and the worker's job span continues it (a single
//! send) or links to it (a batch send), with the messaging attributes.

use std::sync::OnceLock;
use std::time::Duration;

use opentelemetry::trace::{SpanId, SpanKind, Status, TraceContextExt, TracerProvider as _};
use opentelemetry::{KeyValue, Value};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use pgbus_core::trace::{TRACEPARENT, TRACE_LINK};
use pgbus_core::{Consumer, NewMessage, Producer, QueueName, QueueOptions, RetryPolicy};
use pgbus_exec::{JobContext, Worker};
use pgbus_pg::PgBackend;
use pgbus_tests::{create, eventually, fresh_backend, stats_of};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;

const DEADLINE: Duration = Duration::from_secs(60);

/// The process's tracing subscriber: an OpenTelemetry layer exporting to memory, and the
/// W3C propagator. Installed once (the worker's jobs run on other threads, so a
/// thread-local default would not see them); tests tell their spans apart by queue.
fn exporter() -> &'static InMemorySpanExporter {
    static EXPORTER: OnceLock<(InMemorySpanExporter, SdkTracerProvider)> = OnceLock::new();
    &EXPORTER
        .get_or_init(|| {
            let exporter = InMemorySpanExporter::default();
            let provider = SdkTracerProvider::builder()
                .with_simple_exporter(exporter.clone())
                .build();
            let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("pgbus-tests"));
            opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
            tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))
                .expect("the only global subscriber");
            (exporter, provider)
        })
        .0
}

fn spans_named(name: &str) -> Vec<SpanData> {
    exporter()
        .get_finished_spans()
        .expect("finished spans")
        .into_iter()
        .filter(|s| s.name == name)
        .collect()
}

fn attribute<'a>(span: &'a SpanData, key: &str) -> Option<&'a Value> {
    span.attributes
        .iter()
        .find(|kv: &&KeyValue| kv.key.as_str() == key)
        .map(|kv| &kv.value)
}

fn message_id(span: &SpanData) -> String {
    attribute(span, "messaging.message.id")
        .map(|v| v.as_str().into_owned())
        .unwrap_or_default()
}

/// Runs a worker on `q` until `n` job spans of it were exported; the handler fails the
/// payloads in `fail` for good.
async fn run_jobs(backend: &PgBackend, q: &QueueName, n: usize, fail: &'static [u32]) {
    let worker = Worker::builder(backend.clone())
        .poll_interval(Duration::from_millis(20))
        .handle(
            q.clone(),
            move |_ctx: JobContext<PgBackend>, n: u32| async move {
                if fail.contains(&n) {
                    Err(format!("{n} fails"))
                } else {
                    Ok(())
                }
            },
        )
        .build()
        .unwrap();
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    let name = format!("{q} process");
    eventually("the jobs' spans are exported", DEADLINE, || {
        let found = spans_named(&name).len();
        async move { found == n }
    })
    .await;
    stop.cancel();
    run.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_continues_the_trace_of_its_send() {
    exporter();
    let (backend, _url) = fresh_backend(4).await;
    let q = create(&backend, "traced_single", QueueOptions::default()).await;
    let request = tracing::info_span!("request");
    let id = backend
        .send(&q, NewMessage::encode(&1u32).unwrap())
        .instrument(request.clone())
        .await
        .unwrap();
    let request_cx = request.context().span().span_context().clone();
    drop(request);
    run_jobs(&backend, &q, 1, &[]).await;

    let [producer] = &spans_named(&format!("{q} publish"))[..] else {
        panic!("one producer span");
    };
    let [job] = &spans_named(&format!("{q} process"))[..] else {
        panic!("one job span");
    };
    assert_eq!(producer.span_kind, SpanKind::Producer);
    assert_eq!(
        producer.span_context.trace_id(),
        request_cx.trace_id(),
        "the producer span is in the request's trace"
    );
    assert_eq!(producer.parent_span_id, request_cx.span_id());
    assert_eq!(
        attribute(producer, "messaging.operation"),
        Some(&"publish".into())
    );
    assert_eq!(
        attribute(producer, "messaging.system"),
        Some(&"pgbus".into())
    );

    assert_eq!(
        job.span_context.trace_id(),
        request_cx.trace_id(),
        "one trace"
    );
    assert_eq!(
        job.parent_span_id,
        producer.span_context.span_id(),
        "the job span is a child of the producer span"
    );
    assert!(job.parent_span_is_remote);
    assert!(job.links.is_empty());
    assert_eq!(job.span_kind, SpanKind::Consumer);
    assert_eq!(job.status, Status::Unset);
    assert_eq!(attribute(job, "messaging.system"), Some(&"pgbus".into()));
    assert_eq!(
        attribute(job, "messaging.destination.name"),
        Some(&q.as_str().to_owned().into())
    );
    assert_eq!(message_id(job), id.to_string());
    assert_eq!(
        attribute(job, "messaging.operation"),
        Some(&"process".into())
    );
    assert_eq!(
        attribute(job, "messaging.pgbus.attempt"),
        Some(&Value::I64(1))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_of_a_batch_send_link_to_it() {
    exporter();
    let (backend, _url) = fresh_backend(4).await;
    let retry = RetryPolicy::builder().max_attempts(1).build().unwrap();
    let q = create(
        &backend,
        "traced_batch",
        QueueOptions::default().retry(retry),
    )
    .await;
    let request = tracing::info_span!("request");
    let ids = backend
        .send_batch(
            &q,
            (1..=3u32)
                .map(|n| NewMessage::encode(&n).unwrap())
                .collect(),
        )
        .instrument(request.clone())
        .await
        .unwrap();
    drop(request);
    run_jobs(&backend, &q, 3, &[2]).await;

    let [producer] = &spans_named(&format!("{q} publish"))[..] else {
        panic!("one producer span");
    };
    assert_eq!(
        attribute(producer, "messaging.batch.message_count"),
        Some(&Value::I64(3))
    );
    let jobs = spans_named(&format!("{q} process"));
    let mut seen: Vec<String> = jobs.iter().map(message_id).collect();
    seen.sort();
    let mut sent: Vec<String> = ids.iter().map(|id| id.to_string()).collect();
    sent.sort();
    assert_eq!(seen, sent);
    for job in &jobs {
        assert_eq!(
            job.parent_span_id,
            SpanId::INVALID,
            "a batch's job is a root span"
        );
        assert_ne!(
            job.span_context.trace_id(),
            producer.span_context.trace_id()
        );
        let [link] = &job.links[..] else {
            panic!("one link: {:?}", job.links);
        };
        assert_eq!(link.span_context.span_id(), producer.span_context.span_id());
        assert_eq!(
            link.span_context.trace_id(),
            producer.span_context.trace_id()
        );
    }
    // The failed job's span is marked failed; the others are not.
    let failed = jobs
        .iter()
        .find(|j| message_id(j) == ids[1].to_string())
        .unwrap();
    assert!(
        matches!(failed.status, Status::Error { .. }),
        "{:?}",
        failed.status
    );
    assert_eq!(
        jobs.iter()
            .filter(|j| matches!(j.status, Status::Error { .. }))
            .count(),
        1
    );
    // Dead-lettered with its attempts used up, the failure is not retried.
    assert_eq!(stats_of(&backend, &q).await.dead_lettered, 1);
}

/// A context the producer wrote itself is kept; without a tracing subscriber there is no
/// OpenTelemetry context, and nothing is written.
#[tokio::test(flavor = "current_thread")]
async fn only_a_live_trace_context_is_written_and_a_given_one_is_kept() {
    const GIVEN: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    exporter();
    let (backend, _url) = fresh_backend(2).await;
    let q = create(&backend, "untraced", QueueOptions::default()).await;
    backend
        .send_batch(
            &q,
            vec![
                NewMessage::encode(&1u32)
                    .unwrap()
                    .header(TRACEPARENT, GIVEN);
                2
            ],
        )
        .instrument(tracing::info_span!("request"))
        .await
        .unwrap();
    {
        // The current-thread runtime runs the sends on this thread, under this default.
        let _none = tracing::subscriber::set_default(tracing::subscriber::NoSubscriber::default());
        backend
            .send(&q, NewMessage::encode(&2u32).unwrap())
            .await
            .unwrap();
        backend
            .send_batch(&q, vec![NewMessage::encode(&3u32).unwrap(); 2])
            .await
            .unwrap();
    }
    let claimed = backend
        .claim(&q, 10, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(claimed.len(), 5);
    for message in &claimed {
        assert!(
            !message.headers.contains_key(TRACE_LINK),
            "{:?}",
            message.headers
        );
    }
    let contexts: Vec<_> = claimed
        .iter()
        .filter_map(|m| m.headers.get(TRACEPARENT))
        .collect();
    assert_eq!(contexts, vec![GIVEN, GIVEN]);
}
