//! Overhead of `ExecutionPool::post` plus completion of a no-op job, for both pools.
//!
//! One iteration posts a batch of 1,000 no-op jobs into a pool of 64 slots, as a worker
//! would: when the pool refuses a job as full, the poster waits for the state-change
//! callback (a freed slot) and posts it again. The iteration ends when the batch has
//! drained (`wait_for_termination`). Criterion reports the time per batch and the
//! throughput in jobs per second; the mean time per job is also printed at the end.

use std::cell::Cell;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use pgbus_exec::{AsyncPool, ExecutionPool, Job, RefusedReason, ThreadPool};
use tokio::runtime::Runtime;
use tokio::sync::Notify;

const CAPACITY: usize = 64;
const BATCH: usize = 1_000;

/// Posts `BATCH` no-op jobs, waiting for a freed slot whenever the pool is full, and waits
/// until they have all completed.
async fn post_batch(pool: &dyn ExecutionPool, slot_freed: &Notify) {
    for _ in 0..BATCH {
        let mut job: Job = Box::pin(async {});
        loop {
            match pool.post(job) {
                Ok(()) => break,
                Err(refused) => {
                    assert_eq!(
                        refused.reason,
                        RefusedReason::Full,
                        "the pool is never shut down"
                    );
                    job = refused.job;
                    // `notify_one` keeps a permit, so a slot freed since the refusal is not
                    // missed; a stale permit only costs one more try.
                    slot_freed.notified().await;
                }
            }
        }
    }
    assert!(
        pool.wait_for_termination(Duration::from_secs(60)).await,
        "batch did not drain"
    );
}

fn bench_pool(c: &mut Criterion, runtime: &Runtime, name: &str, pool: Arc<dyn ExecutionPool>) {
    let slot_freed = Arc::new(Notify::new());
    let notify = Arc::clone(&slot_freed);
    pool.on_state_change(Arc::new(move || notify.notify_one()));

    let jobs = Cell::new(0_u64);
    let elapsed = Cell::new(Duration::ZERO);
    let mut group = c.benchmark_group("pool_post");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.bench_function(
        BenchmarkId::new(name, format!("{BATCH}_noop_jobs_cap_{CAPACITY}")),
        |b| {
            b.to_async(runtime).iter_custom(|iterations| {
                let (pool, slot_freed) = (Arc::clone(&pool), Arc::clone(&slot_freed));
                let (jobs, elapsed) = (&jobs, &elapsed);
                async move {
                    // Post from a task on a runtime worker thread, as the worker loop does.
                    let took = tokio::spawn(async move {
                        let started = Instant::now();
                        for _ in 0..iterations {
                            post_batch(&*pool, &slot_freed).await;
                        }
                        started.elapsed()
                    })
                    .await
                    .expect("bench task");
                    jobs.set(jobs.get() + iterations * BATCH as u64);
                    elapsed.set(elapsed.get() + took);
                    took
                }
            });
        },
    );
    group.finish();
    let per_job = elapsed.get().as_nanos() / u128::from(jobs.get().max(1));
    println!(
        "pool_post/{name}: {per_job} ns per job (post + completion) over {} jobs",
        jobs.get()
    );
}

fn pool_post(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");

    let threads = Arc::new(ThreadPool::new(CAPACITY).expect("thread pool"));
    bench_pool(c, &runtime, "threads", threads.clone());
    threads.shutdown();

    let pool =
        Arc::new(AsyncPool::with_handle(CAPACITY, runtime.handle().clone()).expect("async pool"));
    bench_pool(c, &runtime, "async", pool.clone());
    pool.shutdown();
}

// What `criterion_group!`/`criterion_main!` expand to, written out because the generated
// `pub fn` would trip the workspace's `missing_docs` lint.
fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    pool_post(&mut criterion);
    criterion.final_summary();
}
