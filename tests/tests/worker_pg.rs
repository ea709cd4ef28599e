//! The worker on PostgreSQL: bulk drains in both execution modes, retries into the
//! dead-letter queue, transactional completion, connection economy, graceful shutdown and
//! the process registry.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgbus_core::{
    CircuitBreaker, Consumer, DeadLetters, GroupSession, NewMessage, OpenGroupSession,
    ProcessRegistry, Producer, QueueName, QueueOptions, RetryPolicy,
};
use pgbus_exec::{ExecutionMode, JobContext, Outcome, Worker, WorkerReport};
use pgbus_pg::PgBackend;
use pgbus_tests::{
    connections, create, eventually, eventually_some, fresh_backend, gate, pass, stats_of,
    wait_until_empty, Gauge,
};
use tokio_util::sync::CancellationToken;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

const DEADLINE: Duration = Duration::from_secs(60);

/// Sends `0..n` as payloads, in `send_batch` chunks of at most 5,000.
async fn send_numbers(backend: &PgBackend, q: &QueueName, n: u32) {
    let mut start = 0;
    while start < n {
        let end = (start + 5_000).min(n);
        let ids = backend
            .send_batch(
                q,
                (start..end)
                    .map(|i| NewMessage::encode(&i).unwrap())
                    .collect(),
            )
            .await
            .unwrap();
        assert_eq!(ids.len(), (end - start) as usize);
        start = end;
    }
}

// ---------------------------------------------------------------------------------------
// 1. Bulk drain: 20,000 messages, four workers in one process.

