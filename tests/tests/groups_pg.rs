//! Ordered groups on PostgreSQL: one connection per in-flight group, advisory locks held
//! elsewhere, clean release on every exit path, ordering across two workers, owners killed
//! mid-group, and the connection budget sampled from `pg_stat_activity`.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgbus_core::{
    CircuitBreaker, DeadLetters, GroupSession, NewMessage, OpenGroupSession, ProcessRegistry,
    Producer, QueueName, QueueOptions, RetryPolicy,
};
use pgbus_exec::{GroupWorker, JobContext, Outcome, Worker, WorkerMonitor};
use pgbus_pg::{connect, GroupLocks, PgBackend};
use pgbus_tests::{
    connections, create, eventually, fresh_backend, gate, pass, stats_of, wait_until_empty, Gauge,
};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(20);

/// The payload of every grouped message: its group and its place in the group.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Step {
    group: String,
    seq: u32,
}

/// Sends `per_group` messages to each group, interleaved (g0#0, g1#0, ..., g0#1, ...), in
/// bulk statements of at most `chunk` messages.
async fn send_groups(
    backend: &PgBackend,
    q: &QueueName,
    groups: &[String],
    per_group: u32,
    chunk: usize,
) {
    let all: Vec<NewMessage> = (0..per_group)
        .flat_map(|seq| {
            groups.iter().map(move |group| {
                NewMessage::encode(&Step {
                    group: group.clone(),
                    seq,
                })
                .unwrap()
                .group(group.clone())
            })
        })
        .collect();
    let mut all = all.into_iter().peekable();
    while all.peek().is_some() {
        let batch: Vec<NewMessage> = all.by_ref().take(chunk).collect();
        let n = batch.len();
        assert_eq!(backend.send_batch(q, batch).await.unwrap().len(), n);
    }
}

