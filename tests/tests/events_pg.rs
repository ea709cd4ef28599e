//! Event subscribers on Postgres: idempotent consumers whose process is killed (SIGKILL,
//! a real child process) after the handler ran but before the ack (not run again), or
//! before the handler finished (run again); dedup record and event log pruning.
//!
//! The killed subscriber is the `idempotent_subscriber` binary of this crate (the same
//! subscriber as `pgbus_tests::idempotent::start_subscriber`, in a process of its own).
//! Its handler cannot share a counter with the test process, so every handler run records
//! itself in the `test_runs` table.

use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use pgbus_core::{Deduplication, EventId, NewEvent, QueueName, QueueOptions, RetryPolicy, Topics};
use pgbus_pg::{connect, PgBackend};
use pgbus_tests::idempotent::{start_subscriber, Paid, Run, CHILD_ROLE};
use pgbus_tests::{connections, create, eventually, fresh_backend, stats_of, wait_until_empty};

const DEADLINE: Duration = Duration::from_secs(30);

/// A short lease, so a killed worker's message comes back quickly.
fn options() -> QueueOptions {
    QueueOptions::default().lease(Duration::from_secs(1)).retry(
        RetryPolicy::builder()
            .base(Duration::from_millis(10))
            .cap(Duration::from_millis(50))
            .max_attempts(5)
            .build()
            .unwrap(),
    )
}

/// Creates the table handler runs record themselves in.
async fn create_runs_table(url: &str) {
    let client = connect(url, "test").await.unwrap();
    client
        .batch_execute(
            "CREATE TABLE test_runs (
                 seq bigserial PRIMARY KEY,
                 event_id text NOT NULL,
                 attempt int NOT NULL,
                 phase text NOT NULL
             )",
        )
        .await
        .unwrap();
}