async fn twenty_thousand_messages_four_workers(mode: ExecutionMode) {
    const MESSAGES: u32 = 20_000;
    const WORKERS: usize = 4;
    const CONCURRENCY: usize = 8;
    let (backend, _url) = fresh_backend(8).await;
    let q = create(&backend, "bulk", QueueOptions::default()).await;
    send_numbers(&backend, &q, MESSAGES).await;
    assert_eq!(stats_of(&backend, &q).await.ready, u64::from(MESSAGES));

    let seen = Arc::new(Mutex::new(HashMap::<u32, usize>::new()));
    let gauge = Arc::new(Gauge::default());
    let stop = CancellationToken::new();
    let started = Instant::now();
    let mut runs = Vec::new();
    for _ in 0..WORKERS {
        let worker = Worker::builder(backend.clone())
            .execution_mode(mode)
            .concurrency(CONCURRENCY)
            .lease(Duration::from_secs(60))
            .poll_interval(Duration::from_millis(50))
            .handle(q.clone(), {
                let (seen, gauge) = (seen.clone(), gauge.clone());
                move |_ctx: JobContext<PgBackend>, n: u32| {
                    let (seen, gauge) = (seen.clone(), gauge.clone());
                    async move {
                        gauge.enter();
                        tokio::task::yield_now().await;
                        *seen.lock().unwrap().entry(n).or_default() += 1;
                        gauge.leave();
                    }
                }
            })
            .build()
            .unwrap();
        assert_eq!(worker.monitor().metadata().mode, mode);
        runs.push(tokio::spawn(worker.run(stop.clone())));
    }
    wait_until_empty(&backend, &q, Duration::from_secs(240)).await;
    let elapsed = started.elapsed();
    stop.cancel();
    let mut reports = Vec::new();
    for run in runs {
        reports.push(run.await.unwrap().unwrap());
    }
    println!(
        "{mode:?}: {MESSAGES} messages by {WORKERS} workers x {CONCURRENCY} in {elapsed:?} \
         (peak concurrency {})",
        gauge.peak()
    );

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), MESSAGES as usize, "every message handled");
    assert!((0..MESSAGES).all(|n| seen.contains_key(&n)));
    let twice: Vec<_> = seen.iter().filter(|(_, &c)| c != 1).collect();
    assert!(twice.is_empty(), "handled more than once: {twice:?}");
    assert!(
        gauge.peak() <= WORKERS * CONCURRENCY,
        "concurrency {} above {}",
        gauge.peak(),
        WORKERS * CONCURRENCY
    );
    let acked: u64 = reports.iter().map(|r| r.acked).sum();
    let started_jobs: u64 = reports.iter().map(|r| r.started).sum();
    assert_eq!(acked, u64::from(MESSAGES), "reports: {reports:?}");
    assert_eq!(started_jobs, u64::from(MESSAGES), "reports: {reports:?}");
    assert!(reports
        .iter()
        .all(|r| r.retried == 0 && r.dead_lettered == 0 && r.discarded == 0));
    let stats = stats_of(&backend, &q).await;
    assert_eq!((stats.depth(), stats.dead_lettered), (0, 0), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_thousand_messages_four_workers_async() {
    twenty_thousand_messages_four_workers(ExecutionMode::Async).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn twenty_thousand_messages_four_workers_threads() {
    twenty_thousand_messages_four_workers(ExecutionMode::Threads).await;
}

// ---------------------------------------------------------------------------------------
// 2. Retries, then the dead-letter queue.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failing_handler_dead_letters_after_max_attempts() {
    let (backend, _url) = fresh_backend(4).await;
    let retry = RetryPolicy::builder()
        .base(Duration::from_millis(10))
        .cap(Duration::from_millis(50))
        .jitter(0.0)
        .max_attempts(3)
        .build()
        .unwrap();
    let q = create(&backend, "failing", QueueOptions::default().retry(retry)).await;
    let id = backend
        .send(&q, NewMessage::encode(&7u32).unwrap())
        .await
        .unwrap();
    let attempts = Arc::new(Mutex::new(Vec::<u32>::new()));
    let worker = Worker::builder(backend.clone())
        .poll_interval(Duration::from_millis(20))
        .handle(q.clone(), {
            let attempts = attempts.clone();
            move |ctx: JobContext<PgBackend>, n: u32| {
                let attempt = ctx.attempt();
                attempts.lock().unwrap().push(attempt);
                async move { Err::<(), _>(format!("boom on {n}, attempt {attempt}")) }
            }
        })
        .build()
        .unwrap();
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    eventually("the message is dead-lettered", DEADLINE, || async {
        let stats = stats_of(&backend, &q).await;
        stats.depth() == 0 && stats.dead_lettered == 1
    })
    .await;
    stop.cancel();
    let report = run.await.unwrap().unwrap();

    assert_eq!(*attempts.lock().unwrap(), vec![1, 2, 3]);
    assert_eq!(
        (
            report.started,
            report.retried,
            report.dead_lettered,
            report.acked
        ),
        (3, 2, 1, 0),
        "{report:?}"
    );
    let dead = backend.list_dead(&q, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, id);
    assert_eq!(dead[0].attempts, 3);
    assert_eq!(dead[0].error, "boom on 7, attempt 3");
}

/// A message whose deliveries keep ending without an outcome (each worker that claimed it
/// died: a handler that aborts the process, overflows its stack or is OOM-killed) is
/// dead-lettered once its attempts are used up, without running again, instead of
/// crashing worker after worker for ever. Two claims left to expire stand for two crashed
/// workers; a plain and a group worker then each meet one such message.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_whose_workers_keep_dying_is_dead_lettered_without_running_again() {
    let (backend, _url) = fresh_backend(6).await;
    let retry = RetryPolicy::builder().max_attempts(2).build().unwrap();
    // A breaker that one failure opens: not running them, the worker reports no failure.
    let options = QueueOptions::default()
        .retry(retry)
        .circuit_breaker(CircuitBreaker::new(1, Duration::from_secs(600)).unwrap());
    let q = create(&backend, "abandoned", options.clone()).await;
    let grouped = create(&backend, "abandoned_grouped", options).await;
    let plain = backend
        .send(&q, NewMessage::encode(&1u32).unwrap())
        .await
        .unwrap();
    let group = backend
        .send(&grouped, NewMessage::encode(&2u32).unwrap().group("g"))
        .await
        .unwrap();
    // Claimed again once the previous claim's lease has run out.
    let abandon = Duration::from_millis(50);
    for crashed in 1..=2u32 {
        let claimed = eventually_some("the message is claimable again", DEADLINE, || async {
            backend.claim(&q, 1, abandon).await.unwrap().pop()
        })
        .await;
        assert_eq!((claimed.id, claimed.attempts), (plain, crashed));
        // The group's session goes with its claim, as a dying worker's would.
        let claimed = eventually_some(
            "the group's message is claimable again",
            DEADLINE,
            || async {
                let mut session = backend.open_group_session().await.unwrap();
                session
                    .lock_and_claim(&grouped, "g", abandon, 1)
                    .await
                    .unwrap()
                    .and_then(|mut run| run.pop())
            },
        )
        .await;
        assert_eq!((claimed.id, claimed.attempts), (group, crashed));
    }

    let runs = Arc::new(AtomicUsize::new(0));
    let count = |runs: &Arc<AtomicUsize>| {
        let runs = runs.clone();
        move |_: JobContext<PgBackend>, _: u32| {
            runs.fetch_add(1, Ordering::SeqCst);
            async { Ok::<(), BoxError>(()) }
        }
    };
    let worker = Worker::builder(backend.clone())
        .poll_interval(Duration::from_millis(20))
        .handle(q.clone(), count(&runs))
        .handle(grouped.clone(), count(&runs))
        .build_mixed()
        .unwrap();
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    eventually("both messages left their queues", DEADLINE, || async {
        stats_of(&backend, &q).await.depth() + stats_of(&backend, &grouped).await.depth() == 0
    })
    .await;
    stop.cancel();
    run.await.unwrap().unwrap();
    assert_eq!(runs.load(Ordering::SeqCst), 0, "neither ran again");
    for (queue, id) in [(&q, plain), (&grouped, group)] {
        // The breaker is opened before a failure's settlement is written.
        assert_eq!(stats_of(&backend, queue).await.breaker_open_for, None);
        let dead = backend.list_dead(queue, 10).await.unwrap();
        assert_eq!((dead.len(), dead[0].id, dead[0].attempts), (1, id, 3));
        assert!(
            dead[0].error.contains("ended without one"),
            "{}",
            dead[0].error
        );
    }
}

