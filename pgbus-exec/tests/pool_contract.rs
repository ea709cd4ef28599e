//! The [`ExecutionPool`] contract, one suite run against both pools.
//!
//! Every generic test below is instantiated for [`ThreadPool`] (`threads_*`) and
//! [`AsyncPool`] (`async_*`) by `contract_tests!`. Nothing here synchronises with sleeps:
//! jobs wait on gates the test opens, and the test awaits counters that jobs and the
//! state-change callback bump. Every wait has a deadline so a broken pool fails the test
//! instead of hanging it.

#[cfg(feature = "threads")]
use std::cell::RefCell;
use std::future::{pending, Future};
use std::pin::pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

#[cfg(feature = "async")]
use pgbus_exec::AsyncPool;
use pgbus_exec::CancellationToken;
#[cfg(feature = "threads")]
use pgbus_exec::ThreadPool;
use pgbus_exec::{ExecError, ExecutionMode, ExecutionPool, Job, RefusedReason};
use tokio::runtime::Handle;
#[cfg(feature = "threads")]
use tokio::runtime::RuntimeFlavor;
#[cfg(feature = "threads")]
use tokio::sync::mpsc;
use tokio::sync::{oneshot, Notify};

/// How long any awaited condition may take before the test fails.
const DEADLINE: Duration = Duration::from_secs(10);

/// A pool the suite can build.
trait TestPool: ExecutionPool + Sized {
    const MODE: ExecutionMode;
    fn with_capacity(capacity: usize) -> Self;
}

#[cfg(feature = "threads")]
impl TestPool for ThreadPool {
    const MODE: ExecutionMode = ExecutionMode::Threads;
    fn with_capacity(capacity: usize) -> Self {
        ThreadPool::new(capacity).expect("thread pool starts")
    }
}

#[cfg(feature = "async")]
impl TestPool for AsyncPool {
    const MODE: ExecutionMode = ExecutionMode::Async;
    fn with_capacity(capacity: usize) -> Self {
        AsyncPool::new(capacity).expect("async pool starts")
    }
}

/// An event count a test can await.
#[derive(Default)]
struct Counter {
    count: AtomicUsize,
    changed: Notify,
}

impl Counter {
    fn bump(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_waiters();
    }

    fn get(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Waits until the count is at least `target`; fails the test after [`DEADLINE`].
    async fn reach(&self, target: usize) {
        let reached = tokio::time::timeout(DEADLINE, async {
            loop {
                let mut changed = pin!(self.changed.notified());
                changed.as_mut().enable();
                if self.get() >= target {
                    return;
                }
                changed.await;
            }
        })
        .await;
        assert!(reached.is_ok(), "count stuck at {} of {target}", self.get());
    }
}

/// Jobs wait on a gate until the test opens it.
#[derive(Clone, Default)]
struct Gate(CancellationToken);

impl Gate {
    fn open(&self) {
        self.0.cancel();
    }

    fn passed(&self) -> impl Future<Output = ()> + Send + 'static {
        self.0.clone().cancelled_owned()
    }
}

/// A job that waits for `gate`, then bumps `done`.
fn gated(gate: &Gate, done: &Arc<Counter>) -> Job {
    let passed = gate.passed();
    let done = Arc::clone(done);
    Box::pin(async move {
        passed.await;
        done.bump();
    })
}

/// A job that bumps `done` at once.
fn noop(done: &Arc<Counter>) -> Job {
    let done = Arc::clone(done);
    Box::pin(async move { done.bump() })
}

/// Installs a callback counting state changes.
fn count_callbacks(pool: &impl ExecutionPool) -> Arc<Counter> {
    let callbacks = Arc::new(Counter::default());
    let counted = Arc::clone(&callbacks);
    pool.on_state_change(Arc::new(move || counted.bump()));
    callbacks
}

