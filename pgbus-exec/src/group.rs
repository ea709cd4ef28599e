//! The group worker: ordered processing of messages that carry a group key.

use std::collections::{HashMap, HashSet, VecDeque};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use pgbus_core::{
    Backend, Error, Fetcher, GroupNext, GroupRecovery, GroupSession, GroupSettle, Lease, Message,
    MessageId, OpenGroupSession, QueueName, Result, RetryPolicy, Settled,
};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::breaker::Breakers;
use crate::handler::{JobContext, Outcome};
use crate::lane::Lane;
use crate::pace::{self, Pace};
use crate::report::{Counters, WorkerReport};
use crate::share::{GroupSlot, Kind, Share};
use crate::worker::{
    backoff, load_policies, log_lease_lost, past_its_attempts, plan, run_handler, KillPoolOnDrop,
    ProcessEntry, Settle, Worker, WorkerMonitor,
};
use crate::{ExecutionPool, Job};

type Session<B> = <B as OpenGroupSession>::Session;
type Policies = HashMap<QueueName, (RetryPolicy, Duration)>;
type GroupKey = (QueueName, String);

/// A worker for ordered groups. Messages sharing a group key run one at a time, in send
/// order, across all workers and processes; different groups run in parallel, up to the
/// concurrency. Build it with [`WorkerBuilder::build_groups`](crate::WorkerBuilder::build_groups).
///
/// How it works, and what it guarantees:
/// - **Finding work takes no lock.** The fetch connection lists groups whose oldest message
///   is visible, oldest first, leaving out the groups this worker already runs.
/// - **Each in-flight group owns a session** (a `pgbus:group` connection for Postgres) for
///   its lock, its claims, its lease heartbeat, its acks and its unlock; no other task ever
///   uses it. A group locked elsewhere is skipped.
/// - **Each in-flight group holds one slot** of the execution pool from its start to its
///   end, and runs its handlers in it one after another.
/// - **A group's messages are claimed in runs**: the group's oldest messages, in id order,
///   up to the first that is delayed or leased, at most 32, and fewer for slower handlers
///   (a run's handlers take about 50 ms at most, judged by the queue's recent handlers).
///   They run one at a time, in order, and are settled together in one round trip that
///   also claims the next run; finished messages wait at most about 50 ms for their ack
///   however long the rest takes. A failed message's unstarted successors are given back
///   untouched (their claim's attempt taken back), and so are a run's unstarted messages
///   when its session fails, on another session that also acks the run's finished
///   messages (the group's lock may have died with the old one; what the failing
///   statement was itself giving back or claiming is left to recovery). If the process
///   dies mid-run, its unstarted claims come back through recovery with the claim's
///   attempt counted, and a message finished in its last 50 ms may run again.
/// - **The lease heartbeat stops before the post-processing writes**: the session extends
///   the leases of all its claimed messages while a handler runs, then stops, then settles.
/// - **Sessions are reused only when clean** (unlocked, no error); after any error the
///   session is dropped, which closes its connection, so a query interrupted half-way
///   never leaves a session to be reused mid-protocol. A clean session unused for the
///   group idle timeout
///   ([`WorkerBuilder::group_idle_timeout`](crate::WorkerBuilder::group_idle_timeout),
///   30 s by default) is closed.
/// - **A failed message blocks its group** until its retry is due (order is kept); a
///   dead-lettered one lets the group move on.
/// - **Recovery**: a separate session (`pgbus:recovery`) periodically frees the in-flight
///   messages of groups whose owner died (its lock is gone), its whole run, and records this process's
///   registry heartbeats, so the worker uses no pooled connection.
/// - **Connection budget**: at most `concurrency + 2` (fetch, recovery, one per in-flight
///   group), reported by [`WorkerMetadata::connection_budget`](crate::WorkerMetadata).
/// - **Shutdown**: stop taking groups and give back the unstarted rest of every run at
///   once, let in-flight groups finish their current message up to the drain deadline, then
///   cancel the rest; their messages stay leased and are recovered.
///
/// To run plain and grouped messages of the same queues in one process, on one set of
/// slots, use a [`MixedWorker`](crate::MixedWorker) rather than a [`Worker`] beside a
/// group worker.
pub struct GroupWorker<B: Backend> {
    pub(crate) worker: Worker<B>,
}

/// What one group task shares with the loop.
struct GroupContext<B: Backend> {
    worker: Arc<Worker<B>>,
    pool: Arc<dyn ExecutionPool>,
    policies: Policies,
    /// How long each queue's handlers take, for the size of a group's runs.
    paces: HashMap<QueueName, Pace>,
    /// Failures in a row per queue, for circuit breakers (counted across all groups).
    breakers: Mutex<Breakers>,
    report: Arc<Counters>,
    /// Sessions returned clean, for the next groups, with when each was returned.
    idle: Mutex<Vec<(Session<B>, tokio::time::Instant)>>,
    /// Open sessions (idle or in use), for the connection budget.
    open_sessions: Arc<AtomicUsize>,
    /// The groups running here.
    in_flight: Mutex<HashSet<GroupKey>>,
    /// When this loop last started or ended a group.
    last_active: Mutex<tokio::time::Instant>,
    /// How the slots are divided with a plain loop (a mixed worker's), if there is one.
    share: Option<Arc<Share>>,
    /// Stop after the current message.
    draining: CancellationToken,
    /// Cut off now.
    kill: CancellationToken,
}

