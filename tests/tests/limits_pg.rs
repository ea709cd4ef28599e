//! Concurrency limits on PostgreSQL across two worker "processes" (two workers, each with
//! its own backend, pool and fetch connection): a key limited to 3 never runs more than 3
//! jobs at once, every job finishes, and other keys run alongside at full width; a rate
//! limit holds across both.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use pgbus_core::{
    Consumer, Fetcher, KeyLimit, Limits, NewMessage, OpenFetcher, Producer, QueueOptions,
};
use pgbus_exec::{JobContext, Worker};
use pgbus_pg::{connect, PgBackend};
use pgbus_tests::{create, eventually, fresh_backend, Gauge};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(60);

#[derive(Debug, Serialize, Deserialize)]
struct Job {
    key: String,
    n: u32,
}

/// What the handlers saw, per key: a gauge of concurrent runs and the runs finished.
#[derive(Default)]
struct Record {
    gauges: Mutex<HashMap<String, Arc<Gauge>>>,
    done: Mutex<HashMap<String, Vec<u32>>>,
    /// Hot jobs finished when the last other-key job finished.
    hot_done_when_others_finished: Mutex<Option<usize>>,
}

impl Record {
    fn gauge(&self, key: &str) -> Arc<Gauge> {
        Arc::clone(
            self.gauges
                .lock()
                .unwrap()
                .entry(key.to_owned())
                .or_default(),
        )
    }
    fn finished(&self, key: &str) -> usize {
        self.done.lock().unwrap().get(key).map_or(0, Vec::len)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_limit_of_three_holds_across_two_processes_of_sixteen_slots() {
    const HOT: u32 = 50;
    const OTHER: u32 = 40;
    let (backend, url) = fresh_backend(4).await;
    let q = create(&backend, "limited", QueueOptions::default()).await;
    backend
        .set_limit("customer_hot", KeyLimit::concurrency(3))
        .await
        .unwrap();
    backend
        .set_limit("customer_other", KeyLimit::concurrency(20))
        .await
        .unwrap();
    // The hot jobs first, so they are the oldest: other keys must still not wait for them.
    let mut jobs: Vec<NewMessage> = (0..HOT)
        .map(|n| {
            NewMessage::encode(&Job {
                key: "customer_hot".into(),
                n,
            })
            .unwrap()
            .limit_key("customer_hot")
        })
        .collect();
    jobs.extend((0..OTHER).map(|n| {
        let key = if n % 2 == 0 {
            "customer_other"
        } else {
            "customer_unlimited"
        };
        NewMessage::encode(&Job { key: key.into(), n })
            .unwrap()
            .limit_key(key)
    }));
    backend.send_batch(&q, jobs).await.unwrap();

    let record = Arc::new(Record::default());
    let stop = CancellationToken::new();
    let mut runs = Vec::new();
    for _ in 0..2 {
        // Each "process" has its own pool and fetch connection.
        let own = PgBackend::builder(&url).max_connections(4).build().unwrap();
        let record = Arc::clone(&record);
        let worker = Worker::builder(own)
            .concurrency(16)
            .poll_interval(Duration::from_millis(20))
            .handle(q.clone(), move |_ctx: JobContext<PgBackend>, job: Job| {
                let record = Arc::clone(&record);
                async move {
                    let gauge = record.gauge(&job.key);
                    gauge.enter();
                    // Hot jobs run long enough for all three to overlap even on a busy
                    // machine.
                    let ms = if job.key == "customer_hot" { 50 } else { 20 };
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    gauge.leave();
                    let mut done = record.done.lock().unwrap();
                    done.entry(job.key.clone()).or_default().push(job.n);
                    let others = done.get("customer_other").map_or(0, Vec::len)
                        + done.get("customer_unlimited").map_or(0, Vec::len);
                    if job.key != "customer_hot" && others == OTHER as usize {
                        let hot = done.get("customer_hot").map_or(0, Vec::len);
                        *record.hot_done_when_others_finished.lock().unwrap() = Some(hot);
                    }
                }
            })
            .build()
            .unwrap();
        runs.push(tokio::spawn(worker.run(stop.clone())));
    }
    eventually("every job finished", DEADLINE, || async {
        record.finished("customer_hot") == HOT as usize
            && record.finished("customer_other") + record.finished("customer_unlimited")
                == OTHER as usize
    })
    .await;
    stop.cancel();
    for run in runs {
        run.await.unwrap().unwrap();
    }

    let hot = record.gauge("customer_hot");
    assert_eq!(
        hot.peak(),
        3,
        "never more than 3 hot jobs at once, and 3 were used"
    );
    let mut done = record.done.lock().unwrap().remove("customer_hot").unwrap();
    done.sort_unstable();
    assert_eq!(done, (0..HOT).collect::<Vec<_>>(), "each hot job ran once");
    assert!(
        record.gauge("customer_other").peak() > 3 && record.gauge("customer_unlimited").peak() > 3,
        "other keys ran wider than the hot key's limit"
    );
    let hot_then = record
        .hot_done_when_others_finished
        .lock()
        .unwrap()
        .unwrap();
    assert!(
        hot_then < HOT as usize / 2,
        "other keys were not held back behind the hot key ({hot_then} hot jobs done when they finished)"
    );
}

/// A finished limited job wakes the workers of other processes: a job waiting for the
/// slot starts long before the next poll.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_freed_slot_wakes_a_waiting_worker_in_another_process() {
    use pgbus_core::{Consumer, Fetcher, OpenFetcher};
    use std::sync::atomic::{AtomicBool, Ordering};
    let (backend, url) = fresh_backend(4).await;
    let q = create(&backend, "solo", QueueOptions::default()).await;
    backend
        .set_limit("solo", KeyLimit::concurrency(1))
        .await
        .unwrap();
    let job = |n: u32| {
        NewMessage::encode(&Job {
            key: "solo".into(),
            n,
        })
        .unwrap()
        .limit_key("solo")
    };
    backend.send_batch(&q, vec![job(1), job(2)]).await.unwrap();
    // "Another process" holds the key's only slot.
    let mut fetcher = backend.open_fetcher().await.unwrap();
    let held = fetcher
        .claim_limited(&q, 10, Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(held.len(), 1);

    let listener = Arc::new(pgbus_pg::PgListener::start(&url).unwrap());
    let ran = Arc::new(AtomicBool::new(false));
    let worker = Worker::builder(PgBackend::connect(&url).unwrap())
        .poll_interval(Duration::from_secs(600))
        .wakeups(listener.clone())
        .handle(q.clone(), {
            let ran = Arc::clone(&ran);
            move |_ctx: JobContext<PgBackend>, _job: Job| {
                ran.store(true, Ordering::SeqCst);
                async {}
            }
        })
        .build()
        .unwrap();
    let monitor = worker.monitor();
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    eventually("the worker waits, its job held back", DEADLINE, || async {
        monitor.metadata().idle && monitor.metadata().wakeups_live
    })
    .await;
    assert!(!ran.load(Ordering::SeqCst));

    backend.ack(&[held[0].lease()]).await.unwrap();
    eventually(
        "the waiting job started (far before the 600 s poll)",
        DEADLINE,
        || async { ran.load(Ordering::SeqCst) },
    )
    .await;
    stop.cancel();
    run.await.unwrap().unwrap();
}

/// A rate limit holds across two "processes" (two backends, each claiming on its own fetch
/// connection): 30 jobs of a key limited to 5 starts per 500 ms. Checked on the
/// database's clock, as the limit counts: each claim's time is its lease's expiry minus
/// the lease, and the windows are rebuilt as the backend opens them (the first when the
/// limit was set, each next one at the first claim after the previous one ran out); no
/// window holds more than 5 starts. Without the limit all 30 are claimed at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rate_limit_holds_across_two_processes() {
    const JOBS: u32 = 30;
    const PER_WINDOW: usize = 5;
    const INTERVAL: Duration = Duration::from_millis(500);
    const LEASE: Duration = Duration::from_secs(60);
    let (backend, url) = fresh_backend(4).await;
    let q = create(&backend, "rated", QueueOptions::default()).await;
    backend
        .set_limit("api_token", KeyLimit::rate(PER_WINDOW as u32, INTERVAL))
        .await
        .unwrap();
    let observer = connect(&url, "observer").await.unwrap();
    let first_window: SystemTime = observer
        .query_one(
            "SELECT window_start FROM pgbus.limits WHERE key = 'api_token'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let jobs = (0..JOBS)
        .map(|n| {
            NewMessage::encode(&Job {
                key: "api_token".into(),
                n,
            })
            .unwrap()
            .limit_key("api_token")
        })
        .collect();
    backend.send_batch(&q, jobs).await.unwrap();

    let claimed: Arc<Mutex<Vec<(SystemTime, u32)>>> = Arc::default();
    let mut claimers = Vec::new();
    for _ in 0..2 {
        let own = PgBackend::builder(&url).max_connections(2).build().unwrap();
        let (claimed, q) = (Arc::clone(&claimed), q.clone());
        claimers.push(tokio::spawn(async move {
            let mut fetcher = own.open_fetcher().await.unwrap();
            while claimed.lock().unwrap().len() < JOBS as usize {
                for m in fetcher.claim_limited(&q, 16, LEASE).await.unwrap() {
                    let job: Job = m.decode().unwrap();
                    claimed
                        .lock()
                        .unwrap()
                        .push((m.lease_expires_at - LEASE, job.n));
                    own.ack(&[m.lease()]).await.unwrap();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }));
    }
    for claimer in claimers {
        tokio::time::timeout(DEADLINE, claimer)
            .await
            .expect("every job claimed in time")
            .unwrap();
    }
    let mut claimed = claimed.lock().unwrap().clone();
    let mut ns: Vec<u32> = claimed.iter().map(|(_, n)| *n).collect();
    ns.sort_unstable();
    assert_eq!(ns, (0..JOBS).collect::<Vec<_>>(), "each job claimed once");
    claimed.sort();
    let mut window = first_window;
    let mut in_window = 0;
    for (at, n) in &claimed {
        assert!(
            *at >= first_window,
            "job {n} claimed before the limit was set"
        );
        if *at >= window + INTERVAL {
            (window, in_window) = (*at, 0);
        }
        in_window += 1;
        assert!(
            in_window <= PER_WINDOW,
            "job {n} is start {in_window} of the window opened at {window:?} (limit {PER_WINDOW} per {INTERVAL:?})"
        );
    }
}
