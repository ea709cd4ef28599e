//! Behaviour specific to the Postgres backend: transactions, migrations, archive,
//! connection naming, errors.

use std::time::Duration;

use pgbus_core::{
    Consumer, Error, Extension, NewMessage, ProcessInfo, ProcessRegistry, Producer, QueueAdmin,
    QueueName, QueueOptions, QueueThroughput, Stats,
};
use pgbus_pg::{connect, test_database, PgBackend, SCHEMA_VERSION};

const LEASE: Duration = Duration::from_secs(60);

async fn backend() -> (PgBackend, String) {
    let db = test_database().await;
    let backend = PgBackend::connect(db.url()).expect("backend");
    backend.migrate().await.expect("migrate");
    (backend, db.url().to_owned())
}

async fn queue(backend: &PgBackend, name: &str, options: QueueOptions) -> QueueName {
    let name = QueueName::new(name).unwrap();
    backend.create_queue(&name, &options).await.unwrap();
    name
}

async fn depth(backend: &PgBackend, queue: &QueueName) -> u64 {
    let stats = backend.stats().await.unwrap();
    stats.iter().find(|s| &s.queue == queue).unwrap().depth()
}

#[tokio::test]
async fn transactional_send_commits_or_leaves_nothing() {
    let (backend, url) = backend().await;
    let q = queue(&backend, "tx", QueueOptions::default()).await;
    let mut client = connect(&url, "test").await.unwrap();

    let tx = client.transaction().await.unwrap();
    backend
        .send_in(&tx, &q, NewMessage::encode(&1).unwrap())
        .await
        .unwrap();
    backend
        .send_batch_in(
            &tx,
            &q,
            (0..100).map(|n| NewMessage::encode(&n).unwrap()).collect(),
        )
        .await
        .unwrap();
    assert_eq!(depth(&backend, &q).await, 0, "invisible before commit");
    tx.rollback().await.unwrap();
    assert_eq!(depth(&backend, &q).await, 0, "a rollback leaves no row");

    let tx = client.transaction().await.unwrap();
    let id = backend
        .send_in(&tx, &q, NewMessage::encode(&2).unwrap())
        .await
        .unwrap();
    tx.commit().await.unwrap();
    let claimed = backend.claim(&q, 10, LEASE).await.unwrap();
    assert_eq!(claimed.iter().map(|m| m.id).collect::<Vec<_>>(), [id]);
}

#[tokio::test]
async fn four_concurrent_migrations_leave_one_schema() {
    let db = test_database().await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let url = db.url().to_owned();
        tasks.push(tokio::spawn(async move {
            PgBackend::connect(url).unwrap().migrate().await
        }));
    }
    let mut applied = Vec::new();
    for task in tasks {
        applied.push(task.await.unwrap().expect("every migration succeeds"));
    }
    // Versions may have gaps (migrations of parallel work merge in any order).
    let mut versions = applied.concat();
    versions.sort_unstable();
    let total = versions.len();
    versions.dedup();
    assert_eq!(total, versions.len(), "each migration applied exactly once");
    assert_eq!(versions.last(), Some(&SCHEMA_VERSION));
    let backend = PgBackend::connect(db.url()).unwrap();
    backend.check_schema().await.unwrap();
    assert!(
        backend.migrate().await.unwrap().is_empty(),
        "re-running is a no-op"
    );
    let client = connect(db.url(), "test").await.unwrap();
    let rows = client
        .query_one("SELECT count(*) FROM pgbus.schema_migrations", &[])
        .await
        .unwrap();
    assert_eq!(rows.get::<_, i64>(0), total as i64);
}

