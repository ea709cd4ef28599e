//! The worker builder: a worker's handlers and settings, checked when it builds a
//! [`Worker`], a [`GroupWorker`](crate::GroupWorker) or a [`MixedWorker`].

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use pgbus_core::{Backend, Error, QueueName, Result, WakeupSource};
use tokio::sync::Notify;

use crate::handler::{Declare, Erased, ErasedHandler, Handler, IntoOutcome, JobContext};
use crate::lane::exec;
use crate::mixed::MixedWorker;
use crate::worker::{Config, ProcessSlot, Runs, Shared, Worker};
use crate::ExecutionMode;

static DEFAULT_MODE: AtomicU8 = AtomicU8::new(MODE_UNSET);
const MODE_UNSET: u8 = 0;
const MODE_ASYNC: u8 = 1;
const MODE_THREADS: u8 = 2;

/// Sets the execution mode of workers that do not choose one themselves (a mode this
/// build lacks makes their `build` fail with [`ExecError::NotBuilt`](crate::ExecError::NotBuilt)).
pub fn set_default_execution_mode(mode: ExecutionMode) {
    let value = match mode {
        ExecutionMode::Async => MODE_ASYNC,
        ExecutionMode::Threads => MODE_THREADS,
    };
    DEFAULT_MODE.store(value, Ordering::Relaxed);
}

/// The execution mode of workers that do not choose one themselves
/// ([`ExecutionMode::default`] unless set).
pub fn default_execution_mode() -> ExecutionMode {
    match DEFAULT_MODE.load(Ordering::Relaxed) {
        MODE_THREADS => ExecutionMode::Threads,
        MODE_ASYNC => ExecutionMode::Async,
        _ => ExecutionMode::default(),
    }
}

/// Builds a [`Worker`]: the backend, a handler per queue, and settings.
pub struct WorkerBuilder<B: Backend> {
    backend: B,
    pub(crate) handlers: Vec<(QueueName, Arc<dyn ErasedHandler<B>>)>,
    /// Subscriptions' bindings, declared when the worker starts.
    pub(crate) declarations: Vec<Declare<B>>,
    config: Config,
    wakeup: Arc<Notify>,
    wakeup_source: Option<Arc<dyn WakeupSource>>,
}

impl<B: Backend> WorkerBuilder<B> {
    /// Registers a typed handler for `queue`.
    pub fn handler<H: Handler<B>>(mut self, queue: QueueName, handler: H) -> Self {
        self.handlers
            .push((queue, Arc::new(Erased(Arc::new(handler)))));
        self
    }

    /// Registers an async function or closure `(JobContext<B>, T) -> impl IntoOutcome` as
    /// the handler for `queue`; `T` is the payload type.
    pub fn handle<F, T, Fut, R>(self, queue: QueueName, f: F) -> Self
    where
        F: Fn(JobContext<B>, T) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = R> + Send,
        R: IntoOutcome,
        T: serde::de::DeserializeOwned + Send + 'static,
    {
        self.handler(queue, crate::handler::handler_fn(f))
    }

    /// Where wake-ups come from (for Postgres, the process's one `PgListener`): the idle
    /// wait ends when one of the worker's queues gets work. Without one, or while it is not
    /// live, the worker polls every poll interval.
    pub fn wakeups(mut self, source: Arc<dyn WakeupSource>) -> Self {
        self.wakeup_source = Some(source);
        self
    }

    /// Jobs run at once; default 10.
    pub fn concurrency(mut self, concurrency: usize) -> Self {
        self.config.concurrency = concurrency;
        self
    }