async fn terminated(pool: &impl ExecutionPool) {
    assert!(
        pool.wait_for_termination(DEADLINE).await,
        "jobs still running after {DEADLINE:?}"
    );
}

/// Sets a flag when dropped: shows that a job's future was dropped.
struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

// ---- the generic contract -------------------------------------------------------------

async fn capacity_accounting<P: TestPool>() {
    let pool = P::with_capacity(4);
    assert_eq!(pool.available_capacity(), 4);
    assert_eq!(pool.metadata().busy, 0);

    let (gate, done) = (Gate::default(), Arc::new(Counter::default()));
    for posted in 1..=3 {
        pool.post(gated(&gate, &done)).expect("a slot is free");
        assert_eq!(pool.metadata().busy, posted);
        assert_eq!(pool.available_capacity(), 4 - posted);
    }
    pool.post(gated(&gate, &done))
        .expect("the last slot is free");
    assert_eq!(pool.metadata().busy, 4);
    assert_eq!(pool.available_capacity(), 0);
    assert_eq!(done.get(), 0, "gated jobs cannot have finished");

    gate.open();
    done.reach(4).await;
    terminated(&pool).await;
    assert_eq!(pool.metadata().busy, 0);
    assert_eq!(pool.available_capacity(), 4);
}

async fn refusal_when_full_returns_job_and_slot<P: TestPool>() {
    let pool = P::with_capacity(2);
    let callbacks = count_callbacks(&pool);
    let (first, second) = (Gate::default(), Gate::default());
    let done = Arc::new(Counter::default());
    pool.post(gated(&first, &done)).expect("slot 1");
    pool.post(gated(&second, &done)).expect("slot 2");

    let ran = Arc::new(AtomicBool::new(false));
    for _ in 0..10 {
        let flag = Arc::clone(&ran);
        let refused = pool
            .post(Box::pin(async move { flag.store(true, Ordering::SeqCst) }))
            .expect_err("the pool is full");
        assert_eq!(refused.reason, RefusedReason::Full);
        // A refusal neither takes a slot nor frees one.
        assert_eq!(pool.metadata().busy, 2);
        assert_eq!(pool.available_capacity(), 0);
        assert!(!pool.has_free_slot());
        assert!(!ran.load(Ordering::SeqCst), "a refused job must not run");
        // The very job that was posted comes back.
        refused.job.await;
        assert!(
            ran.swap(false, Ordering::SeqCst),
            "the returned job is the posted one"
        );
    }
    assert_eq!(callbacks.get(), 0, "a refusal is not a completion");

    first.open();
    callbacks.reach(1).await;
    assert_eq!(pool.available_capacity(), 1);
    let third = Gate::default();
    pool.post(gated(&third, &done))
        .expect("the finished job's slot is free again");
    assert_eq!(pool.available_capacity(), 0);
    assert_eq!(
        pool.post(noop(&done)).expect_err("full again").reason,
        RefusedReason::Full
    );

    second.open();
    third.open();
    done.reach(3).await;
    terminated(&pool).await;
    assert_eq!(pool.available_capacity(), 2);
    callbacks.reach(3).await;
}

