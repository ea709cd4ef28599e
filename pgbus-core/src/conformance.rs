//! The conformance suite: the queue contract as tests, run unchanged by every backend.
//!
//! Each case is a public async function taking a fresh, empty backend. A backend crate
//! runs them all with one macro line in a test file:
//!
//! ```text
//! async fn fresh_backend() -> MyBackend { /* an empty backend, e.g. on a new database */ }
//! pgbus_core::conformance_tests!(fresh_backend);
//! ```
//!
//! Lease expiry is exercised with short real leases: the cases wait for the condition (the
//! message becoming claimable again) with a deadline, never for a fixed time.

use std::collections::HashSet;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::{
    Backend, ContentType, Error, Extension, Fetcher, GroupNext, GroupRecovery, GroupSession,
    GroupSettle, Lease, Message, MessageId, NewMessage, ProcessInfo, ProcessRegistry, QueueName,
    QueueOptions, QueueThroughput, RetryDecision, RetryPolicy, Selection,
    DEFAULT_MAX_PAYLOAD_BYTES, MAX_DELAY,
};

/// Generates one `#[tokio::test]` per conformance case, each given a fresh backend from
/// `$factory` (an async function with no arguments returning the backend). The stream
/// storage cases, for a [`StreamStore`](crate::StreamStore), come with
/// `conformance_tests!(@streams factory)`.
#[macro_export]
macro_rules! conformance_tests {
    ($factory:path) => {
        $crate::conformance_tests!(@cases $factory;
            send_and_claim_round_trip,
            claims_by_priority_then_age,
            delayed_messages_are_invisible_until_due,
            bulk_send_of_ten_thousand,
            concurrent_claimers_claim_each_message_once,
            expired_lease_is_claimed_again_and_fenced,
            extended_lease_keeps_message_hidden,
            extend_reports_the_leases_lost_elsewhere,
            ack_batch_completes_messages,
            nack_makes_message_visible_after_delay,
            release_gives_back_unstarted_claims_uncounted,
            retry_policy_ends_in_dead_letter_queue,
            dead_letter_retry_and_discard,
            undecodable_payload_is_dead_lettered_and_claiming_continues,
            paused_queue_hands_out_nothing,
            purge_and_drop_queue,
            create_queue_is_idempotent_and_listed,
            alter_queue_replaces_settings_and_keeps_messages,
            unknown_queue_is_an_error,
            oversized_payload_and_bad_group_key_are_refused,
            extreme_delays_are_refused_and_extreme_priorities_kept,
            stats_count_each_state,
            queue_stats_count_one_queue_like_stats,
            processes_register_heartbeat_and_go_stale,
            reported_throughput_shows_in_stats_per_minute,
            groups_are_locked_one_owner_at_a_time_and_run_in_order,
            a_group_run_is_settled_and_the_next_claimed_in_one_step,
            recovery_frees_the_work_of_a_dead_group_owner,
            a_failed_group_sessions_leftovers_are_settled_without_its_lock,
            unique_keys_hold_until_the_job_leaves,
            while_running_keys_run_one_job_at_a_time,
            concurrency_limits_count_live_leases,
            rate_limits_count_starts_per_window,
            open_breaker_closes_the_queue_until_its_backoff_passes,
        );
    };
    (@streams $factory:path) => {
        $crate::conformance_tests!(@cases $factory;
            stream_events_read_back_in_id_order,
            oversized_broadcast_is_stored_durably,
            oversized_stream_events_are_refused,
            pruning_moves_the_horizon,
        );
    };
    (@cases $factory:path; $($case:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                $crate::conformance::$case($factory().await).await;
            }
        )*
    };
}

const LONG: Duration = Duration::from_secs(600);
const DEADLINE: Duration = Duration::from_secs(10);
/// A delay, lease or backoff meant to run out during a case: long enough that the few
/// statements a case runs before it ends fit inside it on a loaded machine, so no case
/// depends on a narrow window of wall-clock time.
const SHORT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Job {
    n: u32,
    text: String,
}

fn job(n: u32) -> NewMessage {
    NewMessage::encode(&Job {
        n,
        text: format!("job {n}"),
    })
    .expect("encodes")
}

async fn queue<B: Backend>(backend: &B, name: &str) -> QueueName {
    queue_with(backend, name, QueueOptions::default()).await
}

async fn queue_with<B: Backend>(backend: &B, name: &str, options: QueueOptions) -> QueueName {
    let name = QueueName::new(name).expect("valid name");
    assert!(backend.create_queue(&name, &options).await.expect("create"));
    name
}

fn numbers(messages: &[Message]) -> Vec<u32> {
    messages
        .iter()
        .map(|m| m.decode::<Job>().expect("decodes").n)
        .collect()
}

/// Claims until something comes back or the deadline passes.
async fn claim_eventually<B: Backend>(backend: &B, queue: &QueueName, lease: Duration) -> Message {
    let start = Instant::now();
    loop {
        let mut claimed = backend.claim(queue, 1, lease).await.expect("claim");
        if let Some(m) = claimed.pop() {
            return m;
        }
        assert!(start.elapsed() < DEADLINE, "message never became claimable");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts that claims return nothing for the whole of `period`.
async fn assert_nothing_claimable_for<B: Backend>(
    backend: &B,
    queue: &QueueName,
    period: Duration,
) {
    let start = Instant::now();
    while start.elapsed() < period {
        let claimed = backend.claim(queue, 10, LONG).await.expect("claim");
        assert!(claimed.is_empty(), "claimed {:?} too early", claimed[0].id);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn stats_of<B: Backend>(backend: &B, queue: &QueueName) -> crate::QueueStats {
    backend
        .stats()
        .await
        .expect("stats")
        .into_iter()
        .find(|s| &s.queue == queue)
        .expect("queue in stats")
}

/// A sent message comes back whole: payload, headers, priority, group key; one attempt.
pub async fn send_and_claim_round_trip<B: Backend>(backend: B) {
    let q = queue(&backend, "round_trip").await;
    let before = SystemTime::now() - Duration::from_secs(5);
    let id = backend
        .send(&q, job(7).priority(3).header("trace", "t-1"))
        .await
        .expect("send");
    let claimed = backend.claim(&q, 10, LONG).await.expect("claim");
    assert_eq!(claimed.len(), 1);
    let m = &claimed[0];
    assert_eq!(m.id, id);
    assert_eq!(m.queue, q);
    assert_eq!(
        m.decode::<Job>().unwrap(),
        Job {
            n: 7,
            text: "job 7".into()
        }
    );
    assert_eq!(m.content_type, ContentType::MessagePack);
    assert_eq!(m.headers.get("trace").map(String::as_str), Some("t-1"));
    assert_eq!(m.priority, 3);
    assert_eq!(m.group_key, None);
    assert_eq!(m.attempts, 1);
    assert_eq!(m.last_error, None);
    assert!(m.enqueued_at >= before);
    assert!(m.lease_expires_at > SystemTime::now() + LONG - Duration::from_secs(60));
    assert!(backend.claim(&q, 10, LONG).await.unwrap().is_empty());

    let json_id = backend
        .send(
            &q,
            NewMessage::json(&serde_json::json!({"n": 8, "text": "j"})).unwrap(),
        )
        .await
        .unwrap();
    let m = backend.claim(&q, 1, LONG).await.unwrap().remove(0);
    assert_eq!(m.id, json_id);
    assert_eq!(m.content_type, ContentType::Json);
    assert_eq!(m.decode::<Job>().unwrap().n, 8);
}

/// Higher priority first; within a priority, oldest first.
pub async fn claims_by_priority_then_age<B: Backend>(backend: B) {
    let q = queue(&backend, "priorities").await;
    for (n, priority) in [(1, 0), (2, 5), (3, 1), (4, 5), (5, -2), (6, 0)] {
        backend.send(&q, job(n).priority(priority)).await.unwrap();
    }
    let claimed = backend.claim(&q, 3, LONG).await.unwrap();
    assert_eq!(numbers(&claimed), [2, 4, 3]);
    let claimed = backend.claim(&q, 10, LONG).await.unwrap();
    assert_eq!(numbers(&claimed), [1, 6, 5]);
}

/// A delayed message is invisible until due; one scheduled in the past is visible now.
pub async fn delayed_messages_are_invisible_until_due<B: Backend>(backend: B) {
    let q = queue(&backend, "delayed").await;
    backend.send(&q, job(1).delay(SHORT)).await.unwrap();
    backend.send(&q, job(2).delay(LONG)).await.unwrap();
    backend
        .send(&q, job(3).at(SystemTime::now() + Duration::from_secs(3600)))
        .await
        .unwrap();
    backend
        .send(&q, job(4).at(SystemTime::now() - Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(numbers(&backend.claim(&q, 10, LONG).await.unwrap()), [4]);
    let stats = stats_of(&backend, &q).await;
    assert_eq!((stats.scheduled, stats.in_flight), (3, 1));
    let due = claim_eventually(&backend, &q, LONG).await;
    assert_eq!(due.decode::<Job>().unwrap().n, 1);
    assert!(backend.claim(&q, 10, LONG).await.unwrap().is_empty());
}

/// 10,000 messages in one call: ids in input order, all stored, all claimable.
pub async fn bulk_send_of_ten_thousand<B: Backend>(backend: B) {
    let q = queue(&backend, "bulk").await;
    let ids = backend
        .send_batch(&q, (0..10_000).map(job).collect())
        .await
        .unwrap();
    assert_eq!(ids.len(), 10_000);
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids increase in input order"
    );
    assert_eq!(stats_of(&backend, &q).await.ready, 10_000);
    let mut seen = Vec::new();
    loop {
        let batch = backend.claim(&q, 1_000, LONG).await.unwrap();
        if batch.is_empty() {
            break;
        }
        seen.extend(numbers(&batch));
    }
    assert_eq!(seen, (0..10_000).collect::<Vec<_>>());
    assert!(backend.send_batch(&q, Vec::new()).await.unwrap().is_empty());
}

/// 8 concurrent claimers over 10,000 messages: each message claimed exactly once while no
/// lease expires.
pub async fn concurrent_claimers_claim_each_message_once<B: Backend>(backend: B) {
    let q = queue(&backend, "concurrent").await;
    let sent: HashSet<MessageId> = backend
        .send_batch(&q, (0..10_000).map(job).collect())
        .await
        .unwrap()
        .into_iter()
        .collect();
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let backend = backend.clone();
        let q = q.clone();
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let batch = backend.claim(&q, 50, LONG).await.unwrap();
                if batch.is_empty() {
                    return mine;
                }
                let leases: Vec<_> = batch.iter().map(Message::lease).collect();
                assert_eq!(backend.ack(&leases).await.unwrap(), leases.len() as u64);
                mine.extend(batch.iter().map(|m| (m.id, m.attempts)));
            }
        }));
    }
    let mut claimed = Vec::new();
    for task in tasks {
        claimed.extend(task.await.unwrap());
    }
    assert_eq!(
        claimed.len(),
        10_000,
        "every message claimed once, none twice"
    );
    assert!(claimed.iter().all(|(_, attempts)| *attempts == 1));
    let unique: HashSet<MessageId> = claimed.iter().map(|(id, _)| *id).collect();
    assert_eq!(unique, sent);
    assert_eq!(stats_of(&backend, &q).await.depth(), 0);
}