fn names(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

/// A backend of its own for a worker, as a separate process would have; its pool
/// connections are named `pgbus:<role>`.
fn worker_backend(url: &str, role: &str) -> PgBackend {
    worker_backend_with(url, role, GroupLocks::Advisory)
}

fn worker_backend_with(url: &str, role: &str, locks: GroupLocks) -> PgBackend {
    PgBackend::builder(url)
        .role(role)
        .max_connections(2)
        .group_locks(locks)
        .build()
        .unwrap()
}

/// Backend pids of this database's `pgbus:<role>` connections.
async fn pids(observer: &Client, role: &str) -> HashSet<i32> {
    observer
        .query(
            "SELECT pid FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = $1",
            &[&format!("pgbus:{role}")],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

/// Which backend holds each of `groups`' advisory locks (the key pgbus uses), per group.
async fn lock_holders(
    observer: &Client,
    q: &QueueName,
    groups: &[String],
) -> BTreeMap<String, Vec<i32>> {
    let mut holders: BTreeMap<String, Vec<i32>> =
        groups.iter().map(|g| (g.clone(), Vec::new())).collect();
    for row in observer
        .query(
            "SELECT g, l.pid FROM unnest($2::text[]) AS g
             JOIN pg_locks l
               ON l.locktype = 'advisory' AND l.granted AND l.objsubid = 2
              AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
              AND l.classid = hashtext('pgbus:' || $1)::oid
              AND l.objid = hashtext(g)::oid",
            &[&q.as_str(), &groups],
        )
        .await
        .unwrap()
    {
        holders
            .get_mut(row.get::<_, &str>(0))
            .unwrap()
            .push(row.get(1));
    }
    holders
}

/// Advisory locks granted in this database, held by anyone.
async fn advisory_locks(observer: &Client) -> i64 {
    observer
        .query_one(
            "SELECT count(*) FROM pg_locks
             WHERE locktype = 'advisory' AND granted
               AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

async fn lock_group(client: &Client, q: &QueueName, group: &str) {
    client
        .execute(
            "SELECT pg_advisory_lock(hashtext('pgbus:' || $1), hashtext($2))",
            &[&q.as_str(), &group],
        )
        .await
        .unwrap();
}

async fn unlock_group(client: &Client, q: &QueueName, group: &str) -> bool {
    client
        .query_one(
            "SELECT pg_advisory_unlock(hashtext('pgbus:' || $1), hashtext($2))",
            &[&q.as_str(), &group],
        )
        .await
        .unwrap()
        .get(0)
}

/// `(unclaimed, all)` messages of a group: never claimed and not leased, and in total.
async fn untouched(client: &Client, q: &QueueName, group: &str) -> (i64, i64) {
    let row = client
        .query_one(
            "SELECT count(*) FILTER (WHERE attempts = 0 AND lease_until IS NULL), count(*)
             FROM pgbus.messages WHERE queue = $1 AND group_key = $2",
            &[&q.as_str(), &group],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

/// Terminates the backend of process `pid`, as a server that kills a connection does.
async fn terminate(observer: &Client, pid: i32) {
    let terminated: bool = observer
        .query_one("SELECT pg_terminate_backend($1)", &[&pid])
        .await
        .unwrap()
        .get(0);
    assert!(terminated, "backend {pid} was not terminated");
}

/// Whether the queue's oldest message is leased (`false` for an empty queue).
async fn head_leased(client: &Client, q: &QueueName) -> bool {
    client
        .query_opt(
            "SELECT coalesce(lease_until > now(), false) FROM pgbus.messages WHERE queue = $1 ORDER BY id LIMIT 1",
            &[&q.as_str()],
        )
        .await
        .unwrap()
        .is_some_and(|row| row.get(0))
}

/// Connections of the test itself, never counted against a worker's budget: observers,
/// the test's clients, and the pool of the backend the test sends with (`fresh_backend`'s,
/// default role `pool`). Workers get backends of their own with other role names.
const TEST_ROLES: [&str; 3] = ["pgbus:observer", "pgbus:test", "pgbus:pool"];

/// Samples this database's `pgbus:*` connections (leaving out [`TEST_ROLES`]) every 20 ms
/// on its own observer connection.
struct Sampler {
    stop: CancellationToken,
    task: JoinHandle<Samples>,
}

#[derive(Debug, Default)]
struct Samples {
    samples: usize,
    /// The most connections seen at once.
    peak: i64,
    /// Connections per `application_name` when the peak was seen.
    at_peak: BTreeMap<String, i64>,
    /// The most connections seen at once of the roles a worker opens itself (`fetch`,
    /// `recovery`, `group`), leaving out the pools of the workers' backends.
    peak_worker_owned: i64,
    /// The most seen at once per `application_name`.
    peak_by_role: BTreeMap<String, i64>,
}

impl Sampler {
    async fn start(url: &str) -> Sampler {
        let observer = connect(url, "observer").await.unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let mut samples = Samples::default();
                loop {
                    let rows = observer
                        .query(
                            "SELECT application_name, count(*) FROM pg_stat_activity
                             WHERE datname = current_database()
                               AND application_name LIKE 'pgbus:%'
                               AND application_name <> ALL ($1)
                             GROUP BY application_name",
                            &[&&TEST_ROLES[..]],
                        )
                        .await
                        .unwrap();
                    let by_role: BTreeMap<String, i64> =
                        rows.iter().map(|r| (r.get(0), r.get(1))).collect();
                    let total: i64 = by_role.values().sum();
                    let owned: i64 = ["pgbus:fetch", "pgbus:recovery", "pgbus:group"]
                        .iter()
                        .filter_map(|role| by_role.get(*role))
                        .sum();
                    samples.samples += 1;
                    samples.peak_worker_owned = samples.peak_worker_owned.max(owned);
                    for (role, n) in &by_role {
                        let peak = samples.peak_by_role.entry(role.clone()).or_default();
                        *peak = (*peak).max(*n);
                    }
                    if total > samples.peak {
                        samples.peak = total;
                        samples.at_peak = by_role;
                    }
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(POLL) => {}
                    }
                }
                samples
            }
        });
        Sampler { stop, task }
    }

    async fn finish(self) -> Samples {
        self.stop.cancel();
        self.task.await.unwrap()
    }
}

/// Samples a worker's open group sessions (as its monitor reports them) until stopped.
fn watch_sessions(monitor: WorkerMonitor) -> (CancellationToken, JoinHandle<usize>) {
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut peak = 0;
            while !stop.is_cancelled() {
                peak = peak.max(monitor.metadata().group_sessions.unwrap_or(0));
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            peak
        }
    });
    (stop, task)
}

/// `(group, seq, attempt)` of every handler run, in start order.
type Runs = Arc<Mutex<Vec<(String, u32, u32)>>>;

/// `(group, seq, start, end)` of every handler run.
type Timings = Arc<Mutex<Vec<(String, u32, Instant, Instant)>>>;

/// A handler that counts itself on `gauge` while it works for `work`.
fn gauged(
    gauge: &Arc<Gauge>,
    work: Duration,
) -> impl Fn(
    JobContext<PgBackend>,
    Step,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>
       + Clone
       + Send
       + Sync
       + 'static {
    let gauge = gauge.clone();
    move |_ctx: JobContext<PgBackend>, _step: Step| {
        let gauge = gauge.clone();
        Box::pin(async move {
            gauge.enter();
            tokio::time::sleep(work).await;
            gauge.leave();
        })
    }
}

fn runs_of(runs: &Runs, group: &str) -> Vec<(u32, u32)> {
    runs.lock()
        .unwrap()
        .iter()
        .filter(|(g, ..)| g == group)
        .map(|(_, seq, attempt)| (*seq, *attempt))
        .collect()
}

/// A group worker that records every run and holds at the gate where `hold` says so.
fn recording_worker(
    backend: PgBackend,
    q: &QueueName,
    concurrency: usize,
    runs: &Runs,
    gated: watch::Receiver<bool>,
    hold: fn(&Step, u32) -> bool,
) -> GroupWorker<PgBackend> {
    Worker::builder(backend)
        .concurrency(concurrency)
        .poll_interval(POLL)
        .heartbeat_interval(Duration::from_millis(100))
        .handle(q.clone(), {
            let runs = runs.clone();
            move |ctx: JobContext<PgBackend>, step: Step| {
                let (runs, gated) = (runs.clone(), gated.clone());
                async move {
                    assert_eq!(ctx.group_key(), Some(step.group.as_str()));
                    runs.lock()
                        .unwrap()
                        .push((step.group.clone(), step.seq, ctx.attempt()));
                    if hold(&step, ctx.attempt()) {
                        pass(gated).await;
                    }
                    Outcome::Ack
                }
            }
        })
        .build_groups()
        .unwrap()
}

/// A one-slot group worker that records every run and retries each message `fails` names
/// (by its step and attempt) with that error, acking the others.
fn retrying_worker(
    url: &str,
    q: &QueueName,
    runs: &Runs,
    fails: fn(&Step, u32) -> Option<&'static str>,
) -> GroupWorker<PgBackend> {
    Worker::builder(worker_backend(url, "worker"))
        .concurrency(1)
        .poll_interval(POLL)
        .handle(q.clone(), {
            let runs = runs.clone();
            move |ctx: JobContext<PgBackend>, step: Step| {
                let runs = runs.clone();
                async move {
                    runs.lock()
                        .unwrap()
                        .push((step.group.clone(), step.seq, ctx.attempt()));
                    match fails(&step, ctx.attempt()) {
                        Some(error) => Outcome::retry(error),
                        None => Outcome::Ack,
                    }
                }
            }
        })
        .build_groups()
        .unwrap()
}

/// Retries after `delay`, exactly (no jitter), three attempts in all.
fn fixed_retry(delay: Duration) -> RetryPolicy {
    RetryPolicy::builder()
        .base(delay)
        .cap(delay)
        .jitter(0.0)
        .max_attempts(3)
        .build()
        .unwrap()
}

// ---------------------------------------------------------------------------------------
// 1. Each in-flight group runs on its own connection, never the fetch connection.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_group_runs_on_its_own_connection() {
    const GROUPS: usize = 4;
    let (backend, url) = fresh_backend(4).await;
    let q = create(&backend, "own_connection", QueueOptions::default()).await;
    let groups = names("g", GROUPS);
    send_groups(&backend, &q, &groups, 2, 100).await;

    let gauge = Arc::new(Gauge::default());
    let runs: Runs = Arc::default();
    let (open, gated) = gate();
    let worker = Worker::builder(worker_backend(&url, "worker"))
        .concurrency(GROUPS)
        .poll_interval(POLL)
        .handle(q.clone(), {
            let (gauge, runs) = (gauge.clone(), runs.clone());
            move |ctx: JobContext<PgBackend>, step: Step| {
                let (gauge, runs, gated) = (gauge.clone(), runs.clone(), gated.clone());
                async move {
                    runs.lock()
                        .unwrap()
                        .push((step.group.clone(), step.seq, ctx.attempt()));
                    gauge.enter();
                    pass(gated).await;
                    gauge.leave();
                }
            }
        })
        .build_groups()
        .unwrap();
    let monitor = worker.monitor();
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    eventually("every group has a handler running", DEADLINE, || async {
        gauge.running() == GROUPS
    })
    .await;

    let observer = connect(&url, "observer").await.unwrap();
    let fetch = pids(&observer, "fetch").await;
    let group_pids = pids(&observer, "group").await;
    let holders = lock_holders(&observer, &q, &groups).await;
    println!("fetch pid {fetch:?}; group pids {group_pids:?}; lock holders {holders:?}");
    assert_eq!(fetch.len(), 1, "one fetch connection: {fetch:?}");
    assert_eq!(
        group_pids.len(),
        GROUPS,
        "one pgbus:group connection per in-flight group: {group_pids:?}"
    );
    assert!(
        fetch.is_disjoint(&group_pids),
        "no group runs on the fetch connection"
    );
    // Each group's advisory lock is held by exactly one group connection, a different one
    // for every group.
    let mut holder_pids = HashSet::new();
    for (group, holding) in &holders {
        assert_eq!(holding.len(), 1, "group {group} locked by {holding:?}");
        assert!(
            group_pids.contains(&holding[0]),
            "group {group} is locked by {}, not one of the group connections",
            holding[0]
        );
        holder_pids.insert(holding[0]);
    }
    assert_eq!(holder_pids, group_pids, "every group on its own connection");
    let meta = monitor.metadata();
    assert_eq!(meta.group_sessions, Some(GROUPS));
    assert_eq!(meta.connection_budget, Some(GROUPS + 2));
    assert_eq!(meta.busy, GROUPS);

    open.send(true).unwrap();
    wait_until_empty(&backend, &q, DEADLINE).await;
    stop.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!((report.started, report.acked), (8, 8), "{report:?}");
    for group in &groups {
        assert_eq!(runs_of(&runs, group), [(0, 1), (1, 1)], "group {group}");
    }
    eventually("the group connections are closed", DEADLINE, || async {
        connections(&url, "group").await == 0
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// 2. A group locked by another session is skipped until that session lets go.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_group_locked_elsewhere_is_skipped_until_released() {
    let (backend, url) = fresh_backend(4).await;
    let q = create(&backend, "locked", QueueOptions::default()).await;
    let holder = connect(&url, "test").await.unwrap();
    lock_group(&holder, &q, "held").await;
    // "held" is sent first, so it is always the oldest candidate.
    send_groups(&backend, &q, &["held".to_owned()], 3, 100).await;
    send_groups(&backend, &q, &["free".to_owned()], 3, 100).await;

    let runs: Runs = Arc::default();
    let (_open, gated) = gate();
    let worker = recording_worker(
        worker_backend(&url, "worker"),
        &q,
        2,
        &runs,
        gated,
        |_, _| false,
    );
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    eventually("group free is processed", DEADLINE, || async {
        runs_of(&runs, "free").len() == 3
    })
    .await;

    // Several poll intervals (and at least five looks, however slow they are): "held"
    // stays untouched, not even claimed.
    let window = Instant::now();
    let mut checks = 0;
    while checks < 5 || window.elapsed() < Duration::from_millis(300) {
        assert!(runs_of(&runs, "held").is_empty(), "a locked group ran");
        assert_eq!(
            untouched(&holder, &q, "held").await,
            (3, 3),
            "a locked group was claimed"
        );
        checks += 1;
        tokio::time::sleep(POLL).await;
    }
    assert_eq!(runs_of(&runs, "free"), [(0, 1), (1, 1), (2, 1)]);

    assert!(unlock_group(&holder, &q, "held").await, "the lock was ours");
    eventually("group held is processed", DEADLINE, || async {
        runs_of(&runs, "held").len() == 3
    })
    .await;
    wait_until_empty(&backend, &q, DEADLINE).await;
    stop.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!(runs_of(&runs, "held"), [(0, 1), (1, 1), (2, 1)]);
    assert_eq!((report.started, report.acked), (6, 6), "{report:?}");
}

// ---------------------------------------------------------------------------------------
// 3. The group connection is released on success, handler error and panic.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_connection_released_on_success_error_and_panic() {
    const CONCURRENCY: usize = 2;
    let (backend, url) = fresh_backend(4).await;
    let retry = RetryPolicy::builder()
        .base(Duration::from_millis(10))
        .cap(Duration::from_millis(10))
        .jitter(0.0)
        .max_attempts(2)
        .build()
        .unwrap();
    let q = create(&backend, "exits", QueueOptions::default().retry(retry)).await;
    let groups: Vec<String> = ["ok", "retry", "error", "dead", "panic"]
        .map(String::from)
        .to_vec();
    send_groups(&backend, &q, &groups, 2, 100).await;

    let runs: Runs = Arc::default();
    let worker = Worker::builder(worker_backend(&url, "worker"))
        .concurrency(CONCURRENCY)
        .poll_interval(POLL)
        .heartbeat_interval(Duration::from_millis(100))
        .handle(q.clone(), {
            let runs = runs.clone();
            move |ctx: JobContext<PgBackend>, step: Step| {
                let runs = runs.clone();
                async move {
                    runs.lock()
                        .unwrap()
                        .push((step.group.clone(), step.seq, ctx.attempt()));
                    tokio::task::yield_now().await;
                    match (step.group.as_str(), step.seq) {
                        ("retry", 0) => Ok(Outcome::retry("transient")),
                        ("error", 0) => Err(format!("handler error, attempt {}", ctx.attempt())),
                        ("dead", 0) => Ok(Outcome::dead_letter("poison")),
                        ("panic", 0) => panic!("handler panics on purpose"),
                        _ => Ok(Outcome::Ack),
                    }
                }
            }
        })
        .build_groups()
        .unwrap();
    let monitor = worker.monitor();
    let (stop_watch, sessions_peak) = watch_sessions(monitor.clone());
    let sampler = Sampler::start(&url).await;
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    eventually("everything is settled", DEADLINE, || async {
        let stats = stats_of(&backend, &q).await;
        stats.depth() == 0 && stats.dead_lettered == 4
    })
    .await;

    // Idle now: every session was unlocked on its way out, whatever the handler did, and
    // the open sessions are all idle, clean ones kept for reuse.
    let observer = connect(&url, "observer").await.unwrap();
    eventually("no group lock is held", DEADLINE, || async {
        advisory_locks(&observer).await == 0
    })
    .await;
    let open_sessions = monitor.metadata().group_sessions.unwrap();
    assert!(
        (1..=CONCURRENCY).contains(&open_sessions),
        "{open_sessions} sessions kept"
    );
    assert_eq!(
        pids(&observer, "group").await.len(),
        open_sessions,
        "the monitor counts the open group connections"
    );
    stop.cancel();
    let report = run.await.unwrap().unwrap();
    stop_watch.cancel();
    let sessions_peak = sessions_peak.await.unwrap();
    let samples = sampler.finish().await;
    println!(
        "exit paths: peak group sessions {sessions_peak}, peak pgbus connections {} {:?} \
         over {} samples; {report:?}",
        samples.peak, samples.at_peak, samples.samples
    );
    assert!(
        (1..=CONCURRENCY).contains(&sessions_peak),
        "group sessions peaked at {sessions_peak}"
    );
    assert!(
        samples.at_peak.get("pgbus:group").copied().unwrap_or(0) <= CONCURRENCY as i64
            && samples.peak_worker_owned <= CONCURRENCY as i64 + 2,
        "{samples:?}"
    );

    // Every exit path kept the order and moved the group on.
    assert_eq!(runs_of(&runs, "ok"), [(0, 1), (1, 1)]);
    assert_eq!(runs_of(&runs, "retry"), [(0, 1), (0, 2), (1, 1)]);
    assert_eq!(runs_of(&runs, "error"), [(0, 1), (0, 2), (1, 1)]);
    assert_eq!(runs_of(&runs, "dead"), [(0, 1), (1, 1)]);
    assert_eq!(
        runs_of(&runs, "panic"),
        [(0, 1), (0, 2), (1, 1)],
        "the panicking message is retried, then the group moves on"
    );
    assert_eq!(
        (
            report.started,
            report.acked,
            report.retried,
            report.dead_lettered
        ),
        (13, 6, 3, 4),
        "{report:?}"
    );
    let dead: HashMap<String, (u32, String)> = backend
        .list_dead(&q, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|d| (d.group_key.unwrap(), (d.attempts, d.error)))
        .collect();
    assert_eq!(dead.len(), 4, "{dead:?}");
    assert_eq!(dead["retry"], (2, "transient".to_owned()));
    assert_eq!(dead["error"], (2, "handler error, attempt 2".to_owned()));
    assert_eq!(dead["dead"], (1, "poison".to_owned()));
    assert_eq!(dead["panic"].0, 2, "{dead:?}");
    assert!(dead["panic"].1.contains("panic"), "{dead:?}");

    // After shutdown no worker connection is left.
    eventually("the worker's connections are closed", DEADLINE, || async {
        connections(&url, "group").await == 0
            && connections(&url, "fetch").await == 0
            && connections(&url, "recovery").await == 0
    })
    .await;
    assert_eq!(advisory_locks(&observer).await, 0);
}

/// The statement a backend ran last (`pg_stat_activity.query`).
async fn last_query(observer: &Client, pid: i32) -> String {
    observer
        .query_one("SELECT query FROM pg_stat_activity WHERE pid = $1", &[&pid])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unlock_is_not_issued_when_the_lock_was_not_taken() {
    let (backend, url) = fresh_backend(2).await;
    let q = create(&backend, "contract", QueueOptions::default()).await;
    let holder = connect(&url, "test").await.unwrap();
    let holder_pid: i32 = holder
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    lock_group(&holder, &q, "held").await;

    let observer = connect(&url, "observer").await.unwrap();
    let mut session = backend.open_group_session().await.unwrap();
    let session_pid = {
        let group = pids(&observer, "group").await;
        assert_eq!(group.len(), 1, "the session is one pgbus:group connection");
        group.into_iter().next().unwrap()
    };
    let held = [String::from("held"), String::from("mine")];

    // Locked elsewhere: try_lock says no, and unlock issues nothing.
    assert!(!session.try_lock(&q, "held").await.unwrap());
    let after_try = last_query(&observer, session_pid).await;
    assert!(after_try.contains("pg_try_advisory_lock"), "{after_try}");
    session.unlock(&q, "held").await.unwrap();
    let after_unlock = last_query(&observer, session_pid).await;
    assert_eq!(
        after_unlock, after_try,
        "unlock sent a statement for a lock it never took"
    );
    assert!(!after_unlock.contains("pg_advisory_unlock"));
    assert_eq!(
        lock_holders(&observer, &q, &held).await["held"],
        [holder_pid],
        "the other session still holds the group"
    );

    // Control: a lock taken is released by unlock, on the session's own connection.
    assert!(session.try_lock(&q, "mine").await.unwrap());
    assert_eq!(
        lock_holders(&observer, &q, &held).await["mine"],
        [session_pid]
    );
    session.unlock(&q, "mine").await.unwrap();
    assert!(last_query(&observer, session_pid)
        .await
        .contains("pg_advisory_unlock"));
    let holders = lock_holders(&observer, &q, &held).await;
    assert!(holders["mine"].is_empty(), "{holders:?}");
    assert_eq!(holders["held"], [holder_pid]);

    // Once the other session lets go, the group can be locked here.
    assert!(unlock_group(&holder, &q, "held").await);
    assert!(session.try_lock(&q, "held").await.unwrap());
    assert_eq!(
        lock_holders(&observer, &q, &held).await["held"],
        [session_pid]
    );
    session.unlock(&q, "held").await.unwrap();
    assert_eq!(advisory_locks(&observer).await, 0);
}

// ---------------------------------------------------------------------------------------
// 4. 200 groups x 50 messages, two workers with their own pools: no overlap, send order.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_groups_by_fifty_ordered_across_two_workers() {
    two_hundred_groups_by_fifty(GroupLocks::Advisory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_hundred_groups_by_fifty_ordered_across_two_workers_in_lease_mode() {
    two_hundred_groups_by_fifty(GroupLocks::Lease {
        ttl: Duration::from_secs(30),
    })
    .await;
}

async fn two_hundred_groups_by_fifty(locks: GroupLocks) {
    const GROUPS: usize = 200;
    const PER_GROUP: u32 = 50;
    const CONCURRENCY: usize = 8;
    const TOTAL: usize = GROUPS * PER_GROUP as usize;
    let (backend, url) = fresh_backend(4).await;
    let q = create(&backend, "ordered", QueueOptions::default()).await;
    let groups = names("g", GROUPS);
    send_groups(&backend, &q, &groups, PER_GROUP, 2_000).await;
    assert_eq!(stats_of(&backend, &q).await.ready, TOTAL as u64);

    // (group, seq, start, end) of every run, from both workers.
    let records: Timings = Arc::new(Mutex::new(Vec::with_capacity(TOTAL)));
    let sampler = Sampler::start(&url).await;
    let stop = CancellationToken::new();
    let started = Instant::now();
    let mut runs = Vec::new();
    let mut watchers = Vec::new();
    for name in ["worker_a", "worker_b"] {
        let worker = Worker::builder(worker_backend_with(&url, name, locks))
            .concurrency(CONCURRENCY)
            .poll_interval(Duration::from_millis(50))
            .handle(q.clone(), {
                let records = records.clone();
                move |_ctx: JobContext<PgBackend>, step: Step| {
                    let records = records.clone();
                    async move {
                        let start = Instant::now();
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        let end = Instant::now();
                        records
                            .lock()
                            .unwrap()
                            .push((step.group, step.seq, start, end));
                    }
                }
            })
            .build_groups()
            .unwrap();
        assert_eq!(
            worker.monitor().metadata().connection_budget,
            None,
            "known once it runs"
        );
        watchers.push(watch_sessions(worker.monitor()));
        runs.push(tokio::spawn(worker.run(stop.clone())));
    }
    wait_until_empty(&backend, &q, Duration::from_secs(300)).await;
    let elapsed = started.elapsed();
    stop.cancel();
    let mut reports = Vec::new();
    for run in runs {
        reports.push(run.await.unwrap().unwrap());
    }
    let samples = sampler.finish().await;
    let mut session_peaks = Vec::new();
    for (stop_watch, peak) in watchers {
        stop_watch.cancel();
        session_peaks.push(peak.await.unwrap());
    }
    println!(
        "{GROUPS} groups x {PER_GROUP} by 2 workers x {CONCURRENCY}: drained in {elapsed:?}; \
         acked {:?}; peak group sessions {session_peaks:?}; peak pgbus connections {} \
         {:?} (fetch+recovery+group peak {}) over {} samples",
        reports.iter().map(|r| r.acked).collect::<Vec<_>>(),
        samples.peak,
        samples.at_peak,
        samples.peak_worker_owned,
        samples.samples
    );

    let records = records.lock().unwrap().clone();
    assert_eq!(records.len(), TOTAL, "every message handled exactly once");
    let mut by_group: HashMap<String, Vec<(u32, Instant, Instant)>> = HashMap::new();
    for (group, seq, start, end) in records {
        by_group.entry(group).or_default().push((seq, start, end));
    }
    assert_eq!(by_group.len(), GROUPS);
    for (group, mut runs) in by_group {
        runs.sort_by_key(|(_, start, _)| *start);
        for pair in runs.windows(2) {
            assert!(
                pair[1].1 >= pair[0].2,
                "group {group}: #{} started before #{} ended",
                pair[1].0,
                pair[0].0
            );
        }
        let seqs: Vec<u32> = runs.iter().map(|(seq, ..)| *seq).collect();
        assert_eq!(
            seqs,
            (0..PER_GROUP).collect::<Vec<_>>(),
            "group {group} out of send order, or a duplicate"
        );
    }
    assert_eq!(
        reports.iter().map(|r| r.acked).sum::<u64>(),
        TOTAL as u64,
        "{reports:?}"
    );
    assert!(
        reports.iter().all(|r| r.acked > 0),
        "both workers took groups: {reports:?}"
    );
    assert!(reports
        .iter()
        .all(|r| r.retried == 0 && r.dead_lettered == 0));
    assert!(
        session_peaks.iter().all(|&p| p <= CONCURRENCY),
        "{session_peaks:?}"
    );
    assert!(samples.samples >= 3, "{samples:?}");
    assert!(
        samples.peak_worker_owned <= 2 * (CONCURRENCY as i64 + 2),
        "fetch, recovery and group connections peaked at {} > 2 x ({CONCURRENCY} + 2)",
        samples.peak_worker_owned
    );
    // Everything the two worker processes hold counts, their own pools included.
    assert!(
        samples.peak <= 2 * (CONCURRENCY as i64 + 2),
        "pgbus connections of the two workers peaked at {} > 2 x ({CONCURRENCY} + 2): {:?}",
        samples.peak,
        samples.at_peak
    );
}

// ---------------------------------------------------------------------------------------
// 5. The owner of a group is killed: its connection, or its whole process.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_group_connection_resumes_elsewhere_without_loss() {
    let (backend, url) = fresh_backend(4).await;
    let q = create(&backend, "killed", QueueOptions::default()).await;
    send_groups(&backend, &q, &["g".to_owned()], 3, 100).await;

    let runs: Runs = Arc::default();
    let (open, gated) = gate();
    // Only the first run of the first message waits at the gate.
    let worker = recording_worker(
        worker_backend(&url, "worker"),
        &q,
        2,
        &runs,
        gated,
        |step, attempt| step.seq == 0 && attempt == 1,
    );
    let monitor = worker.monitor();
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    eventually("the first message runs", DEADLINE, || async {
        runs_of(&runs, "g").len() == 1
    })
    .await;

    let observer = connect(&url, "observer").await.unwrap();
    let fetch_before = pids(&observer, "fetch").await;
    let group = pids(&observer, "group").await;
    assert_eq!(group.len(), 1, "one group in flight, one group connection");
    let victim = *group.iter().next().unwrap();
    assert_eq!(
        lock_holders(&observer, &q, &["g".to_owned()]).await["g"],
        [victim]
    );
    assert!(
        head_leased(&observer, &q).await,
        "the running message is leased"
    );
    let killed_at = Instant::now();
    terminate(&observer, victim).await;
    eventually("the group connection is gone", DEADLINE, || async {
        !pids(&observer, "group").await.contains(&victim)
    })
    .await;
    // Its lock went with it; the recovery loop frees the message long before its 30 s
    // lease would run out.
    eventually("the recovery loop frees the message", DEADLINE, || async {
        !head_leased(&observer, &q).await
    })
    .await;
    assert!(killed_at.elapsed() < Duration::from_secs(10));
    // The worker stops the orphaned handler as soon as it sees its session closed (the
    // handler was waiting at the gate and is dropped there), drops the session, and takes
    // the group again: the freed message runs a second time. Opening the gate lets any
    // run still waiting there go on.
    open.send(true).unwrap();
    wait_until_empty(&backend, &q, DEADLINE).await;
    assert!(
        killed_at.elapsed() < Duration::from_secs(20),
        "not by lease expiry"
    );
    assert_eq!(
        runs_of(&runs, "g"),
        [(0, 1), (0, 2), (1, 1), (2, 1)],
        "the interrupted message ran again, then the rest, in order"
    );
    let group_after = pids(&observer, "group").await;
    assert!(
        !group_after.contains(&victim),
        "the dead session was not reused"
    );
    assert_eq!(
        pids(&observer, "fetch").await,
        fetch_before,
        "the loop kept its fetch connection"
    );
    assert!(monitor.metadata().group_sessions.unwrap() <= 2);
    stop.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!((report.started, report.acked), (4, 3), "{report:?}");
    let stats = stats_of(&backend, &q).await;
    assert_eq!((stats.depth(), stats.dead_lettered), (0, 0));
}

/// What a handler did: started, or was dropped before it finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    Started(u32, u32),
    Dropped(u32, u32),
}

/// Records [`Event::Dropped`] unless disarmed: the handler future was dropped mid-run.
struct DropWitness {
    log: Arc<Mutex<Vec<Event>>>,
    run: (u32, u32),
    armed: bool,
}

impl Drop for DropWitness {
    fn drop(&mut self) {
        if self.armed {
            let (seq, attempt) = self.run;
            self.log.lock().unwrap().push(Event::Dropped(seq, attempt));
        }
    }
}

/// A lease extension that fails on a connection that stays open (the statement is
/// cancelled while it waits for a table lock) stops the handler before the group is given
/// up: the group's next run never starts beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_lease_extension_stops_the_handler_before_the_group_moves_on() {
    let (backend, url) = fresh_backend(4).await;
    // A 600 ms lease: the running message's lease is extended every 200 ms.
    let options = QueueOptions::default().lease(Duration::from_millis(600));
    let q = create(&backend, "extend_fails", options).await;
    send_groups(&backend, &q, &["g".to_owned()], 2, 100).await;

    let log: Arc<Mutex<Vec<Event>>> = Arc::default();
    let (_open, gated) = gate();
    let worker = Worker::builder(worker_backend(&url, "worker"))
        .concurrency(1)
        .poll_interval(POLL)
        .heartbeat_interval(Duration::from_millis(100))
        .handle(q.clone(), {
            let log = log.clone();
            move |ctx: JobContext<PgBackend>, step: Step| {
                let (log, gated) = (log.clone(), gated.clone());
                async move {
                    let run = (step.seq, ctx.attempt());
                    log.lock().unwrap().push(Event::Started(run.0, run.1));
                    let mut witness = DropWitness {
                        log,
                        run,
                        armed: true,
                    };
                    // The first run waits at a gate that never opens.
                    if run == (0, 1) {
                        pass(gated).await;
                    }
                    witness.armed = false;
                    Outcome::Ack
                }
            }
        })
        .build_groups()
        .unwrap();
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    eventually("the first message runs", DEADLINE, || async {
        log.lock().unwrap().len() == 1
    })
    .await;

    let observer = connect(&url, "observer").await.unwrap();
    let group = pids(&observer, "group").await;
    assert_eq!(group.len(), 1, "one group in flight, one group connection");
    let victim = *group.iter().next().unwrap();
    // Writes to the messages table wait for this lock (an extension skips locked rows, but
    // not a locked table), reads do not.
    let mut holder = connect(&url, "holder").await.unwrap();
    let tx = holder.transaction().await.unwrap();
    tx.batch_execute("LOCK TABLE pgbus.messages IN EXCLUSIVE MODE")
        .await
        .unwrap();
    eventually(
        "the extension waits for the table lock",
        DEADLINE,
        || async {
            observer
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND wait_event_type = 'Lock'",
                &[&victim],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 1
        },
    )
    .await;
    let cancelled: bool = observer
        .query_one("SELECT pg_cancel_backend($1)", &[&victim])
        .await
        .unwrap()
        .get(0);
    assert!(cancelled);
    eventually("the failed session is closed", DEADLINE, || async {
        !pids(&observer, "group").await.contains(&victim)
    })
    .await;
    tx.commit().await.unwrap();

    wait_until_empty(&backend, &q, DEADLINE).await;
    assert_eq!(
        *log.lock().unwrap(),
        [
            Event::Started(0, 1),
            Event::Dropped(0, 1),
            Event::Started(0, 2),
            Event::Started(1, 1)
        ],
        "the interrupted run was stopped before the group ran again"
    );
    stop.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!((report.started, report.acked), (3, 2), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn worker_killed_mid_group_resumes_in_a_second_worker() {
    const PER_GROUP: u32 = 5;
    let (backend, url) = fresh_backend(4).await;
    let q = create(&backend, "handover", QueueOptions::default()).await;
    let groups = vec!["a".to_owned(), "b".to_owned()];
    send_groups(&backend, &q, &groups, PER_GROUP, 100).await;

    // Worker A runs in a runtime of its own, standing in for its process: shutting the
    // runtime down drops every task of A (its loop, group tasks, recovery loop, handlers
    // and the connections' I/O tasks) at once, as a killed process would.
    let process_a = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let runs: Runs = Arc::default();
    let (_never, gated) = gate();
    let worker_a = {
        let _in_a = process_a.enter();
        // Group a hangs at its third message, group b at its first.
        recording_worker(
            worker_backend(&url, "worker_a"),
            &q,
            2,
            &runs,
            gated.clone(),
            |step, _| (step.group == "a" && step.seq == 2) || (step.group == "b" && step.seq == 0),
        )
    };
    let stop_a = CancellationToken::new();
    let run_a = process_a.spawn(worker_a.run(stop_a.clone()));
    eventually("A hangs in both groups", DEADLINE, || async {
        runs_of(&runs, "a").len() == 3 && runs_of(&runs, "b").len() == 1
    })
    .await;
    let observer = connect(&url, "observer").await.unwrap();
    // The messages of a that A finished are acked while the third runs on.
    eventually("A acks what it finished", DEADLINE, || async {
        let (_, left) = untouched(&observer, &q, "a").await;
        left == i64::from(PER_GROUP) - 2
    })
    .await;
    let a_group_pids = pids(&observer, "group").await;
    assert_eq!(a_group_pids.len(), 2);

    // Worker B, with its own pool, starts while A lives: A's groups are locked and their
    // heads leased, so B leaves them alone.
    let b_runs: Runs = Arc::default();
    let worker_b = recording_worker(
        worker_backend(&url, "worker_b"),
        &q,
        2,
        &b_runs,
        gated,
        |_, _| false,
    );
    let monitor_b = worker_b.monitor();
    let stop_b = CancellationToken::new();
    let run_b = tokio::spawn(worker_b.run(stop_b.clone()));
    eventually("B is up and idle", DEADLINE, || async {
        monitor_b.metadata().idle && monitor_b.metadata().process.is_some()
    })
    .await;
    // B's recovery loop has run (it registered the process) and freed nothing.
    assert!(b_runs.lock().unwrap().is_empty(), "B took A's live groups");

    // Kill A.
    let killed_at = Instant::now();
    process_a.shutdown_background();
    eventually("A's connections are gone", DEADLINE, || async {
        pids(&observer, "group").await.is_disjoint(&a_group_pids)
    })
    .await;
    wait_until_empty(&backend, &q, DEADLINE).await;
    let resumed_in = killed_at.elapsed();
    println!("groups resumed in worker B {resumed_in:?} after worker A was killed");
    assert!(
        resumed_in < Duration::from_secs(20),
        "resumed by recovery, not by the 30 s lease"
    );
    stop_b.cancel();
    let report_b = run_b.await.unwrap().unwrap();
    eventually("A's loop died with its runtime", DEADLINE, || async {
        run_a.is_finished()
    })
    .await;

    assert_eq!(runs_of(&runs, "a"), [(0, 1), (1, 1), (2, 1)]);
    assert_eq!(runs_of(&runs, "b"), [(0, 1)]);
    // B reruns A's interrupted message, then the rest, in order. A's run may have
    // claimed some of the rest too: recovery gives back its whole run, and a claim that
    // never started still counts its attempt.
    let b_a = runs_of(&b_runs, "a");
    let b_b = runs_of(&b_runs, "b");
    println!("B ran a: {b_a:?}, b: {b_b:?}");
    for (runs, first) in [(&b_a, 2), (&b_b, 0)] {
        let seqs: Vec<u32> = runs.iter().map(|(seq, _)| *seq).collect();
        assert_eq!(seqs, (first..PER_GROUP).collect::<Vec<_>>(), "{runs:?}");
        assert_eq!(
            runs[0].1, 2,
            "the interrupted message's second attempt: {runs:?}"
        );
        assert!(
            runs.iter().all(|(_, attempt)| (1..=2).contains(attempt)),
            "{runs:?}"
        );
    }
    assert_eq!((report_b.started, report_b.acked), (8, 8), "{report_b:?}");
    let stats = stats_of(&backend, &q).await;
    assert_eq!((stats.depth(), stats.dead_lettered), (0, 0), "nothing lost");
}

// ---------------------------------------------------------------------------------------
// 6. The connection budget: concurrency + 2.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connection_budget_holds() {
    const CONCURRENCY: usize = 4;
    const GROUPS: usize = 50;
    const PER_GROUP: u32 = 5;
    let (backend, url) = fresh_backend(4).await;
    let q = create(&backend, "budget", QueueOptions::default()).await;
    send_groups(&backend, &q, &names("g", GROUPS), PER_GROUP, 1_000).await;

    let gauge = Arc::new(Gauge::default());
    let worker = Worker::builder(worker_backend(&url, "worker"))
        .concurrency(CONCURRENCY)
        .poll_interval(POLL)
        .handle(q.clone(), gauged(&gauge, Duration::from_millis(2)))
        .build_groups()
        .unwrap();
    let monitor = worker.monitor();
    let (stop_watch, sessions_peak) = watch_sessions(monitor.clone());
    let sampler = Sampler::start(&url).await;
    let stop = CancellationToken::new();
    let started = Instant::now();
    let run = tokio::spawn(worker.run(stop.clone()));
    eventually("the worker reports its budget", DEADLINE, || async {
        monitor.metadata().connection_budget == Some(CONCURRENCY + 2)
    })
    .await;
    wait_until_empty(&backend, &q, DEADLINE).await;
    let elapsed = started.elapsed();
    let samples = sampler.finish().await;
    stop.cancel();
    let report = run.await.unwrap().unwrap();
    stop_watch.cancel();
    let sessions_peak = sessions_peak.await.unwrap();
    println!(
        "budget: {GROUPS} groups x {PER_GROUP} with concurrency {CONCURRENCY} in {elapsed:?}; \
         peak pgbus connections {} {:?} (fetch+recovery+group peak {}) over {} samples; \
         peak group sessions {sessions_peak}; peak handlers {}",
        samples.peak,
        samples.at_peak,
        samples.peak_worker_owned,
        samples.samples,
        gauge.peak()
    );
    assert_eq!(report.acked, (GROUPS as u64) * u64::from(PER_GROUP));
    assert_eq!(monitor.metadata().connection_budget, Some(CONCURRENCY + 2));
    assert!(samples.samples >= 3, "{samples:?}");
    assert!(
        samples.peak_worker_owned >= 3,
        "the sampler saw the worker run: {samples:?}"
    );
    assert!(
        samples.peak_worker_owned <= CONCURRENCY as i64 + 2,
        "fetch, recovery and group connections peaked at {} > {CONCURRENCY} + 2",
        samples.peak_worker_owned
    );
    // Everything the worker's process holds counts, its own pool included.
    assert!(
        samples.peak <= CONCURRENCY as i64 + 2,
        "pgbus connections peaked at {} > {CONCURRENCY} + 2: {:?}",
        samples.peak,
        samples.at_peak
    );
    assert!(
        sessions_peak <= CONCURRENCY,
        "{sessions_peak} group sessions"
    );
    assert!(gauge.peak() <= CONCURRENCY);
}

// ---------------------------------------------------------------------------------------
// 7. A mixed worker: group connections only for grouped work.

/// A mixed worker on plain work opens no group connection; grouped work opens a recovery
/// connection and group sessions within `concurrency + 2` (the fetch connection shared),
/// and once it has been idle for the group idle timeout they are all closed again. One
/// process entry throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mixed_worker_opens_group_connections_for_grouped_work_only() {
    const CONCURRENCY: usize = 4;
    let (backend, url) = fresh_backend(4).await;
    let q = create(&backend, "mixed", QueueOptions::default()).await;
    let plain: Vec<NewMessage> = (0..50)
        .map(|seq| {
            NewMessage::encode(&Step {
                group: String::new(),
                seq,
            })
            .unwrap()
        })
        .collect();
    backend.send_batch(&q, plain).await.unwrap();

    let gauge = Arc::new(Gauge::default());
    let worker = Worker::builder(worker_backend(&url, "worker"))
        .concurrency(CONCURRENCY)
        .poll_interval(POLL)
        .group_idle_timeout(Duration::from_millis(500))
        .handle(q.clone(), gauged(&gauge, Duration::from_millis(5)))
        .build_mixed()
        .unwrap();
    let monitor = worker.monitor();
    let observer = connect(&url, "observer").await.unwrap();
    let sampler = Sampler::start(&url).await;
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    wait_until_empty(&backend, &q, DEADLINE).await;
    eventually("the worker idles", DEADLINE, || async {
        monitor.metadata().idle
    })
    .await;
    let plain_phase = sampler.finish().await;
    println!("mixed, plain work: {plain_phase:?}");
    assert_eq!(plain_phase.peak_by_role.get("pgbus:fetch"), Some(&1));
    for role in ["pgbus:recovery", "pgbus:group"] {
        assert!(
            !plain_phase.peak_by_role.contains_key(role),
            "{role} opened for plain work: {plain_phase:?}"
        );
    }

    let sampler = Sampler::start(&url).await;
    send_groups(&backend, &q, &names("g", 12), 5, 1_000).await;
    wait_until_empty(&backend, &q, DEADLINE).await;
    let processes = backend.processes().await.unwrap();
    assert_eq!(processes.len(), 1, "one process entry: {processes:?}");
    assert_eq!(processes[0].info.capacity, CONCURRENCY as u32);
    eventually("the group connections close", DEADLINE, || async {
        pids(&observer, "recovery").await.is_empty() && pids(&observer, "group").await.is_empty()
    })
    .await;
    assert_eq!(monitor.metadata().group_sessions, Some(0));
    let grouped_phase = sampler.finish().await;
    println!("mixed, grouped work: {grouped_phase:?}");
    assert_eq!(grouped_phase.peak_by_role.get("pgbus:recovery"), Some(&1));
    assert!(grouped_phase.peak_by_role.contains_key("pgbus:group"));
    assert!(
        grouped_phase.peak_worker_owned <= CONCURRENCY as i64 + 2,
        "fetch, recovery and group connections peaked at {}: {grouped_phase:?}",
        grouped_phase.peak_worker_owned
    );
    assert_eq!(grouped_phase.peak_by_role.get("pgbus:fetch"), Some(&1));
    assert_eq!(
        pids(&observer, "fetch").await.len(),
        1,
        "the fetch connection stays"
    );

    stop.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!(report.acked, 50 + 12 * 5, "{report:?}");
    assert!(gauge.peak() <= CONCURRENCY);
    assert!(backend.processes().await.unwrap().is_empty());
}