async fn callback_fires_once_per_completion<P: TestPool>() {
    const JOBS: usize = 8;
    let pool = Arc::new(P::with_capacity(JOBS));

    // A replaced callback never fires.
    let stale = count_callbacks(&*pool);
    let callbacks = Arc::new(Counter::default());
    let fewest_free_seen = Arc::new(AtomicUsize::new(usize::MAX));
    {
        let (callbacks, fewest, observed) = (
            Arc::clone(&callbacks),
            Arc::clone(&fewest_free_seen),
            Arc::clone(&pool),
        );
        pool.on_state_change(Arc::new(move || {
            fewest.fetch_min(observed.available_capacity(), Ordering::SeqCst);
            callbacks.bump();
        }));
    }

    let (gate, done) = (Gate::default(), Arc::new(Counter::default()));
    for _ in 0..JOBS {
        pool.post(gated(&gate, &done)).expect("a slot is free");
    }
    assert_eq!(callbacks.get(), 0, "no job has completed yet");
    gate.open();
    callbacks.reach(JOBS).await;
    assert!(
        fewest_free_seen.load(Ordering::SeqCst) >= 1,
        "the callback fires after the slot is released, so it always sees a free slot"
    );

    // One more full post/complete cycle: any duplicate firing from the first batch would
    // have happened by the time this one's callback has.
    pool.post(noop(&done)).expect("a slot is free");
    callbacks.reach(JOBS + 1).await;
    terminated(&*pool).await;
    assert_eq!(
        callbacks.get(),
        JOBS + 1,
        "exactly one callback per completion"
    );
    assert_eq!(done.get(), JOBS + 1);
    assert_eq!(stale.get(), 0, "the replaced callback stays silent");
}

async fn idle_versus_free_slot<P: TestPool>() {
    let pool = P::with_capacity(4);
    assert!(pool.is_idle() && pool.has_free_slot());

    let (gate, done) = (Gate::default(), Arc::new(Counter::default()));
    pool.post(gated(&gate, &done)).expect("a slot is free");
    assert!(!pool.is_idle(), "one job is running");
    assert!(pool.has_free_slot(), "three slots are free");

    for _ in 0..3 {
        pool.post(gated(&gate, &done)).expect("a slot is free");
    }
    assert!(!pool.is_idle());
    assert!(!pool.has_free_slot(), "every slot is taken");

    gate.open();
    terminated(&pool).await;
    assert!(pool.is_idle() && pool.has_free_slot());
}

async fn shutdown_refuses_posts_while_running_jobs_finish<P: TestPool>() {
    let pool = P::with_capacity(2);
    let callbacks = count_callbacks(&pool);
    let (gate, done) = (Gate::default(), Arc::new(Counter::default()));
    pool.post(gated(&gate, &done)).expect("a slot is free");

    pool.shutdown();
    let refused = pool.post(noop(&done)).expect_err("shut down");
    assert_eq!(refused.reason, RefusedReason::ShutDown);
    assert_eq!(pool.metadata().busy, 1, "the refusal gave its slot back");
    assert_eq!(pool.available_capacity(), 1);
    refused.job.await;
    assert_eq!(done.get(), 1, "the returned job is the posted one");

    // The running job is not disturbed by the shutdown.
    gate.open();
    done.reach(2).await;
    terminated(&pool).await;
    callbacks.reach(1).await;
    assert_eq!(pool.available_capacity(), 2);
    let refused = pool
        .post(noop(&done))
        .expect_err("still shut down after draining");
    assert_eq!(refused.reason, RefusedReason::ShutDown);

    // A pool that is both full and shut down refuses as shut down.
    let full = P::with_capacity(1);
    let gate = Gate::default();
    full.post(gated(&gate, &done)).expect("a slot is free");
    full.shutdown();
    assert_eq!(
        full.post(noop(&done)).expect_err("refused").reason,
        RefusedReason::ShutDown
    );
    gate.open();
    terminated(&full).await;
}

async fn wait_for_termination_until_idle_or_deadline<P: TestPool>() {
    let pool = P::with_capacity(2);
    assert!(
        pool.wait_for_termination(Duration::ZERO).await,
        "an idle pool has terminated"
    );

    let (gate, done) = (Gate::default(), Arc::new(Counter::default()));
    pool.post(gated(&gate, &done)).expect("a slot is free");
    let started = Instant::now();
    assert!(
        !pool.wait_for_termination(Duration::from_millis(100)).await,
        "a gated job is still running at the deadline"
    );
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "returned before the deadline"
    );
    assert!(!pool.is_idle());

    // Returns as soon as the job ends, long before a generous deadline.
    let started = Instant::now();
    let (finished, ()) = tokio::join!(pool.wait_for_termination(Duration::from_secs(60)), async {
        gate.open()
    });
    assert!(finished);
    assert!(
        started.elapsed() < DEADLINE,
        "waited for the deadline instead of the job"
    );
    assert_eq!(done.get(), 1);
    assert!(pool.is_idle());
}

