//! The worker: claims as many messages as there are free slots (plus a few ahead), runs
//! them on an execution pool, and settles their outcomes.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use pgbus_core::{
    panic_message, Backend, Error, Fetcher, Lease, Message, MessageId, OneLine, ProcessId,
    ProcessInfo, ProcessRegistry, QueueName, Result, RetryDecision, RetryPolicy, WakeupSource,
};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::breaker::Breakers;
use crate::handler::{Declare, ErasedHandler, JobContext, Outcome};
use crate::lane::Lane;
use crate::pace::{self, Pace};
use crate::report::{Counters, WorkerReport};
use crate::share::Kind;
use crate::telemetry::{self, Finished};
use crate::{ExecutionMode, ExecutionPool};

/// How long a busy worker (fewer than half its slots free) waits for half of them to free
/// before claiming again: a bound on the latency it trades for batching.
const FILL_LINGER: Duration = Duration::from_millis(2);

/// The claim-ahead buffer's default ceiling, in messages per slot. The handlers' pace is
/// what keeps the buffer small where it would cost (slow jobs buffer what the slots finish
/// in 50 ms, often nothing); the ceiling matters only for jobs faster than a claim's round
/// trip, where the claim's size is the worker's rate: one worker of 64 slots drained
/// no-op jobs at about 31,000/s with a buffer of 16, 49,000 with 64 and 61,000 with 256
/// (no better with 512). See docs/measured.md, "Claim ahead".
const DEFAULT_AHEAD_PER_SLOT: usize = 4;

/// The claim-ahead buffer's default ceiling for wide workers: buffered messages are held in
/// memory, payloads and all, and past a few hundred a claim's size no longer pays (two
/// workers of 500 slots drained no faster with a buffer of 1,000 than of 125).
const DEFAULT_AHEAD_MAX: usize = 512;

/// The most of a job's error text that a log line carries (the message keeps all of it).
const LOGGED_ERROR: usize = 1024;

/// What a worker is and how busy it is.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerMetadata {
    /// Threads or async.
    pub mode: ExecutionMode,
    /// Jobs it runs at once.
    pub capacity: usize,
    /// Jobs running now (0 before the worker starts).
    pub busy: usize,
    /// Queues it works.
    pub queues: Vec<QueueName>,
    /// Its id in the process registry, once registered.
    pub process: Option<ProcessId>,
    /// Whether wake-ups are live (`false`: the worker finds new work by polling).
    pub wakeups_live: bool,
    /// Whether it is waiting for work: its queues were empty at the last claim.
    pub idle: bool,
    /// For a group or mixed worker: open group sessions (connections), idle or in use.
    pub group_sessions: Option<usize>,
    /// For a group or mixed worker: the most connections it may hold, `concurrency + 2`
    /// (fetch, recovery, one per in-flight group; a mixed worker's plain loop shares the
    /// fetch connection).
    pub connection_budget: Option<usize>,
}

/// Settings of a worker; see [`WorkerBuilder`](crate::WorkerBuilder).
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) concurrency: usize,
    /// Plain messages claimed ahead of free slots; `None`: [`DEFAULT_AHEAD_PER_SLOT`] per
    /// slot.
    pub(crate) claim_ahead: Option<usize>,
    /// How long a claimed-ahead message waits for a slot at most (less when a third of its
    /// lease is shorter) before it is given back.
    pub(crate) claim_ahead_wait: Duration,
    pub(crate) mode: Option<ExecutionMode>,
    pub(crate) poll_interval: Duration,
    pub(crate) lease: Option<Duration>,
    pub(crate) job_timeout: Option<Duration>,
    pub(crate) drain_timeout: Duration,
    pub(crate) ack_batch: usize,
    pub(crate) heartbeat_interval: Duration,
    pub(crate) error_backoff_cap: Duration,
    pub(crate) group_idle: Duration,
}

/// Which loops a worker runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Runs {
    Plain,
    Groups,
    Both,
}

/// What a worker's monitor sees; one for both loops of a mixed worker.
pub(crate) struct Shared {
    pub(crate) mode: ExecutionMode,
    pub(crate) capacity: usize,
    pub(crate) queues: Vec<QueueName>,
    pub(crate) pool: OnceLock<Arc<dyn ExecutionPool>>,
    pub(crate) process: ProcessSlot,
    pub(crate) wakeup_source: Option<Arc<dyn WakeupSource>>,
    pub(crate) runs: Runs,
    /// Per loop (plain, groups): its queues were empty at its last look.
    pub(crate) idle: [std::sync::atomic::AtomicBool; 2],
    /// Open group sessions, for a group or mixed worker.
    pub(crate) group_sessions: OnceLock<Arc<std::sync::atomic::AtomicUsize>>,
}

impl Shared {
    fn wakeups_live(&self) -> bool {
        self.wakeup_source.as_ref().is_some_and(|s| s.is_live())
    }

    /// Records whether `kind`'s loop waits for work.
    pub(crate) fn set_idle(&self, kind: Kind, idle: bool) {
        let index = usize::from(kind == Kind::Groups);
        self.idle[index].store(idle, Ordering::SeqCst);
    }

    /// Whether every loop the worker runs waits for work.
    fn idle(&self) -> bool {
        let [plain, groups] = &self.idle;
        match self.runs {
            Runs::Plain => plain.load(Ordering::SeqCst),
            Runs::Groups => groups.load(Ordering::SeqCst),
            Runs::Both => plain.load(Ordering::SeqCst) && groups.load(Ordering::SeqCst),
        }
    }
}

/// The worker's id in the process registry once it has registered, replaced when it
/// registers again after being pruned as stale. Its claims name it as their lease holder.
#[derive(Debug, Default)]
pub(crate) struct ProcessSlot(Mutex<Option<ProcessId>>);

impl ProcessSlot {
    pub(crate) fn get(&self) -> Option<ProcessId> {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set(&self, id: ProcessId) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(id);
    }
}

/// Kills the pool's running jobs when dropped: a worker whose `run` future is dropped (or
/// aborted) takes its jobs with it instead of leaving them running detached. A loop that
/// ends normally disarms it: its jobs have ended, and a pool it shares with another loop
/// goes on running that loop's jobs.
pub(crate) struct KillPoolOnDrop(Option<Arc<dyn ExecutionPool>>);

