//! The worker on the in-memory backend: outcomes, retries, timeouts, shutdown, wake-ups.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgbus_core::{
    Consumer, DeadLetters, MemoryBackend, NewMessage, Producer, QueueAdmin, QueueName,
    QueueOptions, RetryPolicy, Stats,
};
use pgbus_exec::CancellationToken;
use pgbus_exec::{ExecutionMode, JobContext, Outcome, Worker, WorkerReport};
use tokio::sync::Notify;

const DEADLINE: Duration = Duration::from_secs(20);

async fn setup(options: QueueOptions) -> (MemoryBackend, QueueName) {
    let backend = MemoryBackend::new();
    let queue = QueueName::new("jobs").unwrap();
    backend.create_queue(&queue, &options).await.unwrap();
    (backend, queue)
}

fn fast_retries(max_attempts: u32) -> QueueOptions {
    QueueOptions::default().retry(
        RetryPolicy::builder()
            .base(Duration::from_millis(10))
            .cap(Duration::from_millis(40))
            .jitter(0.0)
            .max_attempts(max_attempts)
            .build()
            .unwrap(),
    )
}

async fn send_numbers(backend: &MemoryBackend, queue: &QueueName, n: u32) {
    backend
        .send_batch(
            queue,
            (0..n).map(|i| NewMessage::encode(&i).unwrap()).collect(),
        )
        .await
        .unwrap();
}