async fn kill_cancels_a_job_stuck_awaiting<P: TestPool>() {
    let pool = P::with_capacity(2);
    let callbacks = count_callbacks(&pool);
    let (started, dropped) = (
        Arc::new(Counter::default()),
        Arc::new(AtomicBool::new(false)),
    );
    {
        let (started, flag) = (Arc::clone(&started), DropFlag(Arc::clone(&dropped)));
        pool.post(Box::pin(async move {
            let _flag = flag;
            started.bump();
            pending::<()>().await;
        }))
        .expect("a slot is free");
    }
    started.reach(1).await;
    assert!(
        !pool.wait_for_termination(Duration::from_millis(100)).await,
        "stuck for good"
    );

    pool.kill();
    terminated(&pool).await;
    assert!(
        dropped.load(Ordering::SeqCst),
        "the killed job's future was dropped"
    );
    assert_eq!(
        pool.available_capacity(),
        2,
        "the killed job's slot is back"
    );
    callbacks.reach(1).await;

    let done = Arc::new(Counter::default());
    let refused = pool.post(noop(&done)).expect_err("a killed pool refuses");
    assert_eq!(refused.reason, RefusedReason::ShutDown);
    assert_eq!(pool.available_capacity(), 2);
    assert_eq!(callbacks.get(), 1, "one completion, one callback");
}

async fn metadata_reports_mode_capacity_and_busy<P: TestPool>() {
    let pool = P::with_capacity(3);
    let metadata = pool.metadata();
    assert_eq!(
        (metadata.mode, metadata.capacity, metadata.busy),
        (P::MODE, 3, 0)
    );

    let (gate, done) = (Gate::default(), Arc::new(Counter::default()));
    pool.post(gated(&gate, &done)).expect("a slot is free");
    pool.post(gated(&gate, &done)).expect("a slot is free");
    let metadata = pool.metadata();
    assert_eq!(
        (metadata.mode, metadata.capacity, metadata.busy),
        (P::MODE, 3, 2)
    );

    gate.open();
    terminated(&pool).await;
    assert_eq!(pool.metadata().busy, 0);
}

async fn panic_does_not_poison_the_pool<P: TestPool>() {
    // One slot (and on the thread pool one thread): the next job needs what the panic held.
    let pool = P::with_capacity(1);
    let callbacks = count_callbacks(&pool);

    pool.post(Box::pin(async { panic!("job exploded on purpose") }))
        .expect("a slot is free");
    callbacks.reach(1).await;
    terminated(&pool).await;
    assert_eq!(
        pool.available_capacity(),
        1,
        "the panicked job's slot is back"
    );

    pool.post(Box::pin(async { std::panic::panic_any(42_u32) }))
        .expect("a slot is free");
    callbacks.reach(2).await;

    let (sender, receiver) = oneshot::channel();
    pool.post(Box::pin(
        async move { sender.send("ran").expect("test waits") },
    ))
    .expect("a slot is free after two panics");
    let ran = tokio::time::timeout(DEADLINE, receiver).await;
    assert_eq!(ran.expect("in time").expect("sent"), "ran");
    callbacks.reach(3).await;
    terminated(&pool).await;
    assert_eq!(pool.available_capacity(), 1);
}

