//! Wake-ups on Postgres: the LISTEN connection, coalesced notifications, reconnects,
//! polling fallback, connection budget.

use std::collections::HashSet;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgbus_core::{
    Consumer, NewMessage, Producer, QueueAdmin, QueueName, QueueOptions, Stats, WakeupSource,
};
use pgbus_exec::{JobContext, Worker, WorkerMonitor, WorkerReport};
use pgbus_pg::{connect, PgBackend, PgListener};
use pgbus_tests::{connections, eventually, fresh_backend, queue};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(5);
const LONG_POLL: Duration = Duration::from_secs(30);

type Run = JoinHandle<pgbus_core::Result<WorkerReport>>;

/// Starts a worker on `queue` with a 30 s poll interval that counts handled messages.
fn start_worker(
    backend: &PgBackend,
    queue: &QueueName,
    listener: &Arc<PgListener>,
    handled: &Arc<AtomicUsize>,
    stop: &CancellationToken,
) -> (WorkerMonitor, Run) {
    start_worker_polling(backend, queue, listener, handled, stop, LONG_POLL)
}

/// [`start_worker`] with the poll interval `poll`.
fn start_worker_polling(
    backend: &PgBackend,
    queue: &QueueName,
    listener: &Arc<PgListener>,
    handled: &Arc<AtomicUsize>,
    stop: &CancellationToken,
    poll: Duration,
) -> (WorkerMonitor, Run) {
    let handled = Arc::clone(handled);
    let worker = Worker::builder(backend.clone())
        .poll_interval(poll)
        .concurrency(4)
        .wakeups(Arc::clone(listener) as Arc<dyn WakeupSource>)
        .handle(
            queue.clone(),
            move |_ctx: JobContext<PgBackend>, _n: u32| {
                let handled = Arc::clone(&handled);
                async move {
                    handled.fetch_add(1, Ordering::SeqCst);
                }
            },
        )
        .build()
        .unwrap();
    let monitor = worker.monitor();
    (monitor, tokio::spawn(worker.run(stop.clone())))
}

async fn wait_idle(monitor: &WorkerMonitor) {
    eventually("the worker is idle", WAIT, || async {
        monitor.metadata().idle
    })
    .await;
}

async fn send_numbers(backend: &PgBackend, queue: &QueueName, n: u32) {
    backend
        .send_batch(
            queue,
            (0..n).map(|i| NewMessage::encode(&i).unwrap()).collect(),
        )
        .await
        .unwrap();
}