impl KillPoolOnDrop {
    pub(crate) fn new(pool: Arc<dyn ExecutionPool>) -> Self {
        Self(Some(pool))
    }

    pub(crate) fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for KillPoolOnDrop {
    fn drop(&mut self) {
        if let Some(pool) = &self.0 {
            pool.kill();
        }
    }
}

/// Each queue's retry policy and lease (the worker's lease setting wins), read on the
/// worker's fetch connection.
pub(crate) async fn load_policies<F: Fetcher>(
    fetcher: &mut F,
    queues: &[QueueName],
    lease: Option<Duration>,
) -> Result<HashMap<QueueName, (RetryPolicy, Duration)>> {
    let mut policies = HashMap::new();
    for queue in queues {
        let info = fetcher.queue_info(queue).await?;
        policies.insert(
            queue.clone(),
            (info.options.retry, lease.unwrap_or(info.options.lease)),
        );
    }
    Ok(policies)
}

/// Observes a worker from outside while it runs.
#[derive(Clone)]
pub struct WorkerMonitor {
    shared: Arc<Shared>,
}

impl WorkerMonitor {
    /// Mode, capacity, busy slots, queues.
    pub fn metadata(&self) -> WorkerMetadata {
        let busy = self.shared.pool.get().map_or(0, |p| p.metadata().busy);
        WorkerMetadata {
            mode: self.shared.mode,
            capacity: self.shared.capacity,
            busy,
            queues: self.shared.queues.clone(),
            process: self.shared.process.get(),
            wakeups_live: self.shared.wakeups_live(),
            idle: self.shared.idle(),
            group_sessions: self
                .shared
                .group_sessions
                .get()
                .map(|open| open.load(Ordering::SeqCst)),
            connection_budget: self
                .shared
                .group_sessions
                .get()
                .map(|_| self.shared.capacity + 2),
        }
    }
}

/// A worker for one or more queues. Build with [`Worker::builder`], start with
/// [`Worker::run`].
pub struct Worker<B: Backend> {
    pub(crate) backend: B,
    pub(crate) handlers: HashMap<QueueName, Arc<dyn ErasedHandler<B>>>,
    pub(crate) declarations: Vec<Declare<B>>,
    pub(crate) config: Config,
    pub(crate) wakeup: Arc<Notify>,
    pub(crate) shared: Arc<Shared>,
}

/// A settled job, sent from the pool back to the worker's runtime, where all database
/// work happens (a job on a pool thread never touches the worker's connections).
struct Settlement {
    lease: Lease,
    queue: QueueName,
    outcome: Outcome,
    /// Whether a handler decided the outcome: only then does it count for the circuit
    /// breaker (see [`past_its_attempts`]).
    ran: bool,
}

impl<B: Backend> Worker<B> {
    /// The wake-up hook: notifying it ends the worker's idle wait at once (the LISTEN
    /// listener uses it; anything else may too).
    pub fn waker(&self) -> Arc<Notify> {
        Arc::clone(&self.wakeup)
    }