async fn concurrent_posts_never_oversubscribe<P: TestPool>() {
    const CAPACITY: usize = 8;
    const POSTERS: usize = 64;
    let pool = P::with_capacity(CAPACITY);
    let callbacks = count_callbacks(&pool);
    let (gate, done) = (Gate::default(), Arc::new(Counter::default()));

    let start = Barrier::new(POSTERS);
    let accepted = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..POSTERS {
            scope.spawn(|| {
                let job = gated(&gate, &done);
                start.wait();
                match pool.post(job) {
                    Ok(()) => {
                        accepted.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(refused) => assert_eq!(refused.reason, RefusedReason::Full),
                }
            });
        }
    });
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        CAPACITY,
        "exactly the free slots were taken"
    );
    assert_eq!(pool.metadata().busy, CAPACITY);

    gate.open();
    done.reach(CAPACITY).await;
    terminated(&pool).await;
    callbacks.reach(CAPACITY).await;
    assert_eq!(pool.available_capacity(), CAPACITY);
}

/// Posts race a shutdown: the ones that reserved a slot just before it and then found the
/// pool closed must give the slot back (lesson 8). Repeated, as the window is narrow.
async fn posts_racing_shutdown_leak_no_slot<P: TestPool>() {
    for _ in 0..25 {
        posts_racing_shutdown_round::<P>().await;
    }
}

async fn posts_racing_shutdown_round<P: TestPool>() {
    const CAPACITY: usize = 16;
    const POSTERS: usize = 8;
    const POSTS_EACH: usize = 200;
    let pool = P::with_capacity(CAPACITY);
    let callbacks = count_callbacks(&pool);
    let done = Arc::new(Counter::default());

    let start = Barrier::new(POSTERS + 1);
    let accepted = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for _ in 0..POSTERS {
            scope.spawn(|| {
                start.wait();
                let mut shut_down = false;
                for _ in 0..POSTS_EACH {
                    match pool.post(noop(&done)) {
                        Ok(()) => {
                            assert!(!shut_down, "accepted after a ShutDown refusal");
                            accepted.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(refused) if refused.reason == RefusedReason::ShutDown => {
                            shut_down = true;
                        }
                        Err(_) => {}
                    }
                }
            });
        }
        start.wait();
        std::thread::yield_now();
        pool.shutdown();
    });

    let accepted = accepted.load(Ordering::SeqCst);
    terminated(&pool).await;
    done.reach(accepted).await;
    callbacks.reach(accepted).await;
    assert_eq!(
        done.get(),
        accepted,
        "every accepted job ran, no refused one did"
    );
    assert_eq!(
        pool.metadata().busy,
        0,
        "refusals after reserving gave their slots back"
    );
    assert_eq!(pool.available_capacity(), CAPACITY);
}

/// Instantiates each generic test for both pools, as `threads_<name>` and `async_<name>`.
macro_rules! contract_tests {
    ($($test:ident => $threads:ident, $async_pool:ident;)*) => {$(
        #[cfg(feature = "threads")]
        #[tokio::test(flavor = "multi_thread")]
        async fn $threads() {
            $test::<ThreadPool>().await;
        }

        #[cfg(feature = "async")]
        #[tokio::test(flavor = "multi_thread")]
        async fn $async_pool() {
            $test::<AsyncPool>().await;
        }
    )*};
}

contract_tests! {
    capacity_accounting => threads_capacity_accounting, async_capacity_accounting;
    refusal_when_full_returns_job_and_slot =>
        threads_refusal_when_full_returns_job_and_slot,
        async_refusal_when_full_returns_job_and_slot;
    callback_fires_once_per_completion =>
        threads_callback_fires_once_per_completion,
        async_callback_fires_once_per_completion;
    idle_versus_free_slot => threads_idle_versus_free_slot, async_idle_versus_free_slot;
    shutdown_refuses_posts_while_running_jobs_finish =>
        threads_shutdown_refuses_posts_while_running_jobs_finish,
        async_shutdown_refuses_posts_while_running_jobs_finish;
    wait_for_termination_until_idle_or_deadline =>
        threads_wait_for_termination_until_idle_or_deadline,
        async_wait_for_termination_until_idle_or_deadline;
    kill_cancels_a_job_stuck_awaiting =>
        threads_kill_cancels_a_job_stuck_awaiting,
        async_kill_cancels_a_job_stuck_awaiting;
    metadata_reports_mode_capacity_and_busy =>
        threads_metadata_reports_mode_capacity_and_busy,
        async_metadata_reports_mode_capacity_and_busy;
    panic_does_not_poison_the_pool =>
        threads_panic_does_not_poison_the_pool,
        async_panic_does_not_poison_the_pool;
    concurrent_posts_never_oversubscribe =>
        threads_concurrent_posts_never_oversubscribe,
        async_concurrent_posts_never_oversubscribe;
    posts_racing_shutdown_leak_no_slot =>
        threads_posts_racing_shutdown_leak_no_slot,
        async_posts_racing_shutdown_leak_no_slot;
}