    /// How many plain messages the worker may hold claimed ahead of its free slots, in a
    /// local buffer, so that a slot that frees starts its next job at once instead of after
    /// a claim's round trip; default four times the concurrency (at most 512), `0` turns
    /// it off.
    ///
    /// The buffer holds only what the busy slots are expected to start soon: the worker
    /// keeps moving averages of its handlers' durations, per queue and over all its
    /// queues, and a claim on a queue buffers at most what the `concurrency` slots finish
    /// in about 50 ms at the slower of the two (nothing before a job of that queue has
    /// finished, nothing behind slots busy with another queue's slow jobs, nothing for
    /// jobs longer than `concurrency` × 50 ms, the whole buffer for jobs of 12 ms or less
    /// at the default). It claims for its free slots plus the buffer's room, and refills
    /// the buffer while its slots are still busy once it is half empty.
    ///
    /// A buffered message that waits for a slot longer than 1 s (see
    /// [`claim_ahead_wait`](Self::claim_ahead_wait); a third of its lease, if shorter) is
    /// given back at once with
    /// [`Consumer::release`](pgbus_core::Consumer::release) (claimable again straight away
    /// by other workers, the attempt not counted), and the worker claims nothing ahead
    /// again until one of its slots frees: jobs longer than the pace promised never hold
    /// messages from idle workers for longer than that. Meanwhile buffered messages are
    /// leased like running ones: their leases are extended with the running jobs', a
    /// buffered message whose lease is lost (deleted by an operator, say) is dropped
    /// without running, and when the worker stops, the buffer is given back at once, the
    /// same way. Claims keep priority order, but a message claimed later may wait behind
    /// at most this many claimed before it. Jobs with limit keys are never
    /// buffered (a buffered one would hold its key's slot without running), nor are
    /// grouped ones (a group worker ignores this setting).
    pub fn claim_ahead(mut self, messages: usize) -> Self {
        self.config.claim_ahead = Some(messages);
        self
    }

    /// How long a claimed-ahead message may wait for a slot before it is given back (see
    /// [`claim_ahead`](Self::claim_ahead)); default 1 s, never more than a third of the
    /// message's lease. Jobs that all outlast the pace that sized the buffer must not hold
    /// it from idle workers for long: the bound is what a buffered message can lose.
    pub fn claim_ahead_wait(mut self, wait: Duration) -> Self {
        self.config.claim_ahead_wait = wait;
        self
    }

    /// Threads or async for this worker, overriding the global default
    /// ([`set_default_execution_mode`]).
    pub fn execution_mode(mut self, mode: ExecutionMode) -> Self {
        self.config.mode = Some(mode);
        self
    }