    /// A handle to watch the worker while it runs.
    pub fn monitor(&self) -> WorkerMonitor {
        WorkerMonitor {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Runs until `shutdown` is cancelled, then stops claiming, gives the messages it
    /// claimed ahead back at once, lets running jobs finish for up to the drain timeout,
    /// settles them, and returns. Jobs still running at the deadline are cancelled; their
    /// messages stay leased in the database and are delivered again when the lease runs
    /// out.
    pub async fn run(self, shutdown: CancellationToken) -> Result<WorkerReport> {
        let lane = Lane::alone(
            &self.backend,
            Kind::Plain,
            self.shared.mode,
            self.config.concurrency,
        )?;
        self.run_in(lane, shutdown).await
    }

    /// [`Worker::run`] on `lane`: its pool, fetch connection, report and kill switch, maybe
    /// shared with a group loop (see [`MixedWorker`](crate::MixedWorker)).
    pub(crate) async fn run_in(
        self,
        lane: Lane<B>,
        shutdown: CancellationToken,
    ) -> Result<WorkerReport> {
        for declare in &self.declarations {
            declare(self.backend.clone()).await?;
        }
        let (policies, breakers) = {
            let mut fetcher = lane.fetch.lock().await?;
            let loaded = async {
                let policies =
                    load_policies(fetcher.get(), &self.shared.queues, self.config.lease).await?;
                let breakers = Breakers::load(fetcher.get(), &self.shared.queues).await?;
                Ok::<_, Error>((policies, breakers))
            }
            .await;
            if loaded.is_err() {
                fetcher.discard();
            }
            loaded?
        };
        let pool = Arc::clone(&lane.pool);
        let _ = self.shared.pool.set(Arc::clone(&pool));
        let slot_freed = Arc::clone(&lane.freed);

        let in_flight = InFlight::default();
        let report = Arc::clone(&lane.report);
        let background = TaskTracker::new();
        let stop_background = CancellationToken::new();
        // Helpers and jobs die with this future, also when it is dropped mid-run.
        let _stop_background_on_drop = stop_background.clone().drop_guard();
        let kill_on_drop = KillPoolOnDrop::new(Arc::clone(&pool));
        let (settle_tx, settle_rx) = mpsc::unbounded_channel();

        let settler = tokio::spawn(settle_loop(
            self.backend.clone(),
            settle_rx,
            policies.clone(),
            breakers,
            Arc::clone(&report),
            self.config.ack_batch,
        ));
        let shortest_lease = policies
            .values()
            .map(|(_, l)| *l)
            .min()
            .unwrap_or(Duration::from_secs(30));
        background.spawn(keep_leases(
            self.backend.clone(),
            Arc::clone(&in_flight),
            shortest_lease,
            stop_background.clone(),
        ));
        // Registered before the first claim, so every lease names its holder (a failure
        // is logged and the heartbeat tries again; claims then name none meanwhile).
        let mut entry = ProcessEntry::new(Arc::clone(&self.shared), Arc::clone(&report));
        let interval = self.config.heartbeat_interval;
        entry.beat(&self.backend, 0, interval).await;
        background.spawn(heartbeat(
            self.backend.clone(),
            entry,
            Arc::clone(&pool),
            interval,
            stop_background.clone(),
        ));

        let _subscription = self.shared.wakeup_source.as_ref().map(|source| {
            let wakeup = Arc::clone(&self.wakeup);
            source.subscribe(&self.shared.queues, Arc::new(move || wakeup.notify_one()))
        });
        let mut wakeups_live = None;

        let jobs_cancel = lane.kill.clone();
        let mut fetch = Fetch {
            lane: &lane,
            worker: &self,
            policies: &policies,
            in_flight: &in_flight,
            settle_tx: &settle_tx,
            jobs_cancel: &jobs_cancel,
            report: &report,
            next_queue: 0,
            ahead: VecDeque::new(),
            ahead_size: self.config.claim_ahead.unwrap_or(
                self.config
                    .concurrency
                    .saturating_mul(DEFAULT_AHEAD_PER_SLOT)
                    .min(DEFAULT_AHEAD_MAX),
            ),
            paces: self
                .shared
                .queues
                .iter()
                .map(|queue| (queue.clone(), Arc::default()))
                .collect(),
            pace: Arc::default(),
            stalled: false,
        };
        let mut errors = 0u32;
        // When a look at the queues last found less work than slots: a loop sharing its
        // slots says it waits for one, without having looked, only a poll interval later.
        let mut found_empty: Option<tokio::time::Instant> = None;
        let queues: Vec<QueueName> = self.shared.queues.clone();
        while !shutdown.is_cancelled() {
            let live = self.shared.wakeups_live();
            if wakeups_live != Some(live) {
                if live {
                    tracing::info!(target: "pgbus::worker", "wake-ups live");
                } else {
                    tracing::info!(target: "pgbus::worker", poll_interval = ?self.config.poll_interval, "no live wake-ups: polling");
                }
                wakeups_live = Some(live);
            }
            let round = fetch.round(&queues).await;
            let wait = match round {
                Err(err) => {
                    lane.set_waiting(false);
                    errors += 1;
                    let delay = backoff(errors, self.config.error_backoff_cap);
                    tracing::warn!(target: "pgbus::worker", error = %err.report(), retry_in = ?delay, "claiming failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(delay) => {}
                    }
                    continue;
                }
                Ok(wait) => wait,
            };
            errors = 0;
            match wait {
                Wait::No | Wait::ForSlot { .. } => {
                    if let Wait::ForSlot { more } = wait {
                        let looked_lately =
                            found_empty.is_some_and(|at| at.elapsed() < self.config.poll_interval);
                        lane.set_waiting(more || !looked_lately);
                        let overdue = fetch.overdue_at();
                        tokio::select! {
                            _ = shutdown.cancelled() => {}
                            _ = slot_freed.notified() => {}
                            _ = lane.turn.notified() => {}
                            // The next round gives the overdue messages back.
                            _ = sleep_until_some(overdue) => {}
                        }
                    }
                    // Jobs tend to finish in bunches: while fewer than half the slots are
                    // free, give the others a moment, so the next claim fetches many
                    // messages instead of a few per freed slot. Claimed-ahead jobs start
                    // at once, though.
                    let deadline = tokio::time::Instant::now() + FILL_LINGER;
                    while fetch.ahead.is_empty()
                        && lane.free() < self.config.concurrency.div_ceil(2)
                    {
                        tokio::select! {
                            _ = shutdown.cancelled() => break,
                            _ = slot_freed.notified() => {}
                            _ = tokio::time::sleep_until(deadline) => break,
                        }
                    }
                }
                Wait::ForWork => {
                    found_empty = Some(tokio::time::Instant::now());
                    lane.set_waiting(false);
                    self.shared.set_idle(Kind::Plain, true);
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = self.wakeup.notified() => {}
                        _ = slot_freed.notified() => {}
                        _ = tokio::time::sleep(self.config.poll_interval) => {}
                    }
                    self.shared.set_idle(Kind::Plain, false);
                }
            }
        }

        // Drain: no new jobs, the claimed-ahead ones given back at once; running ones get
        // until the deadline.
        fetch.release_ahead().await;
        lane.set_waiting(false);
        tracing::info!(target: "pgbus::worker", busy = pool.metadata().busy, "stopping: draining running jobs");
        pool.shutdown();
        if !pool.wait_for_termination(self.config.drain_timeout).await {
            tracing::warn!(target: "pgbus::worker", busy = pool.metadata().busy, "drain deadline passed: cancelling the remaining jobs; their messages are redelivered after their leases");
            jobs_cancel.cancel();
            pool.kill();
            pool.wait_for_termination(Duration::from_secs(5)).await;
        }
        drop(settle_tx);
        // Every job has ended, so every sender is gone: the settler finishes the last acks.
        if let Err(err) = settler.await {
            tracing::error!(target: "pgbus::worker", error = %err, "the settler task failed");
        }
        stop_background.cancel();
        background.close();
        background.wait().await;
        kill_on_drop.disarm();
        Ok(report.snapshot())
    }
}

/// Sleeps until `deadline`; forever without one.
async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Exponential backoff for database errors: 100 ms doubling to `cap`, with jitter.
pub(crate) fn backoff(errors: u32, cap: Duration) -> Duration {
    let policy = RetryPolicy::builder()
        .base(Duration::from_millis(100))
        .cap(cap.max(Duration::from_millis(100)))
        .jitter(0.3)
        .build()
        .expect("valid backoff policy");
    policy.backoff(errors)
}

/// What the claim loop waits for after a round.
enum Wait {
    /// Some queue filled every slot asked for: claim again at once if slots are free.
    No,
    /// No slot is free for this loop: wait for one. `more`: the round filled every slot it
    /// had, so more work probably waits (`false` when it had none to fill).
    ForSlot { more: bool },
    /// The queues ran dry: wait for a wake-up, a freed slot, or the poll interval.
    ForWork,
}

struct Fetch<'a, B: Backend> {
    /// The pool and the fetch connection (dropped after an error, reopened next round).
    lane: &'a Lane<B>,
    worker: &'a Worker<B>,
    policies: &'a HashMap<QueueName, (RetryPolicy, Duration)>,
    in_flight: &'a InFlight,
    settle_tx: &'a mpsc::UnboundedSender<Settlement>,
    jobs_cancel: &'a CancellationToken,
    report: &'a Arc<Counters>,
    next_queue: usize,
    /// Messages claimed ahead of free slots, in claim order: each freed slot takes the
    /// first (see [`WorkerBuilder::claim_ahead`](crate::WorkerBuilder::claim_ahead)).
    ahead: VecDeque<Claimed>,
    /// The most messages `ahead` holds once the free slots are filled (the setting; what
    /// it holds is also bounded by the pace, see [`Fetch::ahead_limit`]).
    ahead_size: usize,
    /// How long this worker's handlers take on each of its queues, and on all of them,
    /// recorded by its jobs (see [`pace::buffer_for`]).
    paces: HashMap<QueueName, Arc<Pace>>,
    pace: Arc<Pace>,
    /// Buffered messages waited too long and were given back: nothing is claimed ahead
    /// until a slot frees.
    stalled: bool,
}

impl<B: Backend> Fetch<'_, B> {
    /// Starts claimed-ahead messages in the free slots, then claims for the free slots
    /// plus the buffer's room, visiting the queues in turn (starting one further each
    /// round, so no queue starves the others). While every slot is busy, it claims only to
    /// refill a buffer at least half empty, so claims stay large.
    ///
    /// The round holds the fetch connection's lock from counting the free slots to posting
    /// the last job, so a loop sharing the pool cannot take the same slots meanwhile.
    async fn round(&mut self, queues: &[QueueName]) -> Result<Wait> {
        // Starting buffered jobs needs the lock, not the connection: they start even while
        // the connection cannot be opened.
        let held = self.lane.fetch.hold().await;
        if self.lane.free() > 0 {
            self.stalled = false;
        }
        self.feed().await;
        self.release_overdue().await;
        if !queues.iter().any(|queue| self.worth_claiming(queue)) {
            return Ok(Wait::ForSlot {
                more: !self.ahead.is_empty(),
            });
        }
        let mut fetcher = held.open().await?;
        fetcher.get().set_process(self.worker.shared.process.get());
        let mut filled = false;
        let start = self.next_queue;
        self.next_queue = self.next_queue.wrapping_add(1);
        for i in 0..queues.len() {
            let queue = &queues[(start + i) % queues.len()];
            if !self.worth_claiming(queue) {
                continue;
            }
            let free = self.lane.free();
            let want = free + self.room(queue);
            let (_, lease) = self.policies[queue];
            let began = Instant::now();
            let claimed = match self
                .feeding_while(fetcher.get().claim(queue, want, lease))
                .await
            {
                Ok(claimed) => {
                    telemetry::claimed(claimed.len(), began.elapsed());
                    claimed
                }
                Err(err) => {
                    fetcher.discard();
                    return Err(err);
                }
            };
            let mut taken = claimed.len();
            self.take(claimed).await;
            // Jobs with limit keys are claimed apart, only for slots the plain jobs left
            // free (so a busy queue of plain jobs pays nothing for them), and never ahead.
            let spare = self.lane.free();
            if taken < want && spare > 0 {
                let began = Instant::now();
                let limited = match fetcher.get().claim_limited(queue, spare, lease).await {
                    Ok(limited) => {
                        telemetry::claimed(limited.len(), began.elapsed());
                        limited
                    }
                    Err(err) => {
                        fetcher.discard();
                        return Err(err);
                    }
                };
                taken += limited.len();
                self.take(limited).await;
            }
            filled |= taken == want;
        }
        drop(fetcher);
        let free = self.lane.free();
        // Work waits for a slot when some is buffered, or when a claim filled the slots.
        Ok(if !self.ahead.is_empty() || (filled && free == 0) {
            Wait::ForSlot { more: true }
        } else if filled {
            Wait::No
        } else if free == 0 && queues.iter().all(|queue| self.ahead_limit(queue) == 0) {
            Wait::ForSlot { more: false }
        } else {
            Wait::ForWork
        })
    }

