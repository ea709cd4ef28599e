//! The scenarios, each one run on a fresh database, and what they share.

pub(crate) mod backlog;
pub(crate) mod console;
pub(crate) mod drain;
pub(crate) mod enqueue;
pub(crate) mod groups;
pub(crate) mod io_bound;
pub(crate) mod latency;
pub(crate) mod peer_pgmq;
pub(crate) mod publish_fanout;
pub(crate) mod raw_sql;
pub(crate) mod stream_fanout;
pub(crate) mod stream_publish;
pub(crate) mod xmin_pinned;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use pgbus_core::{
    Consumer, Fetcher, Lease, Message, NewMessage, OpenFetcher, QueueAdmin, QueueName,
    QueueOptions, StreamListener, WakeupSource,
};
use pgbus_exec::{ExecutionMode, JobContext, Worker, WorkerReport};
use pgbus_pg::{PgBackend, PgFetcher, PgListener, PgStreamListener};
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::observer::ConnectionObserver;
use crate::server::{connect, Server};

/// The queue every pgbus scenario uses.
pub(crate) const QUEUE: &str = "bench";
/// Messages per statement when jobs are pre-inserted.
const PREINSERT_CHUNK: usize = 5_000;
/// How long any single run may take before the harness gives up on it.
const RUN_DEADLINE: Duration = Duration::from_secs(600);

pub(crate) fn queue() -> QueueName {
    QueueName::new(QUEUE).expect("valid queue name")
}

/// Runs `body` on a fresh database and drops the database afterwards, also on error.
pub(crate) async fn on_fresh_database<T, F, Fut>(server: &Server, body: F) -> anyhow::Result<T>
where
    F: FnOnce(String) -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let database = server.fresh_database().await?;
    let outcome = tokio::time::timeout(RUN_DEADLINE, body(database.url().to_owned())).await;
    let dropped = server.drop_database(database).await;
    let value =
        outcome.map_err(|_| anyhow::anyhow!("the run took longer than {RUN_DEADLINE:?}"))??;
    dropped?;
    Ok(value)
}

/// A migrated pgbus backend with the bench queue; `configure` adjusts the builder.
pub(crate) async fn pgbus_backend(
    url: &str,
    configure: impl FnOnce(pgbus_pg::PgBackendBuilder) -> pgbus_pg::PgBackendBuilder,
) -> anyhow::Result<PgBackend> {
    let backend = configure(PgBackend::builder(url)).build()?;
    backend.migrate().await.context("migrating")?;
    backend
        .create_queue(&queue(), &QueueOptions::default())
        .await
        .context("creating the bench queue")?;
    Ok(backend)
}

/// A backend for the workers of a counted run, with a pool of its own: the setup's
/// backend (and its idle pooled connection) is dropped before connections are counted.
pub(crate) fn worker_backend(url: &str) -> anyhow::Result<PgBackend> {
    Ok(PgBackend::builder(url).build()?)
}

/// Sends `n` messages (payloads `0..n` as `u64`) on a connection of the bench's own, in
/// bulk, then `VACUUM ANALYZE`s the database, as `raw_sql` does after its insert.
pub(crate) async fn preinsert(backend: &PgBackend, url: &str, n: usize) -> anyhow::Result<()> {
    preinsert_messages(backend, url, (0..n as u64).map(|i| NewMessage::encode(&i))).await
}

/// [`preinsert`] for any messages.
pub(crate) async fn preinsert_messages(
    backend: &PgBackend,
    url: &str,
    messages: impl Iterator<Item = pgbus_core::Result<NewMessage>>,
) -> anyhow::Result<()> {
    let client = connect(url).await?;
    let queue = queue();
    let mut messages = messages.peekable();
    while messages.peek().is_some() {
        let batch = messages
            .by_ref()
            .take(PREINSERT_CHUNK)
            .collect::<Result<Vec<_>, _>>()?;
        backend.send_batch_in(&client, &queue, batch).await?;
    }
    vacuum_analyze(&client).await
}

/// Plain `VACUUM ANALYZE` of the whole (fresh, small) database, so that every drain starts
/// from settled statistics and visibility information.
pub(crate) async fn vacuum_analyze(client: &Client) -> anyhow::Result<()> {
    client
        .batch_execute("VACUUM ANALYZE")
        .await
        .context("VACUUM ANALYZE")
}