/// A lease that runs out makes the message claimable again with one more attempt; the
/// old lease can no longer settle it.
pub async fn expired_lease_is_claimed_again_and_fenced<B: Backend>(backend: B) {
    let q = queue(&backend, "leases").await;
    backend.send(&q, job(1)).await.unwrap();
    let first = backend.claim(&q, 1, SHORT).await.unwrap().remove(0);
    assert_eq!(first.attempts, 1);
    assert!(
        backend.claim(&q, 1, LONG).await.unwrap().is_empty(),
        "hidden while leased"
    );
    let second = claim_eventually(&backend, &q, LONG).await;
    assert_eq!(second.id, first.id);
    assert_eq!(second.attempts, 2);
    let stale = first.lease();
    assert_eq!(backend.ack(&[stale]).await.unwrap(), 0);
    assert!(!backend
        .nack(&stale, Duration::ZERO, Some("late"))
        .await
        .unwrap());
    assert!(!backend.dead_letter(&stale, "late").await.unwrap());
    assert_eq!(
        backend.extend(&[stale], LONG).await.unwrap(),
        Extension::new(0, vec![stale]),
        "a lease claimed again is lost"
    );
    assert_eq!(backend.ack(&[second.lease()]).await.unwrap(), 1);
    assert_eq!(stats_of(&backend, &q).await.depth(), 0);
}

/// Extending a lease keeps the message hidden past its original expiry.
pub async fn extended_lease_keeps_message_hidden<B: Backend>(backend: B) {
    let q = queue(&backend, "extend").await;
    backend.send(&q, job(1)).await.unwrap();
    let m = backend.claim(&q, 1, SHORT).await.unwrap().remove(0);
    assert_eq!(
        backend.extend(&[m.lease()], LONG).await.unwrap(),
        Extension::new(1, Vec::new())
    );
    assert_nothing_claimable_for(&backend, &q, SHORT + SHORT / 4).await;
    assert_eq!(stats_of(&backend, &q).await.in_flight, 1);
    assert_eq!(backend.ack(&[m.lease()]).await.unwrap(), 1);
}

/// An extension reports which leases are gone, whoever took them: acked, given back or
/// dead-lettered elsewhere, or claimed again after running out; the current ones it extends.
pub async fn extend_reports_the_leases_lost_elsewhere<B: Backend>(backend: B) {
    let q = queue(&backend, "lost").await;
    backend
        .send_batch(&q, (1..=5).map(job).collect())
        .await
        .unwrap();
    let claimed = backend.claim(&q, 4, LONG).await.unwrap();
    let [acked, nacked, dead, current] = [0, 1, 2, 3].map(|i| claimed[i].lease());
    let expiring = backend.claim(&q, 1, SHORT).await.unwrap().remove(0).lease();
    assert_eq!(backend.ack(&[acked]).await.unwrap(), 1);
    assert!(backend.nack(&nacked, LONG, Some("later")).await.unwrap());
    assert!(backend.dead_letter(&dead, "dead").await.unwrap());
    let again = claim_eventually(&backend, &q, LONG).await;
    assert_eq!(
        (again.id, again.attempts),
        (expiring.id, expiring.attempt + 1),
        "claimed again"
    );

    let all = [acked, nacked, dead, current, expiring, again.lease()];
    let found = backend.extend(&all, LONG).await.unwrap();
    assert_eq!(
        found.extended, 2,
        "the current and the new lease: {found:?}"
    );
    let lost: HashSet<_> = found.lost.iter().copied().collect();
    assert_eq!(
        lost,
        HashSet::from([acked, nacked, dead, expiring]),
        "{found:?}"
    );
    assert_eq!(found.lost.len(), 4, "each lost lease once: {found:?}");
}

/// One ack call settles many messages; acked messages never come back.
pub async fn ack_batch_completes_messages<B: Backend>(backend: B) {
    let q = queue(&backend, "acks").await;
    backend
        .send_batch(&q, (0..20).map(job).collect())
        .await
        .unwrap();
    let claimed = backend.claim(&q, 20, SHORT).await.unwrap();
    let leases: Vec<_> = claimed.iter().map(Message::lease).collect();
    assert_eq!(backend.ack(&leases).await.unwrap(), 20);
    assert_eq!(
        backend.ack(&leases).await.unwrap(),
        0,
        "second ack finds nothing"
    );
    // Past the lease: acked messages do not come back when it would have run out.
    assert_nothing_claimable_for(&backend, &q, SHORT + SHORT / 4).await;
    assert_eq!(stats_of(&backend, &q).await.depth(), 0);
}

/// A nack gives the message back after the delay, with the error recorded.
pub async fn nack_makes_message_visible_after_delay<B: Backend>(backend: B) {
    let q = queue(&backend, "nacks").await;
    backend.send(&q, job(1)).await.unwrap();
    let m = backend.claim(&q, 1, LONG).await.unwrap().remove(0);
    assert!(backend.nack(&m.lease(), SHORT, Some("boom")).await.unwrap());
    assert!(
        backend.claim(&q, 1, LONG).await.unwrap().is_empty(),
        "hidden during the delay"
    );
    assert_eq!(stats_of(&backend, &q).await.scheduled, 1);
    let again = claim_eventually(&backend, &q, LONG).await;
    assert_eq!((again.id, again.attempts), (m.id, 2));
    assert_eq!(again.last_error.as_deref(), Some("boom"));
}

