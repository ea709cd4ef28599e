//! Cross-crate integration tests for pgbus live in `tests/tests/`; this library holds their
//! shared helpers.

pub mod idempotent;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use pgbus_core::{QueueAdmin, QueueName, QueueOptions, QueueStats, Stats};
use pgbus_pg::{connect, test_database, PgBackend};
use tokio::sync::watch;

/// A migrated backend on a fresh database, with its URL.
pub async fn fresh_backend(max_connections: u32) -> (PgBackend, String) {
    let db = test_database().await;
    let backend = PgBackend::builder(db.url())
        .max_connections(max_connections)
        .build()
        .expect("backend");
    backend.migrate().await.expect("migrate");
    (backend, db.url().to_owned())
}

/// Validated queue name, for tests.
pub fn queue(name: &str) -> QueueName {
    QueueName::new(name).expect("valid queue name")
}

/// Counts this database's connections whose `application_name` is `pgbus:<role>`.
pub async fn connections(url: &str, role: &str) -> i64 {
    let observer = connect(url, "observer").await.expect("observer connection");
    observer
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = $1",
            &[&format!("pgbus:{role}")],
        )
        .await
        .expect("pg_stat_activity")
        .get(0)
}

/// Polls `check` until it returns true, failing after `deadline`.
pub async fn eventually<F, Fut>(what: &str, deadline: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    eventually_some(what, deadline, || {
        let done = check();
        async move { done.await.then_some(()) }
    })
    .await
}

/// Polls `poll` until it returns a value, failing after `deadline`.
pub async fn eventually_some<T, F, Fut>(what: &str, deadline: Duration, mut poll: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(value) = poll().await {
            return value;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Creates a queue that must not exist yet.
pub async fn create(backend: &PgBackend, name: &str, options: QueueOptions) -> QueueName {
    let q = queue(name);
    assert!(backend.create_queue(&q, &options).await.unwrap());
    q
}

/// The stats of one queue.
pub async fn stats_of(backend: &PgBackend, q: &QueueName) -> QueueStats {
    backend.queue_stats(q).await.expect("stats for the queue")
}

/// Waits until the queue holds no message (ready, in flight or scheduled).
pub async fn wait_until_empty(backend: &PgBackend, q: &QueueName, deadline: Duration) {
    eventually("the queue is empty", deadline, || async {
        stats_of(backend, q).await.depth() == 0
    })
    .await;
}

/// Concurrency bookkeeping shared by a handler's runs: how many run now, the most at once.
#[derive(Debug, Default)]
pub struct Gauge {
    running: AtomicUsize,
    peak: AtomicUsize,
}

impl Gauge {
    /// A run starts.
    pub fn enter(&self) {
        let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
    }
    /// A run ends.
    pub fn leave(&self) {
        self.running.fetch_sub(1, Ordering::SeqCst);
    }
    /// Runs now.
    pub fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }
    /// The most runs at once so far.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }
}

/// A gate handlers wait at (with [`pass`]) until the test opens it (`send(true)`).
pub fn gate() -> (watch::Sender<bool>, watch::Receiver<bool>) {
    watch::channel(false)
}

/// Waits at the gate until it is open.
pub async fn pass(mut gate: watch::Receiver<bool>) {
    gate.wait_for(|open| *open).await.expect("gate kept open");
}