// ---------------------------------------------------------------------------------------
// 8. Runs: a group's messages are claimed several at a time and settled together.

/// The messages claimed with a failed one, after it, are not run: they go back untouched
/// (no attempt counted, no lease) while the failed one waits for its retry, and then run
/// in order after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_message_gives_back_the_rest_of_its_run_untouched() {
    let (backend, url) = fresh_backend(4).await;
    let retry = fixed_retry(Duration::from_secs(2));
    let q = create(&backend, "run_fails", QueueOptions::default().retry(retry)).await;
    send_groups(&backend, &q, &["g".to_owned()], 6, 100).await;

    let runs: Runs = Arc::default();
    let worker = retrying_worker(&url, &q, &runs, |step, attempt| {
        ((step.seq, attempt) == (2, 1)).then_some("fails once")
    });
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    let observer = connect(&url, "observer").await.unwrap();
    eventually("the third message fails", DEADLINE, || async {
        runs_of(&runs, "g").len() == 3
    })
    .await;
    // While the failed message waits for its retry (2 s): the three after it, claimed with
    // it, are back as they were before their claim.
    eventually(
        "the rest of the run is given back untouched",
        DEADLINE,
        || async { untouched(&observer, &q, "g").await == (3, 4) },
    )
    .await;
    assert_eq!(
        runs_of(&runs, "g").len(),
        3,
        "nothing ran after the failure"
    );
    wait_until_empty(&backend, &q, DEADLINE).await;
    stop.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!(
        runs_of(&runs, "g"),
        [(0, 1), (1, 1), (2, 1), (2, 2), (3, 1), (4, 1), (5, 1)],
        "the failed message ran again first; the given-back ones kept their attempts"
    );
    assert_eq!((report.acked, report.retried), (6, 1), "{report:?}");
}