/// A release gives back claims whose jobs never ran (a worker's claimed-ahead messages at
/// shutdown): claimable at once, in their old place (not behind messages that became
/// visible since, as after a nack), their attempt not counted and their last error kept; a
/// released, settled or stale lease releases nothing.
pub async fn release_gives_back_unstarted_claims_uncounted<B: Backend>(backend: B) {
    let q = queue(&backend, "releases").await;
    for n in 1..=3 {
        backend.send(&q, job(n)).await.unwrap();
    }
    // Message 1 fails once: visible again now, behind 2 and 3, with an error.
    let failed = backend.claim(&q, 1, LONG).await.unwrap().remove(0);
    assert!(backend
        .nack(&failed.lease(), Duration::ZERO, Some("boom"))
        .await
        .unwrap());
    let ahead = backend.claim(&q, 2, LONG).await.unwrap();
    assert_eq!(numbers(&ahead), [2, 3]);
    let leases: Vec<_> = ahead.iter().map(Message::lease).collect();
    assert_eq!(backend.release(&leases).await.unwrap(), 2);
    assert_eq!(
        backend.release(&leases).await.unwrap(),
        0,
        "a released lease is no longer current"
    );
    assert_eq!(backend.release(&[]).await.unwrap(), 0);
    assert_eq!(stats_of(&backend, &q).await.ready, 3, "released at once");

    let all = backend.claim(&q, 3, LONG).await.unwrap();
    assert_eq!(numbers(&all), [2, 3, 1], "the released keep their place");
    let attempts: Vec<u32> = all.iter().map(|m| m.attempts).collect();
    assert_eq!(attempts, [1, 1, 2], "the released attempt was not counted");
    assert_eq!(all[2].last_error.as_deref(), Some("boom"));

    assert_eq!(backend.release(&[all[2].lease()]).await.unwrap(), 1);
    assert_eq!(
        backend.release(&[failed.lease()]).await.unwrap(),
        0,
        "an attempt already given back is not released"
    );
    assert_eq!(backend.ack(&[all[0].lease()]).await.unwrap(), 1);
    assert_eq!(
        backend.release(&[all[0].lease()]).await.unwrap(),
        0,
        "an acked lease is not released"
    );
    let again = backend.claim(&q, 3, LONG).await.unwrap();
    assert_eq!(numbers(&again), [1], "2 is gone, 3 still leased");
    assert_eq!(again[0].attempts, 2);
    assert_eq!(again[0].last_error.as_deref(), Some("boom"), "error kept");
}

/// A handler that keeps failing is retried with the policy, then dead-lettered with the
/// last error text; a retry from the dead-letter queue puts it back.
pub async fn retry_policy_ends_in_dead_letter_queue<B: Backend>(backend: B) {
    let policy = RetryPolicy::builder()
        .base(Duration::from_millis(5))
        .cap(Duration::from_millis(20))
        .max_attempts(3)
        .build()
        .unwrap();
    let q = queue_with(&backend, "retries", QueueOptions::default().retry(policy)).await;
    let id = backend.send(&q, job(1)).await.unwrap();
    let policy = backend.queue_info(&q).await.unwrap().options.retry;
    assert_eq!(policy.max_attempts(), 3);
    let mut attempts_seen = Vec::new();
    loop {
        let m = claim_eventually(&backend, &q, LONG).await;
        attempts_seen.push(m.attempts);
        let error = format!("failure on attempt {}", m.attempts);
        match policy.decide(m.attempts) {
            RetryDecision::RetryAfter(delay) => {
                assert!(backend.nack(&m.lease(), delay, Some(&error)).await.unwrap())
            }
            RetryDecision::DeadLetter => {
                assert!(backend.dead_letter(&m.lease(), &error).await.unwrap());
                break;
            }
        }
    }
    assert_eq!(attempts_seen, [1, 2, 3]);
    let dead = backend.list_dead(&q, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!((dead[0].id, dead[0].attempts), (id, 3));
    assert_eq!(dead[0].error, "failure on attempt 3");
    assert_eq!(stats_of(&backend, &q).await.dead_lettered, 1);

    assert_eq!(
        backend.retry_dead(&q, Selection::Ids(&[id])).await.unwrap(),
        1
    );
    let back = backend.claim(&q, 1, LONG).await.unwrap().remove(0);
    assert_eq!((back.id, back.attempts), (id, 1));
    assert!(backend.list_dead(&q, 10).await.unwrap().is_empty());
}

/// Dead letters can be listed, retried and discarded, by id or all at once.
pub async fn dead_letter_retry_and_discard<B: Backend>(backend: B) {
    let q = queue(&backend, "dlq").await;
    backend
        .send_batch(&q, (0..4).map(job).collect())
        .await
        .unwrap();
    let claimed = backend.claim(&q, 4, LONG).await.unwrap();
    for m in &claimed {
        assert!(backend
            .dead_letter(&m.lease(), &format!("bad {}", m.id))
            .await
            .unwrap());
    }
    let dead = backend.list_dead(&q, 10).await.unwrap();
    assert_eq!(dead.len(), 4);
    assert_eq!(dead[0].error, format!("bad {}", dead[0].id));
    assert_eq!(dead[0].decode_job(), 0);
    assert_eq!(backend.list_dead(&q, 2).await.unwrap().len(), 2);

    let (first, second) = (dead[0].id, dead[1].id);
    assert_eq!(
        backend
            .discard_dead(&q, Selection::Ids(&[first, MessageId(i64::MAX)]))
            .await
            .unwrap(),
        1
    );
    assert_eq!(
        backend
            .retry_dead(&q, Selection::Ids(&[second]))
            .await
            .unwrap(),
        1
    );
    assert_eq!(backend.retry_dead(&q, Selection::All).await.unwrap(), 2);
    assert!(backend.list_dead(&q, 10).await.unwrap().is_empty());
    assert_eq!(stats_of(&backend, &q).await.ready, 3);
    let again = backend.claim(&q, 10, LONG).await.unwrap();
    assert_eq!(again.len(), 3);
    for m in &again {
        assert!(backend.dead_letter(&m.lease(), "again").await.unwrap());
    }
    assert_eq!(backend.discard_dead(&q, Selection::All).await.unwrap(), 3);
    assert_eq!(stats_of(&backend, &q).await.dead_lettered, 0);
}

trait DecodeJob {
    fn decode_job(&self) -> u32;
}

impl DecodeJob for crate::DeadMessage {
    fn decode_job(&self) -> u32 {
        self.content_type.decode::<Job>(&self.payload).unwrap().n
    }
}

/// A payload that cannot be decoded goes to the dead-letter queue with the reason, and
/// the claim loop goes on with the next message.
pub async fn undecodable_payload_is_dead_lettered_and_claiming_continues<B: Backend>(backend: B) {
    let q = queue(&backend, "poison").await;
    backend
        .send(
            &q,
            NewMessage::raw(b"\xc1\xc1 not msgpack".to_vec(), ContentType::MessagePack),
        )
        .await
        .unwrap();
    backend
        .send(
            &q,
            NewMessage::raw(b"{not json".to_vec(), ContentType::Json),
        )
        .await
        .unwrap();
    backend.send(&q, job(3)).await.unwrap();

    let mut processed = Vec::new();
    loop {
        let batch = backend.claim(&q, 1, LONG).await.unwrap();
        let Some(m) = batch.into_iter().next() else {
            break;
        };
        match m.decode::<Job>() {
            Ok(job) => {
                processed.push(job.n);
                backend.ack(&[m.lease()]).await.unwrap();
            }
            Err(err @ Error::Decode { .. }) => {
                assert!(backend
                    .dead_letter(&m.lease(), &err.report())
                    .await
                    .unwrap());
            }
            Err(other) => panic!("unexpected error {other}"),
        }
    }
    assert_eq!(processed, [3]);
    let dead = backend.list_dead(&q, 10).await.unwrap();
    assert_eq!(dead.len(), 2);
    assert!(
        dead[0]
            .error
            .starts_with("could not decode MessagePack payload"),
        "{}",
        dead[0].error
    );
    assert!(
        dead[1].error.starts_with("could not decode JSON payload"),
        "{}",
        dead[1].error
    );
}

/// A paused queue hands out nothing until resumed; sending still works.
pub async fn paused_queue_hands_out_nothing<B: Backend>(backend: B) {
    let q = queue(&backend, "paused").await;
    backend.set_paused(&q, true).await.unwrap();
    backend.send(&q, job(1)).await.unwrap();
    assert!(backend.claim(&q, 10, LONG).await.unwrap().is_empty());
    assert!(backend.queue_info(&q).await.unwrap().paused);
    assert!(stats_of(&backend, &q).await.paused);
    backend.set_paused(&q, false).await.unwrap();
    assert_eq!(numbers(&backend.claim(&q, 10, LONG).await.unwrap()), [1]);
}

/// Purge empties a queue but keeps it; drop removes it with everything in it.
pub async fn purge_and_drop_queue<B: Backend>(backend: B) {
    let q = queue(&backend, "purged").await;
    let other = queue(&backend, "kept").await;
    backend
        .send_batch(&q, (0..5).map(job).collect())
        .await
        .unwrap();
    backend.send(&other, job(9)).await.unwrap();
    assert_eq!(backend.purge_queue(&q).await.unwrap(), 5);
    assert!(backend.claim(&q, 10, LONG).await.unwrap().is_empty());
    backend.send(&q, job(6)).await.unwrap();
    assert!(backend.drop_queue(&q).await.unwrap());
    assert!(!backend.drop_queue(&q).await.unwrap());
    assert!(matches!(
        backend.send(&q, job(1)).await,
        Err(Error::QueueNotFound(_))
    ));
    assert_eq!(
        numbers(&backend.claim(&other, 10, LONG).await.unwrap()),
        [9],
        "other queues untouched"
    );
    // A queue created again under the same name starts empty.
    assert!(backend
        .create_queue(&q, &QueueOptions::default())
        .await
        .unwrap());
    assert_eq!(stats_of(&backend, &q).await.depth(), 0);
}

/// Creating an existing queue changes nothing; queues are listed with their settings.
pub async fn create_queue_is_idempotent_and_listed<B: Backend>(backend: B) {
    let options = QueueOptions::default()
        .lease(Duration::from_secs(45))
        .keep_history(true)
        .retry(RetryPolicy::builder().max_attempts(9).build().unwrap());
    let b = queue_with(&backend, "beta", options.clone()).await;
    let a = queue(&backend, "alpha").await;
    assert!(!backend
        .create_queue(&b, &QueueOptions::default())
        .await
        .unwrap());
    let listed = backend.list_queues().await.unwrap();
    let names: Vec<_> = listed.iter().map(|q| q.name.clone()).collect();
    assert_eq!(names, [a, b.clone()]);
    let info = backend.queue_info(&b).await.unwrap();
    assert_eq!(info.options, options);
    assert!(!info.paused);
}

/// `alter_queue` replaces a queue's settings and nothing else; taking the breaker away
/// closes an open one.
pub async fn alter_queue_replaces_settings_and_keeps_messages<B: Backend>(backend: B) {
    let q = queue(&backend, "altered").await;
    backend.send(&q, job(1)).await.unwrap();
    backend.set_paused(&q, true).await.unwrap();
    let options = QueueOptions::default()
        .lease(Duration::from_secs(45))
        .keep_history(true)
        .retry(RetryPolicy::builder().max_attempts(9).build().unwrap())
        .circuit_breaker(crate::CircuitBreaker::new(2, LONG).unwrap());
    backend.alter_queue(&q, &options).await.unwrap();
    let info = backend.queue_info(&q).await.unwrap();
    assert_eq!(info.options, options);
    assert!(info.paused, "the pause stays");
    assert_eq!(stats_of(&backend, &q).await.depth(), 1, "the message stays");

    backend.set_paused(&q, false).await.unwrap();
    backend.trip_breaker(&q, LONG).await.unwrap();
    assert!(backend.claim(&q, 1, LONG).await.unwrap().is_empty());
    let mut without = options.clone();
    without.circuit_breaker = None;
    backend.alter_queue(&q, &without).await.unwrap();
    assert_eq!(backend.queue_info(&q).await.unwrap().options, without);
    assert_eq!(stats_of(&backend, &q).await.breaker_open_for, None);
    let claimed = backend.claim(&q, 1, LONG).await.unwrap();
    assert_eq!(numbers(&claimed), [1], "the open breaker went with it");

    let missing = QueueName::new("missing").unwrap();
    assert!(matches!(
        backend.alter_queue(&missing, &options).await,
        Err(Error::QueueNotFound(_))
    ));
}

/// Operations on a queue that does not exist fail with `QueueNotFound`.
pub async fn unknown_queue_is_an_error<B: Backend>(backend: B) {
    let q = QueueName::new("missing").unwrap();
    assert!(matches!(
        backend.send(&q, job(1)).await,
        Err(Error::QueueNotFound(_))
    ));
    assert!(matches!(
        backend.send_batch(&q, vec![job(1)]).await,
        Err(Error::QueueNotFound(_))
    ));
    assert!(matches!(
        backend.claim(&q, 1, LONG).await,
        Err(Error::QueueNotFound(_))
    ));
    assert!(matches!(
        backend.queue_info(&q).await,
        Err(Error::QueueNotFound(_))
    ));
    assert!(matches!(
        backend.set_paused(&q, true).await,
        Err(Error::QueueNotFound(_))
    ));
    assert!(matches!(
        backend.purge_queue(&q).await,
        Err(Error::QueueNotFound(_))
    ));
    assert!(matches!(
        backend.list_dead(&q, 1).await,
        Err(Error::QueueNotFound(_))
    ));
}

/// An oversized payload or a bad group key is refused, and nothing of the batch is stored.
pub async fn oversized_payload_and_bad_group_key_are_refused<B: Backend>(backend: B) {
    let q = queue(&backend, "limits").await;
    let huge = NewMessage::raw(
        vec![0; DEFAULT_MAX_PAYLOAD_BYTES + 1],
        ContentType::MessagePack,
    );
    let err = backend
        .send_batch(&q, vec![job(1), huge])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::PayloadTooLarge { .. }), "{err}");
    let err = backend.send(&q, job(2).group("")).await.unwrap_err();
    assert!(matches!(err, Error::InvalidGroupKey(_)), "{err}");
    let err = backend
        .send(&q, job(3).group("g".repeat(256)))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidGroupKey(_)), "{err}");
    assert_eq!(
        stats_of(&backend, &q).await.depth(),
        0,
        "nothing half-stored"
    );
}