    /// The most the claim-ahead buffer may hold now for a claim on `queue`: the setting,
    /// capped by what the slots are expected to start within [`pace::WITHIN`] (see
    /// [`pace::buffer_for`]); nothing while the buffer is stalled.
    fn ahead_limit(&self, queue: &QueueName) -> usize {
        if self.stalled || self.ahead_size == 0 {
            return 0;
        }
        let soon = pace::buffer_for(
            self.worker.config.concurrency,
            &self.paces[queue],
            &self.pace,
        );
        self.ahead_size.min(soon)
    }

    /// Room in the claim-ahead buffer for a claim on `queue`.
    fn room(&self, queue: &QueueName) -> usize {
        self.ahead_limit(queue).saturating_sub(self.ahead.len())
    }

    /// Whether a claim on `queue` now is worth its round trip: for free slots (the buffer,
    /// if any, is empty then), or while every slot is busy, to refill a buffer at least
    /// half empty.
    fn worth_claiming(&self, queue: &QueueName) -> bool {
        let limit = self.ahead_limit(queue);
        self.lane.free() > 0 || (limit > 0 && self.room(queue) >= limit.div_ceil(2))
    }

    /// When the first buffered message runs out of its wait for a slot.
    fn overdue_at(&self) -> Option<tokio::time::Instant> {
        self.ahead.iter().map(|claimed| claimed.give_back_at).min()
    }

    /// Gives back the buffered messages that waited for a slot longer than their bound
    /// (no slot freed meanwhile: the jobs ahead take longer than the pace promised), and
    /// stops claiming ahead until a slot frees, so stuck slots cost one give-back, not one
    /// per bound.
    async fn release_overdue(&mut self) {
        let now = tokio::time::Instant::now();
        if self.ahead.iter().all(|claimed| claimed.give_back_at > now) {
            return;
        }
        let (overdue, waiting) = std::mem::take(&mut self.ahead)
            .into_iter()
            .partition(|claimed| claimed.give_back_at <= now);
        self.ahead = waiting;
        self.stalled = true;
        self.give_back(overdue, "waited too long for a slot").await;
    }

    /// Awaits `claim` (on the fetch connection), meanwhile starting claimed-ahead messages
    /// in slots as they free: a refill's round trip leaves no slot idle while the buffer
    /// holds work.
    async fn feeding_while<T>(&mut self, claim: impl Future<Output = T>) -> T {
        let mut claim = pin!(claim);
        loop {
            tokio::select! {
                biased;
                done = &mut claim => return done,
                _ = self.lane.freed.notified(), if !self.ahead.is_empty() => self.feed().await,
            }
        }
    }

