//! The scheduler of recurring jobs: one leader at a time across all processes, each
//! occurrence enqueued exactly once.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use pgbus_core::{Error, MissedRuns, QueueName, RecurringTask, Result, MAX_CATCH_UP};
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

use crate::error::db;
use crate::query::Typed;
use crate::{sql, PgBackend};

/// Runs recurring tasks. Start one in every process that should be able to schedule: they
/// elect one leader through a lease row in Postgres (renewed every tick on the scheduler's
/// own `pgbus:scheduler` connection); when the leader dies its lease runs out and another
/// takes over, catching up (per each task's [`MissedRuns`](pgbus_core::MissedRuns)) the
/// occurrences that passed meanwhile. Every occurrence is recorded under its (task, time)
/// key in the transaction that enqueues its job, so none is enqueued twice, even by a
/// leader that has not noticed it lost its lease. Times come from the database's clock.
pub struct Scheduler {
    backend: PgBackend,
    tasks: Vec<RecurringTask>,
    lease: Duration,
    tick: Duration,
    run_retention: Duration,
    leading: Arc<AtomicBool>,
}

/// Configures a [`Scheduler`]; see [`Scheduler::builder`].
pub struct SchedulerBuilder {
    backend: PgBackend,
    tasks: Vec<RecurringTask>,
    lease: Duration,
    tick: Duration,
    run_retention: Duration,
}

impl SchedulerBuilder {
    /// Adds a task.
    pub fn task(mut self, task: RecurringTask) -> Self {
        self.tasks.push(task);
        self
    }

    /// How long a leader's lease lasts without renewal (how long a dead leader's tasks
    /// wait for a new one); default 30 s. Renewed every third of it at least.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }

    /// How often the leader looks for due occurrences (and followers for a free lease);
    /// default 1 s, and never longer than a third of the lease.
    pub fn tick(mut self, tick: Duration) -> Self {
        self.tick = tick;
        self
    }

    /// How long occurrence records are kept (they guard against enqueueing an occurrence
    /// twice: keep them longer than any catch-up window); default 7 days.
    pub fn run_retention(mut self, retention: Duration) -> Self {
        self.run_retention = retention;
        self
    }

    /// Checks the settings.
    pub fn build(self) -> Result<Scheduler> {
        let mut names = std::collections::HashSet::new();
        for task in &self.tasks {
            if !names.insert(task.name.as_str()) {
                return Err(Error::InvalidArgument(format!(
                    "two recurring tasks named {}",
                    task.name
                )));
            }
        }
        if self.lease < Duration::from_millis(30) || self.tick.is_zero() {
            return Err(Error::InvalidArgument(
                "the scheduler lease must be at least 30 ms and the tick positive".into(),
            ));
        }
        Ok(Scheduler {
            tick: self.tick.min(self.lease / 3),
            backend: self.backend,
            tasks: self.tasks,
            lease: self.lease,
            run_retention: self.run_retention,
            leading: Arc::default(),
        })
    }
}

/// Watches a running [`Scheduler`].
#[derive(Debug, Clone)]
pub struct SchedulerMonitor {
    leading: Arc<AtomicBool>,
}

impl SchedulerMonitor {
    /// Whether this scheduler leads now.
    pub fn is_leader(&self) -> bool {
        self.leading.load(Ordering::SeqCst)
    }
}

/// A task as declared in the database, for operators.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ScheduleInfo {
    /// Task name.
    pub task: String,
    /// The queue its jobs go to.
    pub queue: String,
    /// The schedule, as text (`cron */5 * * * * *`, `every 1s`).
    pub schedule: String,
    /// The missed-occurrence policy, as text.
    pub missed: String,
    /// The latest occurrence enqueued; `None` until the first one is.
    pub last_at: Option<SystemTime>,
    /// The next occurrence, as the leader last computed it.
    pub next_at: Option<SystemTime>,
    /// When a scheduler last declared the task.
    pub declared_at: SystemTime,
}

