//! The maintenance loop prunes the archive, dedup records and the event log past their
//! retentions, keeps what is younger, stops when cancelled, and runs safely in several
//! processes at once.

use std::time::{Duration, Instant};

use pgbus_core::{Error, QueueAdmin, QueueName, QueueOptions};
use pgbus_pg::{connect, test_database, Maintenance, PgBackend};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

const HOUR: Duration = Duration::from_secs(3600);

async fn backend() -> (PgBackend, Client) {
    let db = test_database().await;
    let backend = PgBackend::connect(db.url()).expect("backend");
    backend.migrate().await.expect("migrate");
    let client = connect(db.url(), "test").await.expect("a test connection");
    (backend, client)
}

/// Rows left in (archive, event_dedup, events).
async fn counts(client: &Client) -> (i64, i64, i64) {
    let row = client
        .query_one(
            "SELECT (SELECT count(*) FROM pgbus.archive), (SELECT count(*) FROM pgbus.event_dedup),
                    (SELECT count(*) FROM pgbus.events)",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1), row.get(2))
}

/// Inserts `n` rows into each of archive (queue `kept`), event_dedup and events, aged
/// `age` (a Postgres interval), numbered from `first`: archive ids, dedup message ids and
/// event `copies` carry the number, so the survivors can be named.
async fn insert(client: &Client, first: i64, n: i64, age: &str) {
    let last = first + n - 1;
    client
        .batch_execute(&format!(
            "INSERT INTO pgbus.archive (id, queue, priority, enqueued_at, attempts, content_type,
                                        headers, payload, acked_at)
             SELECT i, 'kept', 0, now() - interval '{age}', 1, 'application/json', '{{}}',
                    '1', now() - interval '{age}'
             FROM generate_series({first}, {last}) i;
             INSERT INTO pgbus.event_dedup (subscriber, event_id, state, message_id, attempt,
                                            updated_at)
             SELECT 'sub', gen_random_uuid(), 'completed', i, 1, now() - interval '{age}'
             FROM generate_series({first}, {last}) i;
             INSERT INTO pgbus.events (id, routing_key, content_type, headers, payload, copies,
                                       published_at)
             SELECT gen_random_uuid(), 'order.paid', 'application/json', '{{}}', '1', i,
                    now() - interval '{age}'
             FROM generate_series({first}, {last}) i;"
        ))
        .await
        .unwrap();
}

/// The numbers of the rows left in each table, sorted.
async fn survivors(client: &Client) -> [Vec<i64>; 3] {
    let mut all = [Vec::new(), Vec::new(), Vec::new()];
    for (list, query) in all.iter_mut().zip([
        "SELECT id FROM pgbus.archive ORDER BY 1",
        "SELECT message_id FROM pgbus.event_dedup ORDER BY 1",
        "SELECT copies::bigint FROM pgbus.events ORDER BY 1",
    ]) {
        *list = client
            .query(query, &[])
            .await
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
    }
    all
}

async fn history_queue(backend: &PgBackend) {
    let options = QueueOptions::default()
        .keep_history(true)
        .archive_retention(HOUR);
    backend
        .create_queue(&QueueName::new("kept").unwrap(), &options)
        .await
        .unwrap();
}