    /// Registers newly claimed messages (their leases are kept alive from now on) behind the
    /// buffered ones, then fills the free slots from the front.
    async fn take(&mut self, claimed: Vec<Message>) {
        let now = tokio::time::Instant::now();
        for message in claimed {
            let cancel = self.jobs_cancel.child_token();
            let running =
                Running::insert(Arc::clone(self.in_flight), message.lease(), cancel.clone());
            let (_, lease) = self.policies[&message.queue];
            self.ahead.push_back(Claimed {
                give_back_at: now + self.worker.config.claim_ahead_wait.min(lease / 3),
                message,
                cancel,
                running,
            });
        }
        self.feed().await;
    }

    /// Starts buffered messages, first claimed first, while slots are free; drops those
    /// whose lease was found lost meanwhile, without running them.
    async fn feed(&mut self) {
        let mut started = false;
        while self.lane.free() > 0 {
            let Some(claimed) = self.ahead.pop_front() else {
                break;
            };
            if claimed.running.is_lost() {
                let lease = claimed.message.lease();
                tracing::debug!(target: "pgbus::worker", attempt = lease.attempt, job.id = lease.id.0, "a claimed-ahead message's lease was lost: dropped without running");
                continue;
            }
            self.start(claimed).await;
            started = true;
        }
        if started {
            self.lane.took();
        }
    }

    /// Gives the buffered messages back (the worker is stopping): claimable again at once,
    /// their attempts not counted.
    async fn release_ahead(&mut self) {
        let ahead = std::mem::take(&mut self.ahead);
        self.give_back(ahead, "the worker stops").await;
    }

    /// Gives claimed-ahead messages back: claimable again at once, their attempts not
    /// counted; those whose lease was lost meanwhile are only dropped.
    async fn give_back(&self, claimed: VecDeque<Claimed>, why: &'static str) {
        let leases: Vec<Lease> = claimed
            .into_iter()
            .filter(|claimed| !claimed.running.is_lost())
            .map(|claimed| claimed.message.lease())
            .collect();
        // Their entries left the in-flight map with them: their leases are no longer
        // extended.
        if leases.is_empty() {
            return;
        }
        match self.worker.backend.release(&leases).await {
            Ok(released) => {
                tracing::debug!(target: "pgbus::worker", count = leases.len(), released, why, "gave the claimed-ahead messages back");
            }
            Err(err) => {
                tracing::warn!(target: "pgbus::worker", error = %err.report(), count = leases.len(), why, "could not give the claimed-ahead messages back; they return when their leases run out");
            }
        }
    }

    /// Hands one claimed message to the pool; gives it back at once if the pool refuses.
    async fn start(&self, claimed: Claimed) {
        let Claimed {
            message,
            cancel,
            running,
            give_back_at: _,
        } = claimed;
        let lease = message.lease();
        let queue = message.queue.clone();
        if let Some(outcome) = past_its_attempts(&message, self.policies[&queue].0.max_attempts()) {
            // The settler dead-letters it; its in-flight entry goes now, with `running`.
            drop(running);
            let _ = self.settle_tx.send(Settlement {
                lease,
                queue,
                outcome,
                ran: false,
            });
            return;
        }
        let paces = [Arc::clone(&self.paces[&queue]), Arc::clone(&self.pace)];
        let handler = Arc::clone(&self.worker.handlers[&queue]);
        let shutdown_deadline = self.jobs_cancel.clone();
        let ctx = JobContext::new(&message, cancel.clone(), self.worker.backend.clone());
        let timeout = self.worker.config.job_timeout;
        let settle_tx = self.settle_tx.clone();
        let job_queue = queue.clone();
        // The in-flight entry (inserted at the claim) is removed when the job ends however
        // it ends (settled, cut off at the shutdown deadline, killed, refused), so
        // `keep_leases` never extends the lease of a job that is no longer running.
        let job = Box::pin(async move {
            let began = Instant::now();
            let outcome = run_handler(handler.as_ref(), ctx, &message, timeout, &cancel).await;
            let took = began.elapsed();
            paces.iter().for_each(|pace| pace.record(took));
            let lost = running.finish();
            // Cut off at the shutdown deadline: whatever the handler returned, leave the
            // message leased, to be delivered again when the lease runs out.
            if shutdown_deadline.is_cancelled() {
                return;
            }
            // The message is no longer this job's (deleted by an operator, claimed again):
            // its settlement would change nothing, so none is written.
            if lost {
                tracing::debug!(target: "pgbus::worker", attempt = lease.attempt, job.id = lease.id.0, "the job's lease was lost: its outcome is dropped");
                return;
            }
            // The receiver outlives every job (the worker waits for the pool to drain
            // before dropping it), so this only fails after a kill.
            let _ = settle_tx.send(Settlement {
                lease,
                queue: job_queue,
                outcome,
                ran: true,
            });
        });
        match self.lane.pool.post(job) {
            Ok(()) => {
                self.report.started.fetch_add(1, Ordering::Relaxed);
            }
            Err(refused) => {
                // Dropping the job drops its `Running`: the lease is no longer extended.
                drop(refused.job);
                tracing::debug!(target: "pgbus::worker", reason = ?refused.reason, job.id = lease.id.0, "pool refused a job; giving the message back");
                if let Err(err) = self.worker.backend.release(&[lease]).await {
                    tracing::warn!(target: "pgbus::worker", error = %err.report(), job.id = lease.id.0, "could not give a refused message back; it returns when its lease runs out");
                }
            }
        }
    }
}

/// The jobs running now and the messages claimed ahead for them, by message: whose leases
/// `keep_leases` extends, and how it stops those whose lease is lost.
type InFlight = Arc<Mutex<HashMap<MessageId, RunningJob>>>;

/// A claimed message, from its claim (in the claim-ahead buffer, maybe) to its job's end:
/// its in-flight entry keeps its lease alive all along.
struct Claimed {
    message: Message,
    /// Its job's [`JobContext::cancellation`] token.
    cancel: CancellationToken,
    running: Running,
    /// When it is given back if it still waits in the buffer for a slot.
    give_back_at: tokio::time::Instant,
}