    /// Longest idle sleep between claims when no wake-up comes; default 1 s.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.config.poll_interval = interval;
        self
    }

    /// Lease for claims, instead of each queue's own.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.config.lease = Some(lease);
        self
    }

    /// A job running longer is cancelled and retried; default none.
    pub fn job_timeout(mut self, timeout: Duration) -> Self {
        self.config.job_timeout = Some(timeout);
        self
    }

    /// How long shutdown waits for running jobs; default 30 s.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.config.drain_timeout = timeout;
        self
    }

    /// Most acks sent in one statement; default 500.
    pub fn ack_batch(mut self, size: usize) -> Self {
        self.config.ack_batch = size;
        self
    }

    /// Process registry heartbeat interval; default 10 s. Entries silent for three
    /// intervals are pruned as stale. Each heartbeat also reports the worker's throughput
    /// per queue since the last one (see
    /// [`QueueStats::processed_per_minute`](pgbus_core::QueueStats::processed_per_minute)).
    pub fn heartbeat_interval(mut self, interval: Duration) -> Self {
        self.config.heartbeat_interval = interval;
        self
    }

    /// How long a group session (a `pgbus:group` connection for Postgres) may stay unused
    /// before it is closed, and how long a [`MixedWorker`] keeps its group recovery
    /// connection open without grouped work; default 30 s.
    pub fn group_idle_timeout(mut self, timeout: Duration) -> Self {
        self.config.group_idle = timeout;
        self
    }

    /// Checks the settings and builds a worker for ordered groups: it runs only messages
    /// that carry a group key, one at a time per group, in send order, across all workers
    /// and processes (see [`GroupWorker`](crate::GroupWorker)).
    pub fn build_groups(self) -> Result<crate::GroupWorker<B>> {
        if !self.declarations.is_empty() {
            return Err(Error::InvalidArgument(
                "subscriptions need a plain worker (events carry no group key): use build()".into(),
            ));
        }
        self.build_running(Runs::Groups)
            .map(crate::GroupWorker::new)
    }

    /// Checks the settings and builds a worker for every message of its queues, with or
    /// without a group key, on one set of `concurrency` slots and one process entry (see
    /// [`MixedWorker`]).
    pub fn build_mixed(self) -> Result<MixedWorker<B>> {
        let plain = self.build_running(Runs::Both)?;
        let groups = Worker {
            backend: plain.backend.clone(),
            handlers: plain.handlers.clone(),
            declarations: Vec::new(),
            config: plain.config.clone(),
            wakeup: Arc::new(Notify::new()),
            shared: Arc::clone(&plain.shared),
        };
        Ok(MixedWorker::new(plain, crate::GroupWorker::new(groups)))
    }

    /// Checks the settings and builds a worker for messages without a group key.
    pub fn build(self) -> Result<Worker<B>> {
        self.build_running(Runs::Plain)
    }

    fn build_running(self, runs: Runs) -> Result<Worker<B>> {
        let invalid = |what: &str| Err(Error::InvalidArgument(what.to_owned()));
        if self.handlers.is_empty() {
            return invalid("a worker needs at least one queue handler");
        }
        if self.config.concurrency == 0 {
            return invalid("concurrency must be at least 1");
        }
        if self.config.ack_batch == 0 {
            return invalid("ack batch must be at least 1");
        }
        if self.config.poll_interval.is_zero() || self.config.heartbeat_interval.is_zero() {
            return invalid("poll and heartbeat intervals must be positive");
        }
        if self.config.claim_ahead_wait.is_zero() {
            return invalid("the claim-ahead wait must be positive");
        }
        if self.config.group_idle.is_zero() {
            return invalid("the group idle timeout must be positive");
        }
        let mut seen = std::collections::HashSet::new();
        for (queue, _) in &self.handlers {
            if !seen.insert(queue.clone()) {
                return invalid(&format!("two handlers for queue {queue}"));
            }
        }
        let mode = self
            .config
            .mode
            .unwrap_or_else(default_execution_mode)
            .check_built()
            .map_err(exec)?;
        Ok(Worker {
            shared: Arc::new(Shared {
                mode,
                capacity: self.config.concurrency,
                queues: self.handlers.iter().map(|(q, _)| q.clone()).collect(),
                pool: OnceLock::new(),
                process: ProcessSlot::default(),
                wakeup_source: self.wakeup_source,
                runs,
                idle: Default::default(),
                group_sessions: OnceLock::new(),
            }),
            backend: self.backend,
            handlers: self.handlers.into_iter().collect(),
            declarations: self.declarations,
            config: self.config,
            wakeup: self.wakeup,
        })
    }
}

impl<B: Backend> Worker<B> {
    /// A builder with default settings.
    pub fn builder(backend: B) -> WorkerBuilder<B> {
        WorkerBuilder {
            backend,
            handlers: Vec::new(),
            declarations: Vec::new(),
            config: Config {
                concurrency: 10,
                claim_ahead: None,
                claim_ahead_wait: Duration::from_secs(1),
                mode: None,
                poll_interval: Duration::from_secs(1),
                lease: None,
                job_timeout: None,
                drain_timeout: Duration::from_secs(30),
                ack_batch: 500,
                heartbeat_interval: Duration::from_secs(10),
                error_backoff_cap: Duration::from_secs(30),
                group_idle: Duration::from_secs(30),
            },
            wakeup: Arc::new(Notify::new()),
            wakeup_source: None,
        }
    }
}