/// A one-slot group worker on a fresh queue of six messages in group `g`, its second
/// message (the first of its second run: the first run is one message, the pace being
/// unknown) held at the gate, with at least one message claimed after it in its run.
struct SecondHeld {
    backend: PgBackend,
    url: String,
    q: QueueName,
    runs: Runs,
    open: watch::Sender<bool>,
    stop: CancellationToken,
    run: JoinHandle<pgbus_core::Result<pgbus_exec::WorkerReport>>,
    /// How many of the four messages after the held one its run claimed.
    claimed_after: i64,
}

impl SecondHeld {
    /// Opens the gate and lets the worker finish: each of the six messages ran once, in
    /// order, and was acked.
    async fn finish_in_order(self) {
        self.open.send(true).unwrap();
        wait_until_empty(&self.backend, &self.q, DEADLINE).await;
        self.stop.cancel();
        let report = self.run.await.unwrap().unwrap();
        let expected: Vec<(u32, u32)> = (0..6).map(|seq| (seq, 1)).collect();
        assert_eq!(
            runs_of(&self.runs, "g"),
            expected,
            "each ran once, in order"
        );
        assert_eq!(report.acked, 6, "{report:?}");
    }
}

async fn second_held(name: &str, options: QueueOptions) -> SecondHeld {
    second_held_with(name, options, GroupLocks::Advisory).await
}

