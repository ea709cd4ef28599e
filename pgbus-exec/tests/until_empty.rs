//! `run_until_empty` on the in-memory backend: a run-once worker stops when its queues hold
//! nothing it would run within the wait, and says what it left.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgbus_core::{
    Error, MemoryBackend, NewMessage, Producer, QueueAdmin, QueueName, QueueOptions, RetryPolicy,
    Stats,
};
use pgbus_exec::{CancellationToken, JobContext, Outcome, UntilEmptyReport, Worker};

/// How long a run may take before the test fails (the runs below take about a second).
const DEADLINE: Duration = Duration::from_secs(30);
const WAIT_DUE: Duration = Duration::from_secs(10);

async fn queue(backend: &MemoryBackend, name: &str, options: QueueOptions) -> QueueName {
    let queue = QueueName::new(name).unwrap();
    backend.create_queue(&queue, &options).await.unwrap();
    queue
}

fn fast_retries() -> QueueOptions {
    QueueOptions::default().retry(
        RetryPolicy::builder()
            .base(Duration::from_millis(200))
            .cap(Duration::from_millis(200))
            .jitter(0.0)
            .max_attempts(5)
            .build()
            .unwrap(),
    )
}

async fn within_deadline(
    run: impl std::future::Future<Output = pgbus_core::Result<UntilEmptyReport>>,
) -> pgbus_core::Result<UntilEmptyReport> {
    tokio::time::timeout(DEADLINE, run)
        .await
        .expect("the run ended by itself")
}

/// Retries and messages due within the wait are waited for and done; a message due after
/// it is left, and the report's summary names it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_for_retries_and_soon_due_messages_and_leaves_later_ones() {
    let backend = MemoryBackend::new();
    let jobs = queue(&backend, "jobs", fast_retries()).await;
    let flaky = NewMessage::encode("flaky").unwrap();
    let soon = NewMessage::encode("soon")
        .unwrap()
        .delay(Duration::from_millis(500));
    let later = NewMessage::encode("later")
        .unwrap()
        .delay(Duration::from_secs(3600));
    backend
        .send_batch(&jobs, vec![flaky, soon, later])
        .await
        .unwrap();
    let failures = Arc::new(AtomicU32::new(0));
    let worker = Worker::builder(backend.clone())
        .concurrency(4)
        .handle(jobs.clone(), {
            let failures = Arc::clone(&failures);
            move |ctx: JobContext<MemoryBackend>, kind: String| {
                let failures = Arc::clone(&failures);
                async move {
                    if kind == "flaky" && ctx.attempt() < 3 {
                        failures.fetch_add(1, Ordering::SeqCst);
                        return Outcome::retry("not yet");
                    }
                    Outcome::Ack
                }
            }
        })
        .build()
        .unwrap();

    let report = within_deadline(worker.run_until_empty(WAIT_DUE, CancellationToken::new()))
        .await
        .unwrap();
    assert_eq!(
        (report.worker.acked, report.worker.retried),
        (2, 2),
        "{report:?}"
    );
    assert_eq!(failures.load(Ordering::SeqCst), 2);
    let left = report.left.as_ref().expect("the run was done");
    assert!(left.done());
    assert_eq!(left.queues().len(), 1);
    assert_eq!((left.queues()[0].ready, left.queues()[0].scheduled), (0, 1));
    let summary = left.summary();
    assert!(
        summary.starts_with("stopping: 0 ready, 1 scheduled, the first due in ")
            && summary.contains("(not waited for, --wait-due 10s); jobs: 0 ready, 1 scheduled"),
        "{summary}"
    );
    assert_eq!(report.paused(), None);
    assert_eq!(backend.queue_stats(&jobs).await.unwrap().scheduled, 1);
}

/// A paused queue's messages are not waited for: the other queue's plain and grouped
/// messages are run (a mixed worker), then the report names the paused queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_queue_holding_work_is_named() {
    let backend = MemoryBackend::new();
    let held = queue(&backend, "held", QueueOptions::default()).await;
    let open = queue(&backend, "open", QueueOptions::default()).await;
    for n in 0..2 {
        backend
            .send(&held, NewMessage::encode(&n).unwrap())
            .await
            .unwrap();
    }
    let open_messages = vec![
        NewMessage::encode(&10).unwrap(),
        NewMessage::encode(&11).unwrap().group("g"),
        NewMessage::encode(&12).unwrap().group("g"),
    ];
    backend.send_batch(&open, open_messages).await.unwrap();
    backend.set_paused(&held, true).await.unwrap();
    let mut builder = Worker::builder(backend.clone()).concurrency(2);
    for queue in [&held, &open] {
        builder = builder.handle(
            queue.clone(),
            |_: JobContext<MemoryBackend>, _: u32| async { Outcome::Ack },
        );
    }
    let worker = builder.build_mixed().unwrap();

    let report = within_deadline(worker.run_until_empty(WAIT_DUE, CancellationToken::new()))
        .await
        .unwrap();
    assert_eq!(report.worker.acked, 3, "{report:?}");
    assert_eq!(
        report.paused().as_deref(),
        Some("queue held (2 ready messages) is paused: `pgbus queue resume held` continues it")
    );
    assert_eq!(backend.queue_stats(&open).await.unwrap().depth(), 0);
    assert_eq!(backend.queue_stats(&held).await.unwrap().ready, 2);
}

/// The caller's token stops a run that is not done (it waits for a message due within
/// the wait); the report then has nothing to say about what was left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_callers_token_stops_a_run_that_is_not_done() {
    let backend = MemoryBackend::new();
    let jobs = queue(&backend, "jobs", QueueOptions::default()).await;
    backend
        .send(
            &jobs,
            NewMessage::encode(&1)
                .unwrap()
                .delay(Duration::from_secs(3600)),
        )
        .await
        .unwrap();
    let worker = Worker::builder(backend.clone())
        .handle(jobs.clone(), |_: JobContext<MemoryBackend>, _: u32| async {
            Outcome::Ack
        })
        .build()
        .unwrap();
    let monitor = worker.monitor();
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run_until_empty(Duration::from_secs(7200), stop.clone()));
    tokio::time::timeout(DEADLINE, async {
        while !monitor.metadata().idle {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the worker waits for work");
    assert!(!run.is_finished(), "a message is due within the wait");
    stop.cancel();
    let report = within_deadline(async { run.await.unwrap() }).await.unwrap();
    assert_eq!(report.left, None);
    assert_eq!(report.worker.acked, 0);
}

/// A worker that cannot start (one of its queues does not exist) ends the run with its
/// error, although its other queue holds work: the watch ends with the worker.
#[tokio::test]
async fn a_worker_that_fails_ends_the_run_with_its_error() {
    let backend = MemoryBackend::new();
    let jobs = queue(&backend, "jobs", QueueOptions::default()).await;
    backend
        .send(&jobs, NewMessage::encode(&1).unwrap())
        .await
        .unwrap();
    let missing = QueueName::new("missing").unwrap();
    let mut builder = Worker::builder(backend);
    for queue in [&jobs, &missing] {
        builder = builder.handle(
            queue.clone(),
            |_: JobContext<MemoryBackend>, _: u32| async { Outcome::Ack },
        );
    }
    let worker = builder.build().unwrap();
    let failed = within_deadline(worker.run_until_empty(WAIT_DUE, CancellationToken::new())).await;
    assert!(
        matches!(&failed, Err(Error::QueueNotFound(q)) if q == &missing),
        "{failed:?}"
    );
}
