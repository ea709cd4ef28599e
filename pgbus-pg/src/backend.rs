//! [`PgBackend`]: the queue contract on PostgreSQL.

use std::cmp::Reverse;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bb8::{Pool, PooledConnection};
use pgbus_core::{
    check_delay, CircuitBreaker, Consumer, ContentType, DeadLetters, DeadMessage, Error, Extension,
    Lease, Message, MessageId, NewMessage, ProcessId, Producer, QueueAdmin, QueueInfo, QueueName,
    QueueOptions, QueueStats, Result, RetryPolicy, Selection, Stats, DEFAULT_MAX_PAYLOAD_BYTES,
    MAX_DELAY,
};
use tokio_postgres::{Client, GenericClient, IsolationLevel, Row};
use tracing::Instrument;

use crate::connect::{ConnectOptions, SecretUrl};
use crate::error::{db, pool, storable};
use crate::group_locks::GroupLocks;
use crate::headers::headers_from;
use crate::migrate::{self, Uninstalled, SCHEMA_VERSION};
use crate::notify_limit::NotifyLimiter;
use crate::pool::PooledClient;
use crate::query::{Param, Pooler, Reused, Typed};
use crate::send::{send_error, Columns};
use crate::sql;
use crate::telemetry;

pub(crate) use crate::pool::Manager;

/// The Postgres backend: a connection pool (connections named `pgbus:<role>`, `pgbus:pool`
/// by default) and the queue operations. Cheap to clone; clones share the pool.
///
/// Messages live in `pgbus.messages` only until they are completed, so claims stay fast as
/// history grows; acked messages are deleted, or moved to `pgbus.archive` for queues that
/// keep history.
#[derive(Debug, Clone)]
pub struct PgBackend {
    pool: Pool<Manager>,
    target: ConnectOptions,
    url: SecretUrl,
    max_payload_bytes: usize,
    notify: bool,
    notify_limiter: Arc<NotifyLimiter>,
    group_locks: GroupLocks,
    pooler: Pooler,
}

/// Configures a [`PgBackend`]; see [`PgBackend::builder`].
#[derive(Debug, Clone)]
pub struct PgBackendBuilder {
    url: SecretUrl,
    role: String,
    max_connections: u32,
    connection_timeout: Duration,
    max_payload_bytes: usize,
    notify: bool,
    notify_window: Duration,
    group_locks: Option<GroupLocks>,
    pooler: Pooler,
}

/// The default [`PgBackendBuilder::notify_coalescing`] window.
pub const DEFAULT_NOTIFY_WINDOW: Duration = Duration::from_millis(5);

/// How long a group's row lease lasts without renewal when a transaction-mode pooler
/// rules out advisory locks and no other length was chosen.
const POOLER_GROUP_LEASE: Duration = Duration::from_secs(30);

impl PgBackendBuilder {
    /// How ordered groups are locked; default [`GroupLocks::Advisory`], or
    /// [`GroupLocks::Lease`] (30 s) behind a [transaction-mode pooler](Pooler::Transaction).
    pub fn group_locks(mut self, locks: GroupLocks) -> Self {
        self.group_locks = Some(locks);
        self
    }

    /// What sits between pgbus and PostgreSQL; default [`Pooler::Session`] (a direct
    /// connection or a session-mode pooler). With [`Pooler::Transaction`] the backend
    /// keeps no session state: no prepared statements, no session settings, and ordered
    /// groups use row leases.
    pub fn pooler(mut self, pooler: Pooler) -> Self {
        self.pooler = pooler;
        self
    }

    /// Whether sends notify listening workers (`pg_notify` on the `pgbus_wakeup` channel,
    /// once per statement, delivered on commit); default true. Without it workers find new
    /// messages at their next poll.
    pub fn notify(mut self, notify: bool) -> Self {
        self.notify = notify;
        self
    }

    /// How long after notifying a queue this backend's own sends to it skip their
    /// `pg_notify`; default [`DEFAULT_NOTIFY_WINDOW`] (5 ms), zero notifies every send.
    /// Postgres serialises the commits of notifying transactions, so concurrent senders
    /// that each notify run far below the plain insert rate. A skipped send, once
    /// committed, schedules one trailing notify at the end of the window, so an idle
    /// worker still wakes for it within the window. Applies to
    /// [`send`](Producer::send) and [`send_batch`](Producer::send_batch) on the pool;
    /// sends in the caller's transaction ([`send_in`](PgBackend::send_in)) always notify,
    /// since only the caller knows when they commit.
    pub fn notify_coalescing(mut self, window: Duration) -> Self {
        self.notify_window = window;
        self
    }

