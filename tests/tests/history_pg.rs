//! What the operator's console reads off a message, kept true by the runtime: the attempt
//! history (nack, dead-letter, retry from dead, archive), the process holding a lease, and
//! the cancellation of a running job whose message was deleted under it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgbus_core::{
    Consumer, DeadLetters, Lease, NewMessage, Producer, QueueName, QueueOptions, Selection,
};
use pgbus_exec::{ExecutionMode, JobContext, Worker, WorkerMonitor};
use pgbus_pg::{connect, PgBackend};
use pgbus_tests::{create, eventually, fresh_backend, gate, pass};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(60);
const LONG: Duration = Duration::from_secs(600);

/// The `errors` column of a message's row in `table` (NULL as JSON null).
async fn history(client: &Client, table: &str, id: i64) -> Value {
    let query = format!("SELECT coalesce(errors, 'null') FROM pgbus.{table} WHERE id = $1");
    client
        .query_one(&query, &[&id])
        .await
        .unwrap_or_else(|e| panic!("{query}: {e}"))
        .get(0)
}

/// The `(attempt, error)` pairs of a history, in order.
fn entries(history: &Value) -> Vec<(i64, String)> {
    history
        .as_array()
        .unwrap_or_else(|| panic!("an array: {history}"))
        .iter()
        .map(|e| {
            (
                e["attempt"].as_i64().expect("an attempt number"),
                e["error"].as_str().expect("an error text").to_owned(),
            )
        })
        .collect()
}

/// Claims the queue's one message: it must be claimable now.
async fn claim_one(backend: &PgBackend, q: &QueueName) -> Lease {
    let mut claimed = backend.claim(q, 1, LONG).await.unwrap();
    assert_eq!(claimed.len(), 1, "one message to claim");
    claimed.remove(0).lease()
}

/// Twelve failures keep the last ten, oldest first, each with its attempt, text and time; a
/// give-back without error text adds nothing; the dead letter appends its reason and keeps
/// the history; a retry from dead brings it back, and the ack of a queue that keeps history
/// archives it.
#[tokio::test]
async fn attempt_history_follows_the_message_to_the_dead_letters_back_and_to_the_archive() {
    let (backend, url) = fresh_backend(2).await;
    let client = connect(&url, "test").await.unwrap();
    let q = create(
        &backend,
        "history",
        QueueOptions::default().keep_history(true),
    )
    .await;
    let id = backend
        .send(&q, NewMessage::encode(&1).unwrap())
        .await
        .unwrap();
    assert_eq!(history(&client, "messages", id.0).await, Value::Null);

    let long = "x".repeat(5_000);
    for attempt in 1..=12 {
        let lease = claim_one(&backend, &q).await;
        assert_eq!(lease.attempt, attempt);
        let error = match attempt {
            12 => long.clone(),
            n => format!("failure {n}"),
        };
        assert!(backend
            .nack(&lease, Duration::ZERO, Some(&error))
            .await
            .unwrap());
    }
    let kept = history(&client, "messages", id.0).await;
    // (A long text shows as its length, so a failure stays readable.)
    let shown: Vec<(i64, String)> = entries(&kept)
        .into_iter()
        .map(|(n, error)| match error.len() {
            0..=100 => (n, error),
            _ => (n, format!("{} chars", error.chars().count())),
        })
        .collect();
    let expected: Vec<(i64, String)> = (3..=11)
        .map(|n| (n, format!("failure {n}")))
        .chain([(12, "4096 chars".to_owned())])
        .collect();
    assert_eq!(
        shown, expected,
        "the last ten, oldest first, texts cut at 4096"
    );
    let last_error: String = client
        .query_one(
            "SELECT last_error FROM pgbus.messages WHERE id = $1",
            &[&id.0],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        last_error.len(),
        5_000,
        "the last error keeps the whole text"
    );
    // Each time is RFC 3339 in UTC, in the order of the attempts, and now-ish.
    let times_ok: bool = client
        .query_one(
            "SELECT bool_and(e->>'at' LIKE '____-__-__T__:__:__.___Z'
                             AND (e->>'at')::timestamptz <= now()
                             AND (e->>'at')::timestamptz > now() - interval '1 hour')
                    AND bool_and(at_order) FROM (
                SELECT e, coalesce((e->>'at')::timestamptz
                           >= lag((e->>'at')::timestamptz) OVER (ORDER BY n), true) AS at_order
                FROM pgbus.messages m, jsonb_array_elements(m.errors) WITH ORDINALITY AS x(e, n)
                WHERE m.id = $1
            ) entries",
            &[&id.0],
        )
        .await
        .unwrap()
        .get(0);
    assert!(times_ok, "{kept}");

    // A give-back without error text (a job that never ran) is no failed attempt.
    let lease = claim_one(&backend, &q).await;
    assert_eq!(lease.attempt, 13);
    assert!(backend.nack(&lease, Duration::ZERO, None).await.unwrap());
    assert_eq!(history(&client, "messages", id.0).await, kept);

    let lease = claim_one(&backend, &q).await;
    assert!(backend.dead_letter(&lease, "gave up").await.unwrap());
    let dead = history(&client, "dead_letters", id.0).await;
    let mut expected: Vec<(i64, String)> = entries(&kept)[1..].to_vec();
    expected.push((14, "gave up".to_owned()));
    assert_eq!(entries(&dead), expected, "the reason ends the history");

    assert_eq!(
        backend.retry_dead(&q, Selection::Ids(&[id])).await.unwrap(),
        1
    );
    assert_eq!(history(&client, "messages", id.0).await, dead);
    let lease = claim_one(&backend, &q).await;
    assert_eq!(lease.attempt, 1, "a retry from dead starts counting again");
    assert_eq!(backend.ack(&[lease]).await.unwrap(), 1);
    assert_eq!(history(&client, "archive", id.0).await, dead);
}