impl PgBackend {
    /// The recurring tasks schedulers have declared, by name.
    pub async fn schedules(&self) -> Result<Vec<ScheduleInfo>> {
        let rows = self
            .conn()
            .await?
            .q(sql::LIST_SCHEDULES, &[])
            .await
            .map_err(|e| db("listing schedules", e))?;
        Ok(rows
            .iter()
            .map(|row| ScheduleInfo {
                task: row.get(0),
                queue: row.get(1),
                schedule: row.get(2),
                missed: row.get(3),
                last_at: row.get(4),
                next_at: row.get(5),
                declared_at: row.get(6),
            })
            .collect())
    }
}

/// The leader's view of one task.
struct Cursor {
    /// The latest occurrence handled.
    last: SystemTime,
    /// The next occurrence as recorded in the database.
    next: Option<SystemTime>,
    /// Whether this leader has enqueued the task once: from then on, occurrences that
    /// fall between two of its ticks (a task more frequent than the tick, a slow tick) are
    /// due in its steady run, not missed while no scheduler ran, and are all enqueued
    /// whatever the task's [`MissedRuns`].
    steady: bool,
}

impl Scheduler {
    /// A scheduler with default settings and no tasks.
    pub fn builder(backend: PgBackend) -> SchedulerBuilder {
        SchedulerBuilder {
            backend,
            tasks: Vec::new(),
            lease: Duration::from_secs(30),
            tick: Duration::from_secs(1),
            run_retention: Duration::from_secs(7 * 24 * 3600),
        }
    }

    /// A handle to watch the scheduler while it runs.
    pub fn monitor(&self) -> SchedulerMonitor {
        SchedulerMonitor {
            leading: Arc::clone(&self.leading),
        }
    }

    /// Runs until `shutdown` is cancelled; a leader then gives its lease up so another
    /// scheduler takes over at once. Database errors are logged and retried with backoff
    /// on a new connection.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let mut session: Option<Session> = None;
        let mut errors = 0u32;
        while !shutdown.is_cancelled() {
            let pause = match self.round(&mut session).await {
                Ok(()) => {
                    errors = 0;
                    self.tick
                }
                Err(err) => {
                    errors += 1;
                    session = None;
                    self.leading.store(false, Ordering::SeqCst);
                    let delay = (self.tick * errors.min(10)).min(self.lease);
                    tracing::warn!(target: "pgbus::scheduler", error = %err.report(), retry_in = ?delay, "scheduler round failed");
                    delay
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(pause) => {}
            }
        }
        if let Some(session) = session {
            if self.leading.swap(false, Ordering::SeqCst) {
                if let Err(err) = session
                    .client
                    .exec(sql::RESIGN, &[&sql::SCHEDULER_LEASE_NAME, &session.token])
                    .await
                {
                    tracing::warn!(target: "pgbus::scheduler", error = %err, "could not give up the scheduler lease; it runs out by itself");
                }
            }
        }
        Ok(())
    }

    /// One tick: renew or try the lease; as the leader, enqueue what is due.
    async fn round(&self, session: &mut Option<Session>) -> Result<()> {
        let session = match session {
            Some(session) => session,
            None => session.insert(Session::open(&self.backend).await?),
        };
        let row = session
            .client
            .q_opt(
                sql::TRY_LEAD,
                &[
                    &sql::SCHEDULER_LEASE_NAME,
                    &session.token,
                    &self.lease.as_secs_f64(),
                ],
            )
            .await
            .map_err(|e| db("taking the scheduler lease", e))?;
        let Some(row) = row else {
            if self.leading.swap(false, Ordering::SeqCst) {
                tracing::info!(target: "pgbus::scheduler", "lost the scheduler lease");
            }
            session.cursors.clear();
            return Ok(());
        };
        let now: SystemTime = row.get(0);
        if !self.leading.swap(true, Ordering::SeqCst) {
            // The token is the lease row's owner: operators (and `cargo xtask chaos`) tell
            // from `pgbus.scheduler_lease` which process leads.
            tracing::info!(target: "pgbus::scheduler", tasks = self.tasks.len(), lease.owner = %session.token, "leading the scheduler");
            session.cursors = self.declare(&session.client).await?;
            self.prune(&session.client).await?;
        }
        for task in &self.tasks {
            let cursor = session.cursors.get_mut(&task.name).expect("declared");
            if let Err(err) =
                enqueue_due(&self.backend, &mut session.client, task, cursor, now).await
            {
                if err.is_transient() {
                    return Err(err);
                }
                tracing::warn!(target: "pgbus::scheduler", error = %err.report(), task = %task.name, "could not enqueue a recurring job");
            }
        }
        Ok(())
    }

