//! The core conformance suite, unchanged, on Postgres: one fresh database per test.

use pgbus_pg::{test_database, PgBackend};

async fn fresh_backend() -> PgBackend {
    let db = test_database().await;
    let backend = PgBackend::builder(db.url())
        .max_connections(12)
        .build()
        .expect("backend");
    backend.migrate().await.expect("migrate");
    backend
}

pgbus_core::conformance_tests!(fresh_backend);
pgbus_core::conformance_tests!(@streams fresh_backend);