/// Waits until the worker has registered its process; returns the id.
async fn registered(monitor: &WorkerMonitor) -> i64 {
    eventually("the worker to register", DEADLINE, || async {
        monitor.metadata().process.is_some()
    })
    .await;
    monitor.metadata().process.map_or(0, |id| id.0)
}

/// Every kind of claim (plain, grouped, limited) records the registered process of the
/// worker that holds the lease, read while the handlers run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_record_the_process_that_holds_the_lease() {
    let (backend, url) = fresh_backend(4).await;
    let client = connect(&url, "test").await.unwrap();
    let q = create(&backend, "holder", QueueOptions::default()).await;
    let (open, gate_rx) = gate();
    let (started_tx, mut started) = mpsc::unbounded_channel::<i64>();
    let worker = Worker::builder(backend.clone())
        .concurrency(3)
        .poll_interval(Duration::from_millis(50))
        .handle(q.clone(), move |ctx: JobContext<PgBackend>, _: u32| {
            let (started_tx, gate_rx) = (started_tx.clone(), gate_rx.clone());
            async move {
                let _ = started_tx.send(ctx.message_id().0);
                pass(gate_rx).await;
            }
        })
        .build_mixed()
        .unwrap();
    // Waiting before the worker starts: its first claims come right after it starts,
    // and still name it (it registers before claiming).
    let ids = backend
        .send_batch(
            &q,
            vec![
                NewMessage::encode(&1).unwrap(),
                NewMessage::encode(&2).unwrap().group("g"),
                NewMessage::encode(&3).unwrap().limit_key("k"),
            ],
        )
        .await
        .unwrap();
    let monitor = worker.monitor();
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    let process = registered(&monitor).await;
    let mut running = Vec::new();
    for _ in &ids {
        let id = tokio::time::timeout(DEADLINE, started.recv())
            .await
            .expect("every kind of job started")
            .unwrap();
        running.push(id);
    }
    running.sort_unstable();
    let ids: Vec<i64> = ids.iter().map(|id| id.0).collect();
    assert_eq!(running, ids);
    let holders: Vec<Option<i64>> = client
        .query(
            "SELECT leased_by FROM pgbus.messages WHERE id = ANY ($1) ORDER BY id",
            &[&ids],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(holders, vec![Some(process); 3], "plain, grouped, limited");

    open.send(true).unwrap();
    stop.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!(report.acked, 3, "{report:?}");
}

/// A job the test deletes while its handler runs: started and cancelled handlers report
/// their message id; the others record their payload.
struct Victim {
    started: mpsc::UnboundedReceiver<i64>,
    cancelled: mpsc::UnboundedReceiver<i64>,
    handled: Arc<Mutex<Vec<u32>>>,
}

/// A handler for [`Victim`]: payload 0 waits for its cancellation (for at most the test's
/// deadline), any other payload is recorded and acked.
fn victim_handler() -> (
    Victim,
    impl Fn(JobContext<PgBackend>, u32) -> futures_util::future::BoxFuture<'static, ()>
        + Send
        + Sync
        + 'static,
) {
    let (started_tx, started) = mpsc::unbounded_channel();
    let (cancelled_tx, cancelled) = mpsc::unbounded_channel();
    let handled = Arc::new(Mutex::new(Vec::new()));
    let victim = Victim {
        started,
        cancelled,
        handled: Arc::clone(&handled),
    };
    let handler = move |ctx: JobContext<PgBackend>, n: u32| {
        let (started_tx, cancelled_tx) = (started_tx.clone(), cancelled_tx.clone());
        let handled = Arc::clone(&handled);
        let job: futures_util::future::BoxFuture<'static, ()> = Box::pin(async move {
            if n != 0 {
                handled.lock().unwrap().push(n);
                return;
            }
            let id = ctx.message_id().0;
            let _ = started_tx.send(id);
            tokio::select! {
                () = ctx.cancellation().cancelled() => {
                    let _ = cancelled_tx.send(id);
                }
                () = tokio::time::sleep(DEADLINE) => {}
            }
        });
        job
    };
    (victim, handler)
}