/// The second run claims as many messages as the pace of the first fits in 50 ms. The
/// first handler's time includes handing it to the pool, so on a loaded machine a stall
/// can make the second run one message long; then the scenario starts again, at most
/// three times.
async fn second_held_with(name: &str, options: QueueOptions, locks: GroupLocks) -> SecondHeld {
    second_held_retried(name, options, locks, false).await
}

/// [`second_held_with`] on a worker of two slots that first ran group `h`'s one message
/// beside `g`: `h`'s session is idle while `g`'s second message is held.
async fn second_held_beside_an_idle_session(name: &str, locks: GroupLocks) -> SecondHeld {
    second_held_retried(name, QueueOptions::default(), locks, true).await
}

async fn second_held_retried(
    name: &str,
    options: QueueOptions,
    locks: GroupLocks,
    beside_idle: bool,
) -> SecondHeld {
    for _ in 0..3 {
        let held = second_held_once(name, options.clone(), locks, beside_idle).await;
        if held.claimed_after > 0 {
            return held;
        }
        held.finish_in_order().await;
    }
    panic!("three times the second run claimed nothing after its first message");
}

async fn second_held_once(
    name: &str,
    options: QueueOptions,
    locks: GroupLocks,
    beside_idle: bool,
) -> SecondHeld {
    let (backend, url) = fresh_backend(4).await;
    let q = create(&backend, name, options).await;
    if beside_idle {
        send_groups(&backend, &q, &["h".to_owned()], 1, 100).await;
    }
    send_groups(&backend, &q, &["g".to_owned()], 6, 100).await;
    let runs: Runs = Arc::default();
    let (open, gated) = gate();
    let worker = recording_worker(
        worker_backend_with(&url, "worker", locks),
        &q,
        if beside_idle { 2 } else { 1 },
        &runs,
        gated,
        |step, _| step.group == "g" && step.seq == 1,
    );
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    eventually("the second message runs", DEADLINE, || async {
        runs_of(&runs, "g").len() == 2
    })
    .await;
    let observer = connect(&url, "observer").await.unwrap();
    if beside_idle {
        eventually("h's one message is done", DEADLINE, || async {
            untouched(&observer, &q, "h").await.1 == 0
        })
        .await;
    }
    // The first message's ack lands with the next run's claim, or within about 50 ms when
    // it ran in the held message's run (its pace known from `h`'s).
    eventually("the first message is acked", DEADLINE, || async {
        untouched(&observer, &q, "g").await.1 == 5
    })
    .await;
    let (unclaimed, _) = untouched(&observer, &q, "g").await;
    SecondHeld {
        backend,
        url,
        q,
        runs,
        open,
        stop,
        run,
        claimed_after: 4 - unclaimed,
    }
}