/// A handler that panics on one message among 1,000: every other message is acked, and the
/// panicking one is dead-lettered with the panic text once its attempts are used up,
/// instead of staying leased (its lease extended) for the life of the worker.
async fn a_panicking_handler_dead_letters_with_the_panic_text(mode: ExecutionMode) {
    let (backend, _url) = fresh_backend(4).await;
    let retry = RetryPolicy::builder()
        .base(Duration::from_millis(10))
        .cap(Duration::from_millis(50))
        .jitter(0.0)
        .max_attempts(3)
        .build()
        .unwrap();
    let q = create(&backend, "panics", QueueOptions::default().retry(retry)).await;
    send_numbers(&backend, &q, 1_000).await;
    let worker = Worker::builder(backend.clone())
        .execution_mode(mode)
        .concurrency(8)
        .poll_interval(Duration::from_millis(20))
        .handle(
            q.clone(),
            |_ctx: JobContext<PgBackend>, n: u32| async move {
                assert_ne!(n, 500, "poison message {n}");
            },
        )
        .build()
        .unwrap();
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    eventually("every message is settled", DEADLINE, || async {
        let stats = stats_of(&backend, &q).await;
        stats.depth() == 0 && stats.dead_lettered == 1
    })
    .await;
    stop.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!(
        (report.acked, report.retried, report.dead_lettered),
        (999, 2, 1),
        "{report:?}"
    );
    let dead = backend.list_dead(&q, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].attempts, 3);
    assert!(
        dead[0].error.starts_with("handler panicked: ")
            && dead[0].error.contains("poison message 500"),
        "{:?}",
        dead[0].error
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn async_a_panicking_handler_dead_letters_with_the_panic_text() {
    a_panicking_handler_dead_letters_with_the_panic_text(ExecutionMode::Async).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn threads_a_panicking_handler_dead_letters_with_the_panic_text() {
    a_panicking_handler_dead_letters_with_the_panic_text(ExecutionMode::Threads).await;
}

// ---------------------------------------------------------------------------------------
// 3. Transactional completion: the handler's writes commit with the ack, or not at all.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transactional_completion_commits_writes_with_the_ack() {
    let (backend, url) = fresh_backend(4).await;
    let client = pgbus_pg::connect(&url, "test").await.unwrap();
    client
        .batch_execute("CREATE TABLE effects (message_id bigint PRIMARY KEY)")
        .await
        .unwrap();
    let one_attempt = RetryPolicy::builder().max_attempts(1).build().unwrap();
    let q = create(
        &backend,
        "effects",
        QueueOptions::default().retry(one_attempt),
    )
    .await;
    let good = backend
        .send(&q, NewMessage::encode(&true).unwrap())
        .await
        .unwrap();
    let bad = backend
        .send(&q, NewMessage::encode(&false).unwrap())
        .await
        .unwrap();

    let worker = Worker::builder(backend.clone())
        .poll_interval(Duration::from_millis(20))
        .handle(
            q.clone(),
            |ctx: JobContext<PgBackend>, succeed: bool| async move {
                let tx = ctx.begin().await?;
                tx.client()
                    .execute("INSERT INTO effects VALUES ($1)", &[&ctx.message_id().0])
                    .await?;
                if !succeed {
                    // Dropping `tx` rolls the insert back.
                    return Ok::<_, BoxError>(Outcome::retry("failed after writing"));
                }
                Ok(ctx.ack_in(tx).await?)
            },
        )
        .build()
        .unwrap();
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    eventually("both messages are settled", DEADLINE, || async {
        let stats = stats_of(&backend, &q).await;
        stats.depth() == 0 && stats.dead_lettered == 1
    })
    .await;
    stop.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!(
        (report.acked, report.dead_lettered, report.retried),
        (1, 1, 0),
        "{report:?}"
    );

    let effects: Vec<i64> = client
        .query("SELECT message_id FROM effects ORDER BY message_id", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(
        effects,
        vec![good.0],
        "only the acked message's write is committed"
    );
    let in_messages = |id: i64| {
        let client = &client;
        async move {
            client
                .query_one("SELECT count(*) FROM pgbus.messages WHERE id = $1", &[&id])
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    assert_eq!(in_messages(good.0).await, 0, "the acked message is gone");
    assert_eq!(in_messages(bad.0).await, 0, "the failed one left the queue");
    let dead = backend.list_dead(&q, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].id, bad, "only the failing message is dead-lettered");
    assert_eq!(dead[0].error, "failed after writing");
    assert_eq!(dead[0].attempts, 1);
}

// ---------------------------------------------------------------------------------------
// 4. Async mode: a thousand concurrent I/O-bound jobs on at most four connections.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn async_mode_runs_a_thousand_io_jobs_concurrently_on_few_connections() {
    const JOBS: usize = 1_000;
    const POOL: u32 = 3;
    let (backend, url) = fresh_backend(POOL).await;
    let q = create(&backend, "io", QueueOptions::default()).await;
    send_numbers(&backend, &q, JOBS as u32).await;
    let gauge = Arc::new(Gauge::default());
    let handled = Arc::new(AtomicUsize::new(0));
    let (open, gated) = gate();
    let worker = Worker::builder(backend.clone())
        .execution_mode(ExecutionMode::Async)
        .concurrency(JOBS)
        .handle(q.clone(), {
            let (gauge, handled) = (gauge.clone(), handled.clone());
            move |_ctx: JobContext<PgBackend>, _n: u32| {
                let (gauge, handled, gated) = (gauge.clone(), handled.clone(), gated.clone());
                async move {
                    gauge.enter();
                    pass(gated).await;
                    // Model the job's I/O.
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    handled.fetch_add(1, Ordering::SeqCst);
                    gauge.leave();
                }
            }
        })
        .build()
        .unwrap();
    let monitor = worker.monitor();
    let stop = CancellationToken::new();
    let started = Instant::now();
    let run = tokio::spawn(worker.run(stop.clone()));
    eventually("all 1,000 jobs run at once", DEADLINE, || async {
        gauge.running() == JOBS
    })
    .await;
    assert_eq!(monitor.metadata().busy, JOBS);
    let fetch = connections(&url, "fetch").await;
    let pool = connections(&url, "pool").await;
    println!("1,000 concurrent async jobs: pgbus:fetch = {fetch}, pgbus:pool = {pool}");
    assert_eq!(fetch, 1, "one dedicated fetch connection");
    assert!(
        fetch + pool <= 1 + i64::from(POOL),
        "{fetch} fetch + {pool} pool connections for 1,000 jobs"
    );
    open.send(true).unwrap();
    wait_until_empty(&backend, &q, DEADLINE).await;
    stop.cancel();
    let report = run.await.unwrap().unwrap();
    println!(
        "1,000 async jobs of 200 ms drained in {:?}",
        started.elapsed()
    );
    assert_eq!(gauge.peak(), JOBS);
    assert_eq!(handled.load(Ordering::SeqCst), JOBS);
    assert_eq!((report.started, report.acked), (JOBS as u64, JOBS as u64));
    assert!(connections(&url, "pool").await <= i64::from(POOL));
}

// ---------------------------------------------------------------------------------------
// 5. Threads mode: sixteen blocking jobs at once, connections counted.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn threads_mode_sixteen_threads_connection_count() {
    const THREADS: usize = 16;
    const JOBS: u32 = 64;
    const POOL: u32 = 4;
    let (backend, url) = fresh_backend(POOL).await;
    let q = create(&backend, "blocking", QueueOptions::default()).await;
    send_numbers(&backend, &q, JOBS).await;
    let gauge = Arc::new(Gauge::default());
    let seen = Arc::new(Mutex::new(HashMap::<u32, usize>::new()));
    let on_pool_thread = Arc::new(AtomicBool::new(true));
    let (open, gated) = gate();
    let worker = Worker::builder(backend.clone())
        .execution_mode(ExecutionMode::Threads)
        .concurrency(THREADS)
        .handle(q.clone(), {
            let (gauge, seen, on_pool_thread) =
                (gauge.clone(), seen.clone(), on_pool_thread.clone());
            move |_ctx: JobContext<PgBackend>, n: u32| {
                let (gauge, seen, gated) = (gauge.clone(), seen.clone(), gated.clone());
                let on_pool_thread = on_pool_thread.clone();
                async move {
                    let thread = std::thread::current();
                    if !thread
                        .name()
                        .is_some_and(|t| t.starts_with("pgbus-worker-"))
                    {
                        on_pool_thread.store(false, Ordering::SeqCst);
                    }
                    gauge.enter();
                    // The first wave holds until the connections are counted.
                    pass(gated).await;
                    // Blocking is fine on a pool thread.
                    std::thread::sleep(Duration::from_millis(50));
                    *seen.lock().unwrap().entry(n).or_default() += 1;
                    gauge.leave();
                }
            }
        })
        .build()
        .unwrap();
    let stop = CancellationToken::new();
    let started = Instant::now();
    let run = tokio::spawn(worker.run(stop.clone()));
    eventually("sixteen jobs run", DEADLINE, || async {
        gauge.running() == THREADS
    })
    .await;
    let fetch = connections(&url, "fetch").await;
    let pool = connections(&url, "pool").await;
    println!("16 blocking jobs on 16 threads: pgbus:fetch = {fetch}, pgbus:pool = {pool}");
    assert_eq!(fetch, 1, "one dedicated fetch connection");
    assert!(pool <= i64::from(POOL), "{pool} pool connections");
    open.send(true).unwrap();
    wait_until_empty(&backend, &q, DEADLINE).await;
    stop.cancel();
    let report = run.await.unwrap().unwrap();
    println!(
        "64 blocking jobs of 50 ms drained in {:?}",
        started.elapsed()
    );
    assert!(gauge.peak() <= THREADS, "peak {}", gauge.peak());
    assert!(
        on_pool_thread.load(Ordering::SeqCst),
        "jobs ran on pgbus-worker-N threads"
    );
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), JOBS as usize);
    assert!(seen.values().all(|&c| c == 1), "{seen:?}");
    assert_eq!(
        (report.started, report.acked),
        (u64::from(JOBS), u64::from(JOBS))
    );
}

