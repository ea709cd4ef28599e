//! The outbox relay on Postgres: rows written in the producer's transaction, relayed on a
//! notification; a relay killed mid-batch (its connection terminated, or its task aborted)
//! leaves no row unpublished, and publishes each row exactly once from an outbox in its own
//! database (at least once from another database's); retention pruning.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use pgbus_core::{envelope, Consumer, NewEvent, QueueName, QueueOptions, StartAt, Topics};
use pgbus_pg::{connect, write_outbox, OutboxRelay, PgBackend, RelayStats};
use pgbus_tests::{connections, create, eventually, fresh_backend};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(60);

/// The lock publishers share and binds take exclusively (`sql::TOPICS_LOCK_KEY`): holding
/// it stops a relay in the middle of its batch, after it took its rows, before it publishes.
const TOPICS_LOCK_KEY: i64 = 0x7067_6275_7374_6f70;

async fn sink(backend: &PgBackend) -> QueueName {
    let q = create(backend, "sink", QueueOptions::default()).await;
    backend
        .bind(&"outbox.#".parse().unwrap(), &q, StartAt::Now)
        .await
        .unwrap();
    q
}

/// Event id to number of copies, over everything in the queue.
async fn copies(backend: &PgBackend, q: &QueueName) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    loop {
        let claimed = backend.claim(q, 1000, DEADLINE).await.unwrap();
        if claimed.is_empty() {
            return seen;
        }
        for m in &claimed {
            let (id, _, _) = envelope(&m.headers).unwrap();
            *seen.entry(id.to_string()).or_default() += 1;
        }
        let leases: Vec<_> = claimed.iter().map(|m| m.lease()).collect();
        backend.ack(&leases).await.unwrap();
    }
}