/// Delays, scheduled times, leases and retry delays beyond [`MAX_DELAY`] are refused
/// (nothing of the batch stored, the lease untouched), [`MAX_DELAY`] itself is accepted;
/// the extreme priorities are stored and ordered like any other.
pub async fn extreme_delays_are_refused_and_extreme_priorities_kept<B: Backend>(backend: B) {
    let q = queue(&backend, "extremes").await;
    let far = SystemTime::UNIX_EPOCH + Duration::from_secs(100_000_000_000_000);
    for refused in [
        job(1).delay(Duration::MAX),
        job(1).delay(MAX_DELAY + Duration::from_secs(1)),
        job(1).at(far),
        job(1).at(SystemTime::now() + MAX_DELAY + Duration::from_secs(3600)),
        job(1).at(SystemTime::UNIX_EPOCH - Duration::from_secs(1)),
    ] {
        let err = backend
            .send_batch(&q, vec![job(0), refused.clone()])
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument(_)),
            "{refused:?}: {err}"
        );
        assert!(!err.is_transient());
    }
    assert_eq!(
        stats_of(&backend, &q).await.depth(),
        0,
        "nothing half-stored"
    );

    backend.send(&q, job(1).delay(MAX_DELAY)).await.unwrap();
    let ahead = SystemTime::now() + MAX_DELAY - Duration::from_secs(3600);
    backend.send(&q, job(2).at(ahead)).await.unwrap();
    backend
        .send(&q, job(3).at(SystemTime::UNIX_EPOCH).priority(i16::MIN))
        .await
        .unwrap();
    backend.send(&q, job(4).priority(i16::MAX)).await.unwrap();
    let stats = stats_of(&backend, &q).await;
    assert_eq!((stats.ready, stats.scheduled), (2, 2));

    for lease in [Duration::MAX, MAX_DELAY + Duration::from_secs(1)] {
        let err = backend.claim(&q, 10, lease).await.unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    }
    let claimed = backend.claim(&q, 10, LONG).await.unwrap();
    assert_eq!(numbers(&claimed), [4, 3], "i16::MAX first, i16::MIN last");
    assert_eq!(
        (claimed[0].priority, claimed[1].priority),
        (i16::MAX, i16::MIN)
    );
    let lease = claimed[0].lease();
    let err = backend.extend(&[lease], Duration::MAX).await.unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    let err = backend.nack(&lease, Duration::MAX, None).await.unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    assert_eq!(
        stats_of(&backend, &q).await.in_flight,
        2,
        "the lease is kept"
    );
    assert!(backend.nack(&lease, MAX_DELAY, None).await.unwrap());
    let stats = stats_of(&backend, &q).await;
    assert_eq!((stats.in_flight, stats.scheduled), (1, 3));
}

/// Stats count ready, in-flight, scheduled and dead-lettered messages separately.
pub async fn stats_count_each_state<B: Backend>(backend: B) {
    let q = queue(&backend, "counted").await;
    let empty = stats_of(&backend, &q).await;
    assert_eq!(
        (
            empty.depth(),
            empty.dead_lettered,
            empty.oldest_ready_age,
            empty.next_due_in
        ),
        (0, 0, None, None)
    );
    backend
        .send_batch(&q, (0..6).map(job).collect())
        .await
        .unwrap();
    backend.send(&q, job(10).delay(LONG)).await.unwrap();
    let claimed = backend.claim(&q, 3, LONG).await.unwrap();
    assert!(backend.dead_letter(&claimed[0].lease(), "x").await.unwrap());
    let stats = stats_of(&backend, &q).await;
    assert_eq!(stats.ready, 3);
    assert_eq!(stats.in_flight, 2);
    assert_eq!(stats.scheduled, 1);
    assert_eq!(stats.dead_lettered, 1);
    assert_eq!(stats.depth(), 6);
    assert!(stats.oldest_ready_age.is_some());
    let due = stats
        .next_due_in
        .expect("when the scheduled message is due");
    assert!(
        due <= LONG && due > LONG - Duration::from_secs(60),
        "{due:?}"
    );
    // The earliest of the scheduled messages; a retry's delay counts like a send's.
    let retry_in = Duration::from_secs(120);
    assert!(backend
        .nack(&claimed[1].lease(), retry_in, Some("later"))
        .await
        .unwrap());
    let stats = stats_of(&backend, &q).await;
    assert_eq!((stats.in_flight, stats.scheduled), (1, 2));
    let due = stats.next_due_in.expect("when the retry is due");
    assert!(
        due <= retry_in && due > retry_in - Duration::from_secs(60),
        "{due:?}"
    );
}

