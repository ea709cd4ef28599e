//! Cross-crate integration tests for pgbus live in `tests/tests/`; this library holds their
//! shared helpers.

use std::time::{Duration, Instant};

use pgbus_core::QueueName;
use pgbus_pg::{connect, test_database, PgBackend};

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
    let start = Instant::now();
    while !check().await {
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