/// Waits until `done` holds, polling a cheap condition.
async fn until(what: &str, mut done: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    while !done().await {
        assert!(start.elapsed() < DEADLINE, "timed out waiting until {what}");
        tokio::task::yield_now().await;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// What the backend's queues hold, all together.
async fn depth(backend: &MemoryBackend) -> u64 {
    backend
        .stats()
        .await
        .unwrap()
        .iter()
        .map(|q| q.depth())
        .sum()
}

/// Messages of `queue` claimed and leased now.
async fn in_flight(backend: &MemoryBackend, queue: &QueueName) -> u64 {
    let stats = backend.stats().await.unwrap();
    stats.iter().find(|q| q.queue == *queue).unwrap().in_flight
}

/// Waits until the queue holds nothing (its acks are in).
async fn drained(backend: &MemoryBackend) {
    let start = Instant::now();
    while depth(backend).await > 0 {
        assert!(start.elapsed() < DEADLINE, "queue never drained");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Runs the worker until the queue is empty, then stops it.
async fn run_until_empty(worker: Worker<MemoryBackend>, backend: &MemoryBackend) -> WorkerReport {
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    drained(backend).await;
    stop.cancel();
    run.await.unwrap().unwrap()
}

async fn drains_without_loss_or_excess_concurrency(mode: ExecutionMode) {
    let (backend, queue) = setup(QueueOptions::default()).await;
    send_numbers(&backend, &queue, 2_000).await;
    let seen = Arc::new(Mutex::new(HashMap::<u32, usize>::new()));
    let running = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let worker = Worker::builder(backend.clone())
        .execution_mode(mode)
        .concurrency(8)
        .handle(queue.clone(), {
            let (seen, running, peak) = (seen.clone(), running.clone(), peak.clone());
            move |_ctx: JobContext<MemoryBackend>, n: u32| {
                let (seen, running, peak) = (seen.clone(), running.clone(), peak.clone());
                async move {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    peak.fetch_max(now, Ordering::SeqCst);
                    tokio::task::yield_now().await;
                    *seen.lock().unwrap().entry(n).or_default() += 1;
                    running.fetch_sub(1, Ordering::SeqCst);
                }
            }
        })
        .build()
        .unwrap();
    assert_eq!(worker.monitor().metadata().mode, mode);
    let report = run_until_empty(worker, &backend).await;
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 2_000, "no message lost");
    assert!(seen.values().all(|&c| c == 1), "no message run twice");
    assert!(
        peak.load(Ordering::SeqCst) <= 8,
        "concurrency above capacity"
    );
    assert_eq!(report.acked, 2_000);
    assert_eq!(report.started, 2_000);
}

#[cfg(feature = "async")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn async_mode_drains_without_loss_or_excess_concurrency() {
    drains_without_loss_or_excess_concurrency(ExecutionMode::Async).await;
}

#[cfg(feature = "threads")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn threads_mode_drains_without_loss_or_excess_concurrency() {
    drains_without_loss_or_excess_concurrency(ExecutionMode::Threads).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_handler_retries_with_growing_delays_then_dead_letters() {
    let (backend, queue) = setup(fast_retries(4)).await;
    send_numbers(&backend, &queue, 1).await;
    let runs = Arc::new(Mutex::new(Vec::<Instant>::new()));
    let worker = Worker::builder(backend.clone())
        .poll_interval(Duration::from_millis(5))
        .handle(queue.clone(), {
            let runs = runs.clone();
            move |ctx: JobContext<MemoryBackend>, _n: u32| {
                runs.lock().unwrap().push(Instant::now());
                let attempt = ctx.attempt();
                async move { Err::<(), _>(format!("boom on attempt {attempt}")) }
            }
        })
        .build()
        .unwrap();
    let report = run_until_empty(worker, &backend).await;
    assert_eq!((report.retried, report.dead_lettered), (3, 1));
    let runs = runs.lock().unwrap().clone();
    assert_eq!(runs.len(), 4);
    let gaps: Vec<Duration> = runs.windows(2).map(|w| w[1] - w[0]).collect();
    // Backoff of 10, 20, 40 ms (no jitter): each gap at least its delay.
    for (gap, min) in gaps.iter().zip([10, 20, 40]) {
        assert!(*gap >= Duration::from_millis(min), "gaps {gaps:?}");
    }
    let dead = backend.list_dead(&queue, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].error, "boom on attempt 4");
    assert_eq!(dead[0].attempts, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_are_applied_and_bad_payloads_dead_lettered() {
    let (backend, queue) = setup(fast_retries(5)).await;
    for n in [1u32, 2, 3] {
        backend
            .send(&queue, NewMessage::encode(&n).unwrap())
            .await
            .unwrap();
    }
    backend
        .send(&queue, NewMessage::encode("not a number").unwrap())
        .await
        .unwrap();
    let worker = Worker::builder(backend.clone())
        .handle(
            queue.clone(),
            |_ctx: JobContext<MemoryBackend>, n: u32| async move {
                match n {
                    1 => Outcome::Ack,
                    2 => Outcome::dead_letter("refused: two"),
                    _ => Outcome::Discard,
                }
            },
        )
        .build()
        .unwrap();
    let report = run_until_empty(worker, &backend).await;
    assert_eq!(
        (report.acked, report.dead_lettered, report.discarded),
        (1, 2, 1)
    );
    let dead = backend.list_dead(&queue, 10).await.unwrap();
    let reasons: Vec<&str> = dead.iter().map(|d| d.error.as_str()).collect();
    assert!(reasons.contains(&"refused: two"), "{reasons:?}");
    assert!(
        reasons
            .iter()
            .any(|r| r.starts_with("could not decode MessagePack payload: ")),
        "{reasons:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_past_its_timeout_is_cancelled_and_retried() {
    let (backend, queue) = setup(fast_retries(5)).await;
    send_numbers(&backend, &queue, 1).await;
    let cancelled = Arc::new(AtomicUsize::new(0));
    let worker = Worker::builder(backend.clone())
        .job_timeout(Duration::from_millis(50))
        .handle(queue.clone(), {
            let cancelled = cancelled.clone();
            move |ctx: JobContext<MemoryBackend>, _n: u32| {
                let cancelled = cancelled.clone();
                async move {
                    if ctx.attempt() == 1 {
                        // Hang until cancelled; the timeout must end the job anyway.
                        let token = ctx.cancellation().clone();
                        let _guard = CountOnDrop(cancelled, token);
                        std::future::pending::<()>().await;
                    }
                }
            }
        })
        .build()
        .unwrap();
    let report = run_until_empty(worker, &backend).await;
    assert_eq!((report.retried, report.acked), (1, 1));
    assert_eq!(
        cancelled.load(Ordering::SeqCst),
        1,
        "the timed-out job saw its cancellation"
    );
}

struct CountOnDrop(Arc<AtomicUsize>, CancellationToken);
impl Drop for CountOnDrop {
    fn drop(&mut self) {
        if self.1.is_cancelled() {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_job_keeps_its_lease_alive() {
    let (backend, queue) = setup(QueueOptions::default().lease(Duration::from_millis(150))).await;
    send_numbers(&backend, &queue, 1).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let release = Arc::new(Notify::new());
    let worker = Worker::builder(backend.clone())
        .concurrency(2)
        .poll_interval(Duration::from_millis(10))
        .handle(queue.clone(), {
            let (runs, release) = (runs.clone(), release.clone());
            move |_ctx: JobContext<MemoryBackend>, _n: u32| {
                let (runs, release) = (runs.clone(), release.clone());
                async move {
                    runs.fetch_add(1, Ordering::SeqCst);
                    release.notified().await;
                }
            }
        })
        .build()
        .unwrap();
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    until("the job starts", async || runs.load(Ordering::SeqCst) == 1).await;
    // Four lease lengths pass while the job runs; a free slot and a 10 ms poll would pick
    // the message up again if its lease were not extended.
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(600) {
        assert_eq!(
            runs.load(Ordering::SeqCst),
            1,
            "redelivered while still running"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    release.notify_one();
    until("the queue drains", async || {
        runs.load(Ordering::SeqCst) == 1
    })
    .await;
    drained(&backend).await;
    stop.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!((report.started, report.acked), (1, 1));
}

/// A job whose message is taken from under it (purged here; deleted by an operator on
/// Postgres) has its token cancelled at the next lease extension; nothing is settled for
/// it, and the worker goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_lease_is_lost_is_cancelled() {
    let (backend, queue) = setup(QueueOptions::default().lease(Duration::from_millis(150))).await;
    send_numbers(&backend, &queue, 1).await;
    let started = Arc::new(AtomicUsize::new(0));
    let cancelled = Arc::new(AtomicUsize::new(0));
    let worker = Worker::builder(backend.clone())
        .concurrency(2)
        .poll_interval(Duration::from_millis(10))
        .handle(queue.clone(), {
            let (started, cancelled) = (started.clone(), cancelled.clone());
            move |ctx: JobContext<MemoryBackend>, n: u32| {
                let (started, cancelled) = (started.clone(), cancelled.clone());
                async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    if n == 0 {
                        ctx.cancellation().cancelled().await;
                        cancelled.fetch_add(1, Ordering::SeqCst);
                        // Whatever it returns now changes nothing.
                        return Outcome::dead_letter("too late");
                    }
                    Outcome::Ack
                }
            }
        })
        .build()
        .unwrap();
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    until("the job starts", async || {
        started.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(backend.purge_queue(&queue).await.unwrap(), 1);
    until("the job is cancelled", async || {
        cancelled.load(Ordering::SeqCst) == 1
    })
    .await;
    backend
        .send(&queue, NewMessage::encode(&1).unwrap())
        .await
        .unwrap();
    until("the next job ran", async || {
        started.load(Ordering::SeqCst) == 2
    })
    .await;
    drained(&backend).await;
    stop.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!(
        (report.started, report.acked, report.dead_lettered),
        (2, 1, 0),
        "{report:?}"
    );
    assert!(backend.list_dead(&queue, 10).await.unwrap().is_empty());
}

/// Sends one message per payload, in order.
async fn send_payloads(backend: &MemoryBackend, queue: &QueueName, payloads: &[u32]) {
    backend
        .send_batch(
            queue,
            payloads
                .iter()
                .map(|n| NewMessage::encode(n).unwrap())
                .collect(),
        )
        .await
        .unwrap();
}

/// The payloads of `messages`, in order.
fn decoded(messages: &[pgbus_core::Message]) -> Vec<u32> {
    messages
        .iter()
        .map(|m| m.decode::<u32>().unwrap())
        .collect()
}

/// Payloads from 100 up are warm-up jobs that return at once, so the worker knows its
/// handlers' pace (it claims nothing ahead before one has finished).
const WARM_UP: u32 = 100;

/// A message claimed ahead whose lease is lost while it waits (its message purged here,
/// deleted by an operator on Postgres) is dropped from the buffer without running; the
/// worker goes on with what comes next. The worker also works a queue of short leases, so
/// the lease extension that finds the loss comes every 50 ms, long before the buffered
/// message's 1 s wait for a slot would give it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claimed_ahead_message_whose_lease_is_lost_never_runs() {
    let (backend, queue) = setup(QueueOptions::default().lease(Duration::from_secs(60))).await;
    let short = QueueName::new("short_leases").unwrap();
    let short_leases = QueueOptions::default().lease(Duration::from_millis(150));
    backend.create_queue(&short, &short_leases).await.unwrap();
    let ran = Arc::new(Mutex::new(Vec::new()));
    let worker = Worker::builder(backend.clone())
        .concurrency(1)
        .claim_ahead(1)
        .poll_interval(Duration::from_millis(10))
        .handle(queue.clone(), {
            let ran = ran.clone();
            move |ctx: JobContext<MemoryBackend>, n: u32| {
                ran.lock().unwrap().push(n);
                async move {
                    if n == 0 {
                        // Held until the purge takes its lease (and the buffered one's).
                        ctx.cancellation().cancelled().await;
                    }
                }
            }
        })
        .handle(short, |_ctx: JobContext<MemoryBackend>, _n: u32| async {})
        .build()
        .unwrap();
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    send_payloads(&backend, &queue, &[WARM_UP]).await;
    drained(&backend).await;
    send_numbers(&backend, &queue, 2).await;
    until(
        "the first job runs with the second claimed ahead",
        async || ran.lock().unwrap().len() == 2,
    )
    .await;
    until("the second is claimed ahead", async || {
        in_flight(&backend, &queue).await == 2
    })
    .await;
    assert_eq!(backend.purge_queue(&queue).await.unwrap(), 2);
    backend
        .send(&queue, NewMessage::encode(&2).unwrap())
        .await
        .unwrap();
    until("the next message ran", async || {
        ran.lock().unwrap().contains(&2)
    })
    .await;
    drained(&backend).await;
    stop.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!(
        *ran.lock().unwrap(),
        [WARM_UP, 0, 2],
        "the purged buffered one never ran"
    );
    assert_eq!((report.started, report.acked), (3, 2), "{report:?}");
}

/// A worker whose handlers (payloads below [`WARM_UP`]) wait until `gate` is cancelled;
/// records the payloads it runs.
fn gated_worker(
    backend: &MemoryBackend,
    queue: &QueueName,
    concurrency: usize,
    gate: &CancellationToken,
    slow_warm_up: Duration,
) -> (Worker<MemoryBackend>, Arc<Mutex<Vec<u32>>>) {
    let ran = Arc::new(Mutex::new(Vec::new()));
    let worker = Worker::builder(backend.clone())
        .concurrency(concurrency)
        .claim_ahead(2)
        .poll_interval(Duration::from_millis(10))
        .handle(queue.clone(), {
            let (ran, gate) = (ran.clone(), gate.clone());
            move |_ctx: JobContext<MemoryBackend>, n: u32| {
                ran.lock().unwrap().push(n);
                let gate = gate.clone();
                async move {
                    if n >= WARM_UP {
                        // The job's length, which sets the worker's pace (not a wait
                        // for anything).
                        tokio::time::sleep(slow_warm_up).await;
                    } else {
                        gate.cancelled().await;
                    }
                }
            }
        })
        .build()
        .unwrap();
    (worker, ran)
}

/// Fast jobs fill the claim-ahead buffer, but when every slot then stays busy (jobs far
/// longer than the pace promised), the buffered messages go back to the queue after the
/// bound (1 s here) instead of waiting, leased, for as long as the jobs ahead run: another
/// consumer claims them while the worker's handlers are still blocked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claimed_ahead_messages_go_back_while_every_slot_stays_busy() {
    let lease = Duration::from_secs(60);
    let (backend, queue) = setup(QueueOptions::default().lease(lease)).await;
    let gate = CancellationToken::new();
    let (worker, ran) = gated_worker(&backend, &queue, 2, &gate, Duration::ZERO);
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    send_payloads(&backend, &queue, &[WARM_UP, WARM_UP + 1]).await;
    drained(&backend).await;

    send_payloads(&backend, &queue, &[0, 1, 2, 3]).await;
    until("two jobs run and two wait claimed ahead", async || {
        ran.lock().unwrap().len() == 4 && in_flight(&backend, &queue).await == 4
    })
    .await;
    let start = Instant::now();
    let mut taken = Vec::new();
    while taken.len() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the claimed-ahead messages never came back; another consumer got {:?}",
            decoded(&taken)
        );
        taken.extend(backend.claim(&queue, 10, lease).await.unwrap());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(decoded(&taken), [2, 3], "the two buffered messages");
    assert!(
        taken.iter().all(|m| m.attempts == 1),
        "given back uncounted: {taken:?}"
    );
    let mut ran = ran.lock().unwrap().clone();
    ran.sort_unstable();
    assert_eq!(
        ran,
        [0, 1, WARM_UP, WARM_UP + 1],
        "the worker's handlers are still blocked"
    );

    gate.cancel();
    let leases: Vec<_> = taken.iter().map(|m| m.lease()).collect();
    backend.ack(&leases).await.unwrap();
    drained(&backend).await;
    stop.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!((report.started, report.acked), (4, 4), "{report:?}");
}

/// Jobs slower than the buffer's window (300 ms: one slot finishes none in 50 ms) are not
/// claimed ahead at all, nor are any before the first job has finished: while the one slot
/// runs a blocked job, the two messages behind it stay in the queue for anyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_jobs_are_not_claimed_ahead() {
    let lease = Duration::from_secs(60);
    let (backend, queue) = setup(QueueOptions::default().lease(lease)).await;
    let gate = CancellationToken::new();
    let (worker, ran) = gated_worker(&backend, &queue, 1, &gate, Duration::from_millis(300));
    send_payloads(&backend, &queue, &[WARM_UP, 0, 1, 2]).await;
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    until("the slow job ran and the blocked one runs", async || {
        ran.lock().unwrap().len() == 2
    })
    .await;
    let taken = backend.claim(&queue, 10, lease).await.unwrap();
    assert_eq!(decoded(&taken), [1, 2], "nothing was claimed ahead");

    gate.cancel();
    let leases: Vec<_> = taken.iter().map(|m| m.lease()).collect();
    backend.ack(&leases).await.unwrap();
    drained(&backend).await;
    stop.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!((report.started, report.acked), (2, 2), "{report:?}");
    assert_eq!(*ran.lock().unwrap(), [WARM_UP, 0]);
}

/// The buffer is sized by each queue's own pace: fast jobs on one queue must not let the
/// worker buffer another queue's jobs, which may take far longer (there they would wait,
/// leased, until given back).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_queue_does_not_size_the_buffer_of_a_slow_one() {
    let lease = Duration::from_secs(60);
    let options = QueueOptions::default().lease(lease);
    let (backend, fast) = setup(options.clone()).await;
    let slow = QueueName::new("slow").unwrap();
    backend.create_queue(&slow, &options).await.unwrap();
    let gate = CancellationToken::new();
    let ran = Arc::new(Mutex::new(Vec::new()));
    let worker = Worker::builder(backend.clone())
        .concurrency(1)
        .claim_ahead(2)
        // Nothing goes back by the bound during the test: what the worker buffers stays
        // buffered.
        .claim_ahead_wait(Duration::from_secs(3600))
        .poll_interval(Duration::from_millis(10))
        .handle(
            fast.clone(),
            |_ctx: JobContext<MemoryBackend>, _n: u32| async {},
        )
        .handle(slow.clone(), {
            let (ran, gate) = (ran.clone(), gate.clone());
            move |_ctx: JobContext<MemoryBackend>, n: u32| {
                ran.lock().unwrap().push(n);
                let gate = gate.clone();
                async move { gate.cancelled().await }
            }
        })
        .build()
        .unwrap();
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    // A fast job runs and is acked: the worker's pace on `fast` is known.
    send_payloads(&backend, &fast, &[WARM_UP]).await;
    drained(&backend).await;
    send_payloads(&backend, &slow, &[0, 1, 2]).await;
    until("the first slow job runs", async || {
        ran.lock().unwrap().len() == 1
    })
    .await;
    let taken = backend.claim(&slow, 10, lease).await.unwrap();
    assert_eq!(
        decoded(&taken),
        [1, 2],
        "nothing of the slow queue was claimed ahead"
    );

    gate.cancel();
    let leases: Vec<_> = taken.iter().map(|m| m.lease()).collect();
    backend.ack(&leases).await.unwrap();
    drained(&backend).await;
    stop.cancel();
    run.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_waker_ends_the_idle_wait() {
    let (backend, queue) = setup(QueueOptions::default()).await;
    let done = Arc::new(Notify::new());
    let worker = Worker::builder(backend.clone())
        .poll_interval(Duration::from_secs(3600))
        .handle(queue.clone(), {
            let done = done.clone();
            move |_ctx: JobContext<MemoryBackend>, _n: u32| {
                let done = done.clone();
                async move { done.notify_one() }
            }
        })
        .build()
        .unwrap();
    let waker = worker.waker();
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    // Let the worker find the queue empty and go idle: it registers in the process
    // registry first, which happens after its first claim.
    let start = Instant::now();
    while backend_processes(&backend).await == 0 {
        assert!(start.elapsed() < DEADLINE);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    send_numbers(&backend, &queue, 1).await;
    waker.notify_one();
    tokio::time::timeout(Duration::from_secs(5), done.notified())
        .await
        .expect("woken long before the one-hour poll");
    stop.cancel();
    run.await.unwrap().unwrap();
}

/// Counts go to the registry with each heartbeat; what a stopping worker settled since its
/// last one goes with its deregistration, so a heartbeat interval longer than the run loses
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_worker_reports_its_last_throughput() {
    let (backend, queue) = setup(fast_retries(2)).await;
    send_numbers(&backend, &queue, 8).await;
    let worker = Worker::builder(backend.clone())
        .poll_interval(Duration::from_millis(5))
        .heartbeat_interval(Duration::from_secs(3600))
        .handle(
            queue.clone(),
            |ctx: JobContext<MemoryBackend>, n: u32| async move {
                match (n % 4, ctx.attempt()) {
                    (0, 1) => Outcome::retry("once"),
                    (1, _) => Outcome::retry("always"),
                    (2, _) => Outcome::Discard,
                    _ => Outcome::Ack,
                }
            },
        )
        .build()
        .unwrap();
    let report = run_until_empty(worker, &backend).await;
    assert_eq!(
        (
            report.acked,
            report.discarded,
            report.retried,
            report.dead_lettered
        ),
        (4, 2, 4, 2)
    );
    let stats = backend.stats().await.unwrap().remove(0);
    assert_eq!(
        (stats.processed_per_minute, stats.failed_per_minute),
        (6, 6),
        "acks and discards processed; retries and dead letters failed"
    );
}

async fn backend_processes(backend: &MemoryBackend) -> usize {
    use pgbus_core::ProcessRegistry;
    backend.processes().await.unwrap().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_running_jobs_and_leaves_the_rest_leased() {
    let (backend, queue) = setup(QueueOptions::default().lease(Duration::from_secs(600))).await;
    send_numbers(&backend, &queue, 4).await;
    let started = Arc::new(AtomicUsize::new(0));
    let worker = Worker::builder(backend.clone())
        .concurrency(4)
        .drain_timeout(Duration::from_millis(300))
        .handle(queue.clone(), {
            let started = started.clone();
            move |ctx: JobContext<MemoryBackend>, n: u32| {
                let started = started.clone();
                async move {
                    started.fetch_add(1, Ordering::SeqCst);
                    if n == 3 {
                        // Never finishes by itself: it is still running at the deadline.
                        ctx.cancellation().cancelled().await;
                        return Outcome::retry("cancelled");
                    }
                    // The others finish after shutdown has begun.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    Outcome::Ack
                }
            }
        })
        .build()
        .unwrap();
    let monitor = worker.monitor();
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    until("all four jobs run", async || {
        started.load(Ordering::SeqCst) == 4
    })
    .await;
    assert_eq!(monitor.metadata().busy, 4);
    stop.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!(report.acked, 3, "running jobs completed and were acked");
    let stats = backend.stats().await.unwrap();
    assert_eq!(
        (stats[0].in_flight, stats[0].ready),
        (1, 0),
        "the unfinished job stays leased"
    );
}

#[tokio::test]
async fn builder_refuses_bad_settings() {
    let (backend, queue) = setup(QueueOptions::default()).await;
    let handler = |_ctx: JobContext<MemoryBackend>, _n: u32| async {};
    assert!(
        Worker::builder(backend.clone()).build().is_err(),
        "no handler"
    );
    assert!(Worker::builder(backend.clone())
        .handle(queue.clone(), handler)
        .concurrency(0)
        .build()
        .is_err());
    assert!(Worker::builder(backend.clone())
        .handle(queue.clone(), handler)
        .handle(queue.clone(), handler)
        .build()
        .is_err());
    let err = Worker::builder(backend.clone())
        .handle(queue.clone(), handler)
        .claim_ahead_wait(Duration::ZERO)
        .build()
        .err()
        .expect("a zero claim-ahead wait is refused");
    assert!(err.to_string().contains("claim-ahead wait"), "{err}");
    let missing = Worker::builder(backend.clone())
        .handle(QueueName::new("missing").unwrap(), handler)
        .build()
        .unwrap();
    let err = missing.run(CancellationToken::new()).await.unwrap_err();
    assert!(
        err.to_string().contains("queue missing does not exist"),
        "{err}"
    );
}

/// A handler that panics on one message among 1,000: every other message is acked, and the
/// panicking one is retried, then dead-lettered with the panic text once its attempts are
/// used up, instead of staying leased (and its lease extended) for the life of the worker.
async fn a_panicking_handler_retries_then_dead_letters(mode: ExecutionMode) {
    let (backend, queue) = setup(fast_retries(3)).await;
    send_numbers(&backend, &queue, 1_000).await;
    let seen = Arc::new(Mutex::new(HashMap::<u32, usize>::new()));
    let worker = Worker::builder(backend.clone())
        .execution_mode(mode)
        .concurrency(8)
        .poll_interval(Duration::from_millis(5))
        .handle(queue.clone(), {
            let seen = seen.clone();
            move |_ctx: JobContext<MemoryBackend>, n: u32| {
                let seen = seen.clone();
                async move {
                    *seen.lock().unwrap().entry(n).or_default() += 1;
                    tokio::task::yield_now().await;
                    assert_ne!(n, 500, "poison message {n}");
                }
            }
        })
        .build()
        .unwrap();
    let report = run_until_empty(worker, &backend).await;
    assert_eq!(report.acked, 999, "{report:?}");
    assert_eq!((report.retried, report.dead_lettered), (2, 1), "{report:?}");
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 1_000);
    assert!(seen
        .iter()
        .all(|(&n, &c)| c == if n == 500 { 3 } else { 1 }));
    let dead = backend.list_dead(&queue, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].attempts, 3);
    assert!(
        dead[0].error.starts_with("handler panicked: ")
            && dead[0].error.contains("poison message 500"),
        "{:?}",
        dead[0].error
    );
}

#[cfg(feature = "async")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_mode_a_panicking_handler_retries_then_dead_letters() {
    a_panicking_handler_retries_then_dead_letters(ExecutionMode::Async).await;
}

#[cfg(feature = "threads")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threads_mode_a_panicking_handler_retries_then_dead_letters() {
    a_panicking_handler_retries_then_dead_letters(ExecutionMode::Threads).await;
}

/// Both modes parse in every build, but a worker is built only for a mode whose pool this
/// build has (feature `threads` or `async`); the default mode is always one of them, async
/// when built.
#[test]
fn only_modes_built_in_make_workers() {
    assert!(ExecutionMode::default().is_built());
    let expected_default = if cfg!(feature = "async") {
        ExecutionMode::Async
    } else {
        ExecutionMode::Threads
    };
    assert_eq!(ExecutionMode::default(), expected_default);
    for mode in [ExecutionMode::Threads, ExecutionMode::Async] {
        assert_eq!(mode.as_str().parse::<ExecutionMode>().ok(), Some(mode));
        let feature = match mode {
            ExecutionMode::Threads => cfg!(feature = "threads"),
            ExecutionMode::Async => cfg!(feature = "async"),
        };
        assert_eq!(mode.is_built(), feature, "{mode}");
        let built = Worker::builder(MemoryBackend::new())
            .execution_mode(mode)
            .handle(
                QueueName::new("jobs").unwrap(),
                |_: JobContext<MemoryBackend>, _: u32| async { Outcome::Ack },
            )
            .build();
        match built {
            Ok(worker) => {
                assert!(feature, "built a {mode} worker without its pool");
                assert_eq!(worker.monitor().metadata().mode, mode);
            }
            Err(err) => {
                assert!(!feature, "{mode}: {err}");
                let text = err.to_string();
                assert!(
                    text.contains(&format!("execution mode {mode} is not built")),
                    "{text}"
                );
            }
        }
    }
}