#[tokio::test]
async fn schema_check_reports_an_unmigrated_database() {
    let db = test_database().await;
    let backend = PgBackend::connect(db.url()).unwrap();
    let err = backend.check_schema().await.unwrap_err();
    assert!(
        matches!(err, Error::SchemaMismatch { found: 0, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("pgbus migrate"));
}

#[tokio::test]
async fn history_keeping_queue_archives_and_prunes_in_batches() {
    let (backend, url) = backend().await;
    let kept = queue(
        &backend,
        "kept",
        QueueOptions::default()
            .keep_history(true)
            .archive_retention(Duration::from_secs(3600)),
    )
    .await;
    let plain = queue(&backend, "plain", QueueOptions::default()).await;
    // One ack for the deliveries of both queues.
    let mut leases = Vec::new();
    for q in [&kept, &plain] {
        backend
            .send_batch(
                q,
                (0..25).map(|n| NewMessage::encode(&n).unwrap()).collect(),
            )
            .await
            .unwrap();
        let claimed = backend.claim(q, 25, LEASE).await.unwrap();
        leases.extend(claimed.iter().map(|m| m.lease()));
    }
    assert_eq!(backend.ack(&leases).await.unwrap(), 50);
    assert_eq!(backend.archived_count(&kept).await.unwrap(), 25);
    assert_eq!(backend.archived_count(&plain).await.unwrap(), 0);
    let client = connect(&url, "test").await.unwrap();
    let archived: Vec<(i32, Vec<u8>)> = client
        .query(
            "SELECT attempts, payload FROM pgbus.archive ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let sent: Vec<(i32, Vec<u8>)> = (0..25)
        .map(|n| (1, NewMessage::encode(&n).unwrap().payload))
        .collect();
    assert_eq!(
        archived, sent,
        "the archive holds the acked rows as they were"
    );
    assert_eq!(
        backend.prune_archive(10).await.unwrap(),
        0,
        "nothing past retention yet"
    );

    // Age 21 of the archived rows past the retention.
    client
        .execute(
            "UPDATE pgbus.archive SET acked_at = now() - interval '2 hours'
             WHERE id IN (SELECT id FROM pgbus.archive ORDER BY id LIMIT 21)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        backend.prune_archive(10).await.unwrap(),
        21,
        "three bounded batches"
    );
    assert_eq!(backend.archived_count(&kept).await.unwrap(), 4);
    let hot = client
        .query_one("SELECT count(*) FROM pgbus.messages", &[])
        .await
        .unwrap();
    assert_eq!(hot.get::<_, i64>(0), 0, "completed work left the hot table");
}

/// Uninstalling drops the schema and all it holds, refusing while a live worker is
/// registered unless forced; the database can be migrated again, and a worker that stopped
/// heartbeating long ago does not hold an uninstall back.
#[tokio::test]
async fn uninstall_refuses_live_workers_unless_forced_and_migrate_reinstalls() {
    let (backend, url) = backend().await;
    let q = queue(&backend, "jobs", QueueOptions::default()).await;
    backend
        .send_batch(&q, vec![NewMessage::encode(&1).unwrap(); 2])
        .await
        .unwrap();
    let info = ProcessInfo::current(vec![q.clone()], "async", 4);
    backend.register(&info).await.unwrap();

    let refused = backend.uninstall().await.unwrap_err();
    assert!(
        matches!(refused, Error::WorkersRegistered { count: 1 }),
        "{refused}"
    );
    assert!(refused.to_string().contains("1 live worker"), "{refused}");
    assert_eq!(depth(&backend, &q).await, 2, "nothing was dropped");

    let dropped = backend.force_uninstall().await.unwrap();
    assert_eq!(
        (
            dropped.schema_version,
            dropped.queues,
            dropped.messages,
            dropped.processes
        ),
        (Some(SCHEMA_VERSION), 1, 2, 1)
    );
    let client = connect(&url, "test").await.unwrap();
    let schema_left: bool = client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'pgbus')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!schema_left, "the schema is gone");
    let objects_left: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_proc WHERE proname IN ('publish', 'apply_grants', 'topic_regex')",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(objects_left, 0, "its functions went with it");
    assert!(matches!(
        backend.check_schema().await,
        Err(Error::SchemaMismatch { found: 0, .. })
    ));
    let nothing = backend.uninstall().await.unwrap();
    assert_eq!(nothing.schema_version, None, "nothing left to drop");

    // Installed again, the same backend (and its pooled connections) works as before.
    assert_eq!(
        backend.migrate().await.unwrap().last(),
        Some(&SCHEMA_VERSION)
    );
    let q = queue(&backend, "jobs", QueueOptions::default()).await;
    let id = backend
        .send(&q, NewMessage::encode(&3).unwrap())
        .await
        .unwrap();
    let claimed = backend.claim(&q, 10, LEASE).await.unwrap();
    assert_eq!(claimed.iter().map(|m| m.id).collect::<Vec<_>>(), [id]);

    // A process whose heartbeats stopped long ago is not live.
    backend.register(&info).await.unwrap();
    client
        .execute(
            "UPDATE pgbus.processes SET heartbeat_at = now() - interval '1 hour'",
            &[],
        )
        .await
        .unwrap();
    let dropped = backend.uninstall().await.unwrap();
    assert_eq!(
        (dropped.queues, dropped.messages, dropped.processes),
        (1, 1, 1)
    );
}

#[tokio::test]
async fn pool_connections_are_named_by_role() {
    let db = test_database().await;
    let backend = PgBackend::builder(db.url()).role("api").build().unwrap();
    backend.migrate().await.unwrap();
    backend.list_queues().await.unwrap();
    let client = connect(db.url(), "observer").await.unwrap();
    let rows = client
        .query(
            "SELECT application_name FROM pg_stat_activity WHERE datname = current_database()
             AND application_name LIKE 'pgbus:%' ORDER BY 1",
            &[],
        )
        .await
        .unwrap();
    let names: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert!(names.contains(&"pgbus:api".to_owned()), "{names:?}");
    assert!(names.contains(&"pgbus:observer".to_owned()), "{names:?}");
    assert!(names.iter().all(|n| n.starts_with("pgbus:")));
}

#[tokio::test]
async fn claim_size_and_bad_url_are_clear_errors() {
    let (backend, _) = backend().await;
    let q = queue(&backend, "sizes", QueueOptions::default()).await;
    let err = backend.claim(&q, 0, LEASE).await.unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    let err = PgBackend::connect("not a url at all ::").unwrap_err();
    assert!(err.to_string().contains("invalid database URL"), "{err}");
}

#[tokio::test]
async fn unreachable_database_is_a_transient_error() {
    // A port nobody listens on: reserve one, then free it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let backend = PgBackend::builder(format!("postgres://postgres@127.0.0.1:{port}/x"))
        .connection_timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let err = backend.list_queues().await.unwrap_err();
    assert!(err.is_transient(), "{err}");
}

#[test]
fn invalid_queue_names_never_reach_the_database() {
    // A `QueueName` is the only way to name a queue in any operation, and it cannot be
    // built from these: the refusal happens before any backend call exists.
    for name in ["a;drop table x", "", &"x".repeat(200), "Ünïcode"] {
        let err = QueueName::new(name).unwrap_err();
        assert!(matches!(err, Error::InvalidQueueName { .. }));
        assert!(err.to_string().contains("a queue name"), "{err}");
    }
}

#[tokio::test]
async fn transactional_ack_commits_writes_and_ack_together() {
    use pgbus_core::TransactionalAck;
    let (backend, url) = backend().await;
    let q = queue(&backend, "txack", QueueOptions::default()).await;
    let client = connect(&url, "test").await.unwrap();
    client
        .batch_execute("CREATE TABLE effects (n int)")
        .await
        .unwrap();
    backend
        .send_batch(
            &q,
            (0..3).map(|n| NewMessage::encode(&n).unwrap()).collect(),
        )
        .await
        .unwrap();
    let claimed = backend.claim(&q, 3, LEASE).await.unwrap();
    let effects = || async {
        let row = client
            .query_one("SELECT count(*) FROM effects", &[])
            .await
            .unwrap();
        row.get::<_, i64>(0)
    };

    // Success: the write and the ack commit together.
    let tx = backend.begin().await.unwrap();
    tx.client()
        .execute("INSERT INTO effects VALUES (1)", &[])
        .await
        .unwrap();
    assert!(backend
        .ack_and_commit(tx, &claimed[0].lease())
        .await
        .unwrap());
    assert_eq!(effects().await, 1);

    // Failure after writing: the transaction is dropped; neither write nor ack remains.
    let tx = backend.begin().await.unwrap();
    tx.client()
        .execute("INSERT INTO effects VALUES (2)", &[])
        .await
        .unwrap();
    drop(tx);

    // A lease that is no longer current: the write is rolled back with the ack.
    let stale = pgbus_core::Lease {
        attempt: 99,
        ..claimed[2].lease()
    };
    let tx = backend.begin().await.unwrap();
    tx.client()
        .execute("INSERT INTO effects VALUES (3)", &[])
        .await
        .unwrap();
    assert!(!backend.ack_and_commit(tx, &stale).await.unwrap());

    // The dropped transaction's rollback runs in the background: wait until no session
    // is left idle in a transaction.
    let start = std::time::Instant::now();
    loop {
        let row = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()
                 AND state LIKE 'idle in transaction%'",
                &[],
            )
            .await
            .unwrap();
        if row.get::<_, i64>(0) == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "a dropped transaction stayed open"
        );
        tokio::task::yield_now().await;
    }
    assert_eq!(effects().await, 1);
    let stats = backend.stats().await.unwrap();
    assert_eq!(
        stats[0].in_flight, 2,
        "only the committed ack removed a message"
    );
}