impl<B: Backend> GroupContext<B> {
    fn in_flight(&self) -> std::sync::MutexGuard<'_, HashSet<GroupKey>> {
        self.in_flight.lock().expect("in flight")
    }

    fn touch(&self) {
        *self.last_active.lock().expect("last active") = tokio::time::Instant::now();
    }

    /// Whether no group ran here for the group idle timeout.
    fn idle_for_long(&self) -> bool {
        self.in_flight().is_empty()
            && self.last_active.lock().expect("last active").elapsed()
                >= self.worker.config.group_idle
    }

    /// Closes the sessions unused for the group idle timeout; returns when the next of the
    /// others will be.
    fn close_idle_sessions(&self) -> Option<tokio::time::Instant> {
        let after = self.worker.config.group_idle;
        let mut idle = self.idle.lock().expect("idle sessions");
        let before = idle.len();
        idle.retain(|(_, since)| since.elapsed() < after);
        let closed = before - idle.len();
        if closed > 0 {
            self.open_sessions.fetch_sub(closed, Ordering::SeqCst);
            tracing::debug!(target: "pgbus::group", closed, "closed idle group sessions");
        }
        idle.iter().map(|(_, since)| *since + after).min()
    }

    /// The most recently returned idle session whose connection is still open; closes the
    /// dead ones it finds on the way (after a server restart, all of them).
    fn take_idle(&self) -> Option<Session<B>> {
        let mut idle = self.idle.lock().expect("idle sessions");
        while let Some((session, _)) = idle.pop() {
            if session.is_alive() {
                return Some(session);
            }
            drop(session);
            self.open_sessions.fetch_sub(1, Ordering::SeqCst);
        }
        None
    }

    /// Keeps a clean session for the next group.
    fn return_idle(&self, session: Session<B>) {
        self.idle
            .lock()
            .expect("idle sessions")
            .push((session, tokio::time::Instant::now()));
    }
}

impl<B: Backend> GroupWorker<B> {
    pub(crate) fn new(worker: Worker<B>) -> Self {
        Self { worker }
    }

    /// A handle to watch the worker while it runs.
    pub fn monitor(&self) -> WorkerMonitor {
        self.worker.monitor()
    }

    /// The wake-up hook (see [`Worker::waker`]).
    pub fn waker(&self) -> Arc<Notify> {
        self.worker.waker()
    }

    /// Runs until `shutdown` is cancelled; see the type's documentation.
    pub async fn run(self, shutdown: CancellationToken) -> Result<WorkerReport> {
        let lane = Lane::alone(
            &self.worker.backend,
            Kind::Groups,
            self.worker.shared.mode,
            self.worker.config.concurrency,
        )?;
        self.run_in(lane, shutdown).await
    }

