//! Statements over many rows (the worker's batch ack, a dead-letter retry or discard, a
//! queue purge, the delete of a dropped or truncated queue's messages) lock them in id
//! order, as the console's actions do, so that any two of them on overlapping
//! rows queue behind each other instead of deadlocking. Checked deterministically: rows
//! whose physical (and `failed_at`, or claim index) order is the reverse of their ids', the
//! higher id held by another transaction; while the statement waits for it, it must
//! already hold the lower one.

use std::time::Duration;

use pgbus_core::{
    Consumer, DeadLetters, GroupRecovery, NewMessage, OpenGroupSession, Producer, QueueAdmin,
    QueueOptions, Selection,
};
use pgbus_pg::{connect, GroupLocks, PgBackend};
use pgbus_tests::{create, eventually, fresh_backend};
use tokio_postgres::Client;

const DEADLINE: Duration = Duration::from_secs(30);
const LONG: Duration = Duration::from_secs(600);

/// Whether this database's `pgbus:<role>` connections include one waiting for a lock.
async fn waits_for_a_lock(observer: &Client) -> bool {
    observer
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name LIKE 'pgbus:%'
               AND application_name <> 'pgbus:holder' AND wait_event_type = 'Lock'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
        > 0
}

/// Holds row `high` of `table` in a transaction, runs `statement` (which must reach both
/// rows), and checks that row `low` is locked while the statement waits for `high`.
async fn holds_the_lower_id_while_waiting<F>(
    url: &str,
    table: &str,
    (low, high): (i64, i64),
    statement: F,
) where
    F: std::future::Future<Output = u64> + Send + 'static,
{
    let mut holder = connect(url, "holder").await.unwrap();
    let observer = connect(url, "observer").await.unwrap();
    let tx = holder.transaction().await.unwrap();
    tx.execute(
        &format!("SELECT 1 FROM {table} WHERE id = $1 FOR UPDATE"),
        &[&high],
    )
    .await
    .unwrap();
    let running = tokio::spawn(statement);
    eventually("the statement waits for the held row", DEADLINE, || async {
        waits_for_a_lock(&observer).await
    })
    .await;
    let probe = observer
        .execute(
            &format!("SELECT 1 FROM {table} WHERE id = $1 FOR UPDATE NOWAIT"),
            &[&low],
        )
        .await;
    let code = probe.as_ref().err().and_then(|e| e.code().cloned());
    assert_eq!(
        code,
        Some(tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE),
        "the lower id was not locked first: {probe:?}"
    );
    tx.rollback().await.unwrap();
    assert_eq!(running.await.unwrap(), 2, "both rows were acted on");
}

