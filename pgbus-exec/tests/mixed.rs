//! The mixed worker on the in-memory backend: plain and grouped messages on one set of
//! slots, groups still in order, one process entry, neither kind starved, group sessions
//! closed when idle.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgbus_core::{
    MemoryBackend, NewMessage, ProcessRegistry, Producer, QueueAdmin, QueueName, QueueOptions,
    Stats,
};
use pgbus_exec::CancellationToken;
use pgbus_exec::{ExecutionMode, JobContext, MixedWorker, Outcome, Worker, WorkerReport};
use serde::{Deserialize, Serialize};

const DEADLINE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    /// `None` for a plain job.
    group: Option<String>,
    seq: u32,
}

/// What the handler saw.
#[derive(Default)]
struct Seen {
    running: AtomicUsize,
    peak: AtomicUsize,
    /// Per group, the sequence numbers in the order they ran.
    groups: Mutex<HashMap<String, Vec<u32>>>,
    plain: AtomicUsize,
    grouped: AtomicUsize,
    /// Grouped jobs done when the last plain one ended.
    grouped_when_plain_done: Mutex<Option<usize>>,
}

async fn queue(backend: &MemoryBackend) -> QueueName {
    let queue = QueueName::new("mixed").unwrap();
    backend
        .create_queue(&queue, &QueueOptions::default())
        .await
        .unwrap();
    queue
}

async fn send(backend: &MemoryBackend, queue: &QueueName, plain: u32, groups: u32, each: u32) {
    let mut batch = Vec::new();
    for seq in 0..plain {
        batch.push(NewMessage::encode(&Job { group: None, seq }).unwrap());
    }
    for seq in 0..each {
        for g in 0..groups {
            let group = format!("g{g}");
            let job = Job {
                group: Some(group.clone()),
                seq,
            };
            batch.push(NewMessage::encode(&job).unwrap().group(group));
        }
    }
    backend.send_batch(queue, batch).await.unwrap();
}

fn mixed(
    backend: &MemoryBackend,
    queue: &QueueName,
    concurrency: usize,
    mode: ExecutionMode,
    plain_total: usize,
    seen: &Arc<Seen>,
) -> MixedWorker<MemoryBackend> {
    let seen = Arc::clone(seen);
    Worker::builder(backend.clone())
        .concurrency(concurrency)
        .execution_mode(mode)
        .poll_interval(Duration::from_millis(20))
        .group_idle_timeout(Duration::from_millis(300))
        .handle(
            queue.clone(),
            move |ctx: JobContext<MemoryBackend>, job: Job| {
                let seen = Arc::clone(&seen);
                async move {
                    assert_eq!(ctx.group_key(), job.group.as_deref());
                    let now = seen.running.fetch_add(1, Ordering::SeqCst) + 1;
                    seen.peak.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    seen.running.fetch_sub(1, Ordering::SeqCst);
                    match &job.group {
                        Some(group) => {
                            seen.groups
                                .lock()
                                .unwrap()
                                .entry(group.clone())
                                .or_default()
                                .push(job.seq);
                            seen.grouped.fetch_add(1, Ordering::SeqCst);
                        }
                        None => {
                            let done = seen.plain.fetch_add(1, Ordering::SeqCst) + 1;
                            if done == plain_total {
                                *seen.grouped_when_plain_done.lock().unwrap() =
                                    Some(seen.grouped.load(Ordering::SeqCst));
                            }
                        }
                    }
                    Outcome::Ack
                }
            },
        )
        .build_mixed()
        .unwrap()
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn drained(backend: &MemoryBackend) {
    let start = Instant::now();
    while backend.stats().await.unwrap()[0].depth() > 0 {
        assert!(start.elapsed() < DEADLINE, "never drained");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn one_limit_for_both_kinds(mode: ExecutionMode) {
    let backend = MemoryBackend::new();
    let queue = queue(&backend).await;
    send(&backend, &queue, 40, 8, 5).await;
    let seen = Arc::new(Seen::default());
    let worker = mixed(&backend, &queue, 3, mode, 40, &seen);
    let monitor = worker.monitor();
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));

    wait_until("the process entry", || monitor.metadata().process.is_some()).await;
    drained(&backend).await;
    let processes = backend.processes().await.unwrap();
    assert_eq!(
        processes.len(),
        1,
        "one entry for both kinds: {processes:?}"
    );
    assert_eq!(processes[0].info.capacity, 3);
    let meta = monitor.metadata();
    assert_eq!((meta.capacity, meta.mode), (3, mode));
    assert_eq!(meta.connection_budget, Some(5), "fetch, recovery, 3 groups");
    stop.cancel();
    let report: WorkerReport = run.await.unwrap().unwrap();

    assert_eq!(report.acked, 80, "{report:?}");
    assert_eq!(seen.plain.load(Ordering::SeqCst), 40);
    let peak = seen.peak.load(Ordering::SeqCst);
    assert!(peak <= 3, "{peak} jobs ran at once with concurrency 3");
    assert!(peak >= 2, "jobs ran in parallel");
    let groups = seen.groups.lock().unwrap().clone();
    assert_eq!(groups.len(), 8);
    for (group, seqs) in &groups {
        assert_eq!(
            *seqs,
            (0..5).collect::<Vec<_>>(),
            "group {group} out of order"
        );
    }
    assert!(
        backend.processes().await.unwrap().is_empty(),
        "deregistered at shutdown"
    );
}

#[cfg(feature = "async")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_limit_for_both_kinds_async() {
    one_limit_for_both_kinds(ExecutionMode::Async).await;
}