// ---- construction and modes ------------------------------------------------------------

#[tokio::test]
async fn zero_capacity_is_refused_by_both_pools() {
    #[cfg(feature = "threads")]
    assert!(matches!(ThreadPool::new(0), Err(ExecError::ZeroCapacity)));
    #[cfg(feature = "async")]
    assert!(matches!(AsyncPool::new(0), Err(ExecError::ZeroCapacity)));
}

#[test]
fn execution_mode_from_str() {
    assert_eq!(
        ExecutionMode::from_str("threads").ok(),
        Some(ExecutionMode::Threads)
    );
    assert_eq!(
        ExecutionMode::from_str("async").ok(),
        Some(ExecutionMode::Async)
    );
    assert_eq!(
        ExecutionMode::from_str("fiber").ok(),
        Some(ExecutionMode::Async),
        "alias"
    );
    for mode in [ExecutionMode::Threads, ExecutionMode::Async] {
        assert_eq!(
            mode.to_string().parse::<ExecutionMode>().ok(),
            Some(mode),
            "round trip"
        );
    }
    for bad in ["", "Threads", "thread", "fibre", "tokio"] {
        let err = ExecutionMode::from_str(bad).expect_err(bad);
        assert!(matches!(&err, ExecError::UnknownMode(name) if name == bad));
        let message = err.to_string();
        assert!(
            message.contains(&format!("{bad:?}")),
            "names the bad value: {message}"
        );
        assert!(
            message.contains("expected threads or async"),
            "says what is valid: {message}"
        );
    }
}

// ---- thread pool only ------------------------------------------------------------------

/// A current-thread test runtime: if a pool job blocked the caller's thread, the task
/// spawned below could not run. The job blocks its own thread on a std channel (bounded by
/// [`DEADLINE`], so a pool running it on the caller's thread fails instead of hanging).
#[tokio::test(flavor = "current_thread")]
#[cfg(feature = "threads")]
async fn threads_blocking_job_does_not_block_the_callers_runtime() {
    const CAPACITY: usize = 2;
    let pool = ThreadPool::new(CAPACITY).expect("thread pool starts");
    let started = Arc::new(Counter::default());
    let finished = Arc::new(AtomicUsize::new(0));
    let mut releases = Vec::new();
    for _ in 0..CAPACITY {
        let (release, blocked) = std::sync::mpsc::channel::<()>();
        releases.push(release);
        let (started, finished) = (Arc::clone(&started), Arc::clone(&finished));
        pool.post(Box::pin(async move {
            started.bump();
            // Blocks the pool thread, not a runtime worker of the caller.
            let _ = blocked.recv_timeout(DEADLINE);
            finished.fetch_add(1, Ordering::SeqCst);
        }))
        .expect("a slot is free");
    }
    started.reach(CAPACITY).await;

    // Every pool thread is blocked; the caller's runtime still runs other tasks.
    let (ping, pong) = oneshot::channel();
    tokio::spawn(async move { ping.send(()).expect("test waits") });
    tokio::time::timeout(DEADLINE, pong)
        .await
        .expect("the runtime progressed")
        .expect("sent");
    assert_eq!(
        finished.load(Ordering::SeqCst),
        0,
        "the blocking jobs are still blocking"
    );

    for release in releases {
        release.send(()).expect("job waits");
    }
    terminated(&pool).await;
    assert_eq!(finished.load(Ordering::SeqCst), CAPACITY);
}

