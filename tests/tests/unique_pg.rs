//! Unique jobs on PostgreSQL: concurrent bulk sends of the same keys store each key once;
//! refused and ignored duplicates; keys released by ack, dead-letter and discard; a
//! crashed delivery leaves no key behind.

use std::collections::BTreeSet;
use std::time::Duration;

use pgbus_core::{Consumer, Error, NewMessage, OnConflict, Producer, QueueOptions, Unique};
use pgbus_exec::{JobContext, Outcome, Worker};
use pgbus_pg::{connect, PgBackend};
use pgbus_tests::{create, fresh_backend, stats_of, wait_until_empty};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(60);

fn keyed(n: u32, on_conflict: OnConflict) -> NewMessage {
    NewMessage::encode(&n)
        .unwrap()
        .unique(Unique::new(format!("key-{n}")).on_conflict(on_conflict))
}

async fn keys_held(url: &str) -> i64 {
    connect(url, "observer")
        .await
        .unwrap()
        .query_one(
            "SELECT count(*) FROM pgbus.messages WHERE unique_key IS NOT NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_concurrent_bulk_sends_of_the_same_thousand_keys_store_a_thousand_jobs() {
    const KEYS: u32 = 1_000;
    let (backend, url) = fresh_backend(10).await;
    let q = create(&backend, "unique_bulk", QueueOptions::default()).await;
    let mut sends = Vec::new();
    for sender in 0..8 {
        let (backend, q) = (backend.clone(), q.clone());
        sends.push(tokio::spawn(async move {
            // Half the senders go backwards, so their key orders cross.
            let mut order: Vec<u32> = (0..KEYS).collect();
            if sender % 2 == 1 {
                order.reverse();
            }
            let messages = order
                .iter()
                .map(|&n| keyed(n, OnConflict::ReturnExisting))
                .collect();
            let ids = backend.send_batch(&q, messages).await.unwrap();
            let mut by_key: Vec<_> = order.into_iter().zip(ids).collect();
            by_key.sort();
            by_key
        }));
    }
    let mut results = Vec::new();
    for send in sends {
        results.push(send.await.unwrap());
    }
    assert_eq!(stats_of(&backend, &q).await.ready, u64::from(KEYS));
    assert_eq!(keys_held(&url).await, i64::from(KEYS));
    for other in &results[1..] {
        assert_eq!(
            other, &results[0],
            "every sender got the stored job's id for each key"
        );
    }
    let distinct: BTreeSet<_> = results[0].iter().map(|(_, id)| *id).collect();
    assert_eq!(distinct.len(), KEYS as usize);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_refusing_sends_store_one_and_refuse_the_rest() {
    let (backend, _url) = fresh_backend(10).await;
    let q = create(&backend, "unique_reject", QueueOptions::default()).await;
    let mut sends = Vec::new();
    for _ in 0..8 {
        let (backend, q) = (backend.clone(), q.clone());
        sends.push(tokio::spawn(async move {
            backend.send(&q, keyed(1, OnConflict::Reject)).await
        }));
    }
    let mut stored = Vec::new();
    let mut refused = Vec::new();
    for send in sends {
        match send.await.unwrap() {
            Ok(id) => stored.push(id),
            Err(Error::DuplicateJob { key, existing, .. }) => {
                assert_eq!(key, "key-1");
                refused.push(existing);
            }
            Err(other) => panic!("unexpected error: {other}"),
        }
    }
    assert_eq!(stored.len(), 1, "exactly one send stored the job");
    assert_eq!(
        refused,
        vec![Some(stored[0]); 7],
        "the rest name the stored job"
    );
    // A refused batch stores nothing, also its keyless messages.
    let err = backend
        .send_batch(
            &q,
            vec![
                NewMessage::encode(&2u32).unwrap(),
                keyed(1, OnConflict::Reject),
            ],
        )
        .await
        .unwrap_err();
    assert!(matches!(err, Error::DuplicateJob { .. }), "{err}");
    assert_eq!(stats_of(&backend, &q).await.depth(), 1);
}

/// Ack, dead-letter and discard release the key; a delivery abandoned by a crashed worker
/// keeps it until the job is delivered again and finishes, and then nothing is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_are_released_by_every_way_out_and_never_leak() {
    let (backend, url) = fresh_backend(10).await;
    let q = create(&backend, "unique_release", QueueOptions::default()).await;
    // 0: acked, 1: dead-lettered, 2: discarded, 3: abandoned by a "crashed" worker first.
    for n in 0..4 {
        backend
            .send(&q, keyed(n, OnConflict::Reject))
            .await
            .unwrap();
    }
    let abandoned = backend
        .claim(&q, 4, Duration::from_millis(300))
        .await
        .unwrap();
    assert_eq!(abandoned.len(), 4, "claimed, then never settled");
    for n in 0..4 {
        let err = backend.send(&q, keyed(n, OnConflict::Reject)).await;
        assert!(
            matches!(err, Err(Error::DuplicateJob { .. })),
            "key {n} held"
        );
    }
    let stop = CancellationToken::new();
    let worker = Worker::builder(backend.clone())
        .concurrency(4)
        .poll_interval(Duration::from_millis(50))
        .handle(
            q.clone(),
            |_ctx: JobContext<PgBackend>, n: u32| async move {
                match n {
                    1 => Outcome::dead_letter("permanent"),
                    2 => Outcome::Discard,
                    _ => Outcome::Ack,
                }
            },
        )
        .build()
        .unwrap();
    let run = tokio::spawn(worker.run(stop.clone()));
    // The leases run out and the worker finishes every job.
    wait_until_empty(&backend, &q, DEADLINE).await;
    stop.cancel();
    run.await.unwrap().unwrap();
    assert_eq!(keys_held(&url).await, 0, "no key left behind");
    for n in 0..4 {
        backend
            .send(&q, keyed(n, OnConflict::Reject))
            .await
            .unwrap();
    }
}

/// A refused duplicate returns only once its statement has rolled back: the statement
/// locks the existing job to name it, and a worker claiming right after the refusal (here
/// another process's backend) must find that job rather than skip it as locked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_refused_duplicate_leaves_the_existing_job_claimable_at_once() {
    const ROUNDS: usize = 300;
    let (sender, url) = fresh_backend(2).await;
    let worker = PgBackend::builder(&url).max_connections(2).build().unwrap();
    let q = create(&sender, "unique_refused_claim", QueueOptions::default()).await;
    let existing = sender.send(&q, keyed(1, OnConflict::Reject)).await.unwrap();
    for round in 0..ROUNDS {
        let err = sender
            .send(&q, keyed(1, OnConflict::Reject))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::DuplicateJob { .. }), "{err}");
        let claimed = worker.claim(&q, 1, DEADLINE).await.unwrap();
        assert_eq!(
            claimed.iter().map(|m| m.id).collect::<Vec<_>>(),
            [existing],
            "round {round}: the claim right after the refusal found the existing job"
        );
        assert_eq!(worker.release(&[claimed[0].lease()]).await.unwrap(), 1);
    }
}