    /// [`GroupWorker::run`] on `lane`. A lane shared with a plain loop (a
    /// [`MixedWorker`](crate::MixedWorker)'s) leaves the process entry to that loop and
    /// keeps a recovery connection open only while it has grouped work.
    pub(crate) async fn run_in(
        self,
        lane: Lane<B>,
        shutdown: CancellationToken,
    ) -> Result<WorkerReport> {
        let worker = Arc::new(self.worker);
        let queues = worker.shared.queues.clone();
        let concurrency = worker.config.concurrency;
        // Sharing the lane with a plain loop: the process entry and the pool's shutdown are
        // that loop's, and recovery runs only while there is grouped work.
        let shared = lane.share.is_some();
        let (policies, breakers) = {
            let mut fetcher = lane.fetch.lock().await?;
            let loaded = async {
                let policies = load_policies(fetcher.get(), &queues, worker.config.lease).await?;
                let breakers = Breakers::load(fetcher.get(), &queues).await?;
                Ok::<_, Error>((policies, breakers))
            }
            .await;
            if loaded.is_err() {
                fetcher.discard();
            }
            loaded?
        };
        let pool = Arc::clone(&lane.pool);
        let _ = worker.shared.pool.set(Arc::clone(&pool));
        let open_sessions = Arc::new(AtomicUsize::new(0));
        let _ = worker.shared.group_sessions.set(Arc::clone(&open_sessions));
        let ctx = Arc::new(GroupContext {
            worker: Arc::clone(&worker),
            pool: Arc::clone(&pool),
            paces: queues
                .iter()
                .map(|q| (q.clone(), Pace::default()))
                .collect(),
            policies,
            breakers: Mutex::new(breakers),
            report: Arc::clone(&lane.report),
            idle: Mutex::new(Vec::new()),
            open_sessions,
            in_flight: Mutex::default(),
            last_active: Mutex::new(tokio::time::Instant::now()),
            share: lane.share.clone(),
            // Cancelled with `shutdown` itself, so a group task stops after its current
            // message even before this loop wakes up to the shutdown.
            draining: shutdown.child_token(),
            kill: lane.kill.clone(),
        });

        let stop_recovery = CancellationToken::new();
        let start_recovery = || {
            tokio::spawn(recovery_loop(
                Arc::clone(&ctx),
                stop_recovery.clone(),
                shared,
            ))
        };
        let mut recovery: Option<JoinHandle<()>> = (!shared).then(start_recovery);
        // Group tasks, their jobs and the recovery loop die with this future, also when it
        // is dropped mid-run (their sessions close, releasing their locks).
        let _stop_recovery_on_drop = stop_recovery.clone().drop_guard();
        let kill_groups_on_drop = ctx.kill.clone().drop_guard();
        let kill_jobs_on_drop = KillPoolOnDrop::new(Arc::clone(&pool));
        let _subscription = worker.shared.wakeup_source.as_ref().map(|source| {
            let wakeup = Arc::clone(&worker.wakeup);
            source.subscribe(&queues, Arc::new(move || wakeup.notify_one()))
        });

        let tasks = TaskTracker::new();
        let group_done = Arc::new(Notify::new());
        // Groups found locked elsewhere rest until the next poll interval, so the loop does
        // not spin on them.
        let resting: Arc<Mutex<HashMap<GroupKey, Instant>>> = Arc::default();
        let free = || lane.free().min(concurrency - ctx.in_flight().len());
        let mut errors = 0u32;
        let mut next_queue = 0usize;
        // Whether groups wait for a slot (told to the plain loop sharing the slots).
        let mut waiting = false;
        while !shutdown.is_cancelled() {
            let session_expiry = ctx.close_idle_sessions();
            let round = async {
                let mut started = 0;
                let mut filled = false;
                // Groups found that there was no slot for.
                let mut more = false;
                if free() == 0 && waiting {
                    // Known to wait for a slot: nothing to look for until one frees.
                    return Ok((started, filled, true));
                }
                let mut fetcher = lane.fetch.lock().await?;
                for i in 0..queues.len() {
                    let free = free();
                    if free == 0 && (started > 0 || more) {
                        break;
                    }
                    let queue = &queues[(next_queue + i) % queues.len()];
                    let exclude = excluded(queue, &ctx.in_flight, &resting);
                    // Without a free slot, one candidate tells whether groups wait for one.
                    let ask = free.max(1);
                    let groups = match fetcher.get().group_candidates(queue, ask, &exclude).await {
                        Ok(groups) => groups,
                        Err(err) => {
                            fetcher.discard();
                            return Err(err);
                        }
                    };
                    filled |= free > 0 && groups.len() == free;
                    more |= groups.len() > free;
                    for group in groups.into_iter().take(free) {
                        // The group's slot, taken now, under the fetch connection's lock.
                        let slot = ctx.share.as_ref().map(Share::hold_group);
                        let (jobs, carried) = mpsc::unbounded_channel();
                        if let Err(refused) = pool.post(carrier(carried)) {
                            tracing::debug!(target: "pgbus::group", reason = ?refused.reason, "pool refused a group");
                            return Ok((started, false, false));
                        }
                        ctx.in_flight().insert((queue.clone(), group.clone()));
                        started += 1;
                        let (ctx, done) = (Arc::clone(&ctx), Arc::clone(&group_done));
                        let resting = Arc::clone(&resting);
                        let rest = worker.config.poll_interval;
                        let queue = queue.clone();
                        tasks.spawn(async move {
                            let key = (queue.clone(), group.clone());
                            let run = AssertUnwindSafe(run_group(&ctx, &queue, &group, jobs, slot)).catch_unwind();
                            match run.await {
                                Ok(GroupRun::Ran) => {}
                                Ok(GroupRun::LockedElsewhere) => {
                                    resting.lock().expect("resting groups").insert(key.clone(), Instant::now() + rest);
                                }
                                Err(_) => {
                                    tracing::error!(target: "pgbus::group", group = %group, "group task panicked; its session was dropped");
                                }
                            }
                            ctx.in_flight().remove(&key);
                            ctx.touch();
                            done.notify_one();
                        });
                    }
                }
                drop(fetcher);
                if started > 0 {
                    lane.took();
                }
                Ok::<_, Error>((started, filled, more))
            }
            .await;
            next_queue = next_queue.wrapping_add(1);
            let full = free() == 0;
            match round {
                Err(err) => {
                    waiting = false;
                    lane.set_waiting(false);
                    errors += 1;
                    let delay = backoff(errors, worker.config.error_backoff_cap);
                    tracing::warn!(target: "pgbus::group", error = %err.report(), retry_in = ?delay, "finding groups failed");
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                Ok((started, filled, more)) => {
                    errors = 0;
                    if started > 0 {
                        ctx.touch();
                        if shared && recovery.as_ref().is_none_or(JoinHandle::is_finished) {
                            recovery = Some(start_recovery());
                        }
                    }
                    waiting = more || (filled && full);
                    lane.set_waiting(waiting);
                    if waiting && full {
                        tokio::select! {
                            _ = shutdown.cancelled() => {}
                            _ = group_done.notified() => {}
                            _ = lane.freed.notified() => {}
                            _ = lane.turn.notified() => {}
                            _ = until(session_expiry) => {}
                        }
                    } else if !filled {
                        worker.shared.set_idle(Kind::Groups, true);
                        tokio::select! {
                            _ = shutdown.cancelled() => {}
                            _ = worker.wakeup.notified() => {}
                            _ = group_done.notified() => {}
                            _ = tokio::time::sleep(worker.config.poll_interval) => {}
                            _ = until(session_expiry) => {}
                        }
                        worker.shared.set_idle(Kind::Groups, false);
                    }
                }
            }
        }

        lane.set_waiting(false);
        tracing::info!(target: "pgbus::group", groups = ctx.in_flight().len(), "stopping: draining in-flight groups");
        ctx.draining.cancel();
        tasks.close();
        if tokio::time::timeout(worker.config.drain_timeout, tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(target: "pgbus::group", "drain deadline passed: cancelling the remaining groups; their messages are recovered");
            ctx.kill.cancel();
            pool.kill();
            tasks.wait().await;
        }
        if !shared {
            // (A plain loop sharing the pool shuts it down when it has claimed its last.)
            pool.shutdown();
        }
        stop_recovery.cancel();
        if let Some(recovery) = recovery {
            if let Err(err) = recovery.await {
                tracing::error!(target: "pgbus::group", error = %err, "the recovery task failed");
            }
        }
        ctx.idle.lock().expect("idle sessions").clear();
        // Ended normally: a kill switch and a pool shared with a plain loop are its to use.
        kill_groups_on_drop.disarm();
        kill_jobs_on_drop.disarm();
        Ok(ctx.report.snapshot())
    }
}

/// Waits until `at`, or forever.
async fn until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The job that holds a group's slot for the group's whole run: it runs the handlers the
/// group's task sends it, one after another, and ends (freeing the slot) when the task
/// drops its sender.
fn carrier(mut jobs: mpsc::UnboundedReceiver<Job>) -> Job {
    Box::pin(async move {
        while let Some(job) = jobs.recv().await {
            job.await;
        }
    })
}

/// The groups of `queue` not to fetch now: in flight here, or resting after being found
/// locked elsewhere.
fn excluded(
    queue: &QueueName,
    in_flight: &Mutex<HashSet<GroupKey>>,
    resting: &Mutex<HashMap<GroupKey, Instant>>,
) -> Vec<String> {
    let now = Instant::now();
    let mut resting = resting.lock().expect("resting groups");
    resting.retain(|_, until| *until > now);
    let in_flight = in_flight.lock().expect("in flight");
    in_flight
        .iter()
        .chain(resting.keys())
        .filter(|(q, _)| q == queue)
        .map(|(_, g)| g.clone())
        .collect()
}

/// How a group task ended.
enum GroupRun {
    /// It held the lock (and ran what it could), or failed.
    Ran,
    /// Another session holds the group's lock: skipped.
    LockedElsewhere,
}

/// Runs one group until it is empty, blocked, draining, or an error, its handlers in the
/// carrier that `jobs` feeds; a clean session goes back to the idle list, any other is
/// dropped (closing its connection). The group's slot is freed when this returns (the
/// carrier ends with `jobs`), or given up earlier to plain work waiting for it.
async fn run_group<B: Backend>(
    ctx: &GroupContext<B>,
    queue: &QueueName,
    group: &str,
    jobs: mpsc::UnboundedSender<Job>,
    mut slot: Option<GroupSlot>,
) -> GroupRun {
    let mut session = match ctx.take_idle() {
        Some(session) => session,
        None => match ctx.worker.backend.open_group_session().await {
            Ok(session) => {
                ctx.open_sessions.fetch_add(1, Ordering::SeqCst);
                session
            }
            Err(err) => {
                tracing::warn!(target: "pgbus::group", error = %err.report(), group = %group, "could not open a group session");
                return GroupRun::Ran;
            }
        },
    };
    // The group's current run, left here when the task ends: after a failure, its
    // unstarted messages are still this worker's claims.
    let mut run = None;
    let outcome = tokio::select! {
        // A cut-off wins over whatever the group's task was about to do.
        biased;
        _ = ctx.kill.cancelled() => None,
        outcome = drive_group(ctx, &mut session, queue, group, &jobs, &mut slot, &mut run) => Some(outcome),
    };
    let failed = match outcome {
        Some(Ok(locked)) => {
            ctx.return_idle(session);
            if locked {
                return GroupRun::Ran;
            }
            return GroupRun::LockedElsewhere;
        }
        Some(Err(err)) => {
            tracing::warn!(target: "pgbus::group", error = %err.report(), group = %group, "group task failed; its session is closed");
            true
        }
        // Cut off, possibly mid-query: never reuse this session.
        None => false,
    };
    drop(session);
    ctx.open_sessions.fetch_sub(1, Ordering::SeqCst);
    if let Some(run) = run.filter(|_| failed) {
        settle_orphans(ctx, queue, group, &run).await;
    }
    GroupRun::Ran
}

/// How long a failed session's run may take to settle what it left: the group's slot is
/// held meanwhile, and recovery frees its messages after [`RECOVERY_GRACE`] anyway.
const ORPHANS_WITHIN: Duration = Duration::from_secs(5);

/// Settles what a run whose session failed left behind, on an idle session or a fresh one
/// that takes the failed one's place in the connection budget (the session then joins the
/// idle ones): its finished messages are acked and its unstarted ones given back, their
/// claim's attempt taken back. Left to recovery, all of them would run again with that
/// attempt counted, and one on its last attempt would be dead-lettered, whether it had
/// succeeded or never run. A settle takes the unstarted messages out of the run before it
/// gives them back, so after a failure these are still this worker's claims; the acks of
/// a settle whose answer never came are acked again (those it wrote are gone). Given up
/// after [`ORPHANS_WITHIN`], or at a cut-off.
async fn settle_orphans<B: Backend>(
    ctx: &GroupContext<B>,
    queue: &QueueName,
    group: &str,
    run: &Run,
) {
    let finished: Vec<Lease> = run
        .acks_in_doubt
        .iter()
        .chain(&run.settle.ack)
        .copied()
        .collect();
    let unstarted: Vec<Lease> = run.unstarted.iter().map(Message::lease).collect();
    if finished.is_empty() && unstarted.is_empty() {
        return;
    }
    let mut session = ctx.take_idle();
    let settle = async {
        let session = match &mut session {
            Some(session) => session,
            None => {
                let opened = ctx.worker.backend.open_group_session().await?;
                ctx.open_sessions.fetch_add(1, Ordering::SeqCst);
                session.insert(opened)
            }
        };
        session.settle_orphans(&finished, &unstarted).await
    };
    let settled = tokio::select! {
        biased;
        _ = ctx.kill.cancelled() => None,
        settled = tokio::time::timeout(ORPHANS_WITHIN, settle) => Some(settled),
    };
    let (finished, unstarted) = (finished.len(), unstarted.len());
    match settled {
        Some(Ok(Ok((acked, given_back)))) => {
            tracing::debug!(target: "pgbus::group", group = %group, finished, acked, unstarted, given_back, "settled what the failed session left");
            // Counted from the rows this statement deleted: an ack in doubt that had
            // landed is not counted (its answer never came), and a discard among the
            // finished is taken off the processed count whether or not its row was here.
            ctx.report.acked.fetch_add(acked, Ordering::Relaxed);
            let discarded = run.discards.len() as u64;
            ctx.report
                .throughput
                .processed(queue, acked.saturating_sub(discarded));
            if let Some(session) = session {
                ctx.return_idle(session);
            }
            ctx.worker.wakeup.notify_one();
            return;
        }
        Some(Ok(Err(err))) => {
            tracing::warn!(target: "pgbus::group", error = %err.report(), group = %group, finished, unstarted, "could not settle what the failed session left; recovery frees it with an attempt counted");
        }
        Some(Err(_)) => {
            tracing::warn!(target: "pgbus::group", group = %group, finished, unstarted, within = ?ORPHANS_WITHIN, "could not settle what the failed session left in time; recovery frees it with an attempt counted");
        }
        None => {}
    }
    // Possibly cut off mid-query: never reuse this session.
    if let Some(session) = session {
        drop(session);
        ctx.open_sessions.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How often a running handler's session is checked for a closed connection.
const LIVENESS_CHECK: Duration = Duration::from_millis(100);

/// How long recovery leaves a message whose group's lock vanished before freeing it: ten
/// liveness checks, so the worker whose session died has stopped its handler by then.
const RECOVERY_GRACE: Duration = Duration::from_secs(1);

/// The most messages a group's run claims at once.
const MAX_RUN: usize = 32;

/// How long finished messages of a run wait for their ack at most: the run size keeps a
/// run's handlers within it, and a run that takes longer settles what has finished.
const SETTLE_WITHIN: Duration = pace::WITHIN;

/// How many messages a group's next run claims: as many as its one slot runs within
/// [`SETTLE_WITHIN`], one while the pace is unknown.
fn run_size(pace: &Pace) -> usize {
    pace.fits(1).map_or(1, |fit| fit.clamp(1, MAX_RUN))
}

/// A group's claimed run and what its finished messages await.
struct Run {
    /// Claimed, not started yet, in order.
    unstarted: VecDeque<Message>,
    /// What the next settle writes.
    settle: GroupSettle,
    /// The acks of the settle on its way: until its answer comes, they may or may not
    /// have been written.
    acks_in_doubt: Vec<Lease>,
    /// Acked messages whose handler discarded them (counted as processed when planned).
    discards: HashSet<MessageId>,
    /// When the oldest message awaiting its settle finished.
    waiting_since: Option<tokio::time::Instant>,
    /// End the run after the current message: give back the rest and release the group.
    stop: bool,
    /// Extends the leases of the run's messages while handlers run.
    heartbeat: tokio::time::Interval,
}

impl Run {
    /// A run whose heartbeat beats three times within `beat_within`.
    fn new(claimed: Vec<Message>, beat_within: Duration) -> Self {
        let every = (beat_within / 3).max(Duration::from_millis(10));
        let mut heartbeat = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Self {
            unstarted: claimed.into(),
            settle: GroupSettle::default(),
            acks_in_doubt: Vec::new(),
            discards: HashSet::new(),
            waiting_since: None,
            stop: false,
            heartbeat,
        }
    }

    /// Continues with the next claimed run.
    fn next(&mut self, claimed: Vec<Message>, beat_within: Duration) {
        *self = Self::new(claimed, beat_within);
    }

    /// The session's claimed messages whose leases a heartbeat extends: the running one,
    /// the unstarted ones, and the finished ones awaiting their ack.
    fn leases(&self, running: Lease) -> Vec<Lease> {
        std::iter::once(running)
            .chain(self.unstarted.iter().map(Message::lease))
            .chain(self.settle.ack.iter().copied())
            .collect()
    }

    /// Forgets unstarted messages whose lease is lost (an operator deleted them): they do
    /// not run.
    fn forget(&mut self, lost: &[Lease]) {
        self.unstarted.retain(|m| !lost.contains(&m.lease()));
    }

    fn finished(&mut self) {
        self.waiting_since
            .get_or_insert_with(tokio::time::Instant::now);
    }

    /// When finished messages are settled even while the next one runs: they wait no
    /// longer than [`SETTLE_WITHIN`].
    fn settle_due(&self) -> Option<tokio::time::Instant> {
        self.waiting_since.map(|since| since + SETTLE_WITHIN)
    }

    /// Whether to settle before the next message: a dead letter is written at once, and
    /// finished messages wait no longer than [`SETTLE_WITHIN`].
    fn settle_now(&self) -> bool {
        self.settle.failed.is_some()
            || self
                .settle_due()
                .is_some_and(|due| due <= tokio::time::Instant::now())
    }

    /// What to settle now; when the run ends early, its unstarted messages are given back.
    fn take_settle(&mut self, ending: bool) -> GroupSettle {
        self.waiting_since = None;
        let settle = std::mem::take(&mut self.settle);
        if ending {
            settle.give_back(self.unstarted.drain(..).map(|m| m.lease()))
        } else {
            settle
        }
    }
}

impl<B: Backend> GroupContext<B> {
    /// Counts what a settle acked.
    fn count_acked(&self, queue: &QueueName, settled: &Settled, discards: &HashSet<MessageId>) {
        let acked = settled.acked.len() as u64;
        self.report.acked.fetch_add(acked, Ordering::Relaxed);
        // A discard counted as processed when it was planned.
        let processed = settled
            .acked
            .iter()
            .filter(|id| !discards.contains(id))
            .count();
        self.report.throughput.processed(queue, processed as u64);
    }
}

/// Writes what the run has finished on `session` (giving back its unstarted messages when
/// `ending`), then does what `then` says, in one round trip; counts the acks.
async fn settle_run<B: Backend>(
    ctx: &GroupContext<B>,
    queue: &QueueName,
    session: &mut Session<B>,
    run: &mut Run,
    ending: bool,
    then: GroupNext<'_>,
) -> Result<Settled> {
    let settle = run.take_settle(ending);
    run.acks_in_doubt.clone_from(&settle.ack);
    let settled = session.settle(&settle, then).await?;
    run.acks_in_doubt.clear();
    ctx.count_acked(queue, &settled, &run.discards);
    run.discards.clear();
    Ok(settled)
}

/// Lock and claim the group's first run, then message after message: run each with the
/// leases kept alive on this session, stop the heartbeat, and settle the run in one round
/// trip that claims the next. Unlock only what was locked. `Ok(false)`: locked elsewhere.
async fn drive_group<B: Backend>(
    ctx: &GroupContext<B>,
    session: &mut Session<B>,
    queue: &QueueName,
    group: &str,
    jobs: &mpsc::UnboundedSender<Job>,
    slot: &mut Option<GroupSlot>,
    run: &mut Option<Run>,
) -> Result<bool> {
    let (policy, lease_for) = &ctx.policies[queue];
    let lease_for = *lease_for;
    let pace = &ctx.paces[queue];
    let handler = Arc::clone(&ctx.worker.handlers[queue]);
    session.set_process(ctx.worker.shared.process.get());
    let Some(claimed) = session
        .lock_and_claim(queue, group, lease_for, run_size(pace))
        .await?
    else {
        tracing::debug!(target: "pgbus::group", group = %group, "group locked elsewhere; skipped");
        return Ok(false);
    };
    if claimed.is_empty() {
        // A stale candidate: its run was claimed or settled since it was listed, and the
        // lock is released again.
        return Ok(true);
    }
    // The heartbeat renews the group's lock as well: it must beat within the lock's life
    // too (a 120 s lease's heartbeat every 40 s let a 30 s group lease lapse, and another
    // session take the group and run the same message).
    let beat_within = session
        .lock_lasts()
        .map_or(lease_for, |lock| lease_for.min(lock));
    let run = run.insert(Run::new(claimed, beat_within));
    loop {
        let ending = run.stop || ctx.draining.is_cancelled();
        if ending || run.unstarted.is_empty() {
            // Settle, and claim the next run unless this one ended early; a group left
            // with nothing to claim is released in the same round trip.
            let then = if ending {
                GroupNext::Release { queue, group }
            } else {
                GroupNext::Claim {
                    queue,
                    group,
                    lease: lease_for,
                    max: run_size(pace),
                }
            };
            session.set_process(ctx.worker.shared.process.get());
            let settled = settle_run(ctx, queue, session, run, ending, then).await?;
            if settled.claimed.is_empty() {
                return Ok(true);
            }
            run.next(settled.claimed, beat_within);
            continue;
        }
        if run.settle_now() {
            settle_run(ctx, queue, session, run, false, GroupNext::Keep).await?;
            if ctx.draining.is_cancelled() {
                // The worker began to stop meanwhile: start nothing more.
                continue;
            }
        }
        let Some(message) = run.unstarted.pop_front() else {
            continue;
        };
        let lease = message.lease();
        if let Some(outcome) = past_its_attempts(&message, policy.max_attempts()) {
            // Not run: dead-lettered with the run's next settle, and the run goes on.
            if let Settle::DeadLetter(reason) = plan(outcome, policy, &lease, queue, &ctx.report) {
                run.settle = std::mem::take(&mut run.settle).dead_letter(lease, &reason);
                run.finished();
            }
            continue;
        }
        let (tx, rx) = oneshot::channel();
        let cancel = ctx.kill.child_token();
        let job_ctx = JobContext::new(&message, cancel.clone(), ctx.worker.backend.clone());
        let timeout = ctx.worker.config.job_timeout;
        let handler = Arc::clone(&handler);
        let stop_job = cancel.clone();
        let watched = cancel.clone();
        let job = Box::pin(async move {
            // Dropped at its next await point when the group's session dies (its lock
            // went with the connection) or the worker is cut off.
            tokio::select! {
                biased;
                outcome = run_handler(handler.as_ref(), job_ctx, &message, timeout, &cancel) => {
                    let _ = tx.send(outcome);
                }
                _ = watched.cancelled() => {}
            }
        });
        if jobs.send(job).is_err() {
            // The group's slot is gone (the pool was killed): give the message back
            // untouched, with the rest of the run.
            run.settle = std::mem::take(&mut run.settle).give_back([lease]);
            run.stop = true;
            tracing::debug!(target: "pgbus::group", group = %group, "the group's slot is gone");
            continue;
        }
        ctx.report.started.fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        // The heartbeat: extend the run's leases on this session while the handler runs.
        let mut rx = rx;
        let mut liveness = tokio::time::interval(LIVENESS_CHECK);
        let watched = loop {
            let settle_due = run.settle_due();
            tokio::select! {
                outcome = &mut rx => break Ok(Some(outcome.unwrap_or_else(|_| Outcome::retry("handler panicked")))),
                // Earlier messages of the run that finished are acked while this one runs
                // long; its own lease is not touched.
                _ = until(settle_due) => {
                    if let Err(err) = settle_run(ctx, queue, session, run, false, GroupNext::Keep).await {
                        break Err(err);
                    }
                }
                // The worker began to stop while this message runs: the rest of the run
                // goes back now, not after it (which may be past the drain deadline).
                _ = ctx.draining.cancelled(), if !run.unstarted.is_empty() => {
                    if let Err(err) = settle_run(ctx, queue, session, run, true, GroupNext::Keep).await {
                        break Err(err);
                    }
                }
                _ = run.heartbeat.tick() => match session.extend(&run.leases(lease), lease_for).await {
                    Ok(found) if found.lost.contains(&lease) => break Ok(None),
                    Ok(found) => {
                        run.forget(&found.lost);
                        if found.extended == 0 {
                            tracing::debug!(target: "pgbus::group", group = %group, "leases not extended: their messages are busy elsewhere, or the group's lease ran out");
                        }
                        crate::telemetry::leases_extended(found.extended);
                    }
                    Err(err) => break Err(err),
                },
                _ = liveness.tick() => {
                    if !session.is_alive() {
                        break Err(Error::Backend {
                            message: format!("the session of group {group} closed while its handler ran"),
                            transient: true,
                            source: None,
                        });
                    }
                }
            }
        };
        let outcome = match watched {
            Ok(Some(outcome)) => outcome,
            Ok(None) => {
                // The running message is no longer this delivery's (an operator deleted
                // it, or recovery gave it back): stop its handler and write nothing for
                // it; the rest of the run is given back and the group comes round again.
                log_lease_lost(&lease);
                stop_job.cancel();
                let _ = rx.await;
                run.stop = true;
                continue;
            }
            Err(err) => {
                // The session failed under a running handler, and the group's lock may
                // have died with it: stop the handler before giving up the group, so
                // that whoever takes it next does not run beside it (recovery waits
                // `RECOVERY_GRACE` before handing the message on).
                stop_job.cancel();
                let _ = rx.await;
                return Err(err);
            }
        };
        pace.record(started.elapsed());
        // The heartbeat has stopped; the post-processing writes wait for the run's settle.
        let discard = matches!(outcome, Outcome::Discard);
        let settle = plan(outcome, policy, &lease, queue, &ctx.report);
        let failed = matches!(settle, Settle::Nack(..) | Settle::DeadLetter(_));
        let pending = std::mem::take(&mut run.settle);
        run.settle = match settle {
            Settle::Ack => {
                if discard {
                    run.discards.insert(lease.id);
                }
                pending.ack([lease])
            }
            Settle::Nothing => pending,
            Settle::DeadLetter(reason) => pending.dead_letter(lease, &reason),
            Settle::Nack(delay, error) => {
                // The group waits for it: the rest of the run goes back.
                run.stop = true;
                pending.retry(lease, delay, Some(&error))
            }
        };
        if !run.settle.is_empty() {
            run.finished();
        }
        let trip = ctx.breakers.lock().expect("breakers").record(queue, failed);
        if let Some(backoff) = trip {
            tracing::warn!(target: "pgbus::breaker", backoff = ?backoff, queue.name = %queue, "failures in a row: opening the queue's circuit breaker");
            // The breaker is advisory; the run's settle (its retry, its acks) must not be lost.
            if let Err(err) = session.trip_breaker(queue, backoff).await {
                tracing::warn!(target: "pgbus::breaker", error = %err.report(), queue.name = %queue, "could not open the circuit breaker");
            }
            run.stop = true;
        }
        // Plain work waiting while the groups hold more than their share of a mixed
        // worker's slots: give this one up (the group comes round again).
        if let (Some(share), Some(slot)) = (&ctx.share, slot.as_mut()) {
            if share.yield_group(slot, ctx.pool.metadata().busy) {
                run.stop = true;
            }
        }
    }
}

/// Frees the work of dead group owners and, unless `lazy`, keeps this process's registry
/// entry, on its own session; reopens the session with backoff after errors. A `lazy`
/// loop (a mixed worker's, whose plain loop keeps the entry) ends once no group has run
/// here for the group idle timeout, closing its session; the group loop starts it again
/// when it starts a group.
async fn recovery_loop<B: Backend>(ctx: Arc<GroupContext<B>>, stop: CancellationToken, lazy: bool) {
    let worker = &ctx.worker;
    let queues = worker.shared.queues.clone();
    let interval = worker.config.heartbeat_interval;
    let mut entry =
        (!lazy).then(|| ProcessEntry::new(Arc::clone(&worker.shared), Arc::clone(&ctx.report)));
    let mut session: Option<<B as OpenGroupSession>::Recovery> = None;
    let mut errors = 0u32;
    let mut last_beat: Option<Instant> = None;
    loop {
        let pass = async {
            let recovery = match &mut session {
                Some(s) => s,
                None => session.insert(worker.backend.open_group_recovery().await?),
            };
            let recovered = recovery.recover(&queues, RECOVERY_GRACE).await?;
            if recovered.freed > 0 {
                tracing::info!(target: "pgbus::group", freed = recovered.freed, "recovered messages of groups whose owner died");
                worker.wakeup.notify_one();
            }
            if let Some(entry) = &mut entry {
                if last_beat.is_none_or(|at: Instant| at.elapsed() >= interval) {
                    entry.beat(&*recovery, ctx.pool.metadata().busy, interval).await;
                    last_beat = Some(Instant::now());
                }
            }
            Ok::<_, Error>(recovered.waiting)
        }
        .await;
        let wait = match pass {
            Ok(waiting) => {
                errors = 0;
                if lazy && waiting == 0 && ctx.idle_for_long() {
                    tracing::debug!(target: "pgbus::group", "no grouped work: closing the recovery session");
                    break;
                }
                // Come back when the orphans seen now are due.
                if waiting > 0 {
                    interval.min(RECOVERY_GRACE)
                } else if lazy {
                    interval.min(worker.config.group_idle)
                } else {
                    interval
                }
            }
            Err(err) => {
                session = None;
                errors += 1;
                let delay = backoff(errors, worker.config.error_backoff_cap);
                tracing::warn!(target: "pgbus::group", error = %err.report(), retry_in = ?delay, "recovery failed");
                delay
            }
        };
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(wait) => {}
        }
    }
    if let (Some(recovery), Some(entry)) = (&session, entry) {
        entry.end(recovery).await;
    }
}