/// The lease of [`ClaimAck`]'s claims: far longer than any run.
const CLAIM_LEASE: Duration = Duration::from_secs(60);

/// A consumer of the bench queue in its plainest shape, for the scenarios that time
/// single claims: claims on a fetcher (a worker's dedicated claim connection, committing as
/// a worker's does), and acks what it claimed at once on the backend's pool (no-op jobs).
pub(crate) struct ClaimAck {
    backend: PgBackend,
    fetcher: PgFetcher,
    queue: QueueName,
}

/// One claim and its ack.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cycle {
    /// Messages claimed (and acked).
    pub(crate) claimed: usize,
    /// How long the claim took, round trip included.
    pub(crate) claim: Duration,
    /// How long the ack took (zero when nothing was claimed).
    pub(crate) ack: Duration,
}

impl ClaimAck {
    pub(crate) async fn open(backend: &PgBackend) -> anyhow::Result<Self> {
        Ok(ClaimAck {
            backend: backend.clone(),
            fetcher: backend.open_fetcher().await.context("opening a fetcher")?,
            queue: queue(),
        })
    }

    /// Claims up to `max` messages and acks them.
    pub(crate) async fn cycle(&mut self, max: usize) -> anyhow::Result<Cycle> {
        let started = Instant::now();
        let claimed = self.fetcher.claim(&self.queue, max, CLAIM_LEASE).await?;
        let claim = started.elapsed();
        let acking = Instant::now();
        if !claimed.is_empty() {
            let leases: Vec<Lease> = claimed.iter().map(Message::lease).collect();
            let acked = self.backend.ack(&leases).await?;
            ensure!(
                acked == leases.len() as u64,
                "acked {acked} of {} fresh leases",
                leases.len()
            );
        }
        Ok(Cycle {
            claimed: claimed.len(),
            claim,
            ack: acking.elapsed(),
        })
    }
}

/// A PgListener that is live.
pub(crate) async fn live_listener(url: &str) -> anyhow::Result<Arc<PgListener>> {
    let listener = Arc::new(PgListener::start(url)?);
    ensure!(
        listener.wait_live(Duration::from_secs(10)).await,
        "the LISTEN connection did not come up"
    );
    Ok(listener)
}

/// Waits until a started stream listener has its LISTEN connection.
pub(crate) async fn wait_stream_listener_live(listener: &PgStreamListener) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !listener.is_live() {
        ensure!(
            Instant::now() < deadline,
            "the stream listener's connection did not come up"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// How the handler of a counted run spends each job.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Work {
    /// Returns at once.
    Noop,
    /// `tokio::time::sleep` (async mode).
    AsyncSleep(Duration),
    /// `std::thread::sleep` (threads mode: it blocks the pool thread).
    BlockingSleep(Duration),
}

/// Settings of a counted run: `workers` workers of `concurrency` slots each, in one
/// process, sharing the backend and one listener.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WorkerSettings {
    pub(crate) workers: usize,
    pub(crate) concurrency: usize,
    /// The workers' claim-ahead buffer; `None`: the worker's default.
    pub(crate) claim_ahead: Option<usize>,
    pub(crate) mode: ExecutionMode,
    pub(crate) work: Work,
}

/// What a counted run measured.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Drained {
    /// From starting the workers to the first job's start: opening the fetch connection,
    /// spawning the pool, the first claim. Not part of the throughput.
    pub(crate) startup: Duration,
    /// From the first job's start until every job is acked and the workers have returned.
    pub(crate) elapsed: Duration,
    pub(crate) acked: u64,
}

/// Counts a run's jobs: notes the first start, and stops the workers once `n` are done.
#[derive(Clone)]
pub(crate) struct Tally {
    n: u64,
    done: Arc<AtomicU64>,
    first_start: Arc<OnceLock<Instant>>,
    stop: CancellationToken,
}

impl Tally {
    pub(crate) fn new(n: usize) -> Self {
        Tally {
            n: n as u64,
            done: Arc::default(),
            first_start: Arc::default(),
            stop: CancellationToken::new(),
        }
    }

    /// Called as a job starts.
    pub(crate) fn started(&self) {
        self.first_start.get_or_init(Instant::now);
    }

    /// Called as a job ends; the last one stops the workers.
    pub(crate) fn finished(&self) {
        if self.done.fetch_add(1, Ordering::Relaxed) + 1 == self.n {
            self.stop.cancel();
        }
    }

