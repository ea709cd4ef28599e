//! Batches on PostgreSQL: 500 jobs over two workers, one failing permanently: the finished
//! and dead-lettered callbacks are enqueued once each and the succeeded one never; a batch
//! that all succeeds gets finished and succeeded.

use std::time::Duration;

use pgbus_core::{BatchCallbacks, BatchId, Consumer, NewMessage, QueueName, QueueOptions};
use pgbus_exec::{JobContext, Outcome, Worker};
use pgbus_pg::PgBackend;
use pgbus_tests::{create, eventually, fresh_backend, stats_of};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(60);

fn callbacks(q: &QueueName) -> BatchCallbacks {
    let note = |kind: &str| NewMessage::json(&kind).unwrap();
    BatchCallbacks::new()
        .on_finished(q.clone(), note("finished"))
        .on_succeeded(q.clone(), note("succeeded"))
        .on_dead_lettered(q.clone(), note("dead_lettered"))
}

/// Runs two workers on `jobs` (dead-lettering job `fail`) until the batch finishes.
async fn run_batch(backend: &PgBackend, jobs: &QueueName, batch: BatchId, fail: Option<u32>) {
    let stop = CancellationToken::new();
    let mut runs = Vec::new();
    for _ in 0..2 {
        let worker = Worker::builder(backend.clone())
            .concurrency(16)
            .poll_interval(Duration::from_millis(20))
            .handle(
                jobs.clone(),
                move |_ctx: JobContext<PgBackend>, n: u32| async move {
                    if Some(n) == fail {
                        Outcome::dead_letter("permanent failure")
                    } else {
                        Outcome::Ack
                    }
                },
            )
            .build()
            .unwrap();
        runs.push(tokio::spawn(worker.run(stop.clone())));
    }
    eventually("the batch finished", DEADLINE, || async {
        backend
            .batch(batch)
            .await
            .unwrap()
            .unwrap()
            .finished_at
            .is_some()
    })
    .await;
    stop.cancel();
    for run in runs {
        run.await.unwrap().unwrap();
    }
}

/// The callback kinds enqueued for `batch`, sorted.
async fn callbacks_enqueued(backend: &PgBackend, q: &QueueName, batch: BatchId) -> Vec<String> {
    let claimed = backend
        .claim(q, 100, Duration::from_secs(60))
        .await
        .unwrap();
    let mut kinds: Vec<String> = claimed
        .iter()
        .map(|m| {
            assert_eq!(m.headers["pgbus-batch"], batch.0.to_string());
            let kind: String = m.decode().unwrap();
            assert_eq!(m.headers["pgbus-batch-callback"], kind);
            kind
        })
        .collect();
    kinds.sort();
    kinds
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_hundred_jobs_one_failing_fire_finished_and_dead_lettered_once() {
    let (backend, _url) = fresh_backend(8).await;
    let jobs = create(&backend, "batch_jobs", QueueOptions::default()).await;
    let notes = create(&backend, "batch_notes", QueueOptions::default()).await;
    let messages = (0..500u32)
        .map(|n| NewMessage::encode(&n).unwrap())
        .collect();
    let (batch, ids) = backend
        .start_batch(&jobs, messages, callbacks(&notes))
        .await
        .unwrap();
    assert_eq!(ids.len(), 500);
    let info = backend.batch(batch).await.unwrap().unwrap();
    assert_eq!(
        (info.total, info.pending, info.dead_lettered),
        (500, 500, 0)
    );

    run_batch(&backend, &jobs, batch, Some(137)).await;

    let info = backend.batch(batch).await.unwrap().unwrap();
    assert_eq!(
        (info.pending, info.dead_lettered, info.succeeded()),
        (0, 1, 499)
    );
    assert_eq!(
        callbacks_enqueued(&backend, &notes, batch).await,
        ["dead_lettered", "finished"],
        "finished and dead-lettered once each, succeeded never"
    );
    assert_eq!(stats_of(&backend, &jobs).await.dead_lettered, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_that_all_succeeds_fires_finished_and_succeeded() {
    let (backend, _url) = fresh_backend(8).await;
    let jobs = create(&backend, "batch_jobs", QueueOptions::default()).await;
    let notes = create(&backend, "batch_notes", QueueOptions::default()).await;
    let messages = (0..50u32)
        .map(|n| NewMessage::encode(&n).unwrap())
        .collect();
    let (batch, _) = backend
        .start_batch(&jobs, messages, callbacks(&notes))
        .await
        .unwrap();
    let open = backend.open_batches().await.unwrap();
    assert_eq!(open.iter().map(|b| b.id).collect::<Vec<_>>(), [batch]);
    run_batch(&backend, &jobs, batch, None).await;
    assert!(backend.open_batches().await.unwrap().is_empty());
    assert_eq!(
        callbacks_enqueued(&backend, &notes, batch).await,
        ["finished", "succeeded"]
    );

    // Bad batches are refused and store nothing.
    let missing = pgbus_tests::queue("missing");
    let err = backend
        .start_batch(
            &jobs,
            vec![NewMessage::encode(&1u32).unwrap()],
            callbacks(&missing),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, pgbus_core::Error::InvalidArgument(_)),
        "{err}"
    );
    let err = backend
        .start_batch(&jobs, Vec::new(), callbacks(&notes))
        .await
        .unwrap_err();
    assert!(
        matches!(err, pgbus_core::Error::InvalidArgument(_)),
        "{err}"
    );
    assert_eq!(stats_of(&backend, &jobs).await.depth(), 0);
}
