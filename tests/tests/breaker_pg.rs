//! A per-queue circuit breaker on PostgreSQL: a queue whose handler always fails pauses
//! itself after N failures in a row, visibly in the stats, and resumes by itself after the
//! backoff (then one more failure opens it again), with plain and with grouped messages.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgbus_core::{
    CircuitBreaker, Consumer, Fetcher, NewMessage, OpenFetcher, Producer, QueueOptions, RetryPolicy,
};
use pgbus_exec::{JobContext, Outcome, Worker};
use pgbus_pg::PgBackend;
use pgbus_tests::{create, eventually, fresh_backend, stats_of};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_always_failing_queue_pauses_itself_and_resumes_after_the_backoff() {
    always_failing(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_always_failing_grouped_queue_pauses_itself_and_resumes_after_the_backoff() {
    always_failing(true).await;
}

/// Each message in a group of its own when `grouped`, so a failure does not block the
/// others: only the breaker stops the group worker.
async fn always_failing(grouped: bool) {
    let (backend, _url) = fresh_backend(4).await;
    let retry = RetryPolicy::builder()
        .max_attempts(1_000)
        .base(Duration::from_millis(1))
        .cap(Duration::from_millis(1))
        .build()
        .unwrap();
    let options = QueueOptions::default()
        .retry(retry)
        .circuit_breaker(CircuitBreaker::new(3, Duration::from_secs(3)).unwrap());
    let q = create(&backend, "fragile", options).await;
    backend
        .send_batch(
            &q,
            (0..20u32)
                .map(|n| {
                    let message = NewMessage::encode(&n).unwrap();
                    if grouped {
                        message.group(format!("g{n}"))
                    } else {
                        message
                    }
                })
                .collect(),
        )
        .await
        .unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let builder = Worker::builder(backend.clone())
        .concurrency(1)
        .poll_interval(Duration::from_millis(20))
        .handle(q.clone(), {
            let runs = Arc::clone(&runs);
            move |_ctx: JobContext<PgBackend>, _n: u32| {
                runs.fetch_add(1, Ordering::SeqCst);
                async { Outcome::retry("downstream is down") }
            }
        });
    let run = if grouped {
        tokio::spawn(builder.build_groups().unwrap().run(stop.clone()))
    } else {
        tokio::spawn(builder.build().unwrap().run(stop.clone()))
    };

    eventually("the breaker opened", DEADLINE, || async {
        stats_of(&backend, &q).await.breaker_open_for.is_some()
    })
    .await;
    let at_open = runs.load(Ordering::SeqCst);
    assert!(
        at_open >= 3,
        "opened after 3 failures in a row, not before ({at_open})"
    );
    let stats = stats_of(&backend, &q).await;
    assert!(!stats.paused, "the breaker, not a manual pause");
    let mut fetcher = backend.open_fetcher().await.unwrap();
    let handed_out = if grouped {
        fetcher.group_candidates(&q, 20, &[]).await.unwrap().len()
    } else {
        backend
            .claim(&q, 20, Duration::from_secs(30))
            .await
            .unwrap()
            .len()
    };
    assert_eq!(handed_out, 0, "an open breaker hands out nothing");

    eventually("the breaker closed again", DEADLINE, || async {
        stats_of(&backend, &q).await.breaker_open_for.is_none()
    })
    .await;
    eventually("jobs ran again after the backoff", DEADLINE, || async {
        runs.load(Ordering::SeqCst) > at_open
    })
    .await;
    eventually("the next failure opened it again", DEADLINE, || async {
        stats_of(&backend, &q).await.breaker_open_for.is_some()
    })
    .await;
    stop.cancel();
    run.await.unwrap().unwrap();
    assert_eq!(stats_of(&backend, &q).await.depth(), 20, "nothing was lost");
}