/// A worker shutting down while a run is half done gives back the run's unstarted
/// messages at once (not leased, no attempt counted), while the running one still runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_mid_run_gives_back_the_unstarted_at_once() {
    let SecondHeld {
        url,
        q,
        runs,
        open,
        stop,
        run,
        ..
    } = second_held("run_drains", QueueOptions::default()).await;
    let observer = connect(&url, "observer").await.unwrap();
    stop.cancel();
    eventually(
        "the unstarted are given back while the second still runs",
        DEADLINE,
        || async { untouched(&observer, &q, "g").await == (4, 5) },
    )
    .await;
    assert!(
        head_leased(&observer, &q).await,
        "the second is still running"
    );
    open.send(true).unwrap();
    let report = run.await.unwrap().unwrap();
    assert_eq!(runs_of(&runs, "g"), [(0, 1), (1, 1)]);
    assert_eq!((report.started, report.acked), (2, 2), "{report:?}");
    assert_eq!(
        untouched(&observer, &q, "g").await,
        (4, 4),
        "the unstarted messages are back, unleased, no attempt counted"
    );
    assert_eq!(advisory_locks(&observer).await, 0, "the group is unlocked");
}

/// A group session that fails while a message of its run is running (its connection is
/// killed, and the worker's idle session with it) gives the run's unstarted messages back
/// on a fresh session, uncounted: after recovery frees the interrupted message, it runs
/// again and the others run at their first attempt. Left to recovery, they would have run
/// at their second.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_session_gives_back_the_unstarted_uncounted() {
    a_failed_session_gives_back(GroupLocks::Advisory).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_session_gives_back_the_unstarted_uncounted_in_lease_mode() {
    // Long enough for the give-back to come first, short enough for recovery to free the
    // interrupted message soon after (a dead session's lease is not renewed).
    let ttl = Duration::from_secs(3);
    a_failed_session_gives_back(GroupLocks::Lease { ttl }).await;
}

