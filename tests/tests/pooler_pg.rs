//! The library behind PgBouncer in transaction mode (pool smaller than the worker's
//! concurrency): `Pooler::Transaction` keeps no session state, ordered groups take row
//! leases, and wake-ups come over a direct LISTEN connection.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgbus_core::{NewMessage, Producer, QueueAdmin, QueueName, QueueOptions, WakeupSource};
use pgbus_exec::{JobContext, Outcome, Worker};
use pgbus_pg::{test_database_behind_pgbouncer, GroupLocks, PgBackend, PgListener, Pooler};
use pgbus_tests::{eventually, stats_of};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    group: Option<u32>,
    n: u32,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_and_grouped_jobs_run_once_in_order_behind_a_transaction_pooler() {
    let (database, bouncer) = test_database_behind_pgbouncer(3).await;
    let pooled_url = bouncer.url_for(database.name());
    let backend = PgBackend::builder(&pooled_url)
        .pooler(Pooler::Transaction)
        .max_connections(4)
        .build()
        .unwrap();
    assert!(matches!(backend.group_locks(), GroupLocks::Lease { .. }));
    backend.migrate().await.unwrap();
    let q = QueueName::new("jobs").unwrap();
    backend
        .create_queue(&q, &QueueOptions::default())
        .await
        .unwrap();
    // More than a bulk send (`COPY`) takes: behind the pooler it takes the one-statement
    // send (PgBouncer hangs on the prepared `COPY`).
    let plain: Vec<NewMessage> = (0..1_500)
        .map(|n| NewMessage::encode(&Job { group: None, n }).unwrap())
        .collect();
    backend.send_batch(&q, plain).await.unwrap();
    for n in 0..20 {
        let grouped: Vec<NewMessage> = (0..5)
            .map(|g| {
                NewMessage::encode(&Job { group: Some(g), n })
                    .unwrap()
                    .group(format!("g{g}"))
            })
            .collect();
        backend.send_batch(&q, grouped).await.unwrap();
    }

    // LISTEN over a direct connection: the pooler cannot carry it.
    let listener: Arc<dyn WakeupSource> = Arc::new(PgListener::start(database.url()).unwrap());
    let done: Arc<Mutex<Vec<Job>>> = Arc::default();
    let stop = CancellationToken::new();
    let build = |builder: pgbus_exec::WorkerBuilder<PgBackend>| {
        let done = Arc::clone(&done);
        builder
            .concurrency(8)
            .wakeups(Arc::clone(&listener))
            .handle(q.clone(), move |_ctx: JobContext<PgBackend>, job: Job| {
                let done = Arc::clone(&done);
                async move {
                    done.lock().unwrap().push(job);
                    Outcome::Ack
                }
            })
    };
    let plain = build(Worker::builder(backend.clone())).build().unwrap();
    let grouped = build(Worker::builder(backend.clone()))
        .build_groups()
        .unwrap();
    let plain = tokio::spawn(plain.run(stop.clone()));
    let grouped = tokio::spawn(grouped.run(stop.clone()));
    eventually("every job handled", DEADLINE, || async {
        done.lock().unwrap().len() >= 1_600
    })
    .await;
    eventually("the queue settled", DEADLINE, || async {
        stats_of(&backend, &q).await.depth() == 0
    })
    .await;
    stop.cancel();
    plain.await.unwrap().unwrap();
    grouped.await.unwrap().unwrap();

    let done = done.lock().unwrap();
    assert_eq!(done.len(), 1_600, "a job ran twice");
    let mut plain_runs: BTreeMap<u32, usize> = BTreeMap::new();
    let mut groups: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for job in done.iter() {
        match job.group {
            None => *plain_runs.entry(job.n).or_default() += 1,
            Some(g) => groups.entry(g).or_default().push(job.n),
        }
    }
    assert_eq!(plain_runs.len(), 1_500);
    assert!(plain_runs.values().all(|&runs| runs == 1));
    assert_eq!(groups.len(), 5);
    for (g, order) in &groups {
        assert_eq!(*order, (0..20).collect::<Vec<_>>(), "group {g}");
    }
}

#[tokio::test]
async fn advisory_group_locks_are_refused_behind_a_transaction_pooler() {
    let err = PgBackend::builder("postgres://u:p@localhost/db")
        .pooler(Pooler::Transaction)
        .group_locks(GroupLocks::Advisory)
        .build()
        .unwrap_err()
        .to_string();
    assert!(err.contains("GroupLocks::Lease"), "{err}");
}