// ---------------------------------------------------------------------------------------
// 6. Shutdown mid-run: running jobs complete, nothing is lost, the cut-off job comes back.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_mid_run_completes_running_jobs_and_loses_nothing() {
    const MESSAGES: u32 = 40;
    const CONCURRENCY: usize = 8;
    let lease = Duration::from_secs(2);
    let (backend, _url) = fresh_backend(4).await;
    let q = create(&backend, "shutdown", QueueOptions::default().lease(lease)).await;
    send_numbers(&backend, &q, MESSAGES).await;

    // (payload, attempt) of every run, across both workers.
    let runs = Arc::new(Mutex::new(Vec::<(u32, u32)>::new()));
    let started = Arc::new(AtomicUsize::new(0));
    // The payload of the one job that ignores the gate; u64::MAX until chosen.
    let stubborn = Arc::new(AtomicU64::new(u64::MAX));
    let (open, gated) = gate();
    let first = Worker::builder(backend.clone())
        .concurrency(CONCURRENCY)
        .lease(lease)
        .drain_timeout(Duration::from_millis(300))
        .handle(q.clone(), {
            let (runs, started, stubborn) = (runs.clone(), started.clone(), stubborn.clone());
            move |ctx: JobContext<PgBackend>, n: u32| {
                let (started, stubborn, gated) = (started.clone(), stubborn.clone(), gated.clone());
                runs.lock().unwrap().push((n, ctx.attempt()));
                async move {
                    // The first job to start never finishes by itself.
                    let is_stubborn = stubborn
                        .compare_exchange(
                            u64::MAX,
                            u64::from(n),
                            Ordering::SeqCst,
                            Ordering::SeqCst,
                        )
                        .is_ok();
                    started.fetch_add(1, Ordering::SeqCst);
                    if is_stubborn {
                        ctx.cancellation().cancelled().await;
                        return Outcome::retry("cancelled at shutdown");
                    }
                    pass(gated).await;
                    Outcome::Ack
                }
            }
        })
        .build()
        .unwrap();
    let monitor = first.monitor();
    let stop = CancellationToken::new();
    let run = tokio::spawn(first.run(stop.clone()));
    eventually("eight jobs run", DEADLINE, || async {
        started.load(Ordering::SeqCst) == CONCURRENCY
    })
    .await;
    assert_eq!(monitor.metadata().busy, CONCURRENCY);
    // Stop claiming first, then let seven of the eight finish while the worker drains.
    stop.cancel();
    open.send(true).unwrap();
    let report: WorkerReport = run.await.unwrap().unwrap();
    let stubborn = u32::try_from(stubborn.load(Ordering::SeqCst)).expect("a stubborn job");

    assert_eq!(
        (
            report.started,
            report.acked,
            report.retried,
            report.dead_lettered
        ),
        (CONCURRENCY as u64, CONCURRENCY as u64 - 1, 0, 0),
        "the seven completed jobs are acked, nothing else settled: {report:?}"
    );
    let stats = stats_of(&backend, &q).await;
    assert_eq!(
        stats.depth(),
        u64::from(MESSAGES) - report.acked,
        "every message not acked is still in the database: {stats:?}"
    );
    assert_eq!(
        (stats.in_flight, stats.ready, stats.scheduled),
        (1, u64::from(MESSAGES) - CONCURRENCY as u64, 0),
        "the cut-off job stays leased: {stats:?}"
    );
    let first_runs = runs.lock().unwrap().len();
    assert_eq!(first_runs, CONCURRENCY);

    // A second worker drains the rest, including the cut-off job once its lease runs out.
    let second = Worker::builder(backend.clone())
        .concurrency(CONCURRENCY)
        .lease(lease)
        .poll_interval(Duration::from_millis(50))
        .handle(q.clone(), {
            let runs = runs.clone();
            move |ctx: JobContext<PgBackend>, n: u32| {
                runs.lock().unwrap().push((n, ctx.attempt()));
                async move { Outcome::Ack }
            }
        })
        .build()
        .unwrap();
    let stop = CancellationToken::new();
    let run = tokio::spawn(second.run(stop.clone()));
    wait_until_empty(&backend, &q, DEADLINE).await;
    stop.cancel();
    let report2 = run.await.unwrap().unwrap();
    assert_eq!(report2.acked, u64::from(MESSAGES) - report.acked);

    let runs = runs.lock().unwrap().clone();
    let mut handled: Vec<u32> = runs.iter().map(|(n, _)| *n).collect();
    handled.sort_unstable();
    handled.dedup();
    assert_eq!(
        handled,
        (0..MESSAGES).collect::<Vec<_>>(),
        "every payload handled"
    );
    let of_stubborn: Vec<u32> = runs
        .iter()
        .filter(|(n, _)| *n == stubborn)
        .map(|(_, attempt)| *attempt)
        .collect();
    assert_eq!(
        of_stubborn,
        vec![1, 2],
        "the cut-off job was redelivered as attempt 2"
    );
    assert_eq!(
        runs.len(),
        MESSAGES as usize + 1,
        "only the cut-off job ran twice"
    );
    let stats = stats_of(&backend, &q).await;
    assert_eq!((stats.depth(), stats.dead_lettered), (0, 0));
}

