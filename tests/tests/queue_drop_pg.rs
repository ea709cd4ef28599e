//! A queue drop racing sends (migration 19: the hot table checks its queue once per
//! statement, locking the queue row, instead of a foreign key per row): whichever comes
//! first, no message outlives its queue, and a send that loses the race fails as a send to
//! a missing queue always has.

use std::time::Duration;

use pgbus_core::{Error, NewMessage, Producer, QueueAdmin, QueueOptions};
use pgbus_pg::connect;
use pgbus_tests::{create, eventually, fresh_backend};
use tokio_postgres::Client;

const DEADLINE: Duration = Duration::from_secs(30);

/// How many of this database's `pgbus:<role>` connections wait for a lock, running a
/// statement that starts with `statement`.
async fn waiting(observer: &Client, role: &str, statement: &str) -> i64 {
    observer
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = $1
               AND wait_event_type = 'Lock' AND ltrim(query) LIKE $2 || '%'",
            &[&format!("pgbus:{role}"), &statement],
        )
        .await
        .unwrap()
        .get(0)
}

async fn stored(observer: &Client, queue: &str) -> i64 {
    observer
        .query_one(
            "SELECT count(*) FROM pgbus.messages WHERE queue = $1",
            &[&queue],
        )
        .await
        .unwrap()
        .get(0)
}

fn jobs(n: u32) -> Vec<NewMessage> {
    (0..n).map(|i| NewMessage::encode(&i).unwrap()).collect()
}

/// A drop that comes while a send's transaction is open waits for it to commit, then
/// deletes what it sent.
#[tokio::test]
async fn a_drop_waits_for_an_open_send_and_deletes_its_messages() {
    let (backend, url) = fresh_backend(4).await;
    let q = create(&backend, "racing", QueueOptions::default()).await;
    let kept = create(&backend, "kept", QueueOptions::default()).await;
    backend.send(&kept, jobs(1).remove(0)).await.unwrap();
    let observer = connect(&url, "observer").await.unwrap();
    let mut sender = connect(&url, "sender").await.unwrap();

    let tx = sender.transaction().await.unwrap();
    backend.send_batch_in(&tx, &q, jobs(10)).await.unwrap();
    let drop = tokio::spawn({
        let (backend, q) = (backend.clone(), q.clone());
        async move { backend.drop_queue(&q).await }
    });
    eventually("the drop waits for the send's lock", DEADLINE, || async {
        waiting(&observer, "pool", "DELETE FROM pgbus.queues").await == 1
    })
    .await;
    assert!(!drop.is_finished(), "the drop waits for the send");
    tx.commit().await.unwrap();

    assert!(drop.await.unwrap().unwrap(), "the queue was dropped");
    assert_eq!(
        stored(&observer, "racing").await,
        0,
        "no message outlived its queue"
    );
    assert_eq!(stored(&observer, "kept").await, 1, "other queues untouched");
    let err = backend.send(&q, jobs(1).remove(0)).await.unwrap_err();
    assert!(matches!(err, Error::QueueNotFound(_)), "{err:?}");
}

/// A queue row deleted by hand, outside pgbus, takes its messages with it, as the foreign
/// key's cascade did.
#[tokio::test]
async fn a_queue_row_deleted_by_hand_takes_its_messages() {
    let (backend, url) = fresh_backend(4).await;
    let q = create(&backend, "by_hand", QueueOptions::default()).await;
    let kept = create(&backend, "kept", QueueOptions::default()).await;
    backend.send_batch(&q, jobs(3)).await.unwrap();
    backend.send(&kept, jobs(1).remove(0)).await.unwrap();
    let operator = connect(&url, "operator").await.unwrap();
    operator
        .execute("DELETE FROM pgbus.queues WHERE name = 'by_hand'", &[])
        .await
        .unwrap();
    assert_eq!(stored(&operator, "by_hand").await, 0, "its messages went");
    assert_eq!(stored(&operator, "kept").await, 1, "other queues untouched");
}

/// Migration 21: a delete by hand under repeatable read is refused (its cascade would read
/// an old snapshot and miss the messages of a send that committed while it waited), and
/// `TRUNCATE pgbus.queues CASCADE` empties the hot table too (it has no foreign key to
/// cascade through).
#[tokio::test]
async fn no_delete_by_hand_leaves_messages_without_their_queue() {
    let (backend, url) = fresh_backend(4).await;
    let q = create(&backend, "by_hand", QueueOptions::default()).await;
    backend.send_batch(&q, jobs(3)).await.unwrap();
    let mut operator = connect(&url, "operator").await.unwrap();
    let tx = operator
        .build_transaction()
        .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
        .start()
        .await
        .unwrap();
    let err = tx
        .execute("DELETE FROM pgbus.queues WHERE name = 'by_hand'", &[])
        .await
        .unwrap_err();
    let message = err.as_db_error().map(|e| e.message().to_owned());
    assert!(
        message
            .as_deref()
            .is_some_and(|m| m.contains("read committed")),
        "{err:?}"
    );
    drop(tx);
    assert_eq!(stored(&operator, "by_hand").await, 3, "nothing was deleted");

    operator
        .batch_execute("TRUNCATE pgbus.queues CASCADE")
        .await
        .unwrap();
    let left: i64 = operator
        .query_one("SELECT count(*) FROM pgbus.messages", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0, "the truncate took the messages");
}

/// Sends that reach a queue whose drop is under way wait for it; once it commits they
/// fail as sends to a missing queue, the bulk `COPY` as the one-statement send, and store
/// nothing.
#[tokio::test]
async fn sends_behind_an_uncommitted_drop_fail_as_sends_to_a_missing_queue() {
    let (backend, url) = fresh_backend(4).await;
    let q = create(&backend, "dropping", QueueOptions::default()).await;
    let observer = connect(&url, "observer").await.unwrap();
    let mut dropper = connect(&url, "dropper").await.unwrap();

    let tx = dropper.transaction().await.unwrap();
    tx.execute("DELETE FROM pgbus.queues WHERE name = 'dropping'", &[])
        .await
        .unwrap();
    // 1,500 messages go by `COPY` (pooled batches of 1,000 or more), one by the
    // one-statement send.
    let sends: Vec<_> = [1_500, 1]
        .into_iter()
        .map(|n| {
            let (backend, q) = (backend.clone(), q.clone());
            tokio::spawn(async move { backend.send_batch(&q, jobs(n)).await })
        })
        .collect();
    eventually("both sends wait for the drop", DEADLINE, || async {
        waiting(&observer, "pool", "").await == 2
    })
    .await;
    tx.commit().await.unwrap();

    for send in sends {
        let err = send.await.unwrap().unwrap_err();
        assert!(matches!(err, Error::QueueNotFound(_)), "{err:?}");
    }
    assert_eq!(stored(&observer, "dropping").await, 0, "nothing stored");
}