    /// The role in the pool connections' `application_name` (`pgbus:<role>`); default
    /// `pool`.
    pub fn role(mut self, role: impl Into<String>) -> Self {
        self.role = role.into();
        self
    }
    /// Pool size; default 10.
    pub fn max_connections(mut self, max: u32) -> Self {
        self.max_connections = max;
        self
    }
    /// How long an operation waits for a pooled connection; default 10 s.
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }
    /// Largest payload accepted; default [`DEFAULT_MAX_PAYLOAD_BYTES`].
    pub fn max_payload_bytes(mut self, limit: usize) -> Self {
        self.max_payload_bytes = limit;
        self
    }

    /// Checks the settings (the URL, its TLS files) and creates the pool. Connections
    /// open on first use.
    pub fn build(self) -> Result<PgBackend> {
        if self.max_connections == 0 {
            return Err(Error::InvalidArgument(
                "max_connections must be at least 1".into(),
            ));
        }
        let group_locks = match (self.pooler, self.group_locks) {
            (Pooler::Transaction, Some(GroupLocks::Advisory)) => {
                return Err(Error::InvalidArgument(
                    "advisory group locks need a session of their own, which a transaction-mode \
                     pooler does not keep: use GroupLocks::Lease"
                        .into(),
                ))
            }
            (_, Some(locks)) => locks,
            (Pooler::Transaction, None) => GroupLocks::Lease {
                ttl: POOLER_GROUP_LEASE,
            },
            (Pooler::Session, None) => GroupLocks::Advisory,
        };
        let target = ConnectOptions::parse(&self.url.0)?;
        let pool = Pool::builder()
            .max_size(self.max_connections)
            .connection_timeout(self.connection_timeout)
            .build_unchecked(Manager::new(target.clone(), self.role, self.pooler));
        Ok(PgBackend {
            pool,
            target,
            url: self.url,
            max_payload_bytes: self.max_payload_bytes,
            notify: self.notify,
            notify_limiter: Arc::new(NotifyLimiter::new(self.notify_window)),
            group_locks,
            pooler: self.pooler,
        })
    }
}

impl PgBackend {
    /// A builder for a backend on the database at `url` (a `postgres://` URL or a
    /// key=value string; TLS and passwords as libpq reads them: see [`ConnectOptions`]).
    pub fn builder(url: impl Into<String>) -> PgBackendBuilder {
        PgBackendBuilder {
            url: SecretUrl::from(url.into()),
            role: "pool".into(),
            max_connections: 10,
            connection_timeout: Duration::from_secs(10),
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            notify: true,
            notify_window: DEFAULT_NOTIFY_WINDOW,
            group_locks: None,
            pooler: Pooler::Session,
        }
    }

    /// How this backend locks ordered groups.
    pub fn group_locks(&self) -> GroupLocks {
        self.group_locks
    }

    /// What this backend was told sits between it and PostgreSQL.
    pub fn pooler(&self) -> Pooler {
        self.pooler
    }

    /// A backend with default settings.
    pub fn connect(url: impl Into<String>) -> Result<Self> {
        Self::builder(url).build()
    }

    /// The database URL this backend connects to.
    pub fn url(&self) -> &str {
        &self.url.0
    }

    /// How this backend reaches the database.
    pub fn connect_options(&self) -> &ConnectOptions {
        &self.target
    }

    /// Opens a dedicated connection (not from the pool) named `pgbus:<role>`.
    pub(crate) async fn dedicated(&self, role: &str) -> Result<Client> {
        self.target.connect(role).await
    }

    /// Pooled connections checked out right now (open minus idle).
    pub fn pool_in_use(&self) -> u32 {
        let state = self.pool.state();
        state.connections - state.idle_connections
    }

    /// How many of this backend's sends (and its clones') skipped their wake-up because
    /// the queue was notified within the [coalescing
    /// window](PgBackendBuilder::notify_coalescing); each is covered by a trailing notify.
    pub fn notifies_skipped(&self) -> u64 {
        self.notify_limiter.skipped()
    }

    /// The payload limit sends and publishes enforce.
    pub(crate) fn max_payload_bytes(&self) -> usize {
        self.max_payload_bytes
    }

    /// Whether sends and publishes wake listening workers.
    pub(crate) fn notifies(&self) -> bool {
        self.notify
    }

    pub(crate) fn pool(&self) -> &Pool<Manager> {
        &self.pool
    }