/// Deletes the victim's row while it runs (what the console's "cancel" does), sees its
/// handler cancelled, then that the worker goes on with new jobs (in `group`, if any) and
/// wrote nothing for the cancelled one.
async fn cancel_the_victim(
    backend: &PgBackend,
    url: &str,
    q: &QueueName,
    group: Option<&str>,
    victim: &mut Victim,
) {
    let id = tokio::time::timeout(DEADLINE, victim.started.recv())
        .await
        .expect("the victim started")
        .unwrap();
    let client = connect(url, "test").await.unwrap();
    let deleted = client
        .execute("DELETE FROM pgbus.messages WHERE id = $1", &[&id])
        .await
        .unwrap();
    assert_eq!(deleted, 1);
    let cancelled = tokio::time::timeout(DEADLINE, victim.cancelled.recv())
        .await
        .expect("the handler's token was cancelled")
        .unwrap();
    assert_eq!(cancelled, id);

    backend
        .send_batch(
            q,
            (1..=3)
                .map(|n| {
                    let message = NewMessage::encode(&n).unwrap();
                    match group {
                        Some(group) => message.group(group),
                        None => message,
                    }
                })
                .collect(),
        )
        .await
        .unwrap();
    let handled = Arc::clone(&victim.handled);
    eventually("the worker ran the later jobs", DEADLINE, || {
        let handled = Arc::clone(&handled);
        async move { handled.lock().unwrap().len() == 3 }
    })
    .await;
    // The later jobs' acks are settled in batches after their handlers return: wait for
    // them. The cancelled job must not come back (retried or dead-lettered) meanwhile.
    let client = &client;
    eventually("nothing left: the cancelled job was not written back", DEADLINE, || async move {
        let left: i64 = client
            .query_one(
                "SELECT (SELECT count(*) FROM pgbus.messages) + (SELECT count(*) FROM pgbus.dead_letters)",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        left == 0
    })
    .await;
    assert!(
        victim.started.try_recv().is_err(),
        "the cancelled job was delivered again"
    );
}

/// A plain worker (1 s leases, so extensions come fast) cancels the handler of a job whose
/// row another connection deleted, and goes on working.
async fn a_deleted_running_job_is_cancelled(mode: ExecutionMode) {
    let (backend, url) = fresh_backend(4).await;
    let q = create(&backend, "cancel", QueueOptions::default()).await;
    let (mut victim, handler) = victim_handler();
    let worker = Worker::builder(backend.clone())
        .execution_mode(mode)
        .concurrency(2)
        .lease(Duration::from_secs(1))
        .poll_interval(Duration::from_millis(50))
        .handle(q.clone(), handler)
        .build()
        .unwrap();
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    backend
        .send(&q, NewMessage::encode(&0).unwrap())
        .await
        .unwrap();
    cancel_the_victim(&backend, &url, &q, None, &mut victim).await;
    stop.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!(
        (report.acked, report.retried, report.dead_lettered),
        (3, 0, 0),
        "the cancelled job is not settled: {report:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_a_deleted_running_job_is_cancelled() {
    a_deleted_running_job_is_cancelled(ExecutionMode::Async).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threads_a_deleted_running_job_is_cancelled() {
    a_deleted_running_job_is_cancelled(ExecutionMode::Threads).await;
}

/// The group loop's own lease heartbeat cancels a grouped job whose row was deleted, and the
/// group moves on to its next messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_running_grouped_job_is_cancelled_and_its_group_goes_on() {
    let (backend, url) = fresh_backend(4).await;
    let q = create(&backend, "cancel_group", QueueOptions::default()).await;
    let (mut victim, handler) = victim_handler();
    let worker = Worker::builder(backend.clone())
        .concurrency(2)
        .lease(Duration::from_secs(1))
        .poll_interval(Duration::from_millis(50))
        .handle(q.clone(), handler)
        .build_groups()
        .unwrap();
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    backend
        .send(&q, NewMessage::encode(&0).unwrap().group("g"))
        .await
        .unwrap();
    cancel_the_victim(&backend, &url, &q, Some("g"), &mut victim).await;
    stop.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!(
        (report.acked, report.retried, report.dead_lettered),
        (3, 0, 0),
        "the cancelled job is not settled: {report:?}"
    );
    assert!(backend.list_dead(&q, 10).await.unwrap().is_empty());
}