async fn a_failed_session_gives_back(locks: GroupLocks) {
    let SecondHeld {
        backend,
        url,
        q,
        runs,
        open,
        stop,
        run,
        claimed_after,
    } = second_held_beside_an_idle_session("session_fails", locks).await;
    let observer = connect(&url, "observer").await.unwrap();
    // Both group sessions die, the running one and the idle one, as in a server restart:
    // the leftovers go back on a fresh session, not on the dead idle one.
    let group = pids(&observer, "group").await;
    assert_eq!(group.len(), 2, "g's session and h's idle one");
    for victim in group {
        terminate(&observer, victim).await;
    }
    // The held handler is stopped when the worker sees its session closed; the gate opens
    // only then, so that it never finishes on the dead session.
    eventually("the unstarted are given back", DEADLINE, || async {
        untouched(&observer, &q, "g").await == (4, 5)
    })
    .await;
    open.send(true).unwrap();
    wait_until_empty(&backend, &q, DEADLINE).await;
    stop.cancel();
    let report = run.await.unwrap().unwrap();
    let mut expected = vec![(0, 1), (1, 1), (1, 2)];
    expected.extend((2..6).map(|seq| (seq, 1)));
    assert_eq!(
        runs_of(&runs, "g"),
        expected,
        "the interrupted second ran again, the {claimed_after} claimed with it once, uncounted"
    );
    assert_eq!(report.acked, 7, "g's six and h's one: {report:?}");
}

/// A group session that fails while its settle, carrying the ack of a message that
/// finished, waits for a row lock (here an observer's; in production a slow server or a
/// network cut) acks that message on another session: it does not run again. Left to
/// recovery, it would have run a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_session_acks_what_finished() {
    let (backend, url) = fresh_backend(4).await;
    let q = create(&backend, "ack_in_doubt", QueueOptions::default()).await;
    send_groups(&backend, &q, &["g".to_owned()], 3, 100).await;
    let runs: Runs = Arc::default();
    let (open, gated) = gate();
    let worker = recording_worker(
        worker_backend(&url, "worker"),
        &q,
        1,
        &runs,
        gated,
        |step, attempt| step.seq == 0 && attempt == 1,
    );
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    eventually("the first message runs", DEADLINE, || async {
        runs_of(&runs, "g").len() == 1
    })
    .await;

    // While it runs, an observer locks its row: the settle with its ack will wait.
    let observer = connect(&url, "observer").await.unwrap();
    let locker = connect(&url, "test").await.unwrap();
    let first: i64 = observer
        .query_one(
            "SELECT min(id) FROM pgbus.messages WHERE queue = $1",
            &[&q.as_str()],
        )
        .await
        .unwrap()
        .get(0);
    locker
        .batch_execute(&format!(
            "BEGIN; SELECT 1 FROM pgbus.messages WHERE id = {first} FOR UPDATE"
        ))
        .await
        .unwrap();
    open.send(true).unwrap();
    let waiting = || async {
        observer
            .query(
                "SELECT pid FROM pg_stat_activity
                 WHERE datname = current_database() AND application_name = 'pgbus:group'
                   AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| row.get::<_, i32>(0))
            .collect::<Vec<_>>()
    };
    eventually("the settle waits for the row", DEADLINE, || async {
        waiting().await.len() == 1
    })
    .await;
    let victim = waiting().await[0];
    terminate(&observer, victim).await;
    locker.batch_execute("ROLLBACK").await.unwrap();

    wait_until_empty(&backend, &q, DEADLINE).await;
    stop.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!(
        runs_of(&runs, "g"),
        [(0, 1), (1, 1), (2, 1)],
        "the finished message was acked, not run again"
    );
    assert_eq!(report.acked, 3, "{report:?}");
}