    pub(crate) async fn conn(&self) -> Result<PooledConnection<'_, Manager>> {
        self.pool.get().await.map_err(pool)
    }

    /// Applies missing migrations on a dedicated `pgbus:migrate` connection; safe to run
    /// from many processes at once. Returns the versions applied.
    pub async fn migrate(&self) -> Result<Vec<i64>> {
        self.migrate_and_grant(&[]).await
    }

    /// [`migrate`](Self::migrate), then grants each role in `roles` exactly what pgbus's
    /// run-time paths need (workers, producers, the dashboard, the relay, the scheduler):
    /// use of the `pgbus` schema, `SELECT, INSERT, UPDATE, DELETE` on its tables (only
    /// `SELECT` on its bookkeeping), its sequences and functions; no ownership, no DDL.
    /// The roles are recorded, and every later migration grants them its new objects too.
    /// Run it as the role that owns the schema.
    pub async fn migrate_and_grant(&self, roles: &[&str]) -> Result<Vec<i64>> {
        let mut client = self.dedicated("migrate").await?;
        migrate::migrate(&mut client, roles).await
    }

    /// Drops the `pgbus` schema and everything in it (queues, messages, dead letters,
    /// archive, streams, topics, schedules, the process registry; every object the
    /// migrations create lives there), on a dedicated `pgbus:uninstall` connection in one
    /// transaction under the migration lock. Refuses with [`Error::WorkersRegistered`]
    /// while worker processes with a heartbeat in the last 30 seconds are registered (see
    /// [`force_uninstall`](Self::force_uninstall)). Run it as the schema's owner. A
    /// database without the schema is left as it is (`schema_version: None`);
    /// [`migrate`](Self::migrate) installs it again.
    pub async fn uninstall(&self) -> Result<Uninstalled> {
        migrate::uninstall(&mut self.dedicated("uninstall").await?, false).await
    }

    /// [`uninstall`](Self::uninstall) even while workers are registered: their next
    /// statements fail (the schema is gone), so stop them first where you can.
    pub async fn force_uninstall(&self) -> Result<Uninstalled> {
        migrate::uninstall(&mut self.dedicated("uninstall").await?, true).await
    }

    /// Fails with [`Error::SchemaMismatch`] unless the schema is at [`SCHEMA_VERSION`].
    /// Runs on a dedicated `pgbus:check` connection, so a database that cannot be reached
    /// fails at once with the driver's reason (refused, authentication, TLS), where a pool
    /// checkout would only time out.
    pub async fn check_schema(&self) -> Result<()> {
        let found = migrate::schema_version(&self.dedicated("check").await?).await?;
        match found {
            Some(v) if v == SCHEMA_VERSION => Ok(()),
            other => Err(Error::SchemaMismatch {
                found: other.unwrap_or(0),
                expected: SCHEMA_VERSION,
            }),
        }
    }

    /// Sends one message on the caller's connection or transaction: with a transaction,
    /// the message exists only if it commits.
    pub async fn send_in(
        &self,
        client: &(impl GenericClient + Sync),
        queue: &QueueName,
        message: NewMessage,
    ) -> Result<MessageId> {
        let ids = self.send_batch_in(client, queue, vec![message]).await?;
        Ok(ids[0])
    }

    /// Sends many messages in one statement on the caller's connection or transaction.
    ///
    /// Every send (this, [`send_in`](Self::send_in) and the [`Producer`] methods) runs in
    /// a `pgbus.send` producer span; with the feature `otel` the messages carry its trace
    /// context in their headers (see [`pgbus_core::trace`]).
    pub async fn send_batch_in(
        &self,
        client: &(impl GenericClient + Sync),
        queue: &QueueName,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<MessageId>> {
        self.send_checked(client, None, queue, messages, self.notify)
            .await
    }

    /// Checks the messages, adds their trace context and sends them on `client`, which is
    /// `pooled` when the send runs on (and commits on) a pooled connection of its own:
    /// then the statement is the connection's prepared one.
    async fn send_checked(
        &self,
        client: &(impl GenericClient + Sync),
        pooled: Option<&PooledClient>,
        queue: &QueueName,
        mut messages: Vec<NewMessage>,
        notify: bool,
    ) -> Result<Vec<MessageId>> {
        for message in &messages {
            message.check(self.max_payload_bytes)?;
        }
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let span = telemetry::send_span(queue, messages.len());
        telemetry::inject(&span, &mut messages);
        self.insert(client, pooled, queue, messages, notify)
            .instrument(span)
            .await
    }

    /// The statement of a send, once the messages are checked and carry their trace
    /// context.
    async fn insert(
        &self,
        client: &(impl GenericClient + Sync),
        pooled: Option<&PooledClient>,
        queue: &QueueName,
        messages: Vec<NewMessage>,
        notify: bool,
    ) -> Result<Vec<MessageId>> {
        // Jobs with keys take their own statement, so plain sends pay nothing for them.
        if messages.iter().any(crate::unique::is_keyed) {
            return crate::unique::send_keyed(client, queue, messages, notify).await;
        }
        let bulk = messages.len() >= crate::bulk::BULK_MIN && self.pooler == Pooler::Session;
        if let Some(conn) = pooled.filter(|_| bulk) {
            return crate::bulk::send(conn, queue, &messages, notify).await;
        }
        let columns = Columns::new(queue, messages.iter());
        // One message takes the statement without arrays.
        let (send, params) = match columns.row_params(&notify) {
            Some(row) => (sql::SEND_ONE, row),
            None => (sql::SEND, columns.params(&notify)),
        };
        // On a pooled connection the statement is prepared once per connection (one
        // round trip per send, no parse or plan); in the caller's client it goes unnamed
        // with typed parameters (still one round trip, nothing left on its session).
        let statement = match pooled {
            Some(conn) => conn.reused(send).await.map_err(|e| send_error(queue, e))?,
            None => Arc::new(Reused::Unnamed(send)),
        };
        let rows = statement
            .query(client, &params)
            .await
            .map_err(|e| send_error(queue, e))?;
        Ok(rows.iter().map(|row| MessageId(row.get(0))).collect())
    }

    /// Deletes archived messages past their queue's retention, `batch` rows per statement
    /// so no statement holds many locks; returns how many were deleted.
    pub async fn prune_archive(&self, batch: usize) -> Result<u64> {
        let batch = positive(batch, "batch")?;
        let conn = self.conn().await?;
        let mut total = 0;
        loop {
            let deleted = conn
                .exec(sql::PRUNE_ARCHIVE, &[&batch])
                .await
                .map_err(|e| db("pruning the archive", e))?;
            total += deleted;
            if deleted < batch as u64 {
                return Ok(total);
            }
        }
    }

    /// Number of archived messages of a queue.
    pub async fn archived_count(&self, queue: &QueueName) -> Result<u64> {
        let row = self
            .conn()
            .await?
            .q_one(sql::ARCHIVED_COUNT, &[&queue.as_str()])
            .await
            .map_err(|e| db("counting archived messages", e))?;
        Ok(row.get::<_, i64>(0) as u64)
    }
}

