//! The group worker on the in-memory backend: order within a group, one at a time, groups
//! in parallel, failures block only their group.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgbus_core::{
    DeadLetters, MemoryBackend, NewMessage, Producer, QueueAdmin, QueueName, QueueOptions,
    RetryPolicy, Stats,
};
use pgbus_exec::CancellationToken;
use pgbus_exec::{ExecutionMode, JobContext, Outcome, Worker, WorkerReport};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Step {
    group: String,
    seq: u32,
}

async fn setup(options: QueueOptions) -> (MemoryBackend, QueueName) {
    let backend = MemoryBackend::new();
    let queue = QueueName::new("ordered").unwrap();
    backend.create_queue(&queue, &options).await.unwrap();
    (backend, queue)
}

async fn send_groups(backend: &MemoryBackend, queue: &QueueName, groups: u32, per_group: u32) {
    // Interleaved: g0#0, g1#0, ..., g0#1, g1#1, ...
    let mut batch = Vec::new();
    for seq in 0..per_group {
        for g in 0..groups {
            let group = format!("g{g}");
            batch.push(
                NewMessage::encode(&Step {
                    group: group.clone(),
                    seq,
                })
                .unwrap()
                .group(group),
            );
        }
    }
    backend.send_batch(queue, batch).await.unwrap();
}