/// Throughput lands in the current 10-second bucket; history lists buckets oldest first;
/// buckets past the hour are pruned in batches when counts are next recorded, and the
/// stats count only the last minute.
#[tokio::test]
async fn throughput_buckets_are_recorded_listed_and_pruned() {
    let (backend, url) = backend().await;
    let a = queue(&backend, "tp_a", QueueOptions::default()).await;
    let b = queue(&backend, "tp_b", QueueOptions::default()).await;
    let client = connect(&url, "test").await.unwrap();
    // Older buckets written directly: two within the hour (one outside the last minute),
    // and more past the hour than one pruning batch holds.
    client
        .execute(
            "INSERT INTO pgbus.throughput (queue, bucket, processed, failed)
             VALUES ('tp_a', date_trunc('second', now()) - interval '5 minutes', 7, 1),
                    ('tp_b', date_trunc('second', now()) - interval '10 minutes', 2, 2)",
            &[],
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO pgbus.throughput (queue, bucket, processed, failed)
             SELECT q, now() - interval '2 hours' - n * interval '10 seconds', 1, 1
             FROM generate_series(1, 1500) AS n, unnest(ARRAY['tp_a', 'tp_b']) AS q",
            &[],
        )
        .await
        .unwrap();

    backend
        .record_throughput(&[
            QueueThroughput::new(a.clone(), 4, 1),
            QueueThroughput::new(a.clone(), 1, 0),
            QueueThroughput::new(b.clone(), 0, 3),
        ])
        .await
        .unwrap();

    let left: i64 = client
        .query_one("SELECT count(*) FROM pgbus.throughput", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 4, "every bucket past the hour pruned, the rest kept");
    let stats = backend.stats().await.unwrap();
    let per_minute: Vec<_> = stats
        .iter()
        .map(|s| {
            (
                s.queue.as_str(),
                s.processed_per_minute,
                s.failed_per_minute,
            )
        })
        .collect();
    assert_eq!(
        per_minute,
        [("tp_a", 5, 1), ("tp_b", 0, 3)],
        "a queue named twice is summed; older buckets are not in the last minute"
    );

    let history = backend
        .throughput_history(Duration::from_secs(3600))
        .await
        .unwrap();
    let points: Vec<_> = history
        .iter()
        .map(|p| (p.queue.as_str(), p.processed, p.failed))
        .collect();
    assert_eq!(
        points[..2],
        [("tp_b", 2, 2), ("tp_a", 7, 1)],
        "oldest bucket first"
    );
    assert_eq!(points.len(), 4);
    let current = &history[2];
    assert_eq!(
        current.bucket, history[3].bucket,
        "both in the current bucket"
    );
    let since_epoch = current
        .bucket
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    assert_eq!(since_epoch.as_secs() % 10, 0, "buckets start on 10 s marks");
    assert_eq!(since_epoch.subsec_nanos(), 0);
    let recent = backend
        .throughput_history(Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        recent.len(),
        2,
        "only the current buckets in the last minute"
    );
}