/// A running (or claimed-ahead) job, as the lease heartbeat sees it.
struct RunningJob {
    lease: Lease,
    /// The job's [`JobContext::cancellation`] token.
    cancel: CancellationToken,
    /// Set (under the map's lock) when the heartbeat found the lease lost.
    lost: Arc<AtomicBool>,
}

/// A job's entry in the worker's in-flight map, from its claim; removed when the job's
/// future ends or is dropped, or when the message is dropped from the claim-ahead buffer.
struct Running {
    in_flight: InFlight,
    lease: Lease,
    lost: Arc<AtomicBool>,
}

impl Running {
    fn insert(in_flight: InFlight, lease: Lease, cancel: CancellationToken) -> Self {
        let lost = Arc::new(AtomicBool::new(false));
        in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                lease.id,
                RunningJob {
                    lease,
                    cancel,
                    lost: Arc::clone(&lost),
                },
            );
        Running {
            in_flight,
            lease,
            lost,
        }
    }

    /// Whether the heartbeat has found the lease lost.
    fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    /// Removes the entry; returns whether the lease was found lost meanwhile (final: once
    /// the entry is gone, the heartbeat cannot mark it).
    fn finish(self) -> bool {
        let lost = Arc::clone(&self.lost);
        drop(self);
        lost.load(Ordering::SeqCst)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let mut in_flight = self
            .in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // Only this delivery's entry: a later claim of the same message has its own.
        if in_flight
            .get(&self.lease.id)
            .is_some_and(|job| job.lease == self.lease)
        {
            in_flight.remove(&self.lease.id);
        }
    }
}

/// Logs that a running job's lease is gone and that its handler is being cancelled: the
/// message was deleted (an operator cancelled the job), claimed again, or given back.
pub(crate) fn log_lease_lost(lease: &Lease) {
    let (id, attempt) = (lease.id.0, lease.attempt);
    tracing::info!(target: "pgbus::worker", attempt, job.id = id, "lease lost: job {id} cancelled");
}

/// Runs a handler under the per-job timeout: past it, the job's token is cancelled, its
/// future dropped, and the outcome is a retry. A panic is a retry too, with the panic
/// message as the error (dead-lettered once the attempts are used up, as Sidekiq and Oban
/// treat a crash): caught here rather than only by the pool, so the job still settles its
/// message instead of leaving it leased for the life of the worker.
pub(crate) async fn run_handler<B>(
    handler: &dyn ErasedHandler<B>,
    ctx: JobContext<B>,
    message: &Message,
    timeout: Option<Duration>,
    cancel: &CancellationToken,
) -> Outcome {
    let span = telemetry::job_span(message);
    telemetry::job_started(&message.queue, message.enqueued_at);
    let began = Instant::now();
    let outcome = run_guarded(handler, ctx, message, timeout, cancel)
        .instrument(span.clone())
        .await;
    telemetry::job_ran(&message.queue, began.elapsed());
    if !matches!(
        outcome,
        Outcome::Ack | Outcome::Committed | Outcome::Discard
    ) {
        telemetry::job_failed(&span);
    }
    outcome
}

/// The dead letter of a delivery past its queue's attempts, which is not run. A failure
/// makes the last attempt a dead letter, so only deliveries that ended without an outcome
/// get a message past it: each time, the process running the job died (an abort, a stack
/// overflow, the OOM killer), was stopped past its drain deadline, or lost its lease or
/// its group's session. A job that kills its worker would otherwise take down worker after
/// worker for ever; like Oban's and River's rescuers, pgbus delivers a message at most its
/// attempts' number of times, and an operator's retry starts them anew. Not running, it
/// takes no slot and tells neither the handlers' pace nor the circuit breaker anything.
/// (Lowering a queue's attempts also puts its messages that had as many deliveries past
/// them: the operator asked for no more.)
pub(crate) fn past_its_attempts(message: &Message, max: u32) -> Option<Outcome> {
    (message.attempts > max).then(|| {
        Outcome::DeadLetter(format!(
            "delivery {} of a job with {max} attempts, so it is not run again: the deliveries \
             since its last recorded outcome ended without one (its worker died, was stopped \
             past its drain deadline or lost its lease), or its queue's attempts were lowered",
            message.attempts
        ))
    })
}

/// [`run_handler`] without the telemetry: the handler under its timeout, its panic
/// caught.
async fn run_guarded<B>(
    handler: &dyn ErasedHandler<B>,
    ctx: JobContext<B>,
    message: &Message,
    timeout: Option<Duration>,
    cancel: &CancellationToken,
) -> Outcome {
    // `call` itself runs inside the caught future, so a panic while building the handler's
    // future is caught as well as one while polling it.
    let mut run = pin!(AssertUnwindSafe(async { handler.call(ctx, message).await })
        .catch_unwind()
        .map(|result| {
            result.unwrap_or_else(|panic| {
                let panic = panic_message(&*panic);
                tracing::error!(target: "pgbus::worker", panic, job.id = message.id.0, "handler panicked; retrying");
                Outcome::retry(format!("handler panicked: {panic}"))
            })
        }));
    match timeout {
        None => run.await,
        Some(limit) => tokio::select! {
            outcome = &mut run => outcome,
            _ = tokio::time::sleep(limit) => {
                // Cancel first, so the handler sees its token cancelled while its future
                // is dropped (pinned here, it is dropped as this function returns).
                cancel.cancel();
                Outcome::retry(format!("job timed out after {limit:?}"))
            }
        },
    }
}

/// What to write for an outcome, once the retry policy has had its say.
pub(crate) enum Settle {
    /// Ack (or, for [`Outcome::Discard`], drop without a dead letter).
    Ack,
    /// Nothing: the handler acked in its own transaction.
    Nothing,
    /// Give back, visible after the delay, with the error.
    Nack(Duration, String),
    /// Dead-letter with the reason.
    DeadLetter(String),
}