    /// Declares every task; returns their cursors.
    async fn declare(&self, client: &Client) -> Result<HashMap<String, Cursor>> {
        let mut cursors = HashMap::new();
        for task in &self.tasks {
            let row = client
                .q_one(
                    sql::DECLARE_TASK,
                    &[
                        &task.name,
                        &task.queue.as_str(),
                        &task.schedule.to_string(),
                        &task.missed_text(),
                    ],
                )
                .await
                .map_err(|e| db("declaring a recurring task", e))?;
            cursors.insert(
                task.name.clone(),
                Cursor {
                    last: row.get(0),
                    next: None,
                    steady: false,
                },
            );
        }
        Ok(cursors)
    }

    async fn prune(&self, client: &Client) -> Result<()> {
        client
            .exec(
                sql::PRUNE_RUNS,
                &[&self.run_retention.as_secs_f64(), &10_000i64],
            )
            .await
            .map_err(|e| db("pruning occurrence records", e))?;
        Ok(())
    }
}

/// Enqueues the task's due occurrences in one transaction with their records, and moves
/// its cursor.
async fn enqueue_due(
    backend: &PgBackend,
    client: &mut Client,
    task: &RecurringTask,
    cursor: &mut Cursor,
    now: SystemTime,
) -> Result<()> {
    let missed = if cursor.steady {
        MissedRuns::CatchUp(MAX_CATCH_UP)
    } else {
        task.missed
    };
    let due = task.schedule.due(cursor.last, now, missed);
    let next = task.schedule.next_after(now);
    if due.is_empty() && next == cursor.next {
        return Ok(());
    }
    let tx = client
        .transaction()
        .await
        .map_err(|e| db("starting a scheduler transaction", e))?;
    let latest = due.last().copied();
    if !due.is_empty() {
        let fresh: Vec<SystemTime> = tx
            .q(sql::RECORD_RUNS, &[&task.name, &due])
            .await
            .map_err(|e| db("recording occurrences", e))?
            .iter()
            .map(|row| row.get(0))
            .collect();
        if fresh.len() < due.len() {
            tracing::debug!(target: "pgbus::scheduler", task = %task.name, skipped = due.len() - fresh.len(), "occurrences already enqueued elsewhere");
        }
        let messages = fresh.iter().map(|&at| task.message_for(at)).collect();
        let queue: &QueueName = &task.queue;
        backend.send_batch_in(&tx, queue, messages).await?;
    }
    tx.exec(sql::ADVANCE_TASK, &[&task.name, &latest, &next])
        .await
        .map_err(|e| db("moving a task's cursor", e))?;
    tx.commit()
        .await
        .map_err(|e| db("committing recurring jobs", e))?;
    // Only now: a transaction that failed enqueued nothing, and the next tick must find
    // the same occurrences due again.
    if let Some(latest) = latest {
        cursor.last = latest;
    }
    cursor.next = next;
    cursor.steady = true;
    Ok(())
}

/// The scheduler's connection and its lease token.
struct Session {
    client: Client,
    token: String,
    cursors: HashMap<String, Cursor>,
}

impl Session {
    async fn open(backend: &PgBackend) -> Result<Self> {
        let client = backend.dedicated("scheduler").await?;
        let token = client
            .q_one(sql::NEW_TOKEN, &[])
            .await
            .map_err(|e| db("making a scheduler token", e))?
            .get(0);
        Ok(Self {
            client,
            token,
            cursors: HashMap::new(),
        })
    }
}