/// A worker acks finished jobs and extends the leases of running ones on two pooled
/// connections at once, each with the leases in whatever order it holds them; when a job
/// finishes between the two snapshots the batches overlap. Found by `cargo xtask chaos`:
/// the two statements locked the shared rows in opposite orders and deadlocked (40P01),
/// stalling both for `deadlock_timeout` and failing one. Extensions now skip locked rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_acks_and_lease_extensions_never_deadlock() {
    let (backend, _) = backend().await;
    let q = queue(&backend, "overlap", QueueOptions::default()).await;
    let messages: Vec<NewMessage> = (0..2_000)
        .map(|n| NewMessage::encode(&n).unwrap())
        .collect();
    backend.send_batch(&q, messages).await.unwrap();
    let mut leases: Vec<_> = backend
        .claim(&q, 2_000, LEASE)
        .await
        .unwrap()
        .iter()
        .map(|m| m.lease())
        .collect();
    assert_eq!(leases.len(), 2_000);
    leases.sort_by_key(|l| l.id.0);
    for round in leases.chunks(200) {
        // Extend everything in ascending id order while acking all of it in descending
        // order: without a common lock order the two meet in the middle.
        let ascending = round.to_vec();
        let descending: Vec<_> = round.iter().rev().copied().collect();
        let (extended, acked) =
            tokio::join!(backend.extend(&ascending, LEASE), backend.ack(&descending));
        let extended = extended.unwrap_or_else(|e| panic!("extend: {}", e.report()));
        let acked = acked.unwrap_or_else(|e| panic!("ack: {}", e.report()));
        // Whichever ran first, the ack took every message of the round.
        assert_eq!(acked, 200, "extended {extended:?}");
    }
    assert_eq!(depth(&backend, &q).await, 0);
}