// ---------------------------------------------------------------------------------------
// 7. The process registry.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_registers_and_heartbeats_in_the_process_table() {
    const CAPACITY: usize = 3;
    let (backend, _url) = fresh_backend(4).await;
    let q = create(&backend, "registered", QueueOptions::default()).await;
    let (open, gated) = gate();
    let worker = Worker::builder(backend.clone())
        .execution_mode(ExecutionMode::Async)
        .concurrency(CAPACITY)
        .heartbeat_interval(Duration::from_millis(100))
        .poll_interval(Duration::from_millis(20))
        .handle(q.clone(), move |_ctx: JobContext<PgBackend>, _n: u32| {
            let gated = gated.clone();
            async move { pass(gated).await }
        })
        .build()
        .unwrap();
    let monitor = worker.monitor();
    assert_eq!(
        monitor.metadata().process,
        None,
        "not registered before it runs"
    );
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));

    eventually("the worker registers", DEADLINE, || async {
        backend.processes().await.unwrap().len() == 1
    })
    .await;
    let record = backend.processes().await.unwrap().remove(0);
    assert_eq!(record.info.pid, std::process::id());
    assert_eq!(record.info.queues, vec![q.clone()]);
    assert_eq!(record.info.mode, "async");
    assert_eq!(record.info.capacity, CAPACITY as u32);
    eventually("the monitor knows the registry id", DEADLINE, || async {
        monitor.metadata().process == Some(record.id)
    })
    .await;

    // Heartbeats move heartbeat_at on and report the busy count.
    backend
        .send(&q, NewMessage::encode(&1u32).unwrap())
        .await
        .unwrap();
    eventually("a heartbeat reports the running job", DEADLINE, || async {
        let processes = backend.processes().await.unwrap();
        processes.len() == 1
            && processes[0].id == record.id
            && processes[0].busy == 1
            && processes[0].heartbeat_at > record.heartbeat_at
    })
    .await;
    open.send(true).unwrap();
    eventually("a heartbeat reports no running job", DEADLINE, || async {
        backend.processes().await.unwrap()[0].busy == 0
    })
    .await;

    stop.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!(report.acked, 1);
    assert!(
        backend.processes().await.unwrap().is_empty(),
        "deregistered on shutdown"
    );
}

