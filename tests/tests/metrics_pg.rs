//! Worker and backend metrics on PostgreSQL, read back as a Prometheus scrape: a worker
//! runs 100 jobs of which 10 fail for good, and the counts match exactly.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use pgbus_core::{NewMessage, Producer, QueueOptions, RetryPolicy, WakeupSource};
use pgbus_exec::{JobContext, Worker};
use pgbus_pg::{PgBackend, PgListener};
use pgbus_tests::{create, eventually, fresh_backend, stats_of};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(60);

/// A scrape: each series (name and sorted labels) to its value.
struct Scrape(BTreeMap<(String, BTreeSet<String>), f64>);

impl Scrape {
    fn of(handle: &PrometheusHandle) -> Self {
        let text = handle.render();
        let mut series = BTreeMap::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (key, value) = line.rsplit_once(' ').expect("series and value");
            let (name, labels) = match key.split_once('{') {
                Some((name, labels)) => (
                    name,
                    labels
                        .trim_end_matches('}')
                        .split(',')
                        .map(str::to_owned)
                        .collect(),
                ),
                None => (key, BTreeSet::new()),
            };
            series.insert((name.to_owned(), labels), value.parse().expect("a number"));
        }
        Scrape(series)
    }

    /// The value of `name` with exactly `labels` (`key="value"` each); 0 when absent.
    fn get(&self, name: &str, labels: &[&str]) -> f64 {
        let labels = labels.iter().map(|l| (*l).to_owned()).collect();
        self.0
            .get(&(name.to_owned(), labels))
            .copied()
            .unwrap_or(0.0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_worker_counts_its_jobs_by_outcome() {
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .expect("the only recorder of this test process");
    let (backend, url) = fresh_backend(4).await;
    let retry = RetryPolicy::builder()
        .base(Duration::from_millis(10))
        .cap(Duration::from_millis(10))
        .jitter(0.0)
        .max_attempts(2)
        .build()
        .unwrap();
    let q = create(&backend, "metered", QueueOptions::default().retry(retry)).await;
    backend
        .send_batch(
            &q,
            (0..100u32)
                .map(|n| NewMessage::encode(&n).unwrap())
                .collect(),
        )
        .await
        .unwrap();
    // One slow job outlives its short lease's first third, so its lease is extended.
    let listener = Arc::new(PgListener::start(&url).unwrap());
    let worker = Worker::builder(backend.clone())
        .concurrency(8)
        .lease(Duration::from_secs(1))
        .poll_interval(Duration::from_millis(20))
        .wakeups(listener.clone())
        .handle(
            q.clone(),
            |_ctx: JobContext<PgBackend>, n: u32| async move {
                if n == 0 {
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
                if n % 10 == 5 {
                    Err(format!("{n} fails"))
                } else {
                    Ok(())
                }
            },
        )
        .build()
        .unwrap();
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    eventually("every job is finished", DEADLINE, || async {
        let stats = stats_of(&backend, &q).await;
        stats.depth() == 0 && stats.dead_lettered == 10
    })
    .await;
    stop.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!((report.started, report.acked), (110, 90), "{report:?}");

    let scrape = Scrape::of(&handle);
    let queue = r#"queue="metered""#;
    let finished = |outcome: &str| {
        scrape.get(
            "pgbus_jobs_finished_total",
            &[queue, &format!(r#"outcome="{outcome}""#)],
        )
    };
    assert_eq!(scrape.get("pgbus_jobs_started_total", &[queue]), 110.0);
    assert_eq!(finished("ack"), 90.0);
    assert_eq!(finished("retry"), 10.0);
    assert_eq!(finished("dead_letter"), 10.0);
    assert_eq!(finished("discarded") + finished("committed"), 0.0);
    assert_eq!(
        scrape.get("pgbus_job_duration_seconds_count", &[queue]),
        110.0
    );
    assert!(scrape.get("pgbus_job_duration_seconds_sum", &[queue]) >= 2.0);
    assert_eq!(
        scrape.get("pgbus_job_queue_wait_seconds_count", &[queue]),
        110.0
    );
    // Every claimed message was claimed once per attempt.
    assert_eq!(scrape.get("pgbus_claim_batch_size_sum", &[]), 110.0);
    let claims = scrape.get("pgbus_claim_batch_size_count", &[]);
    assert!(claims >= 1.0);
    assert_eq!(
        scrape.get("pgbus_claim_duration_seconds_count", &[]),
        claims
    );
    assert!(scrape.get("pgbus_lease_extensions_total", &[]) >= 1.0);
    // The pool's connections are counted, within the pool's size.
    let pooled = scrape.get("pgbus_connections", &[r#"role="pool""#]);
    assert!((1.0..=4.0).contains(&pooled), "{pooled} pooled connections");

    // The listener's connection is killed: it reconnects, counted once.
    assert_eq!(scrape.get("pgbus_listener_reconnects_total", &[]), 0.0);
    let observer = pgbus_pg::connect(&url, "observer").await.unwrap();
    observer
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = 'pgbus:listen'",
            &[],
        )
        .await
        .unwrap();
    eventually("the listener reconnected", DEADLINE, || async {
        listener.connections_made() == 2 && listener.is_live()
    })
    .await;
    let scrape = Scrape::of(&handle);
    assert_eq!(scrape.get("pgbus_listener_reconnects_total", &[]), 1.0);

    // When the pool is gone, so are its connections.
    drop((backend, observer));
    eventually("the pool's connections are uncounted", DEADLINE, || {
        let pooled = Scrape::of(&handle).get("pgbus_connections", &[r#"role="pool""#]);
        async move { pooled == 0.0 }
    })
    .await;
}