/// Claims on the given connection with `statement` ([`sql::CLAIM`] or
/// [`sql::CLAIM_LIMITED`]) for process `holder`, restoring claim order, which `RETURNING`
/// does not keep.
pub(crate) async fn claim_on(
    client: &(impl GenericClient + Sync),
    statement: &Reused,
    queue: &QueueName,
    max: usize,
    lease: Duration,
    holder: Option<ProcessId>,
) -> Result<Vec<Message>> {
    let limit = positive(max, "claim size")?;
    check_delay("a lease", lease)?;
    let holder = holder.map(|id| id.0);
    let rows = statement
        .query(
            client,
            &[&queue.as_str(), &limit, &lease.as_secs_f64(), &holder],
        )
        .await
        .map_err(|e| db("claiming messages", e))?;
    if rows.is_empty() {
        ensure_exists(client, queue).await?;
        return Ok(Vec::new());
    }
    let mut claimed = rows
        .iter()
        .map(|row| {
            let was_visible: SystemTime = row.get("was_visible_at");
            Ok((was_visible, message_from(queue, row)?))
        })
        .collect::<Result<Vec<_>>>()?;
    claimed.sort_by_key(|(was_visible, m)| (Reverse(m.priority), *was_visible, m.id));
    Ok(claimed.into_iter().map(|(_, m)| m).collect())
}

/// A queue's settings, on the given connection.
pub(crate) async fn queue_info_on(
    client: &(impl GenericClient + Sync),
    name: &QueueName,
) -> Result<QueueInfo> {
    let row = client
        .q_opt(sql::QUEUE_INFO, &[&name.as_str()])
        .await
        .map_err(|e| db("reading a queue", e))?;
    match row {
        Some(row) => queue_info_from(&row),
        None => Err(Error::QueueNotFound(name.clone())),
    }
}

/// Fails with [`Error::QueueNotFound`] unless the queue exists. Called only after an
/// operation found nothing, to tell "empty" from "missing" without a cost on the busy path.
async fn ensure_exists(client: &(impl GenericClient + Sync), queue: &QueueName) -> Result<()> {
    let row = client
        .q_one(sql::QUEUE_EXISTS, &[&queue.as_str()])
        .await
        .map_err(|e| db("looking up the queue", e))?;
    if row.get(0) {
        Ok(())
    } else {
        Err(Error::QueueNotFound(queue.clone()))
    }
}