/// Decides what an outcome means for this delivery, counting and logging it.
pub(crate) fn plan(
    outcome: Outcome,
    policy: &RetryPolicy,
    lease: &Lease,
    queue: &QueueName,
    report: &Counters,
) -> Settle {
    let discard = matches!(outcome, Outcome::Discard);
    let settle = decide(outcome, policy, lease, queue, report);
    let finished = match &settle {
        Settle::Ack if discard => Finished::Discarded,
        Settle::Ack => Finished::Ack,
        Settle::Nothing => Finished::Committed,
        Settle::Nack(..) => Finished::Retry,
        Settle::DeadLetter(_) => Finished::DeadLetter,
    };
    telemetry::job_finished(queue, finished);
    settle
}

/// [`plan`] without the `pgbus_jobs_finished_total` count.
fn decide(
    outcome: Outcome,
    policy: &RetryPolicy,
    lease: &Lease,
    queue: &QueueName,
    report: &Counters,
) -> Settle {
    let (job_id, attempt) = (lease.id.0, lease.attempt);
    match outcome {
        Outcome::Ack => Settle::Ack,
        Outcome::Committed => {
            report.acked.fetch_add(1, Ordering::Relaxed);
            report.throughput.processed(queue, 1);
            Settle::Nothing
        }
        Outcome::Discard => {
            report.discarded.fetch_add(1, Ordering::Relaxed);
            report.throughput.processed(queue, 1);
            Settle::Ack
        }
        Outcome::DeadLetter(reason) => {
            report.dead_lettered.fetch_add(1, Ordering::Relaxed);
            report.throughput.failed(queue);
            tracing::warn!(target: "pgbus::worker", reason = %OneLine::new(&reason, LOGGED_ERROR), job.id = job_id, queue.name = %queue, "dead-lettering");
            Settle::DeadLetter(reason)
        }
        Outcome::Retry { error, after } => match (policy.decide(attempt), after) {
            (RetryDecision::DeadLetter, _) => {
                report.dead_lettered.fetch_add(1, Ordering::Relaxed);
                report.throughput.failed(queue);
                tracing::warn!(target: "pgbus::worker", attempt, error = %OneLine::new(&error, LOGGED_ERROR), job.id = job_id, queue.name = %queue, "attempts used up: dead-lettering");
                Settle::DeadLetter(error)
            }
            (RetryDecision::RetryAfter(delay), explicit) => {
                report.retried.fetch_add(1, Ordering::Relaxed);
                report.throughput.failed(queue);
                // The backends refuse a longer delay; a handler cannot see that error, so
                // its wish is shortened to the longest delay they accept.
                let delay = explicit.unwrap_or(delay).min(pgbus_core::MAX_DELAY);
                // A failed attempt is worth an operator's eye even when a retry follows:
                // a warning, like the dead letter that ends a run of them. The delay is
                // logged in whole milliseconds (the jitter's nanoseconds are noise).
                let retry_in =
                    Duration::from_millis(u64::try_from(delay.as_millis()).unwrap_or(u64::MAX));
                tracing::warn!(target: "pgbus::worker", attempt, retry_in = ?retry_in, error = %OneLine::new(&error, LOGGED_ERROR), job.id = job_id, queue.name = %queue, "job failed; retrying");
                Settle::Nack(delay, error)
            }
        },
    }
}

/// Applies job outcomes on the worker's runtime. Acks are batched: whatever arrived while
/// the previous ack ran goes in the next statement.
async fn settle_loop<B: Backend>(
    backend: B,
    mut rx: mpsc::UnboundedReceiver<Settlement>,
    policies: HashMap<QueueName, (RetryPolicy, Duration)>,
    mut breakers: Breakers,
    report: Arc<Counters>,
    ack_batch: usize,
) {
    let mut acks = AckBatch::with_capacity(ack_batch);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(settlement) = next.take() {
            apply(
                &backend,
                &policies,
                &mut breakers,
                &report,
                settlement,
                &mut acks,
            )
            .await;
            if acks.leases.len() >= ack_batch {
                break;
            }
            next = rx.try_recv().ok();
        }
        if !acks.leases.is_empty() {
            flush_acks(&backend, &mut acks, &report).await;
        }
    }
}

async fn apply<B: Backend>(
    backend: &B,
    policies: &HashMap<QueueName, (RetryPolicy, Duration)>,
    breakers: &mut Breakers,
    report: &Counters,
    s: Settlement,
    acks: &mut AckBatch,
) {
    let (policy, _) = &policies[&s.queue];
    let discard = matches!(s.outcome, Outcome::Discard);
    let settle = plan(s.outcome, policy, &s.lease, &s.queue, report);
    let failed = matches!(settle, Settle::Nack(..) | Settle::DeadLetter(_));
    let trip = if s.ran {
        breakers.record(&s.queue, failed)
    } else {
        None
    };
    if let Some(backoff) = trip {
        let queue = &s.queue;
        tracing::warn!(target: "pgbus::breaker", backoff = ?backoff, queue.name = %queue, "failures in a row: opening the queue's circuit breaker");
        if let Err(err) = backend.trip_breaker(queue, backoff).await {
            tracing::warn!(target: "pgbus::breaker", error = %err.report(), queue.name = %queue, "could not open the circuit breaker");
        }
    }
    let result = match settle {
        // Acks wait for the next batch; a discard is written at once, uncounted as acked.
        Settle::Ack if !discard => {
            acks.push(s.lease, &s.queue);
            return;
        }
        Settle::Ack => backend.ack(&[s.lease]).await.map(|_| ()),
        Settle::Nothing => return,
        Settle::Nack(delay, error) => backend
            .nack(&s.lease, delay, Some(&error))
            .await
            .map(|_| ()),
        Settle::DeadLetter(reason) => backend.dead_letter(&s.lease, &reason).await.map(|_| ()),
    };
    if let Err(err) = result {
        tracing::warn!(target: "pgbus::worker", error = %err.report(), job.id = s.lease.id.0, "could not settle a job; it is delivered again when its lease runs out");
    }
}

/// Acks waiting for the next batch statement, with how many of them each queue has.
struct AckBatch {
    leases: Vec<Lease>,
    per_queue: HashMap<QueueName, u64>,
}

impl AckBatch {
    fn with_capacity(capacity: usize) -> Self {
        Self {
            leases: Vec::with_capacity(capacity),
            per_queue: HashMap::new(),
        }
    }

