//! Event subscribers on Postgres: idempotent consumers whose worker is killed after the
//! handler ran but before the ack (not run again), or before the handler finished (run
//! again); dedup record and event log pruning.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgbus_core::{Deduplication, Event, NewEvent, QueueName, QueueOptions, RetryPolicy, Topics};
use pgbus_exec::{JobContext, Subscription, Worker};
use pgbus_pg::{connect, PgBackend};
use pgbus_tests::{create, eventually, fresh_backend, stats_of, wait_until_empty};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Paid {
    order: u64,
}

/// A short lease, so a killed worker's message comes back quickly.
fn options() -> QueueOptions {
    QueueOptions::default().lease(Duration::from_secs(1)).retry(
        RetryPolicy::builder()
            .base(Duration::from_millis(10))
            .cap(Duration::from_millis(50))
            .max_attempts(5)
            .build()
            .unwrap(),
    )
}

/// An idempotent subscriber whose handler is `run`, started on its own backend (its own
/// pool, as a separate process would have). Returns the task running it.
fn start_subscriber<F, Fut>(
    url: &str,
    queue: &QueueName,
    run: F,
) -> tokio::task::JoinHandle<pgbus_core::Result<pgbus_exec::WorkerReport>>
where
    F: Fn(JobContext<PgBackend>, Event<Paid>) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let backend = PgBackend::builder(url).max_connections(4).build().unwrap();
    let subscription = Subscription::new(queue.clone())
        .on("order.*".parse().unwrap(), run)
        .idempotent();
    let worker = Worker::builder(backend)
        .poll_interval(Duration::from_millis(50))
        .subscribe(subscription)
        .build()
        .unwrap();
    // Never cancelled: the test kills it by aborting the task.
    tokio::spawn(worker.run(CancellationToken::new()))
}

async fn dedup_state(url: &str) -> Option<(String, i32)> {
    let client = connect(url, "observer").await.unwrap();
    client
        .query_opt("SELECT state, attempt FROM pgbus.event_dedup", &[])
        .await
        .unwrap()
        .map(|row| (row.get(0), row.get(1)))
}

async fn publish_when_bound(backend: &PgBackend) {
    eventually("the subscriber declared its binding", DEADLINE, || async {
        !backend.bindings().await.unwrap().is_empty()
    })
    .await;
    let event = NewEvent::encode("order.paid", &Paid { order: 1 }).unwrap();
    assert_eq!(backend.publish(event).await.unwrap().copies, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_the_handler_ran_but_before_the_ack_the_event_is_not_handled_again() {
    let (backend, url) = fresh_backend(4).await;
    let q = create(&backend, "billing", options()).await;
    // The ack never reaches the database: the process dies between completion and ack.
    let client = connect(&url, "test").await.unwrap();
    client
        .batch_execute(
            "CREATE FUNCTION test_fail_acks() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN RAISE EXCEPTION 'the process died before acking'; END $$;
             CREATE TRIGGER test_fail_acks BEFORE DELETE ON pgbus.messages
                 FOR EACH ROW EXECUTE FUNCTION test_fail_acks();",
        )
        .await
        .unwrap();
    let runs = Arc::new(AtomicUsize::new(0));
    let handler = {
        let runs = runs.clone();
        move |_: JobContext<PgBackend>, _: Event<Paid>| {
            let runs = runs.clone();
            async move {
                runs.fetch_add(1, Ordering::SeqCst);
            }
        }
    };
    let first = start_subscriber(&url, &q, handler.clone());
    publish_when_bound(&backend).await;
    eventually(
        "the handler ran and its event is completed",
        DEADLINE,
        || async {
            runs.load(Ordering::SeqCst) == 1
                && dedup_state(&url).await.is_some_and(|s| s.0 == "completed")
        },
    )
    .await;
    first.abort();
    let _ = first.await;
    assert_eq!(stats_of(&backend, &q).await.depth(), 1, "never acked");

    client
        .batch_execute("DROP TRIGGER test_fail_acks ON pgbus.messages")
        .await
        .unwrap();
    let second = start_subscriber(&url, &q, handler);
    wait_until_empty(&backend, &q, DEADLINE).await;
    second.abort();
    assert_eq!(runs.load(Ordering::SeqCst), 1, "not handled a second time");
    assert_eq!(stats_of(&backend, &q).await.dead_lettered, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_before_the_handler_finished_the_event_is_handled_again() {
    let (backend, url) = fresh_backend(4).await;
    let q = create(&backend, "billing", options()).await;
    let started = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let handler = {
        let (started, finished) = (started.clone(), finished.clone());
        move |ctx: JobContext<PgBackend>, _: Event<Paid>| {
            let (started, finished) = (started.clone(), finished.clone());
            async move {
                started.fetch_add(1, Ordering::SeqCst);
                if ctx.attempt() == 1 {
                    // The first run never finishes: its process is killed meanwhile.
                    std::future::pending::<()>().await;
                }
                finished.fetch_add(1, Ordering::SeqCst);
            }
        }
    };
    let first = start_subscriber(&url, &q, handler.clone());
    publish_when_bound(&backend).await;
    eventually(
        "the handler started and claimed the event",
        DEADLINE,
        || async {
            started.load(Ordering::SeqCst) == 1
                && dedup_state(&url).await.is_some_and(|s| s.0 == "claimed")
        },
    )
    .await;
    first.abort();
    let _ = first.await;

    let second = start_subscriber(&url, &q, handler);
    wait_until_empty(&backend, &q, DEADLINE).await;
    second.abort();
    assert_eq!(started.load(Ordering::SeqCst), 2, "handled again");
    assert_eq!(finished.load(Ordering::SeqCst), 1);
    assert_eq!(dedup_state(&url).await, Some(("completed".into(), 2)));
}

#[tokio::test]
async fn dedup_records_and_the_event_log_are_pruned_in_bounded_batches() {
    let (backend, url) = fresh_backend(4).await;
    let q = create(&backend, "billing", options()).await;
    backend
        .bind(&"order.*".parse().unwrap(), &q, Default::default())
        .await
        .unwrap();
    let events: Vec<_> = (0..7)
        .map(|i| NewEvent::encode("order.paid", &Paid { order: i }).unwrap())
        .collect();
    let published = backend.publish_batch(events).await.unwrap();
    let lease = pgbus_core::Lease {
        id: pgbus_core::MessageId(1),
        attempt: 1,
    };
    for p in &published {
        backend.claim_event(&q, p.id, &lease).await.unwrap();
    }
    let client = connect(&url, "test").await.unwrap();
    client
        .batch_execute(
            "UPDATE pgbus.event_dedup SET updated_at = now() - interval '2 hours';
             UPDATE pgbus.events SET published_at = now() - interval '2 hours'
             WHERE seq IN (SELECT seq FROM pgbus.events ORDER BY seq LIMIT 5);",
        )
        .await
        .unwrap();
    let hour = Duration::from_secs(3600);
    assert_eq!(backend.prune_dedup(hour, 2).await.unwrap(), 7);
    assert_eq!(backend.prune_event_log(hour, 2).await.unwrap(), 5);
    assert_eq!(backend.topic_stats().await.unwrap()[0].published, 2);
    assert!(
        backend.prune_dedup(hour, 0).await.is_err(),
        "a zero batch is refused"
    );
}