/// Messages sent to a group while it runs join its later runs, in send order, each run
/// once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn order_is_kept_across_runs_with_messages_sent_while_the_group_runs() {
    const FIRST: u32 = 20;
    const LATER: u32 = 40;
    let (backend, url) = fresh_backend(4).await;
    let q = create(&backend, "run_grows", QueueOptions::default()).await;
    send_groups(&backend, &q, &["g".to_owned()], FIRST, 100).await;

    let runs: Runs = Arc::default();
    let (_open, gated) = gate();
    let worker = recording_worker(
        worker_backend(&url, "worker"),
        &q,
        2,
        &runs,
        gated,
        |_, _| false,
    );
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    eventually("the group runs", DEADLINE, || async {
        !runs_of(&runs, "g").is_empty()
    })
    .await;
    for seq in FIRST..FIRST + LATER {
        let step = Step {
            group: "g".to_owned(),
            seq,
        };
        backend
            .send(&q, NewMessage::encode(&step).unwrap().group("g"))
            .await
            .unwrap();
    }
    eventually("every message ran", DEADLINE, || async {
        runs_of(&runs, "g").len() == (FIRST + LATER) as usize
    })
    .await;
    wait_until_empty(&backend, &q, DEADLINE).await;
    stop.cancel();
    let report = run.await.unwrap().unwrap();
    let expected: Vec<(u32, u32)> = (0..FIRST + LATER).map(|seq| (seq, 1)).collect();
    assert_eq!(runs_of(&runs, "g"), expected);
    assert_eq!(report.acked, u64::from(FIRST + LATER), "{report:?}");
}

/// While a run's message runs longer than the lease, the heartbeat keeps every claimed
/// message of the run leased, not only the running one.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_heartbeat_keeps_the_whole_run_leased() {
    // A 600 ms lease: extended every 200 ms while a handler runs.
    let options = QueueOptions::default().lease(Duration::from_millis(600));
    let held = second_held("run_heartbeat", options).await;
    let q = &held.q;
    let observer = connect(&held.url, "observer").await.unwrap();
    let leased = || async {
        observer
            .query_one(
                "SELECT count(*) FILTER (WHERE lease_until > now()), count(*)
                 FROM pgbus.messages WHERE queue = $1",
                &[&q.as_str()],
            )
            .await
            .map(|row| (row.get::<_, i64>(0), row.get::<_, i64>(1)))
            .unwrap()
    };
    let (claimed, left) = leased().await;
    assert!(
        claimed >= 2,
        "a run of several was claimed: {claimed} of {left}"
    );
    // Over three lease periods the claimed messages stay leased.
    let window = Instant::now();
    while window.elapsed() < Duration::from_millis(1_800) {
        assert_eq!(
            leased().await.0,
            claimed,
            "a claimed message's lease ran out"
        );
        tokio::time::sleep(POLL).await;
    }
    held.finish_in_order().await;
}

/// Lease mode with a group lease shorter than a third of the queue's lease: the heartbeat
/// beats within the group lease, so it never lapses while a handler runs (it beat every
/// third of the queue's lease, and the lapsed group was recovered and could be taken by
/// another session while its message still ran).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_heartbeat_keeps_a_short_group_lease_alive() {
    let options = QueueOptions::default().lease(Duration::from_secs(6));
    let ttl = Duration::from_millis(600);
    let held = second_held_with("short_group_lease", options, GroupLocks::Lease { ttl }).await;
    let observer = connect(&held.url, "observer").await.unwrap();
    let live_group_leases = || async {
        observer
            .query_one(
                "SELECT count(*) FROM pgbus.group_leases WHERE expires_at > now()",
                &[],
            )
            .await
            .map(|row| row.get::<_, i64>(0))
            .unwrap()
    };
    // Over five group-lease periods (the first heartbeat of a 6 s lease would come after
    // 2 s), the group stays leased while its second message is held.
    let window = Instant::now();
    while window.elapsed() < ttl * 5 {
        assert_eq!(live_group_leases().await, 1, "the group's lease lapsed");
        tokio::time::sleep(POLL).await;
    }
    held.finish_in_order().await;
}

// ---------------------------------------------------------------------------------------
// 9. The circuit breaker.

/// A run whose circuit-breaker trip fails (here a trigger refuses it; in production a
/// statement timeout, say) on a healthy session still settles: the failed message's retry
/// and the run's finished messages are written at once, not left to their leases (300 s,
/// past the deadline), and the worker carries on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_whose_breaker_trip_fails_still_settles() {
    let (backend, url) = fresh_backend(4).await;
    // Retried an hour later: the retry, once written, is plainly scheduled, never run again
    // during the test.
    let options = QueueOptions::default()
        .retry(fixed_retry(Duration::from_secs(3_600)))
        .lease(Duration::from_secs(300))
        .circuit_breaker(CircuitBreaker::new(1, Duration::from_secs(60)).unwrap());
    let q = create(&backend, "breaker_refused", options).await;
    // Opening a breaker fails on this database; each attempt is counted in a sequence,
    // which the failed statement's rollback leaves counted.
    let observer = connect(&url, "observer").await.unwrap();
    observer
        .batch_execute(
            "CREATE SEQUENCE public.breaker_trips;
             CREATE FUNCTION public.refuse_breaker() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 PERFORM nextval('public.breaker_trips');
                 RAISE EXCEPTION 'the breaker may not open';
             END $$;
             CREATE TRIGGER refuse_breaker BEFORE UPDATE ON pgbus.queues FOR EACH ROW
                 WHEN (OLD.breaker_until IS DISTINCT FROM NEW.breaker_until)
                 EXECUTE FUNCTION public.refuse_breaker();",
        )
        .await
        .unwrap();
    send_groups(&backend, &q, &["g".to_owned()], 6, 100).await;

    let runs: Runs = Arc::default();
    let worker = retrying_worker(&url, &q, &runs, |step, _| {
        (step.seq == 2).then_some("downstream is down")
    });
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    // `(retried, leased, left)`: the failed message scheduled with its error and unleased,
    // the messages still leased, and all left.
    let state = || async {
        let row = observer
            .query_one(
                "SELECT count(*) FILTER (WHERE last_error = 'downstream is down'
                                           AND lease_until IS NULL AND attempts = 1
                                           AND visible_at > now() + interval '30 minutes'),
                        count(*) FILTER (WHERE lease_until IS NOT NULL),
                        count(*)
                 FROM pgbus.messages WHERE queue = $1",
                &[&q.as_str()],
            )
            .await
            .unwrap();
        (
            row.get::<_, i64>(0),
            row.get::<_, i64>(1),
            row.get::<_, i64>(2),
        )
    };
    eventually(
        "the failed message's retry and the acks before it are written, nothing leased",
        Duration::from_secs(30),
        || async { state().await == (1, 0, 4) },
    )
    .await;
    let trips: i64 = observer
        .query_one(
            "SELECT CASE WHEN is_called THEN last_value ELSE 0 END FROM public.breaker_trips",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(trips, 1, "the worker tried to open the breaker once");
    assert!(
        stats_of(&backend, &q).await.breaker_open_for.is_none(),
        "the breaker stayed shut"
    );
    assert_eq!(
        untouched(&observer, &q, "g").await,
        (3, 4),
        "the messages after the failed one are back untouched"
    );
    stop.cancel();
    let report = run.await.unwrap().unwrap();
    assert_eq!(runs_of(&runs, "g"), [(0, 1), (1, 1), (2, 1)]);
    assert_eq!((report.acked, report.retried), (2, 1), "{report:?}");
}
