//! Ordered groups in lease mode: row leases with an owner token and expiry, every write
//! fenced by the token.

use std::time::{Duration, Instant, SystemTime};

use pgbus_core::{
    GroupNext, GroupRecovery, GroupSession, GroupSettle, Message, NewMessage, OpenGroupSession,
    Producer, QueueAdmin, QueueName, QueueOptions, Stats,
};
use pgbus_pg::{connect, test_database, GroupLocks, PgBackend};
use tokio_postgres::Client;

const LONG: Duration = Duration::from_secs(600);
const DEADLINE: Duration = Duration::from_secs(10);

async fn lease_backend(ttl: Duration) -> (PgBackend, QueueName) {
    let db = test_database().await;
    let backend = PgBackend::builder(db.url())
        .group_locks(GroupLocks::Lease { ttl })
        .build()
        .unwrap();
    backend.migrate().await.unwrap();
    let queue = QueueName::new("leased").unwrap();
    backend
        .create_queue(&queue, &QueueOptions::default())
        .await
        .unwrap();
    (backend, queue)
}

/// Sends the numbers of `numbers` to group `g`, in order.
async fn send_to_g(backend: &PgBackend, q: &QueueName, numbers: std::ops::Range<u32>) {
    for n in numbers {
        backend
            .send(q, NewMessage::encode(&n).unwrap().group("g"))
            .await
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_lease_has_one_owner_until_released() {
    let (backend, q) = lease_backend(LONG).await;
    send_to_g(&backend, &q, 0..2).await;
    let mut a = backend.open_group_session().await.unwrap();
    let mut b = backend.open_group_session().await.unwrap();
    assert!(a.try_lock(&q, "g").await.unwrap());
    assert!(
        !b.try_lock(&q, "g").await.unwrap(),
        "a live lease is exclusive"
    );
    let head = one(a.claim(&q, "g", LONG, 1).await.unwrap());
    assert_eq!(a.extend(&[head.lease()], LONG).await.unwrap().extended, 1);
    let acked = a
        .settle(&GroupSettle::default().ack([head.lease()]), GroupNext::Keep)
        .await
        .unwrap()
        .acked;
    assert_eq!(acked, [head.id]);
    a.unlock(&q, "g").await.unwrap();
    assert!(
        b.try_lock(&q, "g").await.unwrap(),
        "released: the next owner takes it"
    );
    let next = one(b.claim(&q, "g", LONG, 10).await.unwrap());
    assert_eq!(next.decode::<u32>().unwrap(), 1);
    // Unlike a session advisory lock, a lease survives its owner's connection.
    drop(b);
    assert!(
        !a.try_lock(&q, "g").await.unwrap(),
        "the lease outlives the connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_owner_cannot_write_and_its_work_is_recovered() {
    let ttl = Duration::from_millis(300);
    let (backend, q) = lease_backend(ttl).await;
    send_to_g(&backend, &q, 7..8).await;
    let mut stale = backend.open_group_session().await.unwrap();
    assert!(stale.try_lock(&q, "g").await.unwrap());
    let head = one(stale.claim(&q, "g", LONG, 10).await.unwrap());

    // The owner stalls past its lease; another session takes the group over.
    let mut next = backend.open_group_session().await.unwrap();
    let start = Instant::now();
    while !next.try_lock(&q, "g").await.unwrap() {
        assert!(
            start.elapsed() < DEADLINE,
            "the expired lease was never taken over"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Every write of the stale owner is fenced off.
    let fenced = [
        GroupSettle::default().ack([head.lease()]),
        GroupSettle::default().retry(head.lease(), Duration::ZERO, Some("late")),
        GroupSettle::default().dead_letter(head.lease(), "late"),
        GroupSettle::default().give_back([head.lease()]),
    ];
    for settle in &fenced {
        let settled = stale.settle(settle, GroupNext::Keep).await.unwrap();
        assert!(
            settled.acked.is_empty() && !settled.failed && settled.given_back == 0,
            "{settle:?} wrote {settled:?}"
        );
    }
    assert!(
        stale.claim(&q, "g", LONG, 10).await.unwrap().is_empty(),
        "a stale owner claims nothing"
    );
    assert_eq!(
        stale.extend(&[head.lease()], LONG).await.unwrap().extended,
        0
    );

    // The message is still leased to the stale owner's delivery; once no live lease holds
    // its group, recovery frees it for the next owner.
    assert!(next.claim(&q, "g", LONG, 10).await.unwrap().is_empty());
    next.unlock(&q, "g").await.unwrap();
    let mut recovery = backend.open_group_recovery().await.unwrap();
    let recovered = recovery
        .recover(std::slice::from_ref(&q), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!((recovered.freed, recovered.waiting), (1, 0));
    assert!(next.try_lock(&q, "g").await.unwrap());
    let again = one(next.claim(&q, "g", LONG, 10).await.unwrap());
    assert_eq!((again.id, again.attempts), (head.id, 2));
    let settle = GroupSettle::default().ack([again.lease()]);
    assert_eq!(
        next.settle(&settle, GroupNext::Keep).await.unwrap().acked,
        [again.id]
    );
}

/// A run that ends releases its group in the same statement by deleting the lease row, so
/// the table holds live leases only, and the next owner takes the group at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_that_ends_deletes_its_lease_row() {
    let (backend, q) = lease_backend(LONG).await;
    let client = connect(backend.url(), "test").await.unwrap();
    send_to_g(&backend, &q, 0..2).await;
    let mut a = backend.open_group_session().await.unwrap();
    let run = a.lock_and_claim(&q, "g", LONG, 10).await.unwrap().unwrap();
    assert_eq!(run.len(), 2, "{run:?}");
    assert!(lease_expiry(&client, "g").await.is_some());

    let next = GroupNext::Claim {
        queue: &q,
        group: "g",
        lease: LONG,
        max: 10,
    };
    let settle = GroupSettle::default().ack(run.iter().map(Message::lease));
    let settled = a.settle(&settle, next).await.unwrap();
    assert_eq!(settled.acked.len(), 2, "{settled:?}");
    assert!(settled.claimed.is_empty(), "{settled:?}");
    assert_eq!(
        lease_expiry(&client, "g").await,
        None,
        "the released lease's row is left behind"
    );

    send_to_g(&backend, &q, 2..3).await;
    let mut b = backend.open_group_session().await.unwrap();
    let taken = b.lock_and_claim(&q, "g", LONG, 10).await.unwrap();
    assert_eq!(taken.map(|run| run.len()), Some(1), "the next owner waits");
}

/// A group step renews the session's lease only once a third of its time has passed: a
/// step at once leaves the row alone (no write per step), a later one extends it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_renews_the_lease_only_after_a_third_of_its_time() {
    let ttl = Duration::from_secs(6);
    let (backend, q) = lease_backend(ttl).await;
    let client = connect(backend.url(), "test").await.unwrap();
    send_to_g(&backend, &q, 0..2).await;
    let mut a = backend.open_group_session().await.unwrap();
    let head = a.lock_and_claim(&q, "g", LONG, 1).await.unwrap().unwrap();
    assert_eq!(head.len(), 1, "{head:?}");
    let taken = lease_expiry(&client, "g").await.unwrap();

    assert!(a.claim(&q, "g", LONG, 0).await.unwrap().is_empty());
    assert_eq!(
        lease_expiry(&client, "g").await,
        Some(taken),
        "renewed with most of its time left"
    );

    let start = Instant::now();
    loop {
        assert!(a.claim(&q, "g", LONG, 0).await.unwrap().is_empty());
        if lease_expiry(&client, "g")
            .await
            .is_some_and(|expiry| expiry > taken)
        {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the group's steps never renewed its lease"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let next = GroupNext::Claim {
        queue: &q,
        group: "g",
        lease: LONG,
        max: 10,
    };
    let settle = GroupSettle::default().ack(head.iter().map(Message::lease));
    let settled = a.settle(&settle, next).await.unwrap();
    assert_eq!(
        (settled.acked.len(), settled.claimed.len()),
        (1, 1),
        "the renewed lease still writes: {settled:?}"
    );
}

/// Workers of both lock modes on one queue (a rolling switch to a transaction-mode
/// pooler): neither mode's recovery frees a group the other mode holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_in_either_mode_leaves_the_other_modes_groups_alone() {
    let (leased, q) = lease_backend(LONG).await;
    let advisory = PgBackend::builder(leased.url())
        .group_locks(GroupLocks::Advisory)
        .build()
        .unwrap();
    for group in ["held-by-advisory", "held-by-lease"] {
        leased
            .send(&q, NewMessage::encode(&0u32).unwrap().group(group))
            .await
            .unwrap();
    }
    let mut by_lock = advisory.open_group_session().await.unwrap();
    assert!(by_lock.try_lock(&q, "held-by-advisory").await.unwrap());
    let locked = by_lock
        .claim(&q, "held-by-advisory", LONG, 10)
        .await
        .unwrap();
    assert_eq!(locked.len(), 1);
    let mut by_lease = leased.open_group_session().await.unwrap();
    assert!(by_lease.try_lock(&q, "held-by-lease").await.unwrap());
    assert_eq!(
        by_lease
            .claim(&q, "held-by-lease", LONG, 10)
            .await
            .unwrap()
            .len(),
        1
    );

    // Lease-mode recovery frees at once what no lease covers: not the advisory-held group.
    let mut lease_recovery = leased.open_group_recovery().await.unwrap();
    let freed = lease_recovery
        .recover(std::slice::from_ref(&q), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(
        freed.freed, 0,
        "lease recovery freed an advisory-held group"
    );
    // Advisory-mode recovery frees what no advisory lock covers after its grace (two
    // sightings): not the lease-held group.
    let mut lock_recovery = advisory.open_group_recovery().await.unwrap();
    for _ in 0..2 {
        let pass = lock_recovery
            .recover(std::slice::from_ref(&q), Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(pass.freed, 0, "advisory recovery freed a lease-held group");
    }
    // Both are still in flight with their owners.
    let stats = leased.stats().await.unwrap();
    assert_eq!(stats[0].in_flight, 2, "{stats:?}");
}

fn one(mut run: Vec<Message>) -> Message {
    assert_eq!(run.len(), 1, "{run:?}");
    run.remove(0)
}

/// When group `group`'s lease row expires, if there is a row.
async fn lease_expiry(client: &Client, group: &str) -> Option<SystemTime> {
    client
        .query_opt(
            "SELECT expires_at FROM pgbus.group_leases WHERE group_key = $1",
            &[&group],
        )
        .await
        .unwrap()
        .map(|row| row.get(0))
}