/// The recorded handler runs, in order: (event id, attempt, phase).
async fn runs(url: &str) -> Vec<(String, i32, String)> {
    let client = connect(url, "observer").await.unwrap();
    client
        .query(
            "SELECT event_id, attempt, phase FROM test_runs ORDER BY seq",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect()
}

/// A subscriber in a child process (the `idempotent_subscriber` binary). Dropping it
/// kills and reaps the child, so a failed assertion leaves no process behind.
struct ChildSubscriber(Child);

impl ChildSubscriber {
    fn spawn(url: &str, queue: &QueueName, run: Run) -> Self {
        let child = Command::new(env!("CARGO_BIN_EXE_idempotent_subscriber"))
            .args([url, queue.as_str(), run.as_str()])
            .stdin(Stdio::null())
            .spawn()
            .expect("spawning the child process");
        Self(child)
    }

    /// Fails the test if the child has exited (it only ever stops by being killed).
    fn assert_running(&mut self) {
        if let Some(status) = self.0.try_wait().unwrap() {
            panic!("the child process exited on its own: {status}");
        }
    }

    /// Kills the running child with SIGKILL (what `Child::kill` sends on Unix) and reaps it.
    fn kill(mut self) {
        self.assert_running();
        self.0.kill().unwrap();
        let status = self.0.wait().unwrap();
        assert_eq!(status.signal(), Some(9), "SIGKILLed, not exited: {status}");
    }
}

impl Drop for ChildSubscriber {
    fn drop(&mut self) {
        // Already reaped after `kill`: both calls then do nothing.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn dedup_state(url: &str) -> Option<(String, i32)> {
    let client = connect(url, "observer").await.unwrap();
    client
        .query_opt("SELECT state, attempt FROM pgbus.event_dedup", &[])
        .await
        .unwrap()
        .map(|row| (row.get(0), row.get(1)))
}

async fn publish_when_bound(backend: &PgBackend) -> EventId {
    eventually("the subscriber declared its binding", DEADLINE, || async {
        !backend.bindings().await.unwrap().is_empty()
    })
    .await;
    let event = NewEvent::encode("order.paid", &Paid { order: 1 }).unwrap();
    let published = backend.publish(event).await.unwrap();
    assert_eq!(published.copies, 1);
    published.id
}

/// How many of the child's connections are in the hanging ack trigger.
async fn child_backends_in_the_ack(url: &str) -> i64 {
    let client = connect(url, "observer").await.unwrap();
    client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = $1
               AND wait_event = 'PgSleep'",
            &[&format!("pgbus:{CHILD_ROLE}")],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_the_handler_ran_but_before_the_ack_the_event_is_not_handled_again() {
    let (backend, url) = fresh_backend(4).await;
    let q = create(&backend, "billing", options()).await;
    create_runs_table(&url).await;
    // The ack hangs: the child is provably between completion and ack when killed.
    let client = connect(&url, "test").await.unwrap();
    client
        .batch_execute(
            "CREATE FUNCTION test_hang_acks() RETURNS trigger LANGUAGE plpgsql AS
                 $$ BEGIN PERFORM pg_sleep(3600); RETURN OLD; END $$;
             CREATE TRIGGER test_hang_acks BEFORE DELETE ON pgbus.messages
                 FOR EACH ROW EXECUTE FUNCTION test_hang_acks();",
        )
        .await
        .unwrap();
    let mut child = ChildSubscriber::spawn(&url, &q, Run::Finishes);
    let event = publish_when_bound(&backend).await;
    eventually(
        "the child's handler ran, its event is completed and the ack waits",
        DEADLINE,
        || {
            child.assert_running();
            async {
                dedup_state(&url).await.is_some_and(|s| s.0 == "completed")
                    && child_backends_in_the_ack(&url).await == 1
            }
        },
    )
    .await;
    child.kill();
    // The server does not notice the dead client while the ack sleeps: end the child's
    // connections, so the ack rolls back and the message's lease can expire.
    client
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = $1",
            &[&format!("pgbus:{CHILD_ROLE}")],
        )
        .await
        .unwrap();
    eventually("the child's connections are gone", DEADLINE, || async {
        connections(&url, CHILD_ROLE).await == 0
    })
    .await;
    assert_eq!(stats_of(&backend, &q).await.depth(), 1, "never acked");

    client
        .batch_execute("DROP TRIGGER test_hang_acks ON pgbus.messages")
        .await
        .unwrap();
    let second = start_subscriber(&url, &q, "second", Run::Finishes);
    wait_until_empty(&backend, &q, DEADLINE).await;
    second.abort();
    let id = event.to_string();
    assert_eq!(
        runs(&url).await,
        [
            (id.clone(), 1, "started".into()),
            (id, 1, "finished".into())
        ],
        "handled once, by the killed child, not a second time"
    );
    assert_eq!(dedup_state(&url).await, Some(("completed".into(), 1)));
    assert_eq!(stats_of(&backend, &q).await.dead_lettered, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_before_the_handler_finished_the_event_is_handled_again() {
    let (backend, url) = fresh_backend(4).await;
    let q = create(&backend, "billing", options()).await;
    create_runs_table(&url).await;
    let mut child = ChildSubscriber::spawn(&url, &q, Run::Hangs);
    let event = publish_when_bound(&backend).await;
    eventually(
        "the child's handler started and claimed the event",
        DEADLINE,
        || {
            child.assert_running();
            async {
                dedup_state(&url).await.is_some_and(|s| s.0 == "claimed")
                    && runs(&url).await.len() == 1
            }
        },
    )
    .await;
    child.kill();

    let second = start_subscriber(&url, &q, "second", Run::Finishes);
    wait_until_empty(&backend, &q, DEADLINE).await;
    second.abort();
    let id = event.to_string();
    assert_eq!(
        runs(&url).await,
        [
            (id.clone(), 1, "started".into()),
            (id.clone(), 2, "started".into()),
            (id, 2, "finished".into()),
        ],
        "handled again after the kill, finished once"
    );
    assert_eq!(dedup_state(&url).await, Some(("completed".into(), 2)));
    assert_eq!(stats_of(&backend, &q).await.dead_lettered, 0);
}

#[tokio::test]
async fn dedup_records_and_the_event_log_are_pruned_in_bounded_batches() {
    let (backend, url) = fresh_backend(4).await;
    let q = create(&backend, "billing", options()).await;
    backend
        .bind(&"order.*".parse().unwrap(), &q, Default::default())
        .await
        .unwrap();
    let events: Vec<_> = (0..7)
        .map(|i| NewEvent::encode("order.paid", &Paid { order: i }).unwrap())
        .collect();
    let published = backend.publish_batch(events).await.unwrap();
    let lease = pgbus_core::Lease {
        id: pgbus_core::MessageId(1),
        attempt: 1,
    };
    for p in &published {
        backend.claim_event(&q, p.id, &lease).await.unwrap();
    }
    let client = connect(&url, "test").await.unwrap();
    client
        .batch_execute(
            "UPDATE pgbus.event_dedup SET updated_at = now() - interval '2 hours';
             UPDATE pgbus.events SET published_at = now() - interval '2 hours'
             WHERE seq IN (SELECT seq FROM pgbus.events ORDER BY seq LIMIT 5);",
        )
        .await
        .unwrap();
    let hour = Duration::from_secs(3600);
    assert_eq!(backend.prune_dedup(hour, 2).await.unwrap(), 7);
    assert_eq!(backend.prune_event_log(hour, 2).await.unwrap(), 5);
    assert_eq!(backend.topic_stats().await.unwrap()[0].published, 2);
    assert!(
        backend.prune_dedup(hour, 0).await.is_err(),
        "a zero batch is refused"
    );
}