async fn create(backend: &PgBackend, name: &str) -> QueueName {
    let q = queue(name);
    backend
        .create_queue(&q, &QueueOptions::default())
        .await
        .unwrap();
    q
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_worker_wakes_on_notify_long_before_the_poll() {
    let (backend, url) = fresh_backend(4).await;
    let q = create(&backend, "wake").await;
    let listener = Arc::new(PgListener::start(&url).unwrap());
    assert!(listener.wait_live(WAIT).await);
    let handled = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let (monitor, run) = start_worker(&backend, &q, &listener, &handled, &stop);
    eventually("wake-ups are live", WAIT, || async {
        monitor.metadata().wakeups_live
    })
    .await;
    wait_idle(&monitor).await;

    // Sent from another connection: only the notification can end the 30 s idle wait.
    let sender = PgBackend::builder(&url).role("sender").build().unwrap();
    sender
        .send(&q, NewMessage::encode(&1u32).unwrap())
        .await
        .unwrap();
    eventually("the message is handled", WAIT, || async {
        handled.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(
        listener.notifications_heard_for(&q),
        1,
        "exactly one notification for one send"
    );
    stop.cancel();
    run.await.unwrap().unwrap();
}

/// Messages given back (`Consumer::release`: a stopping worker's claimed-ahead buffer, or
/// one whose buffered messages waited too long for a slot) wake idle workers: they are
/// claimable at once, and without a notification another worker found them only at its
/// next poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn released_messages_wake_an_idle_worker() {
    let (backend, url) = fresh_backend(4).await;
    let q = create(&backend, "given_back").await;
    send_numbers(&backend, &q, 1).await;
    let holder = PgBackend::builder(&url).role("holder").build().unwrap();
    let held = holder.claim(&q, 1, Duration::from_secs(600)).await.unwrap();
    assert_eq!(held.len(), 1);

    let listener = Arc::new(PgListener::start(&url).unwrap());
    assert!(listener.wait_live(WAIT).await);
    let handled = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let hour = Duration::from_secs(3600);
    let (monitor, run) = start_worker_polling(&backend, &q, &listener, &handled, &stop, hour);
    eventually("wake-ups are live", WAIT, || async {
        monitor.metadata().wakeups_live
    })
    .await;
    wait_idle(&monitor).await;

    let leases: Vec<_> = held.iter().map(|m| m.lease()).collect();
    assert_eq!(holder.release(&leases).await.unwrap(), 1);
    eventually(
        "the released message is handled, its worker's poll an hour away",
        Duration::from_secs(30),
        || async { handled.load(Ordering::SeqCst) == 1 },
    )
    .await;
    stop.cancel();
    run.await.unwrap().unwrap();
}

/// Sends whose wake-up was coalesced (the queue was notified within the window) still wake
/// an idle worker: the trailing notify at the end of the window delivers them, with the
/// worker's poll an hour away.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn coalesced_sends_are_delivered_by_the_trailing_notify() {
    const BURST: usize = 20;
    // Far longer than the burst takes, so every send of it falls in the first's window.
    const WINDOW: Duration = Duration::from_secs(10);
    let (backend, url) = fresh_backend(4).await;
    let q = create(&backend, "coalesce").await;
    let listener = Arc::new(PgListener::start(&url).unwrap());
    assert!(listener.wait_live(WAIT).await);
    let handled = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let (monitor, run) = start_worker_polling(
        &backend,
        &q,
        &listener,
        &handled,
        &stop,
        Duration::from_secs(3600),
    );
    eventually("wake-ups are live", WAIT, || async {
        monitor.metadata().wakeups_live
    })
    .await;
    wait_idle(&monitor).await;

    let sender = PgBackend::builder(&url)
        .role("sender")
        .notify_coalescing(WINDOW)
        .build()
        .unwrap();
    // The first send notifies and opens the window; it is handled and the worker is idle
    // again before the burst, so only a wake-up can deliver the burst.
    sender
        .send(&q, NewMessage::encode(&0u32).unwrap())
        .await
        .unwrap();
    eventually("the first message is handled", WAIT, || async {
        handled.load(Ordering::SeqCst) == 1
    })
    .await;
    wait_idle(&monitor).await;
    for i in 1..=BURST {
        sender
            .send(&q, NewMessage::encode(&(i as u32)).unwrap())
            .await
            .unwrap();
    }
    assert_eq!(
        sender.notifies_skipped(),
        BURST as u64,
        "every send of the burst fell in the first one's window"
    );
    eventually(
        "the coalesced burst is handled",
        Duration::from_secs(60),
        || async { handled.load(Ordering::SeqCst) == BURST + 1 },
    )
    .await;
    assert_eq!(
        listener.notifications_heard_for(&q),
        2,
        "the first send's notify and one trailing notify for the whole burst"
    );
    stop.cancel();
    run.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_notifies_nothing_and_a_big_transaction_notifies_once() {
    let (backend, url) = fresh_backend(4).await;
    let q = create(&backend, "bulk").await;
    let marker = create(&backend, "marker").await;
    let listener = PgListener::start(&url).unwrap();
    assert!(listener.wait_live(WAIT).await);
    let mut client = connect(&url, "test").await.unwrap();

    // Rolled back: no job and no notification.
    let tx = client.transaction().await.unwrap();
    backend
        .send_in(&tx, &q, NewMessage::encode(&0u32).unwrap())
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    // Notifications arrive in commit order: once the marker's is heard, any notification
    // of the rolled-back transaction would have been heard before it.
    backend
        .send(&marker, NewMessage::encode(&0u32).unwrap())
        .await
        .unwrap();
    eventually("the marker is heard", WAIT, || async {
        listener.notifications_heard_for(&marker) == 1
    })
    .await;
    assert_eq!(listener.notifications_heard_for(&q), 0);
    assert_eq!(backend.stats().await.unwrap()[0].depth(), 0);

    // 10,000 messages in one transaction: nine bulk statements and a thousand single sends.
    let tx = client.transaction().await.unwrap();
    for chunk in 0..9u32 {
        let batch = (0..1_000)
            .map(|i| NewMessage::encode(&(chunk * 1_000 + i)).unwrap())
            .collect();
        backend.send_batch_in(&tx, &q, batch).await.unwrap();
    }
    for i in 9_000..10_000u32 {
        backend
            .send_in(&tx, &q, NewMessage::encode(&i).unwrap())
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();
    backend
        .send(&marker, NewMessage::encode(&1u32).unwrap())
        .await
        .unwrap();
    eventually("the second marker is heard", WAIT, || async {
        listener.notifications_heard_for(&marker) == 2
    })
    .await;
    assert_eq!(
        listener.notifications_heard_for(&q),
        1,
        "one notification for the whole transaction"
    );
    let stats = backend.stats().await.unwrap();
    assert_eq!(stats.iter().find(|s| s.queue == q).unwrap().ready, 10_000);
}

async fn backend_pids(url: &str, role: &str) -> HashSet<i32> {
    let observer = connect(url, "observer").await.unwrap();
    observer
        .query(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND application_name = $1",
            &[&format!("pgbus:{role}")],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

async fn terminate(url: &str, role: &str) {
    let observer = connect(url, "observer").await.unwrap();
    let killed: i64 = observer
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = $1",
            &[&format!("pgbus:{role}")],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 1, "one pgbus:{role} connection terminated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_recovers_from_killed_listen_and_fetch_connections() {
    let (backend, url) = fresh_backend(4).await;
    let q = create(&backend, "killed").await;
    let listener = Arc::new(PgListener::start(&url).unwrap());
    assert!(listener.wait_live(WAIT).await);
    let handled = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let (monitor, run) = start_worker(&backend, &q, &listener, &handled, &stop);
    let handled_reaches = |n: usize| {
        let handled = Arc::clone(&handled);
        move || {
            let handled = Arc::clone(&handled);
            async move { handled.load(Ordering::SeqCst) == n }
        }
    };

    send_numbers(&backend, &q, 100).await;
    eventually("the first batch is handled", WAIT, handled_reaches(100)).await;

    // Kill the listener: it reconnects and LISTENs again; wake-ups work again.
    terminate(&url, "listen").await;
    eventually("the listener reconnected", WAIT, || async {
        listener.connections_made() == 2 && listener.is_live()
    })
    .await;
    wait_idle(&monitor).await;
    send_numbers(&backend, &q, 100).await;
    eventually(
        "the second batch is handled by wake-up",
        WAIT,
        handled_reaches(200),
    )
    .await;

    // Kill the fetch connection while the worker idles: the next claim fails, the worker
    // backs off, reopens its fetch connection and claims.
    let fetch_before = backend_pids(&url, "fetch").await;
    wait_idle(&monitor).await;
    terminate(&url, "fetch").await;
    send_numbers(&backend, &q, 100).await;
    eventually(
        "the third batch is handled after the fetch reconnect",
        WAIT,
        handled_reaches(300),
    )
    .await;
    let fetch_after = backend_pids(&url, "fetch").await;
    assert_eq!(fetch_after.len(), 1);
    assert!(
        fetch_before.is_disjoint(&fetch_after),
        "a new fetch connection was opened"
    );

    stop.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!(report.acked, 300, "every message processed once");
    assert_eq!(backend.stats().await.unwrap()[0].depth(), 0);
}

/// Collects formatted log lines for one test.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn refused_listen_is_logged_once_and_the_worker_polls() {
    let logs = Logs::default();
    let subscriber = tracing_subscriber::fmt()
        .with_writer({
            let logs = logs.clone();
            move || logs.clone()
        })
        .with_max_level(tracing::Level::INFO)
        .finish();
    // A current-thread runtime: every task of this test logs through this subscriber.
    let _guard = tracing::subscriber::set_default(subscriber);

    let (backend, url) = fresh_backend(4).await;
    let q = create(&backend, "polled").await;
    let admin = connect(&url, "test").await.unwrap();
    let db: String = admin
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0);
    admin
        .batch_execute(&format!(
            "DO $$ BEGIN CREATE ROLE no_listen LOGIN PASSWORD 'no_listen'; EXCEPTION WHEN duplicate_object THEN NULL; END $$;
             REVOKE CONNECT ON DATABASE {db} FROM PUBLIC;"
        ))
        .await
        .unwrap();
    // The listener is given a role that may not connect: LISTEN cannot be set up.
    let (scheme, rest) = url.split_once("://").unwrap();
    let (_, host_and_rest) = rest.split_once('@').unwrap();
    let listener_url = format!("{scheme}://no_listen:no_listen@{host_and_rest}");
    let listener = Arc::new(PgListener::start(&listener_url).unwrap());

    let handled = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let worker = Worker::builder(backend.clone())
        .poll_interval(Duration::from_millis(50))
        .wakeups(Arc::clone(&listener) as Arc<dyn WakeupSource>)
        .handle(q.clone(), {
            let handled = Arc::clone(&handled);
            move |_ctx: JobContext<PgBackend>, _n: u32| {
                let handled = Arc::clone(&handled);
                async move {
                    handled.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
        .build()
        .unwrap();
    let monitor = worker.monitor();
    let run = tokio::spawn(worker.run(stop.clone()));
    send_numbers(&backend, &q, 50).await;
    eventually(
        "every message is handled by polling",
        Duration::from_secs(10),
        || async { handled.load(Ordering::SeqCst) == 50 },
    )
    .await;
    eventually(
        "the listener retried several times",
        Duration::from_secs(10),
        || async { listener.failures() >= 3 },
    )
    .await;
    assert!(!monitor.metadata().wakeups_live);
    stop.cancel();
    run.await.unwrap().unwrap();

    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert_eq!(
        text.matches("wake-ups unavailable").count(),
        1,
        "logged once over {} failures:\n{text}",
        listener.failures()
    );
    assert!(text.contains("no live wake-ups: polling"), "{text}");
    assert!(
        text.contains("permission denied"),
        "the reason is logged:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_workers_share_one_listen_connection_and_keep_their_fetch_connections() {
    let (backend, url) = fresh_backend(8).await;
    let listener = Arc::new(PgListener::start(&url).unwrap());
    assert!(listener.wait_live(WAIT).await);
    let handled = Arc::new(AtomicUsize::new(0));
    let stop = CancellationToken::new();
    let mut queues = Vec::new();
    let mut runs = Vec::new();
    for i in 0..4 {
        let q = create(&backend, &format!("q{i}")).await;
        let (monitor, run) = start_worker(&backend, &q, &listener, &handled, &stop);
        queues.push((q, monitor));
        runs.push(run);
    }
    for (_, monitor) in &queues {
        wait_idle(monitor).await;
    }
    assert_eq!(
        connections(&url, "listen").await,
        1,
        "one LISTEN connection per process"
    );
    assert_eq!(
        connections(&url, "fetch").await,
        4,
        "one fetch connection per worker"
    );
    let pids = backend_pids(&url, "fetch").await;

    // Many claim rounds: each message sent on its own, each woken and claimed.
    for round in 0..20u32 {
        for (q, _) in &queues {
            backend
                .send(q, NewMessage::encode(&round).unwrap())
                .await
                .unwrap();
        }
    }
    eventually("all 80 are handled", WAIT, || async {
        handled.load(Ordering::SeqCst) == 80
    })
    .await;
    assert_eq!(
        backend_pids(&url, "fetch").await,
        pids,
        "fetch connections kept across rounds"
    );
    assert_eq!(connections(&url, "listen").await, 1);
    stop.cancel();
    for run in runs {
        run.await.unwrap().unwrap();
    }
}
