//! `run_until_empty` on PostgreSQL: a mixed worker runs plain, grouped and limited jobs,
//! retries and messages due soon, then stops by itself, leaving later messages and a paused
//! queue's work, and says so.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgbus_core::{NewMessage, Producer, QueueAdmin, QueueOptions, RetryPolicy, Stats};
use pgbus_exec::{CancellationToken, JobContext, Outcome, Worker};
use pgbus_pg::PgBackend;
use pgbus_tests::{create, fresh_backend};

const DEADLINE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_worker_stops_once_its_queues_hold_nothing_due_within_the_wait() {
    let (backend, _url) = fresh_backend(6).await;
    let retry = RetryPolicy::builder()
        .base(Duration::from_millis(300))
        .cap(Duration::from_millis(300))
        .jitter(0.0)
        .max_attempts(5)
        .build()
        .unwrap();
    let jobs = create(&backend, "jobs", QueueOptions::default().retry(retry)).await;
    let held = create(&backend, "held", QueueOptions::default()).await;
    let encode = |kind: &str| NewMessage::encode(kind).unwrap();
    backend
        .send_batch(
            &jobs,
            vec![
                encode("plain"),
                encode("flaky"),
                encode("grouped").group("g"),
                encode("grouped").group("g"),
                encode("limited").limit_key("k"),
                encode("soon").delay(Duration::from_secs(1)),
                encode("later").delay(Duration::from_secs(3600)),
            ],
        )
        .await
        .unwrap();
    backend.send(&held, encode("held")).await.unwrap();
    backend.set_paused(&held, true).await.unwrap();

    let failures = Arc::new(AtomicU32::new(0));
    let mut builder = Worker::builder(backend.clone()).concurrency(4);
    for queue in [&jobs, &held] {
        let failures = Arc::clone(&failures);
        builder = builder.handle(
            queue.clone(),
            move |ctx: JobContext<PgBackend>, kind: String| {
                let failures = Arc::clone(&failures);
                async move {
                    if kind == "flaky" && ctx.attempt() == 1 {
                        failures.fetch_add(1, Ordering::SeqCst);
                        return Outcome::retry("once more");
                    }
                    Outcome::Ack
                }
            },
        );
    }
    let worker = builder.build_mixed().unwrap();

    let report = tokio::time::timeout(
        DEADLINE,
        worker.run_until_empty(Duration::from_secs(30), CancellationToken::new()),
    )
    .await
    .expect("the run ended by itself")
    .unwrap();
    assert_eq!(
        (report.worker.acked, report.worker.retried),
        (6, 1),
        "{report:?}"
    );
    assert_eq!(failures.load(Ordering::SeqCst), 1);
    let left = report.left.as_ref().expect("the run was done");
    let summary = left.summary();
    assert!(
        summary.starts_with("stopping: 1 ready, 1 scheduled")
            && summary.contains("jobs: 0 ready, 1 scheduled")
            && summary.contains("held: 1 ready, 0 scheduled, paused"),
        "{summary}"
    );
    assert_eq!(
        report.paused().as_deref(),
        Some("queue held (1 ready message) is paused: `pgbus queue resume held` continues it")
    );
    let jobs_left = backend.queue_stats(&jobs).await.unwrap();
    assert_eq!(
        (jobs_left.ready, jobs_left.in_flight, jobs_left.scheduled),
        (0, 0, 1)
    );
}