/// The lease heartbeat never waits for a row another statement holds (one being settled):
/// it extends the others and returns.
#[tokio::test]
async fn lease_extension_skips_rows_being_settled() {
    let (backend, url) = backend().await;
    let q = queue(&backend, "skip", QueueOptions::default()).await;
    let messages = vec![
        NewMessage::encode(&1).unwrap(),
        NewMessage::encode(&2).unwrap(),
    ];
    backend.send_batch(&q, messages).await.unwrap();
    let leases: Vec<_> = backend
        .claim(&q, 2, Duration::from_secs(5))
        .await
        .unwrap()
        .iter()
        .map(|m| m.lease())
        .collect();
    assert_eq!(leases.len(), 2);
    let mut settling = connect(&url, "test").await.unwrap();
    let tx = settling.transaction().await.unwrap();
    tx.execute(
        "SELECT 1 FROM pgbus.messages WHERE id = $1 FOR UPDATE",
        &[&leases[0].id.0],
    )
    .await
    .unwrap();
    let extended = tokio::time::timeout(Duration::from_secs(5), backend.extend(&leases, LEASE))
        .await
        .expect("the extension waited for the locked row")
        .unwrap();
    assert_eq!(
        extended,
        Extension::new(1, Vec::new()),
        "a locked row is skipped, not lost"
    );
    tx.rollback().await.unwrap();
    assert_eq!(
        backend.extend(&leases, LEASE).await.unwrap(),
        Extension::new(2, Vec::new())
    );
}