/// One queue's stats are its entry in the stats of every queue: plain, grouped and limited
/// messages in each state, and nothing of another queue; a missing queue is an error.
pub async fn queue_stats_count_one_queue_like_stats<B: Backend>(backend: B) {
    let q = queue(&backend, "watched").await;
    let other = queue(&backend, "other").await;
    assert_eq!(
        backend.queue_stats(&q).await.expect("queue stats"),
        crate::QueueStats::new(q.clone()),
        "an empty queue"
    );
    backend
        .send_batch(&other, (0..4).map(job).collect())
        .await
        .unwrap();
    let messages = vec![
        job(1),
        job(2),
        job(3).group("g"),
        job(4).group("g"),
        job(5).limit_key("k"),
        job(6).group("h"),
        job(7).delay(LONG),
        job(8).group("g").delay(SHORT * 30),
        job(9).limit_key("k").delay(LONG),
    ];
    backend.send_batch(&q, messages).await.unwrap();
    let claimed = backend.claim(&q, 1, LONG).await.unwrap();
    assert_eq!(claimed.len(), 1, "one plain message claimed");
    backend
        .record_throughput(&[QueueThroughput::new(q.clone(), 3, 1)])
        .await
        .unwrap();
    let mut dead = backend.claim(&q, 1, LONG).await.unwrap();
    assert!(backend
        .dead_letter(&dead.remove(0).lease(), "x")
        .await
        .unwrap());

    let one = backend.queue_stats(&q).await.expect("queue stats");
    let all = stats_of(&backend, &q).await;
    assert_eq!(
        (one.ready, one.in_flight, one.scheduled, one.dead_lettered),
        (4, 1, 3, 1),
        "grouped and limited messages count like plain ones: {one:?}"
    );
    assert_eq!((one.processed_per_minute, one.failed_per_minute), (3, 1));
    assert!(!one.paused);
    assert_eq!(one.breaker_open_for, None);
    assert!(one.oldest_ready_age.is_some());
    let due = one
        .next_due_in
        .expect("when the first scheduled message is due");
    assert!(due <= SHORT * 30 && due > Duration::from_secs(1), "{due:?}");
    // The two reads are moments apart: the times may differ, the counts may not.
    let counts = |s: &crate::QueueStats| {
        (
            s.queue.clone(),
            s.paused,
            s.depth(),
            s.ready,
            s.in_flight,
            s.scheduled,
            s.dead_lettered,
            s.processed_per_minute,
            s.failed_per_minute,
            s.oldest_ready_age.is_some(),
            s.next_due_in.is_some(),
        )
    };
    assert_eq!(counts(&one), counts(&all));

    backend.set_paused(&q, true).await.unwrap();
    assert!(backend.queue_stats(&q).await.unwrap().paused);
    let missing = QueueName::new("never_created").unwrap();
    assert!(matches!(
        backend.queue_stats(&missing).await,
        Err(Error::QueueNotFound(name)) if name == missing
    ));
}

/// Processes register, heartbeat, deregister, and are pruned once their heartbeats stop.
pub async fn processes_register_heartbeat_and_go_stale<B: Backend>(backend: B) {
    let queues = vec![QueueName::new("a").unwrap(), QueueName::new("b").unwrap()];
    let info = ProcessInfo::current(queues, "async", 16);
    let first = backend.register(&info).await.unwrap();
    let second = backend.register(&info).await.unwrap();
    assert_ne!(first, second);
    assert!(backend.heartbeat(first, 3).await.unwrap());
    let listed = backend.processes().await.unwrap();
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0].id, first);
    assert_eq!(listed[0].info, info);
    assert_eq!(listed[0].busy, 3);
    assert!(listed[0].heartbeat_at >= listed[0].started_at);

    backend.deregister(second).await.unwrap();
    assert_eq!(
        backend.prune_stale(LONG).await.unwrap(),
        0,
        "fresh heartbeats are kept"
    );
    let start = Instant::now();
    while backend
        .prune_stale(Duration::from_millis(50))
        .await
        .unwrap()
        == 0
    {
        assert!(start.elapsed() < DEADLINE, "stale process never pruned");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(backend.processes().await.unwrap().is_empty());
    assert!(
        !backend.heartbeat(first, 0).await.unwrap(),
        "a pruned process learns it is gone"
    );
}

/// Throughput reports add up per queue into the per-minute stats; counts for a queue that
/// does not exist are dropped without failing the others.
pub async fn reported_throughput_shows_in_stats_per_minute<B: Backend>(backend: B) {
    let a = queue(&backend, "busy").await;
    let b = queue(&backend, "quiet").await;
    let empty = stats_of(&backend, &a).await;
    assert_eq!(
        (empty.processed_per_minute, empty.failed_per_minute),
        (0, 0)
    );
    let gone = QueueName::new("never_created").unwrap();
    backend
        .record_throughput(&[
            QueueThroughput::new(a.clone(), 5, 2),
            QueueThroughput::new(gone, 100, 100),
        ])
        .await
        .unwrap();
    backend
        .record_throughput(&[
            QueueThroughput::new(a.clone(), 3, 1),
            QueueThroughput::new(b.clone(), 0, 4),
        ])
        .await
        .unwrap();
    backend.record_throughput(&[]).await.unwrap();
    let stats = stats_of(&backend, &a).await;
    assert_eq!(
        (stats.processed_per_minute, stats.failed_per_minute),
        (8, 3)
    );
    let stats = stats_of(&backend, &b).await;
    assert_eq!(
        (stats.processed_per_minute, stats.failed_per_minute),
        (0, 4)
    );
}