// ---------------------------------------------------------------------------------------
// 8. Throughput: workers report what they settle per queue with their heartbeats.

/// Runs a worker (plain or group) over one message of each kind of outcome, six times,
/// and waits, while it runs, until the stats count every finished message as processed
/// and every failed attempt as failed; stopping it adds nothing more.
async fn settled_work_shows_in_the_per_minute_stats(groups: bool) {
    const EACH: u32 = 5;
    // Per kind: processed, failed (attempts used up at 3).
    const KINDS: [(u64, u64); 6] = [
        (0, 3), // fails on every attempt, then dead-lettered
        (1, 1), // fails once, then acked
        (0, 1), // dead-lettered at once
        (1, 0), // acked
        (1, 0), // acked in the handler's transaction
        (1, 0), // discarded
    ];
    let (backend, _url) = fresh_backend(4).await;
    let retry = RetryPolicy::builder()
        .base(Duration::from_millis(10))
        .cap(Duration::from_millis(20))
        .jitter(0.0)
        .max_attempts(3)
        .build()
        .unwrap();
    let q = create(&backend, "counted", QueueOptions::default().retry(retry)).await;
    let messages = (0..EACH * KINDS.len() as u32)
        .map(|n| {
            let m = NewMessage::encode(&n).unwrap();
            if groups {
                m.group(format!("g{n}"))
            } else {
                m
            }
        })
        .collect();
    backend.send_batch(&q, messages).await.unwrap();
    let processed: u64 = KINDS.iter().map(|k| k.0).sum::<u64>() * u64::from(EACH);
    let failed: u64 = KINDS.iter().map(|k| k.1).sum::<u64>() * u64::from(EACH);

    let builder = Worker::builder(backend.clone())
        .concurrency(4)
        .poll_interval(Duration::from_millis(20))
        .heartbeat_interval(Duration::from_millis(50))
        .handle(q.clone(), |ctx: JobContext<PgBackend>, n: u32| async move {
            Ok::<_, BoxError>(match (n % 6, ctx.attempt()) {
                (0, _) | (1, 1) => Outcome::retry("not yet"),
                (2, _) => Outcome::dead_letter("refused"),
                (4, _) => ctx.ack_in(ctx.begin().await?).await?,
                (5, _) => Outcome::Discard,
                _ => Outcome::Ack,
            })
        });
    let stop = CancellationToken::new();
    let run = if groups {
        tokio::spawn(builder.build_groups().unwrap().run(stop.clone()))
    } else {
        tokio::spawn(builder.build().unwrap().run(stop.clone()))
    };
    eventually(
        "the stats count every outcome in the last minute",
        DEADLINE,
        || async {
            let stats = stats_of(&backend, &q).await;
            stats.depth() == 0
                && (stats.processed_per_minute, stats.failed_per_minute) == (processed, failed)
        },
    )
    .await;
    stop.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!(
        (report.retried, report.dead_lettered),
        (3 * u64::from(EACH), 2 * u64::from(EACH)),
        "{report:?}"
    );
    let stats = stats_of(&backend, &q).await;
    assert_eq!(
        (stats.processed_per_minute, stats.failed_per_minute),
        (processed, failed),
        "the last report at shutdown adds nothing twice"
    );
    let history = backend
        .throughput_history(Duration::from_secs(60))
        .await
        .unwrap();
    assert!(history.iter().all(|p| p.queue == q));
    assert!(history.windows(2).all(|w| w[0].bucket < w[1].bucket));
    assert_eq!(
        (
            history.iter().map(|p| p.processed).sum::<u64>(),
            history.iter().map(|p| p.failed).sum::<u64>()
        ),
        (processed, failed),
        "the history holds the same counts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_throughput_shows_in_the_per_minute_stats() {
    settled_work_shows_in_the_per_minute_stats(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_worker_throughput_shows_in_the_per_minute_stats() {
    settled_work_shows_in_the_per_minute_stats(true).await;
}

// ---------------------------------------------------------------------------------------
// 8. Claim ahead: the buffer of messages claimed before a slot frees.

/// The (payload, attempt) of every run, in order.
type Runs = Arc<Mutex<Vec<(u32, u32)>>>;

/// A payload that runs at once and is not recorded: the worker claims nothing ahead until
/// it knows its handlers' pace, from a job that finished.
const WARM_UP: u32 = 1_000;

/// Sends the [`WARM_UP`] message (before the test's own, so it is claimed first).
async fn send_warm_up(backend: &PgBackend, q: &QueueName) {
    backend
        .send(q, NewMessage::encode(&WARM_UP).unwrap())
        .await
        .unwrap();
}

/// A worker of one slot and a claim-ahead buffer of `ahead` whose handler records each
/// payload it runs, with its attempt; the job of payload 0 waits at the gate. Buffered
/// messages may wait for the slot as long as their lease allows (a third of it), so the
/// tests see the buffer the gate holds up, not its give-back.
fn gated_first_job(
    backend: &PgBackend,
    q: &QueueName,
    ahead: usize,
    gated: tokio::sync::watch::Receiver<bool>,
) -> (Worker<PgBackend>, Runs) {
    let runs = Arc::new(Mutex::new(Vec::new()));
    let worker = Worker::builder(backend.clone())
        .concurrency(1)
        .claim_ahead(ahead)
        .claim_ahead_wait(Duration::from_secs(3600))
        .poll_interval(Duration::from_millis(20))
        .handle(q.clone(), {
            let runs = runs.clone();
            move |ctx: JobContext<PgBackend>, n: u32| {
                if n != WARM_UP {
                    runs.lock().unwrap().push((n, ctx.attempt()));
                }
                let gated = gated.clone();
                async move {
                    if n == 0 {
                        pass(gated).await;
                    }
                }
            }
        })
        .build()
        .unwrap();
    (worker, runs)
}

/// The payloads a handler ran, in order.
fn payloads(runs: &Mutex<Vec<(u32, u32)>>) -> Vec<u32> {
    runs.lock().unwrap().iter().map(|(n, _)| *n).collect()
}

/// Messages claimed ahead are given back the moment the worker is told to stop, while its
/// running job still holds the drain: claimable at once by anyone (their leases are long),
/// as the attempt they were before (the claim's attempt is not counted), and never run by
/// the stopping worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claimed_ahead_messages_are_given_back_at_once_on_shutdown() {
    let lease = Duration::from_secs(600);
    let (backend, _url) = fresh_backend(4).await;
    let q = create(&backend, "ahead_stop", QueueOptions::default().lease(lease)).await;
    send_warm_up(&backend, &q).await;
    send_numbers(&backend, &q, 4).await;
    let (open, gated) = gate();
    let (worker, runs) = gated_first_job(&backend, &q, 3, gated);
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    eventually(
        "one job runs and three wait claimed ahead",
        DEADLINE,
        || async { payloads(&runs) == [0] && stats_of(&backend, &q).await.in_flight == 4 },
    )
    .await;

    stop.cancel();
    eventually("the three are given back", DEADLINE, || async {
        stats_of(&backend, &q).await.ready == 3
    })
    .await;
    assert!(!run.is_finished(), "the gated job still holds the drain");
    let back = backend.claim(&q, 10, lease).await.unwrap();
    let back: Vec<(u32, u32)> = back
        .iter()
        .map(|m| (m.decode::<u32>().unwrap(), m.attempts))
        .collect();
    assert_eq!(
        back,
        [(1, 1), (2, 1), (3, 1)],
        "claimable at once, in order, as their first attempt"
    );

    open.send(true).unwrap();
    let report = run.await.unwrap().unwrap();
    assert_eq!((report.started, report.acked), (2, 2), "{report:?}");
    assert_eq!(payloads(&runs), [0], "the stopping worker ran none of them");
}

/// Claim-ahead does not hold messages behind long jobs: fast jobs fill the buffer, then
/// both slots block, and the two messages waiting claimed ahead go back to the queue after
/// the bound on their wait (1 s), where another consumer claims them while the worker's
/// handlers are still blocked, as their first attempt; the worker claims nothing ahead
/// again until a slot frees.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claimed_ahead_messages_go_back_while_every_slot_stays_busy() {
    let lease = Duration::from_secs(600);
    let (backend, _url) = fresh_backend(4).await;
    let q = create(
        &backend,
        "ahead_stuck",
        QueueOptions::default().lease(lease),
    )
    .await;
    send_warm_up(&backend, &q).await;
    send_numbers(&backend, &q, 4).await;
    let (open, gated) = gate();
    let ran = Arc::new(Mutex::new(Vec::new()));
    let worker = Worker::builder(backend.clone())
        .concurrency(2)
        .claim_ahead(2)
        .poll_interval(Duration::from_millis(20))
        .handle(q.clone(), {
            let ran = ran.clone();
            move |_ctx: JobContext<PgBackend>, n: u32| {
                ran.lock().unwrap().push(n);
                let gated = gated.clone();
                async move {
                    if n != WARM_UP {
                        pass(gated).await;
                    }
                }
            }
        })
        .build()
        .unwrap();
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    eventually("the warm-up ran and two jobs block", DEADLINE, || async {
        ran.lock().unwrap().len() == 3
    })
    .await;

    // Claimed alone, not with `eventually`, which cannot keep what each try took.
    let start = Instant::now();
    let mut taken = Vec::new();
    while taken.len() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the messages claimed ahead never came back; another consumer got {} of them",
            taken.len()
        );
        taken.extend(backend.claim(&q, 10, lease).await.unwrap());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let taken_runs: Vec<(u32, u32)> = taken
        .iter()
        .map(|m| (m.decode::<u32>().unwrap(), m.attempts))
        .collect();
    assert_eq!(taken_runs, [(2, 1), (3, 1)], "as their first attempt");
    let mut blocked = ran.lock().unwrap().clone();
    blocked.sort_unstable();
    assert_eq!(blocked, [0, 1, WARM_UP], "the worker's jobs still block");
    assert_eq!(stats_of(&backend, &q).await.in_flight, 4);

    open.send(true).unwrap();
    let leases: Vec<_> = taken.iter().map(|m| m.lease()).collect();
    backend.ack(&leases).await.unwrap();
    wait_until_empty(&backend, &q, DEADLINE).await;
    stop.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!((report.started, report.acked), (3, 3), "{report:?}");
}