/// A claim of messages sent together updates them in place (HOT updates, no new index
/// entries), since the hot table leaves half of each page free for the rows' next versions.
#[tokio::test]
async fn claims_update_rows_in_place() {
    const N: usize = 1_000;
    let (backend, url) = backend().await;
    let q = queue(&backend, "in_place", QueueOptions::default()).await;
    let batch = (0..N).map(|n| NewMessage::encode(&n).unwrap()).collect();
    assert_eq!(backend.send_batch(&q, batch).await.unwrap().len(), N);
    assert_eq!(backend.claim(&q, N, LEASE).await.unwrap().len(), N);

    // An idle session publishes its statistics within ten seconds (PGSTAT_IDLE_INTERVAL).
    let observer = connect(&url, "observer").await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let (updated, hot) = loop {
        let row = observer
            .query_one(
                "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables
                 WHERE schemaname = 'pgbus' AND relname = 'messages'",
                &[],
            )
            .await
            .unwrap();
        let (updated, hot): (i64, i64) = (row.get(0), row.get(1));
        if updated >= N as i64 {
            break (updated, hot);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "statistics never showed the claim ({updated} updates)"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(updated, N as i64);
    // A row's claimed version is a little longer (its lease is set), so the last rows of
    // a full page may not fit beside it; with pages 85% full, only one in six did.
    assert!(
        hot * 10 >= updated * 9,
        "{hot} of {updated} claims were HOT updates"
    );
}

/// Checkout costs no round trip, yet a pooled connection the server ended is not handed
/// out: the driver saw it close, so the pool opens another and the send goes through.
#[tokio::test]
async fn a_send_after_the_pooled_connection_was_terminated_succeeds() {
    let db = test_database().await;
    let backend = PgBackend::builder(db.url())
        .role("victim")
        .max_connections(1)
        .build()
        .unwrap();
    backend.migrate().await.unwrap();
    let q = queue(&backend, "victim", QueueOptions::default()).await;
    backend
        .send(&q, NewMessage::encode(&1).unwrap())
        .await
        .unwrap();

    let observer = connect(db.url(), "observer").await.unwrap();
    let ended = observer
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = 'pgbus:victim'",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(ended, 1, "the pool's one connection was terminated");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let left: i64 = observer
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database() AND application_name = 'pgbus:victim'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if left == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the terminated connection is still there"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    backend
        .send(&q, NewMessage::encode(&2).unwrap())
        .await
        .expect("a fresh connection replaced the terminated one");
    assert_eq!(depth(&backend, &q).await, 2);
}

/// A large batch goes by `COPY`, a small one by the one-statement send: both store the
/// same rows, return the ids in input order, and refuse a missing queue storing nothing.
#[tokio::test]
async fn a_large_batch_is_copied_and_stores_what_small_batches_store() {
    let (backend, url) = backend().await;
    let copied = queue(&backend, "copied", QueueOptions::default()).await;
    let unnested = queue(&backend, "unnested", QueueOptions::default()).await;
    let at = std::time::UNIX_EPOCH + Duration::from_secs(4_000_000_000);
    let batch = || -> Vec<NewMessage> {
        (0..1_500u32)
            .map(|n| {
                let m = NewMessage::encode(&n).unwrap();
                match n % 5 {
                    0 => m.delay(Duration::from_secs(90)),
                    1 => m.priority(3).header("tenant", "acme"),
                    2 => m.group(format!("g{}", n % 7)),
                    3 => m.at(at),
                    _ => m,
                }
            })
            .collect()
    };
    let ids = backend.send_batch(&copied, batch()).await.unwrap();
    assert!(
        ids.windows(2).all(|w| w[0].0 < w[1].0),
        "ids in input order"
    );
    // Below the bulk threshold: the one-statement send.
    for chunk in batch().chunks(500) {
        backend.send_batch(&unnested, chunk.to_vec()).await.unwrap();
    }

    let client = connect(&url, "observer").await.unwrap();
    let rows = |q: &'static str| {
        let client = &client;
        async move {
            client
                .query(
                    "SELECT id, priority, content_type, headers, group_key, payload,
                            extract(epoch FROM visible_at - enqueued_at)::float8,
                            visible_at, enqueued_at
                     FROM pgbus.messages WHERE queue = $1 ORDER BY id",
                    &[&q],
                )
                .await
                .unwrap()
        }
    };
    let (copied_rows, unnested_rows) = (rows("copied").await, rows("unnested").await);
    assert_eq!(copied_rows.len(), 1_500);
    assert_eq!(unnested_rows.len(), 1_500);
    let returned: Vec<i64> = ids.iter().map(|id| id.0).collect();
    let stored: Vec<i64> = copied_rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(
        returned, stored,
        "the returned ids are the stored rows, in order"
    );
    type Stored = (i16, String, serde_json::Value, Option<String>, Vec<u8>);
    let stored_columns =
        |r: &tokio_postgres::Row| -> Stored { (r.get(1), r.get(2), r.get(3), r.get(4), r.get(5)) };
    for (n, (c, u)) in copied_rows.iter().zip(&unnested_rows).enumerate() {
        assert_eq!(stored_columns(c), stored_columns(u), "message {n}");
        if n % 5 == 3 {
            let (cv, uv): (std::time::SystemTime, std::time::SystemTime) = (c.get(7), u.get(7));
            assert_eq!((cv, uv), (at, at), "message {n}: run at");
        } else {
            // Delays count from the server's clock: the same offset from enqueue.
            let (cd, ud): (f64, f64) = (c.get(6), u.get(6));
            assert!((cd - ud).abs() < 0.5, "message {n}: delay {cd} vs {ud}");
        }
    }

    let missing = QueueName::new("missing").unwrap();
    let err = backend.send_batch(&missing, batch()).await.unwrap_err();
    assert!(matches!(err, Error::QueueNotFound(_)), "{err:?}");
    let stored: i64 = client
        .query_one("SELECT count(*) FROM pgbus.messages", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, 3_000, "the refused batch stored nothing");
}

/// A bulk send of several megabytes crosses the copy's chunks: every payload arrives whole
/// and in order.
#[tokio::test]
async fn a_bulk_send_of_many_chunks_stores_every_payload() {
    let (backend, url) = backend().await;
    let q = queue(&backend, "chunked", QueueOptions::default()).await;
    // 1,200 payloads of 4 KiB: about 5 MiB, five chunks of the copy.
    let payload = |n: u32| -> Vec<u8> { (0..4096u32).map(|i| (n + i) as u8).collect() };
    let messages = (0..1_200u32)
        .map(|n| NewMessage::raw(payload(n), pgbus_core::ContentType::MessagePack))
        .collect();
    let ids = backend.send_batch(&q, messages).await.unwrap();

    let client = connect(&url, "observer").await.unwrap();
    let rows = client
        .query(
            "SELECT id, payload FROM pgbus.messages WHERE queue = 'chunked' ORDER BY id",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 1_200);
    for (n, (row, id)) in rows.iter().zip(&ids).enumerate() {
        assert_eq!(row.get::<_, i64>(0), id.0, "message {n}: its returned id");
        assert_eq!(row.get::<_, Vec<u8>>(1), payload(n as u32), "message {n}");
    }
}