#[cfg(feature = "threads")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_limit_for_both_kinds_threads() {
    one_limit_for_both_kinds(ExecutionMode::Threads).await;
}

/// Two long groups could hold both slots to their last message; plain work waiting for a
/// slot gets its half instead, and is done long before the groups are.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn long_groups_do_not_starve_plain_work() {
    let backend = MemoryBackend::new();
    let queue = queue(&backend).await;
    // The groups first, so they take both slots before any plain job is seen.
    send(&backend, &queue, 0, 2, 150).await;
    let seen = Arc::new(Seen::default());
    let worker = mixed(&backend, &queue, 2, ExecutionMode::default(), 20, &seen);
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    wait_until("both groups to run", || {
        seen.groups.lock().unwrap().len() == 2
    })
    .await;
    send(&backend, &queue, 20, 0, 0).await;
    drained(&backend).await;
    stop.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!(report.acked, 320, "{report:?}");
    let grouped_then = seen.grouped_when_plain_done.lock().unwrap().unwrap();
    assert!(
        grouped_then < 300,
        "the plain jobs waited for the groups to finish ({grouped_then} of 300 done)"
    );
    for (group, seqs) in seen.groups.lock().unwrap().iter() {
        assert_eq!(
            *seqs,
            (0..150).collect::<Vec<_>>(),
            "group {group} out of order"
        );
    }
    assert!(seen.peak.load(Ordering::SeqCst) <= 2);
}

/// Plain work opens no group session; grouped work opens them, and they close once unused
/// for the group idle timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_sessions_open_for_grouped_work_and_close_when_idle() {
    let backend = MemoryBackend::new();
    let queue = queue(&backend).await;
    send(&backend, &queue, 30, 0, 0).await;
    let seen = Arc::new(Seen::default());
    let worker = mixed(&backend, &queue, 4, ExecutionMode::default(), 30, &seen);
    let monitor = worker.monitor();
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    drained(&backend).await;
    // Idle: the loops have looked for more work and found none.
    wait_until("both loops to idle", || monitor.metadata().idle).await;
    assert_eq!(monitor.metadata().group_sessions, Some(0));

    send(&backend, &queue, 0, 3, 4).await;
    wait_until("group sessions to open", || {
        monitor.metadata().group_sessions.unwrap_or(0) > 0
    })
    .await;
    drained(&backend).await;
    wait_until("idle group sessions to close", || {
        monitor.metadata().group_sessions == Some(0)
    })
    .await;
    stop.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!(report.acked, 42, "{report:?}");
}