/// Polls until the tables hold `want` rows (archive, dedup, events), at most a minute.
async fn wait_for_counts(client: &Client, want: (i64, i64, i64)) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = counts(client).await;
        if now == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "pruning did not get to {want:?} rows; left: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn the_loop_prunes_past_retention_in_batches_keeps_fresh_rows_and_stops_when_cancelled() {
    let (backend, client) = backend().await;
    history_queue(&backend).await;
    insert(&client, 1, 9, "2 hours").await; // past every retention below
    insert(&client, 100, 3, "10 minutes").await; // within them
    assert_eq!(counts(&client).await, (12, 12, 12));

    let maintenance = Maintenance::builder(backend.clone())
        .dedup_retention(HOUR)
        .event_log_retention(HOUR)
        .interval(Duration::from_millis(50))
        .batch(2)
        .build()
        .unwrap();
    let stop = CancellationToken::new();
    let running = tokio::spawn(maintenance.run(stop.clone()));

    // Nine expired rows at two per statement: the pass goes on until a short batch.
    wait_for_counts(&client, (3, 3, 3)).await;
    let fresh = vec![100, 101, 102];
    assert_eq!(
        survivors(&client).await,
        [fresh.clone(), fresh.clone(), fresh.clone()]
    );

    // Rows that expire later go on a later pass.
    insert(&client, 200, 5, "3 hours").await;
    wait_for_counts(&client, (3, 3, 3)).await;
    assert_eq!(
        survivors(&client).await,
        [fresh.clone(), fresh.clone(), fresh]
    );

    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("run returns promptly once cancelled")
        .expect("the loop did not panic");
}

#[tokio::test]
async fn retention_is_per_table_and_the_archive_follows_each_queue() {
    let (backend, client) = backend().await;
    history_queue(&backend).await;
    insert(&client, 1, 4, "2 days").await;
    insert(&client, 10, 4, "2 hours").await;

    // Dedup records kept a day, the event log only 30 minutes; the queue keeps its archive
    // an hour.
    let maintenance = Maintenance::builder(backend.clone())
        .dedup_retention(24 * HOUR)
        .event_log_retention(HOUR / 2)
        .batch(3)
        .build()
        .unwrap();
    let pruned = maintenance.prune_once().await.unwrap();
    assert_eq!((pruned.archive, pruned.dedup, pruned.event_log), (8, 4, 8));
    let [archive, dedup, events] = survivors(&client).await;
    assert!(
        archive.is_empty() && events.is_empty(),
        "{archive:?} {events:?}"
    );
    assert_eq!(dedup, [10, 11, 12, 13]);
    assert_eq!(
        maintenance.prune_once().await.unwrap().archive,
        0,
        "nothing left to do"
    );
}

/// Several processes run the loop: concurrent passes share the rows (each pruned exactly
/// once) and none of them fails, blocks or deadlocks.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_passes_share_the_work_without_errors() {
    const EXPIRED: i64 = 600;
    let (backend, client) = backend().await;
    history_queue(&backend).await;
    insert(&client, 1, EXPIRED, "2 hours").await;
    insert(&client, 10_000, 5, "1 minute").await;

    let mut passes = Vec::new();
    for _ in 0..4 {
        // A backend each, as separate processes would have.
        let own = PgBackend::connect(backend.url()).unwrap();
        let maintenance = Maintenance::builder(own)
            .dedup_retention(HOUR)
            .event_log_retention(HOUR)
            .batch(7)
            .build()
            .unwrap();
        passes.push(tokio::spawn(async move { maintenance.prune_once().await }));
    }
    let (mut archive, mut dedup, mut event_log) = (0, 0, 0);
    for pass in passes {
        let pruned = tokio::time::timeout(Duration::from_secs(60), pass)
            .await
            .expect("no pass blocks")
            .unwrap()
            .expect("no pass fails");
        archive += pruned.archive;
        dedup += pruned.dedup;
        event_log += pruned.event_log;
    }
    let expired = EXPIRED as u64;
    assert_eq!((archive, dedup, event_log), (expired, expired, expired));
    assert_eq!(counts(&client).await, (5, 5, 5));
}

#[tokio::test]
async fn settings_are_checked() {
    let (backend, _client) = backend().await;
    let invalid = |builder: pgbus_pg::MaintenanceBuilder| {
        matches!(builder.build(), Err(Error::InvalidArgument(_)))
    };
    let builder = || Maintenance::builder(backend.clone());
    assert!(invalid(builder().batch(0)));
    assert!(invalid(builder().interval(Duration::ZERO)));
    assert!(invalid(builder().dedup_retention(Duration::ZERO)));
    assert!(invalid(builder().event_log_retention(Duration::MAX)));
    assert!(builder()
        .event_log_retention(Duration::ZERO)
        .build()
        .is_ok());
}