    /// The workers' shutdown token.
    pub(crate) fn stop(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Waits for the workers started at `started`; the time runs from the first job's
    /// start until every worker has acked and returned.
    pub(crate) async fn time(
        &self,
        started: Instant,
        runs: Vec<JoinHandle<pgbus_core::Result<WorkerReport>>>,
    ) -> anyhow::Result<Drained> {
        let mut acked = 0;
        let mut failure = None;
        for run in runs {
            match run.await.context("a worker panicked")? {
                Ok(report) => acked += report.acked,
                Err(err) => {
                    // One worker failing (e.g. threads that cannot be spawned) stops the rest.
                    self.stop.cancel();
                    failure.get_or_insert(err);
                }
            }
        }
        let finished = Instant::now();
        if let Some(err) = failure {
            return Err(err.into());
        }
        let first_start = *self.first_start.get().context("no job ever started")?;
        ensure!(
            acked == self.n,
            "the workers acked {acked} of {} jobs (handled {})",
            self.n,
            self.done.load(Ordering::Relaxed)
        );
        Ok(Drained {
            startup: first_start - started,
            elapsed: finished - first_start,
            acked,
        })
    }
}

/// Starts the workers on a queue holding `n` jobs and waits until all `n` have run (see
/// [`Tally::time`]).
pub(crate) async fn drain_with_workers(
    backend: &PgBackend,
    listener: &Arc<PgListener>,
    n: usize,
    settings: WorkerSettings,
) -> anyhow::Result<Drained> {
    let tally = Tally::new(n);
    let mut workers = Vec::with_capacity(settings.workers);
    for _ in 0..settings.workers {
        let tally = tally.clone();
        let work = settings.work;
        let mut builder = Worker::builder(backend.clone());
        if let Some(ahead) = settings.claim_ahead {
            builder = builder.claim_ahead(ahead);
        }
        let worker = builder
            .concurrency(settings.concurrency)
            .execution_mode(settings.mode)
            .wakeups(Arc::clone(listener) as Arc<dyn WakeupSource>)
            .handle(queue(), move |_ctx: JobContext<PgBackend>, _n: u64| {
                tally.started();
                let tally = tally.clone();
                async move {
                    match work {
                        Work::Noop => {}
                        Work::AsyncSleep(d) => tokio::time::sleep(d).await,
                        Work::BlockingSleep(d) => std::thread::sleep(d),
                    }
                    tally.finished();
                }
            })
            .build()?;
        workers.push(worker);
    }
    let started = Instant::now();
    let runs = workers
        .into_iter()
        .map(|worker| tokio::spawn(worker.run(tally.stop())))
        .collect();
    tally.time(started, runs).await
}

/// One run's figures.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Run {
    pub(crate) jobs_per_s: f64,
    pub(crate) peak_connections: i64,
    pub(crate) startup: Duration,
    /// CPU microseconds per job: the harness's (the pgbus client side) and the rest of the
    /// machine's (the server's), from the workers' start until they returned.
    pub(crate) client_us_per_job: f64,
    pub(crate) server_us_per_job: f64,
}

/// On a fresh database: pre-inserts `n` jobs, starts the process's listener, then times
/// the workers draining them while an observer counts pgbus's connections.
pub(crate) async fn worker_run(
    server: &Server,
    n: usize,
    settings: WorkerSettings,
) -> anyhow::Result<Run> {
    on_fresh_database(server, |url| async move {
        let backend = {
            let setup_backend = pgbus_backend(&url, |b| b).await?;
            preinsert(&setup_backend, &url, n).await?;
            worker_backend(&url)?
        };
        let observer = ConnectionObserver::start(&url).await?;
        let listener = live_listener(&url).await?;
        let (drained, cpu) =
            crate::system::cpu_split(drain_with_workers(&backend, &listener, n, settings)).await?;
        let peak = observer.finish().await?;
        let drained = drained?;
        let per_job = |seconds: f64| seconds * 1e6 / drained.acked.max(1) as f64;
        Ok(Run {
            jobs_per_s: rate(drained.acked, drained.elapsed),
            peak_connections: peak,
            startup: drained.startup,
            client_us_per_job: per_job(cpu.harness),
            server_us_per_job: per_job(cpu.rest),
        })
    })
    .await
}

/// Jobs per second.
pub(crate) fn rate(n: u64, elapsed: Duration) -> f64 {
    n as f64 / elapsed.as_secs_f64()
}