async fn drain(
    run: tokio::task::JoinHandle<pgbus_core::Result<WorkerReport>>,
    backend: &MemoryBackend,
    stop: CancellationToken,
) -> WorkerReport {
    let start = Instant::now();
    while backend.stats().await.unwrap()[0].depth() > 0 {
        assert!(start.elapsed() < Duration::from_secs(30), "never drained");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.cancel();
    run.await.unwrap().unwrap()
}

async fn ordered_one_at_a_time(mode: ExecutionMode) {
    let (backend, queue) = setup(QueueOptions::default()).await;
    send_groups(&backend, &queue, 12, 15).await;
    let running: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    let seen: Arc<Mutex<HashMap<String, Vec<u32>>>> = Arc::default();
    let overlaps = Arc::new(AtomicUsize::new(0));
    let parallel_peak = Arc::new(AtomicUsize::new(0));
    let now_running = Arc::new(AtomicUsize::new(0));
    let worker = Worker::builder(backend.clone())
        .concurrency(4)
        .execution_mode(mode)
        .handle(queue.clone(), {
            let (running, seen, overlaps, peak, now) = (
                running.clone(),
                seen.clone(),
                overlaps.clone(),
                parallel_peak.clone(),
                now_running.clone(),
            );
            move |ctx: JobContext<MemoryBackend>, step: Step| {
                let (running, seen, overlaps, peak, now) = (
                    running.clone(),
                    seen.clone(),
                    overlaps.clone(),
                    peak.clone(),
                    now.clone(),
                );
                async move {
                    assert_eq!(ctx.group_key(), Some(step.group.as_str()));
                    {
                        let mut r = running.lock().unwrap();
                        let n = r.entry(step.group.clone()).or_default();
                        *n += 1;
                        if *n > 1 {
                            overlaps.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    peak.fetch_max(now.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    now.fetch_sub(1, Ordering::SeqCst);
                    seen.lock()
                        .unwrap()
                        .entry(step.group.clone())
                        .or_default()
                        .push(step.seq);
                    *running.lock().unwrap().get_mut(&step.group).unwrap() -= 1;
                    Outcome::Ack
                }
            }
        })
        .build_groups()
        .unwrap();
    let monitor = worker.monitor();
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    let report = drain(run, &backend, stop).await;
    assert_eq!(
        overlaps.load(Ordering::SeqCst),
        0,
        "two handlers of one group overlapped"
    );
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 12);
    for (group, seqs) in seen.iter() {
        assert_eq!(
            *seqs,
            (0..15).collect::<Vec<_>>(),
            "group {group} out of order"
        );
    }
    assert!(parallel_peak.load(Ordering::SeqCst) <= 4);
    assert!(
        parallel_peak.load(Ordering::SeqCst) >= 2,
        "groups ran in parallel"
    );
    assert_eq!(report.acked, 12 * 15);
    let meta = monitor.metadata();
    assert_eq!(meta.connection_budget, Some(6));
    assert!(meta.group_sessions.unwrap() <= 4);
}

#[cfg(feature = "async")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn async_groups_run_in_order_one_at_a_time() {
    ordered_one_at_a_time(ExecutionMode::Async).await;
}

#[cfg(feature = "threads")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn threads_groups_run_in_order_one_at_a_time() {
    ordered_one_at_a_time(ExecutionMode::Threads).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_message_blocks_only_its_group_and_keeps_order() {
    let policy = RetryPolicy::builder()
        .base(Duration::from_millis(20))
        .cap(Duration::from_millis(20))
        .jitter(0.0)
        .max_attempts(3)
        .build()
        .unwrap();
    let (backend, queue) = setup(QueueOptions::default().retry(policy)).await;
    send_groups(&backend, &queue, 2, 3).await;
    let order: Arc<Mutex<Vec<(String, u32, u32)>>> = Arc::default();
    let worker = Worker::builder(backend.clone())
        .concurrency(2)
        .poll_interval(Duration::from_millis(10))
        .handle(queue.clone(), {
            let order = order.clone();
            move |ctx: JobContext<MemoryBackend>, step: Step| {
                let order = order.clone();
                async move {
                    order
                        .lock()
                        .unwrap()
                        .push((step.group.clone(), step.seq, ctx.attempt()));
                    match (step.group.as_str(), step.seq) {
                        // g0#1 fails twice, then succeeds: g0#2 must wait for it.
                        ("g0", 1) if ctx.attempt() < 3 => Outcome::retry("not yet"),
                        // g1#0 is poison: dead-lettered, and g1 moves on.
                        ("g1", 0) => Outcome::dead_letter("poison"),
                        _ => Outcome::Ack,
                    }
                }
            }
        })
        .build_groups()
        .unwrap();
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    let report = drain(run, &backend, stop).await;
    let order = order.lock().unwrap().clone();
    let g0: Vec<(u32, u32)> = order
        .iter()
        .filter(|(g, ..)| g == "g0")
        .map(|(_, s, a)| (*s, *a))
        .collect();
    assert_eq!(g0, [(0, 1), (1, 1), (1, 2), (1, 3), (2, 1)]);
    let g1: Vec<u32> = order
        .iter()
        .filter(|(g, ..)| g == "g1")
        .map(|(_, s, _)| *s)
        .collect();
    assert_eq!(g1, [0, 1, 2]);
    assert_eq!(
        (report.acked, report.retried, report.dead_lettered),
        (5, 2, 1)
    );
    assert_eq!(
        backend.list_dead(&queue, 10).await.unwrap()[0].error,
        "poison"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_workers_leave_grouped_messages_alone() {
    let (backend, queue) = setup(QueueOptions::default()).await;
    send_groups(&backend, &queue, 1, 2).await;
    backend
        .send(
            &queue,
            NewMessage::encode(&Step {
                group: String::new(),
                seq: 99,
            })
            .unwrap(),
        )
        .await
        .unwrap();
    let handled = Arc::new(AtomicUsize::new(0));
    let worker = Worker::builder(backend.clone())
        .handle(queue.clone(), {
            let handled = handled.clone();
            move |_ctx: JobContext<MemoryBackend>, step: Step| {
                let handled = handled.clone();
                async move {
                    assert_eq!(step.seq, 99, "a plain worker ran a grouped message");
                    handled.fetch_add(1, Ordering::SeqCst);
                }
            }
        })
        .build()
        .unwrap();
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    let start = Instant::now();
    while handled.load(Ordering::SeqCst) == 0 {
        assert!(start.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    stop.cancel();
    run.await.unwrap().unwrap();
    assert_eq!(
        backend.stats().await.unwrap()[0].ready,
        2,
        "grouped messages untouched"
    );
}

/// A grouped handler that panics is retried, then dead-lettered with the panic text, and
/// its group moves on to the next message.
async fn a_panicking_grouped_handler_dead_letters_with_the_panic_text(mode: ExecutionMode) {
    let policy = RetryPolicy::builder()
        .base(Duration::from_millis(10))
        .cap(Duration::from_millis(10))
        .jitter(0.0)
        .max_attempts(2)
        .build()
        .unwrap();
    let (backend, queue) = setup(QueueOptions::default().retry(policy)).await;
    send_groups(&backend, &queue, 3, 4).await;
    let worker = Worker::builder(backend.clone())
        .concurrency(2)
        .execution_mode(mode)
        .poll_interval(Duration::from_millis(10))
        .handle(
            queue.clone(),
            |_ctx: JobContext<MemoryBackend>, step: Step| async move {
                assert!(
                    !(step.group == "g1" && step.seq == 2),
                    "poison step {}#{}",
                    step.group,
                    step.seq
                );
            },
        )
        .build_groups()
        .unwrap();
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    let report = drain(run, &backend, stop).await;
    assert_eq!(
        (report.acked, report.retried, report.dead_lettered),
        (11, 1, 1),
        "{report:?}"
    );
    let dead = backend.list_dead(&queue, 10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert!(
        dead[0].error.starts_with("handler panicked: ")
            && dead[0].error.contains("poison step g1#2"),
        "{:?}",
        dead[0].error
    );
}

#[cfg(feature = "async")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_a_panicking_grouped_handler_dead_letters_with_the_panic_text() {
    a_panicking_grouped_handler_dead_letters_with_the_panic_text(ExecutionMode::Async).await;
}

#[cfg(feature = "threads")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn threads_a_panicking_grouped_handler_dead_letters_with_the_panic_text() {
    a_panicking_grouped_handler_dead_letters_with_the_panic_text(ExecutionMode::Threads).await;
}