/// A job runs on a `pgbus-worker-N` thread, driven with the caller's runtime handle: timers,
/// `tokio::spawn` and channels work, and spawned tasks outlive the job.
#[tokio::test(flavor = "multi_thread")]
#[cfg(feature = "threads")]
async fn threads_jobs_run_on_pool_threads_with_the_callers_runtime() {
    let pool = ThreadPool::new(2).expect("thread pool starts");
    let callers_runtime = Handle::current().id();
    let (to_job, from_test) = oneshot::channel::<u32>();
    let (report, reported) = oneshot::channel();
    pool.post(Box::pin(async move {
        let thread = std::thread::current().name().map(str::to_owned);
        let handle = Handle::current();
        tokio::time::sleep(Duration::from_millis(1)).await; // the timer driver is enabled
        let spawned = tokio::spawn(async { 20 }).await.expect("spawned task runs");
        let sent = from_test.await.expect("test sends"); // a channel from another runtime
        report
            .send((thread, handle.id(), handle.runtime_flavor(), spawned + sent))
            .expect("test waits");
    }))
    .expect("a slot is free");
    to_job.send(22).expect("job waits");

    let (thread, runtime, flavor, sum) = tokio::time::timeout(DEADLINE, reported)
        .await
        .expect("in time")
        .expect("reported");
    let thread = thread.expect("pool threads are named");
    assert!(thread.starts_with("pgbus-worker-"), "thread name {thread}");
    assert_eq!(
        runtime, callers_runtime,
        "timers, I/O and spawned tasks use the caller's runtime"
    );
    assert_eq!(flavor, RuntimeFlavor::MultiThread);
    assert_eq!(sum, 42);

    // A task a job spawned (a pooled connection's driver, say) keeps running after the job
    // ended and its thread went back to waiting for work.
    let (release, released) = oneshot::channel::<()>();
    let (done, finished) = oneshot::channel::<()>();
    pool.post(Box::pin(async move {
        tokio::spawn(async move {
            released.await.expect("test releases");
            done.send(()).expect("test waits");
        });
    }))
    .expect("a slot is free");
    tokio::time::timeout(DEADLINE, async {
        while !pool.is_idle() {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the spawning job ends");
    release.send(()).expect("task waits");
    tokio::time::timeout(DEADLINE, finished)
        .await
        .expect("the spawned task ran while no job was running")
        .expect("finished");
    terminated(&pool).await;
}

#[cfg(feature = "threads")]
thread_local! {
    /// Reports this thread's exit (thread-local destructors run as a thread ends).
    static ON_EXIT: RefCell<Option<ExitSignal>> = const { RefCell::new(None) };
}

#[cfg(feature = "threads")]
struct ExitSignal(mpsc::UnboundedSender<()>);

#[cfg(feature = "threads")]
impl Drop for ExitSignal {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

/// Occupies every thread of `pool` at once (so each job lands on a different thread) and
/// arms an exit signal on each.
#[cfg(feature = "threads")]
async fn arm_exit_signals(pool: &ThreadPool, threads: usize) -> mpsc::UnboundedReceiver<()> {
    let (exits, exited) = mpsc::unbounded_channel();
    let (armed, gate) = (Arc::new(Counter::default()), Gate::default());
    for _ in 0..threads {
        let (exits, armed, passed) = (exits.clone(), Arc::clone(&armed), gate.passed());
        pool.post(Box::pin(async move {
            ON_EXIT.with(|slot| *slot.borrow_mut() = Some(ExitSignal(exits)));
            armed.bump();
            passed.await;
        }))
        .expect("a slot is free");
    }
    armed.reach(threads).await;
    gate.open();
    terminated(pool).await;
    exited
}

#[cfg(feature = "threads")]
async fn threads_exited(exited: &mut mpsc::UnboundedReceiver<()>, threads: usize) {
    for _ in 0..threads {
        let exit = tokio::time::timeout(DEADLINE, exited.recv()).await;
        assert!(matches!(exit, Ok(Some(()))), "a pool thread did not exit");
    }
}

#[tokio::test(flavor = "multi_thread")]
#[cfg(feature = "threads")]
async fn threads_exit_after_shutdown_and_drain() {
    let pool = ThreadPool::new(3).expect("thread pool starts");
    let mut exited = arm_exit_signals(&pool, 3).await;
    assert!(
        exited.try_recv().is_err(),
        "threads wait for work until shut down"
    );

    pool.shutdown();
    threads_exited(&mut exited, 3).await;
}

#[tokio::test(flavor = "multi_thread")]
#[cfg(feature = "threads")]
async fn threads_exit_when_the_pool_is_dropped() {
    let pool = ThreadPool::new(2).expect("thread pool starts");
    let mut exited = arm_exit_signals(&pool, 2).await;
    drop(pool);
    threads_exited(&mut exited, 2).await;
}

// ---- async pool only -------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread")]
#[cfg(feature = "async")]
async fn async_thousand_jobs_on_one_gate_run_at_once() {
    const JOBS: usize = 1_000;
    let pool = AsyncPool::new(JOBS).expect("async pool starts");
    let (gate, started, done) = (
        Gate::default(),
        Arc::new(Counter::default()),
        Arc::new(Counter::default()),
    );
    for _ in 0..JOBS {
        let (started, done, passed) = (Arc::clone(&started), Arc::clone(&done), gate.passed());
        pool.post(Box::pin(async move {
            started.bump();
            passed.await;
            done.bump();
        }))
        .expect("a slot is free");
    }
    // All of them are running together, each parked on the same closed gate.
    started.reach(JOBS).await;
    assert_eq!(done.get(), 0);
    assert_eq!(pool.metadata().busy, JOBS);
    assert_eq!(
        pool.post(noop(&done)).expect_err("full").reason,
        RefusedReason::Full
    );

    gate.open();
    done.reach(JOBS).await;
    terminated(&pool).await;
    assert_eq!(pool.available_capacity(), JOBS);
}

#[tokio::test(flavor = "multi_thread")]
#[cfg(feature = "async")]
async fn async_jobs_run_on_the_callers_runtime() {
    let pool = AsyncPool::new(1).expect("async pool starts");
    let (report, reported) = oneshot::channel();
    pool.post(Box::pin(async move {
        report.send(Handle::current().id()).expect("test waits")
    }))
    .expect("a slot is free");
    let runtime = tokio::time::timeout(DEADLINE, reported)
        .await
        .expect("in time")
        .expect("sent");
    assert_eq!(runtime, Handle::current().id());
}

#[tokio::test(flavor = "multi_thread")]
#[cfg(feature = "async")]
async fn async_pool_outside_a_runtime_needs_a_handle() {
    let outside = std::thread::spawn(|| AsyncPool::new(1).map(drop));
    assert!(
        outside.join().is_err(),
        "AsyncPool::new outside a runtime panics"
    );

    let handle = Handle::current();
    let (report, reported) = oneshot::channel();
    std::thread::spawn(move || {
        let pool = AsyncPool::with_handle(1, handle).expect("async pool starts");
        pool.post(Box::pin(
            async move { report.send(()).expect("test waits") },
        ))
        .expect("a slot is free");
    })
    .join()
    .expect("posting from a plain thread works");
    tokio::time::timeout(DEADLINE, reported)
        .await
        .expect("in time")
        .expect("the job ran");
}