    fn push(&mut self, lease: Lease, queue: &QueueName) {
        self.leases.push(lease);
        match self.per_queue.get_mut(queue) {
            Some(n) => *n += 1,
            None => {
                self.per_queue.insert(queue.clone(), 1);
            }
        }
    }

    fn clear(&mut self) {
        self.leases.clear();
        self.per_queue.clear();
    }
}

async fn flush_acks<B: Backend>(backend: &B, acks: &mut AckBatch, report: &Counters) {
    let count = acks.leases.len();
    for attempt in 1..=5u32 {
        match backend.ack(&acks.leases).await {
            Ok(_) => {
                report.acked.fetch_add(count as u64, Ordering::Relaxed);
                for (queue, n) in &acks.per_queue {
                    report.throughput.processed(queue, *n);
                }
                acks.clear();
                return;
            }
            Err(err) if err.is_transient() && attempt < 5 => {
                tracing::warn!(target: "pgbus::worker", error = %err.report(), count, "ack failed; retrying");
                tokio::time::sleep(backoff(attempt, Duration::from_secs(5))).await;
            }
            Err(err) => {
                tracing::error!(target: "pgbus::worker", error = %err.report(), count, "ack failed; these messages are delivered again when their leases run out");
                acks.clear();
                return;
            }
        }
    }
}

/// Extends the leases of running jobs every third of the shortest lease, so a long job is
/// not delivered again while it is alive; cancels the jobs whose lease the extension
/// found lost.
async fn keep_leases<B: Backend>(
    backend: B,
    in_flight: InFlight,
    lease: Duration,
    stop: CancellationToken,
) {
    let every = (lease / 3).max(Duration::from_millis(10));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let leases: Vec<Lease> = in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|job| !job.lost.load(Ordering::SeqCst))
            .map(|job| job.lease)
            .collect();
        if leases.is_empty() {
            continue;
        }
        match backend.extend(&leases, lease).await {
            Ok(found) => {
                telemetry::leases_extended(found.extended);
                cancel_lost(&in_flight, &found.lost);
            }
            Err(err) => {
                tracing::warn!(target: "pgbus::worker", error = %err.report(), count = leases.len(), "could not extend leases");
            }
        }
    }
}

/// Cancels the jobs whose lease is lost, if they still run that delivery, and marks them
/// so their outcome is dropped and their lease no longer extended.
fn cancel_lost(in_flight: &InFlight, lost: &[Lease]) {
    if lost.is_empty() {
        return;
    }
    let in_flight = in_flight.lock().unwrap_or_else(PoisonError::into_inner);
    for lease in lost {
        let Some(job) = in_flight.get(&lease.id) else {
            continue; // ended meanwhile
        };
        if job.lease == *lease && !job.lost.swap(true, Ordering::SeqCst) {
            log_lease_lost(lease);
            job.cancel.cancel();
        }
    }
}

/// Keeps a process's entry in the registry: registers, heartbeats with the busy count,
/// registers again when pruned, reports the worker's throughput since the last beat,
/// prunes entries of processes that went silent.
pub(crate) struct ProcessEntry {
    info: ProcessInfo,
    id: Option<ProcessId>,
    shared: Arc<Shared>,
    report: Arc<Counters>,
}

impl ProcessEntry {
    pub(crate) fn new(shared: Arc<Shared>, report: Arc<Counters>) -> Self {
        let info = ProcessInfo::current(
            shared.queues.clone(),
            shared.mode.as_str(),
            u32::try_from(shared.capacity).unwrap_or(u32::MAX),
        );
        Self {
            info,
            id: None,
            shared,
            report,
        }
    }

    /// One heartbeat; errors are logged, never fatal.
    pub(crate) async fn beat(
        &mut self,
        registry: &impl ProcessRegistry,
        busy: usize,
        interval: Duration,
    ) {
        let busy = u32::try_from(busy).unwrap_or(u32::MAX);
        let alive = match self.id {
            Some(current) => registry.heartbeat(current, busy).await,
            None => Ok(false),
        };
        match alive {
            Ok(true) => {}
            Ok(false) => match registry.register(&self.info).await {
                Ok(new) => {
                    let new_id = new.0;
                    self.id = Some(new);
                    self.shared.process.set(new);
                    tracing::info!(target: "pgbus::worker", id = new_id, "process registered");
                }
                Err(err) => {
                    tracing::warn!(target: "pgbus::worker", error = %err.report(), "could not register the process")
                }
            },
            Err(err) => {
                tracing::warn!(target: "pgbus::worker", error = %err.report(), "heartbeat failed")
            }
        }
        if let Err(err) = self.report_throughput(registry).await {
            tracing::warn!(target: "pgbus::worker", error = %err.report(), "could not record throughput; the counts go with the next heartbeat");
        }
        if let Err(err) = registry.prune_stale(interval * 3).await {
            tracing::debug!(target: "pgbus::worker", error = %err.report(), "could not prune stale processes");
        }
    }

    /// Writes the counts settled since the last report; on an error they are kept for the
    /// next one.
    async fn report_throughput(&self, registry: &impl ProcessRegistry) -> Result<()> {
        let counts = self.report.throughput.drain();
        let written = registry.record_throughput(&counts).await;
        if written.is_err() {
            self.report.throughput.restore(&counts);
        }
        written
    }

    /// Reports the last counts and removes the entry of a process stopping cleanly.
    pub(crate) async fn end(self, registry: &impl ProcessRegistry) {
        if let Err(err) = self.report_throughput(registry).await {
            tracing::warn!(target: "pgbus::worker", error = %err.report(), "could not record the last throughput counts");
        }
        if let Some(id) = self.id {
            if let Err(err) = registry.deregister(id).await {
                tracing::warn!(target: "pgbus::worker", error = %err.report(), "could not deregister the process");
            }
        }
    }
}

/// The plain worker's registry heartbeat, on the backend's pool.
async fn heartbeat<B: Backend>(
    backend: B,
    mut entry: ProcessEntry,
    pool: Arc<dyn ExecutionPool>,
    interval: Duration,
    stop: CancellationToken,
) {
    // The first beat (the registration) ran before the claims started.
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(interval) => {}
        }
        entry.beat(&backend, pool.metadata().busy, interval).await;
    }
    entry.end(&backend).await;
}