/// Two dead letters of queue `name`; the lower id's row rewritten, so it now lies after
/// the higher one in the table and failed after it.
async fn two_dead_letters(backend: &PgBackend, url: &str, name: &str) -> (i64, i64) {
    let q = create(backend, name, QueueOptions::default()).await;
    backend
        .send_batch(&q, vec![NewMessage::json(&1).unwrap(); 2])
        .await
        .unwrap();
    let claimed = backend.claim(&q, 2, LONG).await.unwrap();
    for m in &claimed {
        assert!(backend.dead_letter(&m.lease(), "test").await.unwrap());
    }
    let (low, high) = (
        claimed[0].id.0.min(claimed[1].id.0),
        claimed[0].id.0.max(claimed[1].id.0),
    );
    let client = connect(url, "setup").await.unwrap();
    client
        .execute(
            "UPDATE pgbus.dead_letters SET failed_at = now() + interval '1 minute' WHERE id = $1",
            &[&low],
        )
        .await
        .unwrap();
    (low, high)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_retry_locks_in_id_order() {
    let (backend, url) = fresh_backend(4).await;
    let ids = two_dead_letters(&backend, &url, "retried").await;
    let q = pgbus_core::QueueName::new("retried").unwrap();
    holds_the_lower_id_while_waiting(&url, "pgbus.dead_letters", ids, async move {
        backend.retry_dead(&q, Selection::All).await.unwrap()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_discard_locks_in_id_order() {
    let (backend, url) = fresh_backend(4).await;
    let ids = two_dead_letters(&backend, &url, "discarded").await;
    let q = pgbus_core::QueueName::new("discarded").unwrap();
    holds_the_lower_id_while_waiting(&url, "pgbus.dead_letters", ids, async move {
        backend.discard_dead(&q, Selection::All).await.unwrap()
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_purge_locks_in_id_order() {
    let (backend, url) = fresh_backend(4).await;
    let ids = two_messages(&backend, &url, "purged").await;
    let q = pgbus_core::QueueName::new("purged").unwrap();
    holds_the_lower_id_while_waiting(&url, "pgbus.messages", ids, async move {
        backend.purge_queue(&q).await.unwrap()
    })
    .await;
}

/// Queue `name` with two messages; the lower id's row rewritten with a later `visible_at`,
/// so it now lies after the higher one in the table and in the claim index (whichever a
/// delete by queue would read). Returns the ids, lower first.
async fn two_messages(backend: &PgBackend, url: &str, name: &str) -> (i64, i64) {
    let q = create(backend, name, QueueOptions::default()).await;
    backend
        .send_batch(&q, vec![NewMessage::json(&1).unwrap(); 2])
        .await
        .unwrap();
    lower_id_rewritten(&connect(url, "setup").await.unwrap(), name).await
}

/// Rewrites the lower id of queue `name`'s two messages with a later `visible_at`, so it
/// now lies after the higher one in the table and in the claim index. Returns the ids,
/// lower first.
async fn lower_id_rewritten(client: &Client, name: &str) -> (i64, i64) {
    let ids: Vec<i64> = client
        .query(
            "SELECT id FROM pgbus.messages WHERE queue = $1 ORDER BY id",
            &[&name],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    client
        .execute(
            "UPDATE pgbus.messages SET visible_at = visible_at + interval '1 second'
             WHERE id = $1",
            &[&ids[0]],
        )
        .await
        .unwrap();
    (ids[0], ids[1])
}

/// The batch ack deletes without locking first (migration 23), in the primary key's order
/// whatever the planner's statistics: here a table of one page, where a plain delete by id
/// reads the heap, in which the lower id lies after the higher one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ack_locks_in_id_order() {
    let (backend, url) = fresh_backend(4).await;
    let ids = two_messages(&backend, &url, "acked").await;
    // Visible again for the claim: rewritten once more, the lower id stays after the higher.
    connect(&url, "setup")
        .await
        .unwrap()
        .execute(
            "UPDATE pgbus.messages SET visible_at = now() - interval '1 second' WHERE id = $1",
            &[&ids.0],
        )
        .await
        .unwrap();
    let q = pgbus_core::QueueName::new("acked").unwrap();
    let leases: Vec<_> = backend
        .claim(&q, 2, LONG)
        .await
        .unwrap()
        .iter()
        .map(|m| m.lease())
        .collect();
    assert_eq!(leases.len(), 2, "both messages claimed");
    holds_the_lower_id_while_waiting(&url, "pgbus.messages", ids, async move {
        backend.ack(&leases).await.unwrap()
    })
    .await;
}

/// How many of the two messages of `ids` are gone.
async fn deleted(client: &Client, (low, high): (i64, i64)) -> u64 {
    let left: i64 = client
        .query_one(
            "SELECT count(*) FROM pgbus.messages WHERE id = ANY ($1)",
            &[&vec![low, high]],
        )
        .await
        .unwrap()
        .get(0);
    2 - left.unsigned_abs()
}

/// The queue drop's messages are deleted by a statement trigger on `pgbus.queues`
/// (migration 19; id order since migration 22).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_drop_locks_in_id_order() {
    let (backend, url) = fresh_backend(4).await;
    let ids = two_messages(&backend, &url, "dropped").await;
    let q = pgbus_core::QueueName::new("dropped").unwrap();
    let client = connect(&url, "check").await.unwrap();
    holds_the_lower_id_while_waiting(&url, "pgbus.messages", ids, async move {
        assert!(
            backend.drop_queue(&q).await.unwrap(),
            "the queue was dropped"
        );
        deleted(&client, ids).await
    })
    .await;
}

/// `TRUNCATE pgbus.queues CASCADE` empties the hot table by a trigger of its own
/// (migration 21; id order since migration 22).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_truncate_locks_in_id_order() {
    let (backend, url) = fresh_backend(4).await;
    let ids = two_messages(&backend, &url, "truncated").await;
    let operator = connect(&url, "operator").await.unwrap();
    holds_the_lower_id_while_waiting(&url, "pgbus.messages", ids, async move {
        operator
            .batch_execute("TRUNCATE pgbus.queues CASCADE")
            .await
            .unwrap();
        deleted(&operator, ids).await
    })
    .await;
}

/// Two grouped messages of a new queue `name` claimed by an owner that died (no lock or
/// lease holds their group), the lower id's row rewritten so it lies after the higher one
/// in the table, and the database's index scans off so that recovery's connections read
/// the table in that order, as they would a big table (a sequential or bitmap scan), not
/// through an index in id order. Returns the queue and the ids, lower first.
async fn two_orphaned_grouped_claims(
    backend: &PgBackend,
    url: &str,
    name: &str,
) -> (pgbus_core::QueueName, (i64, i64)) {
    let q = create(backend, name, QueueOptions::default()).await;
    backend
        .send_batch(&q, vec![NewMessage::json(&1).unwrap().group("g"); 2])
        .await
        .unwrap();
    let setup = connect(url, "setup").await.unwrap();
    setup
        .execute(
            "UPDATE pgbus.messages SET attempts = 1, lease_until = now() + interval '1 hour'
             WHERE queue = $1",
            &[&name],
        )
        .await
        .unwrap();
    let ids = lower_id_rewritten(&setup, name).await;
    let database: String = setup
        .query_one("SELECT current_database()", &[])
        .await
        .unwrap()
        .get(0);
    setup
        .batch_execute(&format!(
            "ALTER DATABASE \"{database}\" SET enable_indexscan = off;
             ALTER DATABASE \"{database}\" SET enable_indexonlyscan = off"
        ))
        .await
        .unwrap();
    (q, ids)
}

/// Recovery frees a dead owner's grouped claims in id order too, as the give-back of a
/// failed group session's run (`settle_orphans`) locks the same rows: in plan order the two
/// could deadlock, and a give-back chosen as the victim left its messages to be freed with
/// their claim's attempt counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_recovery_locks_in_id_order() {
    let (backend, url) = fresh_backend(4).await;
    let (q, ids) = two_orphaned_grouped_claims(&backend, &url, "orphaned").await;
    let mut recovery = backend.open_group_recovery().await.unwrap();
    let queues = [q];
    // The first pass sees the orphaned claims; the next frees them (no grace).
    let seen = recovery.recover(&queues, Duration::ZERO).await.unwrap();
    assert_eq!(
        (seen.freed, seen.waiting),
        (0, 2),
        "both claims seen orphaned"
    );
    holds_the_lower_id_while_waiting(&url, "pgbus.messages", ids, async move {
        recovery
            .recover(&queues, Duration::ZERO)
            .await
            .unwrap()
            .freed
    })
    .await;
}

/// Lease-mode recovery (no grace: an expired lease is one) locks in id order too; it runs
/// beside advisory-mode recovery while a queue's workers switch modes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_mode_group_recovery_locks_in_id_order() {
    let (backend, url) = fresh_backend(4).await;
    let (q, ids) = two_orphaned_grouped_claims(&backend, &url, "orphaned").await;
    let leases = PgBackend::builder(&url)
        .group_locks(GroupLocks::Lease {
            ttl: Duration::from_secs(30),
        })
        .build()
        .unwrap();
    let mut recovery = leases.open_group_recovery().await.unwrap();
    holds_the_lower_id_while_waiting(&url, "pgbus.messages", ids, async move {
        recovery.recover(&[q], Duration::ZERO).await.unwrap().freed
    })
    .await;
}