/// Claims ahead keep priority order up to the buffer's size: a high-priority message sent
/// while the buffer is full of low-priority ones runs right after those (at most the
/// buffer's size of them), before the rest of the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn claims_ahead_keep_priority_order_within_the_buffer() {
    let (backend, _url) = fresh_backend(4).await;
    let lease = Duration::from_secs(600);
    let q = create(
        &backend,
        "ahead_order",
        QueueOptions::default().lease(lease),
    )
    .await;
    send_warm_up(&backend, &q).await;
    send_numbers(&backend, &q, 6).await;
    let (open, gated) = gate();
    let (worker, runs) = gated_first_job(&backend, &q, 2, gated);
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    eventually(
        "one job runs and two wait claimed ahead",
        DEADLINE,
        || async { payloads(&runs) == [0] && stats_of(&backend, &q).await.in_flight == 3 },
    )
    .await;
    backend
        .send(&q, NewMessage::encode(&100u32).unwrap().priority(10))
        .await
        .unwrap();

    open.send(true).unwrap();
    wait_until_empty(&backend, &q, DEADLINE).await;
    stop.cancel();
    run.await.unwrap().unwrap();
    assert_eq!(
        payloads(&runs),
        [0, 1, 2, 100, 3, 4, 5],
        "behind the running job and the two claimed ahead, before the rest"
    );
}