fn positive(n: usize, what: &str) -> Result<i64> {
    match i64::try_from(n) {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(Error::InvalidArgument(format!(
            "{what} must be between 1 and {}",
            i64::MAX
        ))),
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn attempts(value: i32) -> u32 {
    u32::try_from(value).unwrap_or(0)
}

/// Gives back claims that never started on `client` (see [`Consumer::release`]), waking
/// the queues that got messages back when `notify`; how many were given back.
pub(crate) async fn release_on(client: &Client, leases: &[Lease], notify: bool) -> Result<u64> {
    if leases.is_empty() {
        return Ok(0);
    }
    let (ids, attempts) = lease_arrays(leases);
    let row = client
        .q_one(sql::RELEASE, &[&ids, &attempts, &notify])
        .await
        .map_err(|e| db("releasing messages", e))?;
    Ok(u64::try_from(row.get::<_, i64>(0)).unwrap_or(0))
}

/// Opens a queue's circuit breaker on `client` (see [`QueueAdmin::trip_breaker`]).
pub(crate) async fn trip_breaker_on(
    client: &Client,
    name: &QueueName,
    backoff: Duration,
) -> Result<()> {
    let updated = client
        .exec(sql::TRIP_BREAKER, &[&name.as_str(), &backoff.as_secs_f64()])
        .await
        .map_err(|e| db("opening a circuit breaker", e))?;
    if updated == 0 {
        return Err(Error::QueueNotFound(name.clone()));
    }
    Ok(())
}

/// The row of [`sql::EXTEND`] or [`sql::EXTEND_FENCED`] for `leases`: how many were
/// extended, and the lost ones (the statement returns their positions, from 1, so two
/// leases of one message are told apart).
pub(crate) fn extension_from(row: &Row, leases: &[Lease]) -> Extension {
    let extended: i64 = row.get(0);
    let lost = row
        .get::<_, Vec<i64>>(1)
        .into_iter()
        .filter_map(|n| usize::try_from(n - 1).ok().and_then(|i| leases.get(i)))
        .copied()
        .collect();
    Extension::new(u64::try_from(extended).unwrap_or(0), lost)
}

pub(crate) fn lease_arrays(leases: &[Lease]) -> (Vec<i64>, Vec<i32>) {
    leases
        .iter()
        .map(|l| (l.id.0, i32::try_from(l.attempt).unwrap_or(i32::MAX)))
        .unzip()
}

fn selection(which: Selection<'_>) -> Option<Vec<i64>> {
    match which {
        Selection::All => None,
        Selection::Ids(ids) => Some(ids.iter().map(|id| id.0).collect()),
    }
}

/// A queue's name and settings as the parameters of `CREATE_QUEUE` and `ALTER_QUEUE`.
struct QueueColumns<'a> {
    name: &'a str,
    max_attempts: i32,
    retry_base_ms: i64,
    retry_cap_ms: i64,
    retry_jitter: f64,
    lease_ms: i64,
    keep_history: bool,
    archive_retention_ms: i64,
    breaker_failures: Option<i32>,
    breaker_backoff_ms: Option<i64>,
}

impl<'a> QueueColumns<'a> {
    fn new(name: &'a QueueName, options: &QueueOptions) -> Self {
        let r = &options.retry;
        let breaker = options.circuit_breaker;
        Self {
            name: name.as_str(),
            max_attempts: i32::try_from(r.max_attempts()).unwrap_or(i32::MAX),
            retry_base_ms: millis(r.base()),
            retry_cap_ms: millis(r.cap()),
            retry_jitter: r.jitter(),
            lease_ms: millis(options.lease),
            keep_history: options.keep_history,
            archive_retention_ms: millis(options.archive_retention),
            breaker_failures: breaker.map(|b| i32::try_from(b.failures).unwrap_or(i32::MAX)),
            breaker_backoff_ms: breaker.map(|b| millis(b.backoff)),
        }
    }

    /// The parameters `$1` to `$10`.
    fn params(&self) -> [&dyn Param; 10] {
        [
            &self.name,
            &self.max_attempts,
            &self.retry_base_ms,
            &self.retry_cap_ms,
            &self.retry_jitter,
            &self.lease_ms,
            &self.keep_history,
            &self.archive_retention_ms,
            &self.breaker_failures,
            &self.breaker_backoff_ms,
        ]
    }
}

fn queue_info_from(row: &Row) -> Result<QueueInfo> {
    let name = QueueName::new(row.get::<_, String>("name"))?;
    let retry = RetryPolicy::builder()
        .max_attempts(attempts(row.get("max_attempts")))
        .base(Duration::from_millis(
            row.get::<_, i64>("retry_base_ms") as u64
        ))
        .cap(Duration::from_millis(
            row.get::<_, i64>("retry_cap_ms") as u64
        ))
        .jitter(row.get("retry_jitter"))
        .build()?;
    let mut options = QueueOptions::default()
        .retry(retry)
        .lease(Duration::from_millis(row.get::<_, i64>("lease_ms") as u64))
        .keep_history(row.get("keep_history"))
        .archive_retention(Duration::from_millis(
            row.get::<_, i64>("archive_retention_ms") as u64,
        ));
    let failures: Option<i32> = row.get("breaker_failures");
    let backoff: Option<i64> = row.get("breaker_backoff_ms");
    if let (Some(failures), Some(ms)) = (failures, backoff) {
        options = options.circuit_breaker(CircuitBreaker::new(
            attempts(failures),
            Duration::from_millis(ms as u64),
        )?);
    }
    let mut info = QueueInfo::new(name, options);
    info.paused = row.get("paused");
    Ok(info)
}

impl QueueAdmin for PgBackend {
    async fn create_queue(&self, name: &QueueName, options: &QueueOptions) -> Result<bool> {
        let created = self
            .conn()
            .await?
            .exec(
                sql::CREATE_QUEUE,
                &QueueColumns::new(name, options).params(),
            )
            .await
            .map_err(|e| db("creating a queue", e))?;
        Ok(created == 1)
    }

    async fn alter_queue(&self, name: &QueueName, options: &QueueOptions) -> Result<()> {
        let altered = self
            .conn()
            .await?
            .exec(sql::ALTER_QUEUE, &QueueColumns::new(name, options).params())
            .await
            .map_err(|e| db("altering a queue", e))?;
        if altered == 0 {
            return Err(Error::QueueNotFound(name.clone()));
        }
        Ok(())
    }

    async fn drop_queue(&self, name: &QueueName) -> Result<bool> {
        let mut conn = self.conn().await?;
        // Read committed whatever the server's default: the messages' delete (a trigger's
        // statement, migration 19) must see the sends that the queue row's delete waited
        // for.
        let tx = conn
            .build_transaction()
            .isolation_level(IsolationLevel::ReadCommitted)
            .start()
            .await
            .map_err(|e| db("starting a queue drop", e))?;
        // The queue row's delete waits for every send that locked it (see migration 19)
        // and fails every later one; its trigger then deletes the messages with a fresh
        // snapshot, leaving none of the queue behind.
        let dropped = tx
            .exec(sql::DROP_QUEUE, &[&name.as_str()])
            .await
            .map_err(|e| db("dropping a queue", e))?;
        tx.commit()
            .await
            .map_err(|e| db("committing a queue drop", e))?;
        Ok(dropped == 1)
    }

    async fn trip_breaker(&self, name: &QueueName, backoff: Duration) -> Result<()> {
        trip_breaker_on(&**self.conn().await?, name, backoff).await
    }

    async fn set_paused(&self, name: &QueueName, paused: bool) -> Result<()> {
        let updated: i64 = self
            .conn()
            .await?
            .q_one(sql::SET_PAUSED, &[&name.as_str(), &paused])
            .await
            .map_err(|e| db("pausing or resuming a queue", e))?
            .get(0);
        if updated == 0 {
            return Err(Error::QueueNotFound(name.clone()));
        }
        Ok(())
    }

    async fn purge_queue(&self, name: &QueueName) -> Result<u64> {
        let conn = self.conn().await?;
        let purged = conn
            .exec(sql::PURGE_QUEUE, &[&name.as_str()])
            .await
            .map_err(|e| db("purging a queue", e))?;
        if purged == 0 {
            ensure_exists(&**conn, name).await?;
        }
        Ok(purged)
    }

    async fn queue_info(&self, name: &QueueName) -> Result<QueueInfo> {
        queue_info_on(&**self.conn().await?, name).await
    }

    async fn list_queues(&self) -> Result<Vec<QueueInfo>> {
        let rows = self
            .conn()
            .await?
            .q(sql::LIST_QUEUES, &[])
            .await
            .map_err(|e| db("listing queues", e))?;
        rows.iter().map(queue_info_from).collect()
    }
}

impl Producer for PgBackend {
    async fn send(&self, queue: &QueueName, message: NewMessage) -> Result<MessageId> {
        let ids = self.send_batch(queue, vec![message]).await?;
        Ok(ids[0])
    }

    async fn send_batch(
        &self,
        queue: &QueueName,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<MessageId>> {
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let notify = self.notify && self.notify_limiter.should_notify(queue);
        let conn = self.conn().await?;
        let ids = self
            .send_checked(&**conn, Some(&*conn), queue, messages, notify)
            .await?;
        drop(conn);
        if self.notify && !notify {
            // Committed (the statement ran on its own): its wake-up follows.
            self.notify_limiter.skipped_committed(queue, &self.pool);
        }
        Ok(ids)
    }
}

impl Consumer for PgBackend {
    async fn claim(&self, queue: &QueueName, max: usize, lease: Duration) -> Result<Vec<Message>> {
        let statement = Reused::Unnamed(sql::CLAIM);
        // A pooled claim is no worker's: its leases name no holder.
        claim_on(&**self.conn().await?, &statement, queue, max, lease, None).await
    }

    async fn ack(&self, leases: &[Lease]) -> Result<u64> {
        if leases.is_empty() {
            return Ok(0);
        }
        let (ids, attempts) = lease_arrays(leases);
        let conn = self.conn().await?;
        let ack = conn
            .reused(sql::ACK)
            .await
            .map_err(|e| db("preparing the ack", e))?;
        let row = ack
            .query_one(&**conn, &[&ids, &attempts])
            .await
            .map_err(|e| db("acking messages", e))?;
        Ok(row.get::<_, i64>(0) as u64)
    }

    async fn extend(&self, leases: &[Lease], lease: Duration) -> Result<Extension> {
        check_delay("a lease", lease)?;
        if leases.is_empty() {
            return Ok(Extension::default());
        }
        let (ids, attempts) = lease_arrays(leases);
        let row = self
            .conn()
            .await?
            .q_one(sql::EXTEND, &[&ids, &attempts, &lease.as_secs_f64()])
            .await
            .map_err(|e| db("extending leases", e))?;
        Ok(extension_from(&row, leases))
    }

    async fn nack(&self, lease: &Lease, delay: Duration, error: Option<&str>) -> Result<bool> {
        check_delay("a retry delay", delay)?;
        let error = error.map(storable);
        let error = error.as_deref();
        let (ids, attempts) = lease_arrays(std::slice::from_ref(lease));
        let updated = self
            .conn()
            .await?
            .exec(
                sql::NACK,
                &[&ids[0], &attempts[0], &delay.as_secs_f64(), &error],
            )
            .await
            .map_err(|e| db("returning a message", e))?;
        Ok(updated == 1)
    }

    async fn release(&self, leases: &[Lease]) -> Result<u64> {
        if leases.is_empty() {
            // Not even a pooled connection.
            return Ok(0);
        }
        release_on(&**self.conn().await?, leases, self.notify).await
    }

    async fn dead_letter(&self, lease: &Lease, reason: &str) -> Result<bool> {
        let reason = storable(reason);
        let (ids, attempts) = lease_arrays(std::slice::from_ref(lease));
        let moved = self
            .conn()
            .await?
            .exec(sql::DEAD_LETTER, &[&ids[0], &attempts[0], &&*reason])
            .await
            .map_err(|e| db("dead-lettering a message", e))?;
        Ok(moved == 1)
    }
}

impl DeadLetters for PgBackend {
    async fn list_dead(&self, queue: &QueueName, limit: usize) -> Result<Vec<DeadMessage>> {
        let limit = positive(limit, "limit")?;
        let conn = self.conn().await?;
        let rows = conn
            .q(sql::LIST_DEAD, &[&queue.as_str(), &limit])
            .await
            .map_err(|e| db("listing dead letters", e))?;
        if rows.is_empty() {
            ensure_exists(&**conn, queue).await?;
        }
        rows.iter()
            .map(|row| dead_message_from(queue, row))
            .collect()
    }

    async fn retry_dead(&self, queue: &QueueName, which: Selection<'_>) -> Result<u64> {
        let conn = self.conn().await?;
        let moved = conn
            .q_one(sql::RETRY_DEAD, &[&queue.as_str(), &selection(which)])
            .await
            .map_err(|e| db("retrying dead letters", e))?
            .get::<_, i64>(0) as u64;
        if moved == 0 {
            ensure_exists(&**conn, queue).await?;
        }
        Ok(moved)
    }

    async fn discard_dead(&self, queue: &QueueName, which: Selection<'_>) -> Result<u64> {
        let conn = self.conn().await?;
        let deleted = conn
            .exec(sql::DISCARD_DEAD, &[&queue.as_str(), &selection(which)])
            .await
            .map_err(|e| db("discarding dead letters", e))?;
        if deleted == 0 {
            ensure_exists(&**conn, queue).await?;
        }
        Ok(deleted)
    }
}

impl PgBackend {
    /// Which of `ids` are dead letters of `queue`, in no particular order; fails with
    /// [`Error::QueueNotFound`] when the queue does not exist. For a caller that refuses
    /// unknown ids before it retries or discards any (`pgbus dlq`), where
    /// [`DeadLetters::retry_dead`] skips them.
    pub async fn dead_letter_ids(
        &self,
        queue: &QueueName,
        ids: &[MessageId],
    ) -> Result<Vec<MessageId>> {
        let conn = self.conn().await?;
        let raw: Vec<i64> = ids.iter().map(|id| id.0).collect();
        let found: Vec<MessageId> = conn
            .q(sql::DEAD_IDS, &[&queue.as_str(), &raw])
            .await
            .map_err(|e| db("looking up dead letters", e))?
            .iter()
            .map(|row| MessageId(row.get(0)))
            .collect();
        if found.len() < ids.len() {
            ensure_exists(&**conn, queue).await?;
        }
        Ok(found)
    }
}

impl Stats for PgBackend {
    async fn stats(&self) -> Result<Vec<QueueStats>> {
        let rows = self
            .conn()
            .await?
            .q(sql::STATS, &[])
            .await
            .map_err(|e| db("reading queue stats", e))?;
        rows.iter().map(stats_from).collect()
    }

    async fn queue_stats(&self, queue: &QueueName) -> Result<QueueStats> {
        let row = self
            .conn()
            .await?
            .q_opt(sql::QUEUE_STATS, &[&queue.as_str()])
            .await
            .map_err(|e| db("reading queue stats", e))?;
        match row {
            Some(row) => stats_from(&row),
            None => Err(Error::QueueNotFound(queue.clone())),
        }
    }
}

/// A row of [`sql::STATS`] or [`sql::QUEUE_STATS`].
fn stats_from(row: &Row) -> Result<QueueStats> {
    let mut stats = QueueStats::new(QueueName::new(row.get::<_, String>(0))?);
    stats.paused = row.get(1);
    stats.ready = row.get::<_, i64>(2) as u64;
    stats.in_flight = row.get::<_, i64>(3) as u64;
    stats.scheduled = row.get::<_, i64>(4) as u64;
    stats.dead_lettered = row.get::<_, i64>(5) as u64;
    stats.oldest_ready_age = row.get::<_, Option<f64>>(6).map(seconds);
    stats.breaker_open_for = row.get::<_, Option<f64>>(7).map(seconds);
    stats.processed_per_minute = row.get::<_, i64>(8).max(0) as u64;
    stats.failed_per_minute = row.get::<_, i64>(9).max(0) as u64;
    stats.next_due_in = row.get::<_, Option<f64>>(10).map(seconds);
    Ok(stats)
}

/// Seconds Postgres computed as a duration: never negative, and saturating at
/// [`MAX_DELAY`] (a server with infinite intervals answers `Infinity`; NaN reads as zero),
/// so no stored value can make a stats read panic.
fn seconds(secs: f64) -> Duration {
    Duration::try_from_secs_f64(secs.clamp(0.0, MAX_DELAY.as_secs_f64())).unwrap_or_default()
}

pub(crate) fn message_from(queue: &QueueName, row: &Row) -> Result<Message> {
    let headers = headers_from(row);
    let mut m = Message::new(
        MessageId(row.get("id")),
        queue.clone(),
        row.get("payload"),
        ContentType::from_mime(row.get("content_type"))?,
    );
    m.headers = headers;
    m.priority = row.get("priority");
    m.enqueued_at = row.get("enqueued_at");
    m.attempts = attempts(row.get("attempts"));
    m.group_key = row.get("group_key");
    m.last_error = row.get("last_error");
    m.lease_expires_at = row.get("lease_until");
    Ok(m)
}

fn dead_message_from(queue: &QueueName, row: &Row) -> Result<DeadMessage> {
    let headers = headers_from(row);
    let mut d = DeadMessage::new(
        MessageId(row.get("id")),
        queue.clone(),
        row.get("payload"),
        ContentType::from_mime(row.get("content_type"))?,
        row.get("error"),
    );
    d.headers = headers;
    d.priority = row.get("priority");
    d.group_key = row.get("group_key");
    d.enqueued_at = row.get("enqueued_at");
    d.attempts = attempts(row.get("attempts"));
    d.failed_at = row.get("failed_at");
    d.limit_key = row.get("limit_key");
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_from_the_server_never_panic() {
        assert_eq!(seconds(1.5), Duration::from_millis(1500));
        assert_eq!(seconds(-3.0), Duration::ZERO);
        assert_eq!(seconds(f64::NAN), Duration::ZERO);
        assert_eq!(seconds(f64::INFINITY), MAX_DELAY);
        assert_eq!(seconds(1e300), MAX_DELAY);
        assert_eq!(seconds(f64::NEG_INFINITY), Duration::ZERO);
    }

    /// No claim can be planned on the console's `(queue, id)` index, whatever the
    /// statistics say: a generic claim plan once took it (after autovacuum analyzed a table
    /// of dead rows only, while a pinned xmin kept them) and sorted the whole backlog for
    /// each claim. The index's predicate (`id > 0`, true of every row) is one the claim
    /// never states, so even with the claim index gone the planner cannot pick it.
    #[tokio::test]
    async fn no_claim_can_use_the_consoles_index() {
        let db = crate::test_database().await;
        let backend = PgBackend::connect(db.url()).expect("backend");
        backend.migrate().await.expect("migrate");
        let mut client = crate::connect(db.url(), "test").await.expect("connect");
        client
            .batch_execute(
                "INSERT INTO pgbus.queues (name, max_attempts, retry_base_ms, retry_cap_ms,
                     retry_jitter, lease_ms, keep_history, archive_retention_ms)
                 SELECT 'q' || n, 5, 1000, 60000, 0.1, 30000, false, 0
                 FROM generate_series(1, 50) n;
                 INSERT INTO pgbus.messages (queue, visible_at, content_type, payload)
                 SELECT 'q' || (n % 50 + 1), now(), 'application/json', '\\x7b7d'::bytea
                 FROM generate_series(1, 50000) n;
                 ANALYZE pgbus.messages",
            )
            .await
            .expect("setup");
        let tx = client.transaction().await.expect("begin");
        tx.batch_execute(&format!(
            "DROP INDEX pgbus.messages_claim_idx;
             SET LOCAL plan_cache_mode = force_generic_plan;
             PREPARE claim_plan AS {}",
            sql::CLAIM
        ))
        .await
        .expect("prepare");
        let mut plan = Vec::new();
        for message in tx
            .simple_query("EXPLAIN EXECUTE claim_plan('q1', 50, 30.0, NULL)")
            .await
            .expect("explain")
        {
            if let tokio_postgres::SimpleQueryMessage::Row(row) = message {
                plan.push(row.get(0).unwrap_or_default().to_owned());
            }
        }
        let plan = plan.join("\n");
        assert!(!plan.contains("messages_queue_id_idx"), "{plan}");
        tx.rollback().await.expect("rollback");
    }

    /// One queue's stats read its rows through indexes: with sequential scans priced out,
    /// the plan still scans no table whole (a plan with no index for a table falls back
    /// to a sequential scan whatever its cost).
    #[tokio::test]
    async fn one_queues_stats_are_served_by_indexes() {
        let db = crate::test_database().await;
        let backend = PgBackend::connect(db.url()).expect("backend");
        backend.migrate().await.expect("migrate");
        let client = crate::connect(db.url(), "test").await.expect("connect");
        client
            .batch_execute("SET enable_seqscan = off")
            .await
            .expect("set");
        let explain = format!("EXPLAIN {}", sql::QUEUE_STATS);
        let plan: Vec<String> = client
            .query(&explain, &[&"jobs"])
            .await
            .expect("explain")
            .iter()
            .map(|row| row.get(0))
            .collect();
        let plan = plan.join("\n");
        assert!(!plan.contains("Seq Scan"), "{plan}");
        for index in [
            "messages_claim_idx",
            "messages_group_idx",
            "messages_limited_idx",
            // Either index led by the queue: `dead_letters_queue_idx` (queue, failed_at,
            // id) or the console's `dead_letters_queue_id_idx` (queue, id).
            "dead_letters_queue",
        ] {
            assert!(plan.contains(index), "{index} unused:\n{plan}");
        }
    }
}