/// Grouped messages never come from a plain claim; a group's head is claimed by the one
/// session holding the group's lock, in send order, and waits while it is leased or
/// delayed.
pub async fn groups_are_locked_one_owner_at_a_time_and_run_in_order<B: Backend>(backend: B) {
    let q = queue(&backend, "grouped").await;
    for (n, group) in [(1, "a"), (2, "b"), (3, "a"), (4, "a")] {
        backend.send(&q, job(n).group(group)).await.unwrap();
    }
    backend.send(&q, job(5)).await.unwrap();
    assert_eq!(
        numbers(&backend.claim(&q, 10, LONG).await.unwrap()),
        [5],
        "plain claims skip groups"
    );

    let mut fetcher = backend.open_fetcher().await.unwrap();
    assert_eq!(
        fetcher.group_candidates(&q, 10, &[]).await.unwrap(),
        ["a", "b"]
    );
    assert_eq!(fetcher.group_candidates(&q, 1, &[]).await.unwrap(), ["a"]);
    assert_eq!(
        fetcher
            .group_candidates(&q, 10, &["a".to_owned()])
            .await
            .unwrap(),
        ["b"]
    );

    let mut owner = backend.open_group_session().await.unwrap();
    let mut other = backend.open_group_session().await.unwrap();
    assert!(owner.try_lock(&q, "a").await.unwrap());
    assert!(
        owner.try_lock(&q, "a").await.unwrap(),
        "re-locking by the owner succeeds"
    );
    assert!(
        !other.try_lock(&q, "a").await.unwrap(),
        "a held group is skipped"
    );
    assert!(
        other.claim(&q, "a", LONG, 10).await.unwrap().is_empty(),
        "only the lock holder claims"
    );

    let head = one(owner.claim(&q, "a", LONG, 1).await.unwrap());
    assert_eq!(
        (head.decode::<Job>().unwrap().n, head.group_key.as_deref()),
        (1, Some("a"))
    );
    assert!(
        owner.claim(&q, "a", LONG, 10).await.unwrap().is_empty(),
        "one run at a time"
    );
    assert_eq!(
        fetcher.group_candidates(&q, 10, &[]).await.unwrap(),
        ["b"],
        "a is in flight"
    );
    assert_eq!(
        owner.extend(&[head.lease()], LONG).await.unwrap(),
        Extension::new(1, Vec::new())
    );
    let settled = owner
        .settle(&GroupSettle::default().ack([head.lease()]), GroupNext::Keep)
        .await
        .unwrap();
    assert_eq!(settled.acked, [head.id]);
    assert_eq!(
        owner.extend(&[head.lease()], LONG).await.unwrap(),
        Extension::new(0, vec![head.lease()]),
        "an acked head's lease is lost"
    );

    let second = one(owner.claim(&q, "a", LONG, 1).await.unwrap());
    assert_eq!(second.decode::<Job>().unwrap().n, 3, "send order");
    let settle = GroupSettle::default().retry(second.lease(), LONG, Some("later"));
    assert!(owner.settle(&settle, GroupNext::Keep).await.unwrap().failed);
    assert!(
        owner.claim(&q, "a", LONG, 10).await.unwrap().is_empty(),
        "a delayed head blocks the group"
    );
    owner.unlock(&q, "a").await.unwrap();
    assert!(
        other.try_lock(&q, "a").await.unwrap(),
        "unlocked: another session may take it"
    );
    drop(other);
    // The server notices a closed connection asynchronously: wait for the release.
    let start = Instant::now();
    while !owner.try_lock(&q, "a").await.unwrap() {
        assert!(
            start.elapsed() < DEADLINE,
            "a closed session's locks are never released"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    assert!(owner.try_lock(&q, "b").await.unwrap());
    let b = one(owner.claim(&q, "b", LONG, 10).await.unwrap());
    let settle = GroupSettle::default().dead_letter(b.lease(), "bad");
    assert!(owner.settle(&settle, GroupNext::Keep).await.unwrap().failed);
    assert!(
        owner.claim(&q, "b", LONG, 10).await.unwrap().is_empty(),
        "b is empty"
    );
    assert_eq!(backend.list_dead(&q, 10).await.unwrap().len(), 1);
}

fn one(mut run: Vec<Message>) -> Message {
    assert_eq!(run.len(), 1, "{run:?}");
    run.remove(0)
}

/// A group's run is its oldest messages up to the first delayed one; a settle acks,
/// fails and gives back in one step and claims the next run, which stops before a retried
/// or given-back message; given-back messages keep the attempts they had; an empty next
/// run releases the lock, and so does an explicit release.
pub async fn a_group_run_is_settled_and_the_next_claimed_in_one_step<B: Backend>(backend: B) {
    let q = queue(&backend, "runs").await;
    for n in 1..=6 {
        backend.send(&q, job(n).group("g")).await.unwrap();
    }
    backend
        .send(&q, job(7).group("g").delay(LONG))
        .await
        .unwrap();
    backend.send(&q, job(8).group("g")).await.unwrap();
    let mut owner = backend.open_group_session().await.unwrap();
    let mut other = backend.open_group_session().await.unwrap();
    let run = owner
        .lock_and_claim(&q, "g", LONG, 3)
        .await
        .unwrap()
        .expect("unlocked");
    assert_eq!(numbers(&run), [1, 2, 3], "the oldest, in order, at most 3");
    assert!(run.iter().all(|m| m.attempts == 1));
    assert_eq!(
        other.lock_and_claim(&q, "g", LONG, 3).await.unwrap(),
        None,
        "locked"
    );

    // 1 succeeded, 2 failed (retried now), 3 never started: one step, and the next run
    // stops before the retried 2.
    let settle = GroupSettle::default()
        .ack([run[0].lease()])
        .retry(run[1].lease(), Duration::ZERO, Some("flaky"))
        .give_back([run[2].lease()]);
    let next = GroupNext::Claim {
        queue: &q,
        group: "g",
        lease: LONG,
        max: 10,
    };
    let settled = owner.settle(&settle, next).await.unwrap();
    assert_eq!(settled.acked, [run[0].id]);
    assert!(settled.failed);
    assert_eq!(settled.given_back, 1);
    assert!(
        settled.claimed.is_empty(),
        "nothing after a message retried in the same step: {:?}",
        numbers(&settled.claimed)
    );
    // An empty next run released the lock. The retry is due now: the next owner's run
    // starts with it, and 3 kept its attempts.
    let run = other
        .lock_and_claim(&q, "g", LONG, 3)
        .await
        .unwrap()
        .expect("an empty next run releases the lock");
    assert_eq!(numbers(&run), [2, 3, 4]);
    let attempts: Vec<u32> = run.iter().map(|m| m.attempts).collect();
    assert_eq!(attempts, [2, 1, 1], "a given-back claim counts no attempt");

    // All done: the next run comes in the same step, up to the delayed 7.
    let next = GroupNext::Claim {
        queue: &q,
        group: "g",
        lease: LONG,
        max: 10,
    };
    let settle = GroupSettle::default().ack(run.iter().map(Message::lease));
    let settled = other.settle(&settle, next).await.unwrap();
    assert_eq!(settled.acked.len(), 3);
    assert_eq!(
        numbers(&settled.claimed),
        [5, 6],
        "the next run, up to the delayed 7"
    );
    let run = settled.claimed;

    // 5 done, 6 given back: the next run starts with 6 again, its attempts unchanged.
    let settle = GroupSettle::default()
        .ack([run[0].lease()])
        .give_back([run[1].lease()]);
    let settled = other.settle(&settle, GroupNext::Keep).await.unwrap();
    assert_eq!((settled.acked.len(), settled.given_back), (1, 1));
    let run = other.claim(&q, "g", LONG, 10).await.unwrap();
    assert_eq!(numbers(&run), [6]);
    assert_eq!(run[0].attempts, 1);
    // 6 dead-lettered, then nothing to claim before the delayed 7: the lock goes.
    let settle = GroupSettle::default().dead_letter(run[0].lease(), "poison");
    let settled = other.settle(&settle, next).await.unwrap();
    assert!(settled.failed && settled.claimed.is_empty());
    assert_eq!(backend.list_dead(&q, 10).await.unwrap().len(), 1);
    let start = Instant::now();
    loop {
        match owner.lock_and_claim(&q, "g", LONG, 10).await.unwrap() {
            Some(run) => {
                assert!(run.is_empty(), "7 is delayed: {:?}", numbers(&run));
                break;
            }
            None => assert!(start.elapsed() < DEADLINE, "the lock was never released"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // An explicit release, with nothing to settle.
    assert!(owner.try_lock(&q, "g").await.unwrap());
    let release = GroupNext::Release {
        queue: &q,
        group: "g",
    };
    owner
        .settle(&GroupSettle::default(), release)
        .await
        .unwrap();
    assert!(other.try_lock(&q, "g").await.unwrap(), "released");
}

/// When the session owning a group goes away mid-run, recovery makes its whole run
/// claimable again, but only once an earlier pass saw it orphaned for the grace period;
/// while the owner lives, recovery leaves it alone.
pub async fn recovery_frees_the_work_of_a_dead_group_owner<B: Backend>(backend: B) {
    let q = queue(&backend, "recovered").await;
    for n in 1..=3 {
        backend.send(&q, job(n).group("g")).await.unwrap();
    }
    let mut recovery = backend.open_group_recovery().await.unwrap();
    let mut owner = backend.open_group_session().await.unwrap();
    assert!(owner.try_lock(&q, "g").await.unwrap());
    let run = owner.claim(&q, "g", LONG, 10).await.unwrap();
    assert_eq!(numbers(&run), [1, 2, 3]);
    let queues = std::slice::from_ref(&q);
    assert_eq!(
        recovery.recover(queues, Duration::ZERO).await.unwrap(),
        crate::Recovered::default(),
        "the owner is alive"
    );
    drop(owner);
    until_seen_orphaned(&mut recovery, queues, 3).await;
    assert_eq!(
        recovery.recover(queues, Duration::ZERO).await.unwrap(),
        crate::Recovered {
            freed: 3,
            waiting: 0
        },
        "seen orphaned by an earlier pass: the whole run freed"
    );
    let mut next = backend.open_group_session().await.unwrap();
    assert!(next.try_lock(&q, "g").await.unwrap());
    let again = next.claim(&q, "g", LONG, 10).await.unwrap();
    let again: Vec<(MessageId, u32)> = again.iter().map(|m| (m.id, m.attempts)).collect();
    let before: Vec<(MessageId, u32)> = run.iter().map(|m| (m.id, 2)).collect();
    assert_eq!(again, before, "claimable again, in order");
    let info = ProcessInfo::current(vec![q.clone()], "async", 1);
    let id = recovery.register(&info).await.unwrap();
    assert!(
        recovery.heartbeat(id, 1).await.unwrap(),
        "the recovery session records heartbeats"
    );
}

/// A group session that failed leaves its run leased, and its group's lock may be gone with
/// it: another session settles what it left, without the lock. A message that finished is
/// acked; claims that never started are claimable again with no attempt counted. Settled
/// twice, the second finds nothing; a claim that recovery freed meanwhile (counting its
/// attempt) is not given back.
pub async fn a_failed_group_sessions_leftovers_are_settled_without_its_lock<B: Backend>(
    backend: B,
) {
    let q = queue(&backend, "failed_session").await;
    for n in 1..=4 {
        backend.send(&q, job(n).group("g")).await.unwrap();
    }
    let mut recovery = backend.open_group_recovery().await.unwrap();
    let mut failed = backend.open_group_session().await.unwrap();
    let run = failed
        .lock_and_claim(&q, "g", LONG, 10)
        .await
        .unwrap()
        .expect("unlocked");
    assert_eq!(numbers(&run), [1, 2, 3, 4]);
    // 1 finished (its ack not written), 2 was running when the session failed, 3 and 4
    // never started.
    drop(failed);
    let mut fresh = backend.open_group_session().await.unwrap();
    let finished = [run[0].lease()];
    let unstarted: Vec<Lease> = run[2..].iter().map(Message::lease).collect();
    assert_eq!(
        fresh.settle_orphans(&finished, &unstarted).await.unwrap(),
        (1, 2)
    );
    assert_eq!(
        fresh.settle_orphans(&finished, &unstarted).await.unwrap(),
        (0, 0),
        "settled already"
    );
    // Recovery frees the running one once it has seen it without its group's lock.
    let queues = std::slice::from_ref(&q);
    until_seen_orphaned(&mut recovery, queues, 1).await;
    assert_eq!(
        recovery
            .recover(queues, Duration::ZERO)
            .await
            .unwrap()
            .freed,
        1,
        "only the running claim was left to recovery"
    );
    assert_eq!(
        fresh.settle_orphans(&[], &[run[1].lease()]).await.unwrap(),
        (0, 0),
        "a claim recovery freed is not given back"
    );
    let again = fresh
        .lock_and_claim(&q, "g", LONG, 10)
        .await
        .unwrap()
        .expect("the failed session's lock is gone");
    assert_eq!(
        numbers(&again),
        [2, 3, 4],
        "the rest, claimable again, in order"
    );
    let attempts: Vec<u32> = again.iter().map(|m| m.attempts).collect();
    assert_eq!(
        attempts,
        [2, 1, 1],
        "the running claim counted, the given-back ones not"
    );
}

/// Runs recovery passes that free nothing (a grace no claim reaches) until `waiting`
/// claims are seen orphaned. The server notices a closed connection asynchronously, and no
/// backend says when: recovery is asked again every 20 ms.
async fn until_seen_orphaned<R: GroupRecovery>(
    recovery: &mut R,
    queues: &[QueueName],
    waiting: u64,
) {
    const NEVER: Duration = Duration::from_secs(3600);
    let start = Instant::now();
    loop {
        let pass = recovery.recover(queues, NEVER).await.unwrap();
        assert_eq!(pass.freed, 0, "freed before the grace period: {pass:?}");
        if pass.waiting == waiting {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "{waiting} claims of a dead owner are never seen orphaned: {pass:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn stream(name: &str) -> crate::StreamName {
    crate::StreamName::new(name).expect("valid stream name")
}

/// Events come back after a cursor, in id order, bounded by the limit; streams are apart.
pub async fn stream_events_read_back_in_id_order<S: crate::StreamStore>(store: S) {
    let (a, b) = (stream("orders"), stream("users"));
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(
            store
                .publish(&a, "created", &format!("{{\"n\":{n}}}"))
                .await
                .unwrap(),
        );
    }
    store.publish(&b, "joined", "x").await.unwrap();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "ids increase: {ids:?}");
    let all = store.read_after(&a, 0, 100).await.unwrap();
    assert_eq!(all.iter().map(|e| e.id).collect::<Vec<_>>(), ids);
    assert_eq!(
        (all[0].event.as_str(), all[0].data.as_str()),
        ("created", "{\"n\":0}")
    );
    assert_eq!(all[0].stream, a);
    let page = store.read_after(&a, ids[1], 2).await.unwrap();
    assert_eq!(page.iter().map(|e| e.id).collect::<Vec<_>>(), &ids[2..4]);
    assert!(store.read_after(&a, ids[4], 10).await.unwrap().is_empty());
    assert_eq!(store.read_after(&b, 0, 10).await.unwrap().len(), 1);
    assert_eq!(store.latest(&a).await.unwrap(), ids[4]);
    assert_eq!(store.latest(&stream("never_used")).await.unwrap(), 0);
    assert!(crate::StreamName::new("No Spaces").is_err());
}

/// A broadcast small enough rides the notification only; a larger one is stored.
pub async fn oversized_broadcast_is_stored_durably<S: crate::StreamStore>(store: S) {
    let s = stream("live");
    assert_eq!(store.broadcast(&s, "tick", "small").await.unwrap(), None);
    assert!(
        store.read_after(&s, 0, 10).await.unwrap().is_empty(),
        "ephemeral: not stored"
    );
    let big = "x".repeat(crate::MAX_EPHEMERAL_BYTES + 1);
    let id = store
        .broadcast(&s, "tick", &big)
        .await
        .unwrap()
        .expect("stored durably");
    let stored = store.read_after(&s, 0, 10).await.unwrap();
    assert_eq!(
        (stored.len(), stored[0].id, stored[0].data.len()),
        (1, id, big.len())
    );
}

/// Data over the payload limit and an overlong event type are refused, published or
/// broadcast, and nothing is stored.
pub async fn oversized_stream_events_are_refused<S: crate::StreamStore>(store: S) {
    let s = stream("bounded");
    let big = "x".repeat(crate::DEFAULT_MAX_PAYLOAD_BYTES + 1);
    let long_type = "t".repeat(crate::MAX_STREAM_EVENT_TYPE_LEN + 1);
    let err = store.publish(&s, "e", &big).await.unwrap_err();
    assert!(matches!(err, Error::PayloadTooLarge { .. }), "{err}");
    let err = store.broadcast(&s, "e", &big).await.unwrap_err();
    assert!(matches!(err, Error::PayloadTooLarge { .. }), "{err}");
    let err = store.publish(&s, &long_type, "d").await.unwrap_err();
    assert!(err.to_string().contains("at most 255 bytes"), "{err}");
    let err = store.broadcast(&s, &long_type, "d").await.unwrap_err();
    assert!(err.to_string().contains("at most 255 bytes"), "{err}");
    assert!(store.read_after(&s, 0, 10).await.unwrap().is_empty());
    let fits = "x".repeat(crate::DEFAULT_MAX_PAYLOAD_BYTES);
    store.publish(&s, &"t".repeat(255), &fits).await.unwrap();
}

/// Pruning deletes old events and marks the stream, so a cursor before them is a gap.
pub async fn pruning_moves_the_horizon<S: crate::StreamStore>(store: S) {
    let s = stream("pruned");
    let first = store.publish(&s, "e", "1").await.unwrap();
    let last = store.publish(&s, "e", "2").await.unwrap();
    assert_eq!(
        store.horizon(&s, 0).await.unwrap(),
        crate::Horizon::Complete
    );
    assert_eq!(
        store.prune(Duration::from_secs(3600), 10).await.unwrap(),
        0,
        "nothing old yet"
    );
    let start = Instant::now();
    let mut pruned = 0;
    while pruned < 2 {
        pruned += store.prune(Duration::ZERO, 1).await.unwrap();
        assert!(start.elapsed() < DEADLINE, "events never pruned");
    }
    assert!(store.read_after(&s, 0, 10).await.unwrap().is_empty());
    assert_eq!(
        store.latest(&s).await.unwrap(),
        last,
        "pruning keeps the stream's position"
    );
    assert_eq!(store.horizon(&s, first).await.unwrap(), crate::Horizon::Gap);
    assert_eq!(
        store.horizon(&s, last).await.unwrap(),
        crate::Horizon::Complete
    );
    let next = store.publish(&s, "e", "3").await.unwrap();
    assert!(next > last);
}

/// A unique key admits one unfinished job per queue: duplicates get the existing id back
/// or are refused (the whole batch with them); the key is free again once the job is
/// acked, discarded or dead-lettered.
pub async fn unique_keys_hold_until_the_job_leaves<B: Backend>(backend: B) {
    use crate::{OnConflict, Unique};
    let q = queue(&backend, "unique").await;
    let other = queue(&backend, "unique_other").await;
    let reject = |n, key: &str| job(n).unique(Unique::new(key).on_conflict(OnConflict::Reject));
    let first = backend
        .send(&q, job(1).unique(Unique::new("k")))
        .await
        .unwrap();
    let ids = backend
        .send_batch(
            &q,
            vec![
                job(2).unique(Unique::new("k")),
                job(3),
                job(4).unique(Unique::new("j")),
                job(5).unique(Unique::new("j")),
            ],
        )
        .await
        .unwrap();
    assert_eq!(ids[0], first, "a duplicate gets the existing id");
    assert_eq!(
        ids[2], ids[3],
        "a duplicate within the batch gets the first one's id"
    );
    assert_ne!(ids[1], ids[2]);
    // Keys are per queue.
    backend.send(&other, reject(6, "k")).await.unwrap();

    let err = backend
        .send_batch(&q, vec![job(7), reject(8, "k")])
        .await
        .unwrap_err();
    match err {
        Error::DuplicateJob { key, existing, .. } => {
            assert_eq!(key, "k");
            assert_eq!(existing, Some(first));
        }
        other => panic!("expected DuplicateJob, got {other}"),
    }
    assert_eq!(
        stats_of(&backend, &q).await.depth(),
        3,
        "the refused batch stored nothing"
    );
    let err = backend
        .send(&q, job(9).unique(Unique::new("")))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");

    // Ack, dead-letter and discard release their keys.
    let claimed = backend.claim(&q, 10, LONG).await.unwrap();
    assert_eq!(numbers(&claimed), [1, 3, 4]);
    backend.ack(&[claimed[0].lease()]).await.unwrap();
    backend
        .dead_letter(&claimed[2].lease(), "boom")
        .await
        .unwrap();
    let again = backend.send(&q, reject(10, "k")).await.unwrap();
    assert_ne!(again, first, "the acked job's key is free");
    backend.send(&q, reject(11, "j")).await.unwrap();
    let claimed = backend.claim(&q, 10, LONG).await.unwrap();
    assert_eq!(numbers(&claimed), [10, 11]);
    backend.ack(&[claimed[0].lease()]).await.unwrap();
    backend.send(&q, reject(12, "k")).await.unwrap();
}

/// Claims limited jobs on a fresh fetcher.
async fn claim_limited<B: Backend>(backend: &B, q: &QueueName, lease: Duration) -> Vec<Message> {
    let mut fetcher = backend.open_fetcher().await.expect("fetcher");
    fetcher
        .claim_limited(q, 100, lease)
        .await
        .expect("limited claim")
}

/// Jobs with a limit key are claimed only by the limited claim, at most the key's
/// concurrency at once; an ack, a dead letter or an expired lease frees a slot; other keys
/// and keys without limits are not held back; a dead letter keeps its key when retried.
pub async fn concurrency_limits_count_live_leases<B: Backend + crate::Limits>(backend: B) {
    use crate::KeyLimit;
    let q = queue(&backend, "limited").await;
    backend
        .set_limit("hot", KeyLimit::concurrency(3))
        .await
        .unwrap();
    backend
        .set_limit("warm", KeyLimit::concurrency(1))
        .await
        .unwrap();
    assert!(backend
        .set_limit("hot", KeyLimit::concurrency(0))
        .await
        .is_err());
    assert!(backend
        .set_limit("", KeyLimit::concurrency(1))
        .await
        .is_err());
    let err = backend
        .send(&q, job(0).limit_key("hot").group("g"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");
    let mut batch: Vec<NewMessage> = (0..6).map(|n| job(n).limit_key("hot")).collect();
    batch.extend((10..12).map(|n| job(n).limit_key("warm")));
    batch.extend((20..22).map(|n| job(n).limit_key("free")));
    batch.push(job(30));
    backend.send_batch(&q, batch).await.unwrap();

    let plain = backend.claim(&q, 100, LONG).await.unwrap();
    assert_eq!(
        numbers(&plain),
        [30],
        "the plain claim leaves limited jobs alone"
    );
    let mut first = claim_limited(&backend, &q, LONG).await;
    first.sort_by_key(|m| m.id);
    assert_eq!(
        numbers(&first),
        [0, 1, 2, 10, 20, 21],
        "3 hot, 1 warm, every free one"
    );
    assert!(
        claim_limited(&backend, &q, LONG).await.is_empty(),
        "all at their limits"
    );
    assert_eq!(backend.limits().await.unwrap().len(), 2);

    // An ack frees a slot.
    backend.ack(&[first[0].lease()]).await.unwrap();
    let next = claim_limited(&backend, &q, SHORT).await;
    assert_eq!(numbers(&next), [3]);
    assert!(claim_limited(&backend, &q, LONG).await.is_empty());
    // An expired lease frees its slot (the job itself is ready again too).
    let start = Instant::now();
    let again = loop {
        let claimed = claim_limited(&backend, &q, LONG).await;
        if !claimed.is_empty() {
            break claimed;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "the expired lease never freed its slot"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(again.len(), 1, "one slot freed");
    // A dead letter frees its slot and keeps its key when retried.
    backend
        .dead_letter(&first[1].lease(), "boom")
        .await
        .unwrap();
    let dead = backend.list_dead(&q, 10).await.unwrap();
    assert_eq!(dead[0].limit_key.as_deref(), Some("hot"));
    backend.retry_dead(&q, Selection::All).await.unwrap();
    assert!(backend.claim(&q, 10, LONG).await.unwrap().is_empty());
    assert_eq!(claim_limited(&backend, &q, LONG).await.len(), 1);
    assert!(claim_limited(&backend, &q, LONG).await.is_empty());
    // Without its limit, a key runs freely.
    assert!(backend.remove_limit("warm").await.unwrap());
    assert!(!backend.remove_limit("warm").await.unwrap());
    assert_eq!(numbers(&claim_limited(&backend, &q, LONG).await), [11]);
}

/// A rate limit lets at most N jobs of the key start per window; a new window lets more.
pub async fn rate_limits_count_starts_per_window<B: Backend + crate::Limits>(backend: B) {
    use crate::KeyLimit;
    let q = queue(&backend, "rated").await;
    backend
        .set_limit("api", KeyLimit::rate(2, LONG))
        .await
        .unwrap();
    backend
        .send_batch(&q, (0..5).map(|n| job(n).limit_key("api")).collect())
        .await
        .unwrap();
    let first = claim_limited(&backend, &q, LONG).await;
    assert_eq!(numbers(&first), [0, 1]);
    backend
        .ack(&[first[0].lease(), first[1].lease()])
        .await
        .unwrap();
    assert!(
        claim_limited(&backend, &q, LONG).await.is_empty(),
        "finishing does not refill the window"
    );
    backend
        .set_limit("api", KeyLimit::rate(2, Duration::from_millis(100)))
        .await
        .unwrap();
    let start = Instant::now();
    let mut started = Vec::new();
    while started.len() < 3 {
        let claimed = claim_limited(&backend, &q, LONG).await;
        assert!(claimed.len() <= 2, "at most 2 per window");
        started.extend(numbers(&claimed));
        assert!(start.elapsed() < DEADLINE, "new windows let the rest start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(started, [2, 3, 4]);
}

/// An open circuit breaker makes every claim of the queue hand out nothing, shows in the
/// stats, and closes by itself after the backoff; the queue's breaker settings round-trip.
pub async fn open_breaker_closes_the_queue_until_its_backoff_passes<B: Backend>(backend: B) {
    let breaker = crate::CircuitBreaker::new(3, SHORT).unwrap();
    assert!(crate::CircuitBreaker::new(0, LONG).is_err());
    let options = QueueOptions::default().circuit_breaker(breaker);
    let q = queue_with(&backend, "breaker", options.clone()).await;
    assert_eq!(backend.queue_info(&q).await.unwrap().options, options);
    backend
        .send_batch(&q, (0..3).map(job).collect())
        .await
        .unwrap();
    backend.send(&q, job(9).limit_key("k")).await.unwrap();
    assert_eq!(stats_of(&backend, &q).await.breaker_open_for, None);

    let tripped = Instant::now();
    backend.trip_breaker(&q, SHORT).await.unwrap();
    let stats = stats_of(&backend, &q).await;
    assert!(stats.breaker_open_for.is_some(), "visible in the stats");
    assert!(!stats.paused, "not a manual pause");
    assert!(backend.claim(&q, 10, LONG).await.unwrap().is_empty());
    let mut fetcher = backend.open_fetcher().await.unwrap();
    assert!(fetcher
        .claim_limited(&q, 10, LONG)
        .await
        .unwrap()
        .is_empty());
    let missing = QueueName::new("missing").unwrap();
    assert!(matches!(
        backend.trip_breaker(&missing, LONG).await,
        Err(Error::QueueNotFound(_))
    ));

    while stats_of(&backend, &q).await.breaker_open_for.is_some() {
        assert!(tripped.elapsed() < DEADLINE, "the breaker never closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Open for its whole backoff (a busy machine only makes this later).
    assert!(
        tripped.elapsed() >= SHORT,
        "the breaker closed after {:?} of a {SHORT:?} backoff",
        tripped.elapsed()
    );
    assert_eq!(backend.claim(&q, 10, LONG).await.unwrap().len(), 3);
    assert_eq!(fetcher.claim_limited(&q, 10, LONG).await.unwrap().len(), 1);
}

/// A while-running unique key never refuses a send, but runs one job with the key at a
/// time per queue.
pub async fn while_running_keys_run_one_job_at_a_time<B: Backend>(backend: B) {
    use crate::{OnConflict, Unique};
    let q = queue(&backend, "one_at_a_time").await;
    let other = queue(&backend, "one_at_a_time_2").await;
    let w = || Unique::while_running("w").on_conflict(OnConflict::Reject);
    let ids = backend
        .send_batch(&q, (0..3).map(|n| job(n).unique(w())).collect())
        .await
        .unwrap();
    assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 3, "all stored");
    backend.send(&other, job(9).unique(w())).await.unwrap();
    let err = backend
        .send(&q, job(4).unique(w()).limit_key("k"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err}");

    assert!(backend.claim(&q, 10, LONG).await.unwrap().is_empty());
    let first = claim_limited(&backend, &q, LONG).await;
    assert_eq!(numbers(&first), [0], "one at a time");
    assert!(claim_limited(&backend, &q, LONG).await.is_empty());
    assert_eq!(
        numbers(&claim_limited(&backend, &other, LONG).await),
        [9],
        "per queue"
    );
    backend.ack(&[first[0].lease()]).await.unwrap();
    assert_eq!(numbers(&claim_limited(&backend, &q, LONG).await), [1]);
}