async fn outbox_ids(url: &str) -> BTreeSet<String> {
    let client = connect(url, "observer").await.unwrap();
    client
        .query("SELECT event_id::text FROM pgbus.outbox", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

fn start_relay(
    backend: &PgBackend,
    batch: usize,
) -> (
    Arc<RelayStats>,
    tokio::task::JoinHandle<pgbus_core::Result<()>>,
    CancellationToken,
) {
    let relay = OutboxRelay::builder(backend.clone())
        .batch(batch)
        // Wake-ups come from the insert trigger's notification, not from polling.
        .poll_interval(Duration::from_secs(600))
        .build()
        .unwrap();
    let stats = relay.stats();
    let stop = CancellationToken::new();
    (stats, tokio::spawn(relay.run(stop.clone())), stop)
}

async fn insert_rows(url: &str, from: i32, to: i32) {
    let client = connect(url, "producer").await.unwrap();
    client
        .execute(
            "INSERT INTO pgbus.outbox (routing_key, payload)
             SELECT 'outbox.' || i, convert_to(i::text, 'UTF8') FROM generate_series($1::int, $2::int) i",
            &[&from, &to],
        )
        .await
        .unwrap();
}

/// Holds the topics lock on its own connection until committed.
async fn block_publishes(url: &str) -> tokio_postgres::Client {
    let blocker = connect(url, "blocker").await.unwrap();
    blocker.batch_execute("BEGIN").await.unwrap();
    blocker
        .execute("SELECT pg_advisory_xact_lock($1)", &[&TOPICS_LOCK_KEY])
        .await
        .unwrap();
    blocker
}

/// Waits until a pgbus connection of `url`'s database waits on a lock: the relay's
/// publish, on its own connection (`pgbus:relay`, an outbox in the same database) or
/// through the pool (`pgbus:pool`, an outbox in another database).
async fn wait_for_a_blocked_publish(url: &str) {
    let observer = connect(url, "observer").await.unwrap();
    eventually(
        "the relay's publish waits on the lock",
        DEADLINE,
        || async {
            let n: i64 = observer
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database()
                   AND application_name IN ('pgbus:relay', 'pgbus:pool')
                   AND wait_event_type = 'Lock'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            n > 0
        },
    )
    .await;
}

async fn terminate_relays(url: &str) {
    let observer = connect(url, "observer").await.unwrap();
    observer
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = 'pgbus:relay'",
            &[],
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_written_in_the_producers_transaction_are_relayed_on_commit_only() {
    let (backend, url) = fresh_backend(4).await;
    let q = sink(&backend).await;
    let (stats, relay, stop) = start_relay(&backend, 100);
    eventually("the relay connected", DEADLINE, || async {
        stats.connections() == 1
    })
    .await;
    assert_eq!(connections(&url, "relay").await, 1);

    let mut producer = connect(&url, "producer").await.unwrap();
    let tx = producer.transaction().await.unwrap();
    write_outbox(&tx, vec![NewEvent::json("outbox.rolled_back", &1).unwrap()])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    let tx = producer.transaction().await.unwrap();
    let events: Vec<_> = (0..3)
        .map(|i| NewEvent::json("outbox.order", &i).unwrap())
        .collect();
    let mut ids: BTreeSet<String> = events.iter().map(|e| e.id.to_string()).collect();
    write_outbox(&tx, events).await.unwrap();
    // A header that is not a string, as plain SQL may write: published with the value as
    // its JSON text (reading it once panicked the relay, on every batch).
    let numeric: String = tx
        .query_one(
            "INSERT INTO pgbus.outbox (routing_key, headers, payload)
             VALUES ('outbox.numeric', '{\"attempt\": 2}', '\\x31')
             RETURNING event_id::text",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    ids.insert(numeric);
    // A row no relay can publish (a reserved header name), written behind pgbus's back.
    tx.execute(
        "INSERT INTO pgbus.outbox (routing_key, headers, payload)
         VALUES ('outbox.bad', '{\"pgbus-event-id\": \"x\"}', '\\x31')",
        &[],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();

    eventually("the rows are relayed", DEADLINE, || async {
        backend.outbox_pending().await.unwrap() == 0 && stats.failed() == 1
    })
    .await;
    let delivered = copies(&backend, &q).await;
    assert_eq!(delivered.keys().cloned().collect::<BTreeSet<_>>(), ids);
    assert!(delivered.values().all(|n| *n == 1));
    let client = connect(&url, "observer").await.unwrap();
    let error: String = client
        .query_one(
            "SELECT error FROM pgbus.outbox WHERE routing_key = 'outbox.bad'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(error.contains("reserved"), "{error}");

    // Published rows past the retention are pruned by the relay.
    client
        .batch_execute("UPDATE pgbus.outbox SET published_at = now() - interval '2 days' WHERE published_at IS NOT NULL")
        .await
        .unwrap();
    stop.cancel();
    relay.await.unwrap().unwrap();
    let relay = OutboxRelay::builder(backend.clone())
        .batch(2)
        .retention(Duration::from_secs(3600))
        .build()
        .unwrap();
    let stats = relay.stats();
    let stop = CancellationToken::new();
    let running = tokio::spawn(relay.run(stop.clone()));
    eventually("the published rows are pruned", DEADLINE, || async {
        stats.pruned() == 4
    })
    .await;
    stop.cancel();
    running.await.unwrap().unwrap();
    assert_eq!(
        outbox_ids(&url).await.len(),
        1,
        "only the failed row is left"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_killed_mid_batch_publishes_each_row_exactly_once() {
    let (backend, url) = fresh_backend(4).await;
    let q = sink(&backend).await;
    insert_rows(&url, 1, 200).await;

    // 1. The relay's connection is terminated while its batch is published: the publish
    //    is part of the batch's transaction and is rolled back with it.
    let blocker = block_publishes(&url).await;
    let (stats, relay, stop) = start_relay(&backend, 50);
    wait_for_a_blocked_publish(&url).await;
    terminate_relays(&url).await;
    blocker.batch_execute("COMMIT").await.unwrap();
    eventually(
        "the relay reconnected and drained the outbox",
        DEADLINE,
        || async { backend.outbox_pending().await.unwrap() == 0 },
    )
    .await;
    assert!(stats.connections() >= 2, "the relay reconnected by itself");

    // 2. The relay's task is aborted in the middle of a batch (as a process dies): its
    //    server session finishes the publish, finds its client gone and rolls back; then
    //    another relay takes over.
    let blocker = block_publishes(&url).await;
    insert_rows(&url, 201, 300).await;
    wait_for_a_blocked_publish(&url).await;
    relay.abort();
    let _ = relay.await;
    drop(stop);
    blocker.batch_execute("COMMIT").await.unwrap();
    eventually("the aborted relay's session ended", DEADLINE, || async {
        connections(&url, "relay").await == 0
    })
    .await;
    let (_, relay, stop) = start_relay(&backend, 50);
    eventually("the new relay drained the outbox", DEADLINE, || async {
        backend.outbox_pending().await.unwrap() == 0
    })
    .await;
    stop.cancel();
    relay.await.unwrap().unwrap();

    let delivered = copies(&backend, &q).await;
    let all = outbox_ids(&url).await;
    assert_eq!(all.len(), 300);
    assert_eq!(
        delivered.keys().cloned().collect::<BTreeSet<_>>(),
        all,
        "every row delivered"
    );
    let repeated: Vec<_> = delivered.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        repeated.is_empty(),
        "{} rows published more than once, e.g. {:?}",
        repeated.len(),
        repeated.first()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_in_another_database_is_relayed_at_least_once() {
    let (backend, url) = fresh_backend(4).await;
    let (_, outbox_url) = fresh_backend(1).await;
    let q = sink(&backend).await;
    insert_rows(&outbox_url, 1, 100).await;

    // The relay's connection (to the outbox's database) is terminated while its batch is
    // published through the pool: the publish commits, the marking is lost, and the
    // reconnected relay publishes the batch again.
    let blocker = block_publishes(&url).await;
    let relay = OutboxRelay::builder(backend.clone())
        .source_url(&outbox_url)
        .batch(50)
        .poll_interval(Duration::from_secs(600))
        .build()
        .unwrap();
    let stop = CancellationToken::new();
    let running = tokio::spawn(relay.run(stop.clone()));
    wait_for_a_blocked_publish(&url).await;
    terminate_relays(&outbox_url).await;
    blocker.batch_execute("COMMIT").await.unwrap();
    let outbox = connect(&outbox_url, "observer").await.unwrap();
    eventually("the relay drained the outbox", DEADLINE, || async {
        let pending: i64 = outbox
            .query_one(
                "SELECT count(*) FROM pgbus.outbox WHERE published_at IS NULL",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        pending == 0
    })
    .await;
    stop.cancel();
    running.await.unwrap().unwrap();

    let delivered = copies(&backend, &q).await;
    assert_eq!(
        delivered.keys().cloned().collect::<BTreeSet<_>>(),
        outbox_ids(&outbox_url).await,
        "every row delivered"
    );
    let repeated = delivered.values().filter(|n| **n > 1).count();
    assert_eq!(repeated, 50, "the interrupted batch was published again");
}

#[tokio::test]
async fn relay_settings_are_checked() {
    let (backend, url) = fresh_backend(1).await;
    let invalid = |builder: pgbus_pg::OutboxRelayBuilder| {
        matches!(builder.build(), Err(pgbus_core::Error::InvalidArgument(_)))
    };
    let builder = || OutboxRelay::builder(backend.clone());
    assert!(invalid(builder().batch(0)));
    assert!(invalid(builder().poll_interval(Duration::ZERO)));
    assert!(
        invalid(builder().source_url(&url).direct_url(&url)),
        "another database's outbox, or this one's reached directly: not both"
    );
    assert!(builder().source_url(&url).build().is_ok());
    assert!(builder().direct_url(&url).build().is_ok());
}
