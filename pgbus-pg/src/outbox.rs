//! The transactional outbox and its relay (`pgbus:relay`).
//!
//! Producers that cannot publish in their own transaction (they write to another database,
//! or through another client) insert rows into `pgbus.outbox` in that transaction, with
//! [`write_outbox`] or plain SQL. The relay publishes pending rows to topics and marks them
//! published. When the outbox is in the database it publishes to, both happen in one
//! transaction: each row is published exactly once, whenever the relay dies. An outbox in
//! another database ([`OutboxRelayBuilder::source_url`]) is relayed at least once: a relay
//! that dies after publishing and before marking publishes those rows again (with the
//! same event ids, which idempotent consumers recognise).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgbus_core::{ContentType, Error, EventId, NewEvent, Result, RetryPolicy, Topics};
use tokio_postgres::{Client, GenericClient, Row};
use tokio_util::sync::CancellationToken;

use crate::connect::{ConnectOptions, SecretUrl};
use crate::error::db;
use crate::headers::headers_from;
use crate::listener::{Notifications, NotifyConnection};
use crate::query::{Pooler, Typed};
use crate::topics::{prune_in_batches, EventColumns};
use crate::{sql, PgBackend};

/// Writes events to the outbox on the caller's connection or transaction (of the database
/// holding the outbox); the relay publishes them after the transaction commits. Returns
/// how many rows were written.
pub async fn write_outbox(
    client: &(impl GenericClient + Sync),
    events: Vec<NewEvent>,
) -> Result<u64> {
    for event in &events {
        // Checked here so a bad event fails its producer, not the relay later.
        event.check(usize::MAX)?;
    }
    let n = events.len();
    let columns = EventColumns::new(events, |e| e.headers.clone());
    client
        .query_typed(sql::WRITE_OUTBOX, &columns.params())
        .await
        .map_err(|e| db("writing to the outbox", e))?;
    Ok(n as u64)
}

/// Counts of what a relay did, shared with whoever watches it.
#[derive(Debug, Default)]
pub struct RelayStats {
    relayed: AtomicU64,
    failed: AtomicU64,
    batches: AtomicU64,
    connections: AtomicU64,
    pruned: AtomicU64,
}

impl RelayStats {
    /// Rows published (a row relayed again after a crash counts again).
    pub fn relayed(&self) -> u64 {
        self.relayed.load(Ordering::Relaxed)
    }
    /// Rows that could not be published, kept with their error.
    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }
    /// Batches committed.
    pub fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }
    /// Connections opened (1 + reconnections).
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
    /// Published rows pruned after the retention.
    pub fn pruned(&self) -> u64 {
        self.pruned.load(Ordering::Relaxed)
    }
}

/// Configures an [`OutboxRelay`]; see [`OutboxRelay::builder`].
#[derive(Debug, Clone)]
pub struct OutboxRelayBuilder {
    backend: PgBackend,
    source_url: Option<SecretUrl>,
    direct_url: Option<SecretUrl>,
    batch: usize,
    poll_interval: Duration,
    retention: Duration,
    prune_interval: Duration,
}

impl OutboxRelayBuilder {
    /// The database holding the outbox, when it is not the backend's (run `pgbus migrate`
    /// there to create `pgbus.outbox`). No transaction spans two databases, so rows are
    /// then relayed at least once: a relay that dies between publishing a batch and
    /// marking it publishes the batch again.
    pub fn source_url(mut self, url: impl Into<String>) -> Self {
        self.source_url = Some(SecretUrl::from(url.into()));
        self
    }
    /// The backend's own database reached directly, when the backend goes through a
    /// transaction-mode pooler: the relay's connection opens here so that it can LISTEN
    /// for inserts. The outbox is still the backend's, relayed exactly once.
    pub fn direct_url(mut self, url: impl Into<String>) -> Self {
        self.direct_url = Some(SecretUrl::from(url.into()));
        self
    }
    /// Rows per batch (one publish statement, one transaction); default 500.
    pub fn batch(mut self, rows: usize) -> Self {
        self.batch = rows;
        self
    }
    /// Longest wait between looks at the outbox when no notification comes; default 1 s.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval;
        self
    }
    /// How long published rows are kept; default 1 day.
    pub fn retention(mut self, retention: Duration) -> Self {
        self.retention = retention;
        self
    }
    /// How often published rows past the retention are pruned; default 1 minute.
    pub fn prune_interval(mut self, interval: Duration) -> Self {
        self.prune_interval = interval;
        self
    }
    /// Checks the settings.
    pub fn build(self) -> Result<OutboxRelay> {
        if self.batch == 0 || i64::try_from(self.batch).is_err() {
            return Err(Error::InvalidArgument(
                "outbox batch must be at least 1".into(),
            ));
        }
        if self.poll_interval.is_zero() || self.prune_interval.is_zero() {
            return Err(Error::InvalidArgument(
                "poll and prune intervals must be positive".into(),
            ));
        }
        if self.source_url.is_some() && self.direct_url.is_some() {
            return Err(Error::InvalidArgument(
                "an outbox relay takes a source URL (another database) or a direct URL (its \
                 own), not both"
                    .into(),
            ));
        }
        // Behind a transaction-mode pooler LISTEN does not work: relay on the poll interval
        // unless the relay's connection has a URL of its own (a direct one, or the outbox's
        // database).
        let own_url = self.source_url.as_ref().or(self.direct_url.as_ref());
        let listen = own_url.is_some() || self.backend.pooler() == Pooler::Session;
        let target = match own_url {
            Some(url) => ConnectOptions::parse(&url.0)?,
            None => self.backend.connect_options().clone(),
        };
        Ok(OutboxRelay {
            target,
            listen,
            same_database: self.source_url.is_none(),
            settings: self,
            stats: Arc::default(),
        })
    }
}

/// Publishes `pgbus.outbox` rows to topics: one dedicated `pgbus:relay` connection to the
/// outbox's database that LISTENs for inserts and takes pending rows with `FOR UPDATE SKIP
/// LOCKED` (so several relays share the work). An outbox in the backend's database is
/// published in the same transaction that marks its rows (exactly once); one in another
/// database is published through the backend's pool, then marked (at least once). Rows
/// are published in id order within a batch; across relays there is no order.
pub struct OutboxRelay {
    target: ConnectOptions,
    /// Whether to LISTEN for inserts (not behind a transaction-mode pooler).
    listen: bool,
    /// Whether the outbox is in the database events are published to, so that a batch is
    /// published and marked in one transaction.
    same_database: bool,
    settings: OutboxRelayBuilder,
    stats: Arc<RelayStats>,
}

impl std::fmt::Debug for OutboxRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxRelay")
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl OutboxRelay {
    /// A relay publishing through `backend`, reading the outbox of the same database
    /// unless [`source_url`](OutboxRelayBuilder::source_url) says otherwise.
    pub fn builder(backend: PgBackend) -> OutboxRelayBuilder {
        OutboxRelayBuilder {
            backend,
            source_url: None,
            direct_url: None,
            batch: 500,
            poll_interval: Duration::from_secs(1),
            retention: Duration::from_secs(24 * 3600),
            prune_interval: Duration::from_secs(60),
        }
    }

    /// What the relay has done so far.
    pub fn stats(&self) -> Arc<RelayStats> {
        Arc::clone(&self.stats)
    }

    /// Relays until `shutdown` is cancelled. A batch under way is finished first (a query
    /// is never abandoned mid-flight). Connection and database errors are logged; the
    /// relay backs off, reconnects and LISTENs again, and rows not marked published are
    /// relayed again.
    pub async fn run(self, shutdown: CancellationToken) -> Result<()> {
        let backoff = RetryPolicy::builder()
            .base(Duration::from_millis(100))
            .cap(Duration::from_secs(30))
            .jitter(0.3)
            .max_attempts(u32::MAX)
            .build()?;
        let mut failures = 0u32;
        while !shutdown.is_cancelled() {
            match self.session(&shutdown).await {
                Ok(()) => return Ok(()),
                Err(err) => {
                    failures += 1;
                    let delay = backoff.backoff(failures);
                    tracing::warn!(target: "pgbus::relay", error = %err.report(), retry_in = ?delay, "outbox relay failed; reconnecting");
                    tokio::select! {
                        _ = shutdown.cancelled() => {}
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        Ok(())
    }

    /// One connection's life: LISTEN, then relay batches until the outbox is drained,
    /// wait for a notification or the poll interval, and again.
    async fn session(&self, shutdown: &CancellationToken) -> Result<()> {
        let NotifyConnection {
            mut client,
            mut notifications,
            _driver,
        } = NotifyConnection::open(&self.target, "relay")
            .await
            .map_err(|e| connection_lost(format!("opening the pgbus:relay connection: {e}")))?;
        if self.listen {
            client
                .batch_execute(sql::LISTEN_OUTBOX)
                .await
                .map_err(|e| db("listening for outbox inserts", e))?;
        }
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        tracing::info!(target: "pgbus::relay", "relaying the outbox");
        let mut last_prune: Option<Instant> = None;
        while !shutdown.is_cancelled() {
            if self.relay_batch(&mut client).await? == self.settings.batch {
                continue;
            }
            if last_prune.is_none_or(|at| at.elapsed() >= self.settings.prune_interval) {
                let pruned = prune_in_batches(
                    &client,
                    sql::PRUNE_OUTBOX,
                    self.settings.retention,
                    self.settings.batch,
                    "pruning the outbox",
                )
                .await?;
                self.stats.pruned.fetch_add(pruned, Ordering::Relaxed);
                last_prune = Some(Instant::now());
            }
            wait(&mut notifications, shutdown, self.settings.poll_interval).await?;
        }
        Ok(())
    }

    /// Publishes one batch of pending rows and marks them, in one transaction on the relay
    /// connection (which publishes too when the outbox is in the same database); returns
    /// how many rows it took.
    async fn relay_batch(&self, client: &mut Client) -> Result<usize> {
        let tx = client
            .transaction()
            .await
            .map_err(|e| db("starting an outbox batch", e))?;
        let limit = self.settings.batch as i64;
        let rows = tx
            .q(sql::CLAIM_OUTBOX, &[&limit])
            .await
            .map_err(|e| db("reading the outbox", e))?;
        if rows.is_empty() {
            return Ok(0);
        }
        let max_payload = self.settings.backend.max_payload_bytes();
        let (mut ids, mut events, mut failed_ids, mut errors) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for row in &rows {
            let id: i64 = row.get("id");
            match event_from(row).and_then(|e| e.check(max_payload).map(|()| e)) {
                Ok(event) => {
                    ids.push(id);
                    events.push(event);
                }
                Err(err) => {
                    tracing::error!(target: "pgbus::relay", outbox_id = id, error = %err.report(), "outbox row cannot be published; kept with its error");
                    failed_ids.push(id);
                    errors.push(err.report());
                }
            }
        }
        if self.same_database {
            // Published in the transaction that marks the rows: both commit, or neither.
            self.settings.backend.publish_batch_in(&tx, events).await?;
        } else {
            // Another database: published (and committed) before the rows are marked, so a
            // crash in between publishes them again, never loses them.
            self.settings.backend.publish_batch(events).await?;
        }
        tx.exec(sql::MARK_OUTBOX_PUBLISHED, &[&ids])
            .await
            .map_err(|e| db("marking outbox rows published", e))?;
        if !failed_ids.is_empty() {
            tx.exec(sql::MARK_OUTBOX_FAILED, &[&failed_ids, &errors])
                .await
                .map_err(|e| db("recording outbox failures", e))?;
        }
        tx.commit()
            .await
            .map_err(|e| db("committing an outbox batch", e))?;
        self.stats
            .relayed
            .fetch_add(ids.len() as u64, Ordering::Relaxed);
        self.stats
            .failed
            .fetch_add(failed_ids.len() as u64, Ordering::Relaxed);
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        Ok(rows.len())
    }
}

impl PgBackend {
    /// Outbox rows not yet published (rows kept with an error left out).
    pub async fn outbox_pending(&self) -> Result<u64> {
        let row = self
            .conn()
            .await?
            .q_one(sql::OUTBOX_PENDING, &[])
            .await
            .map_err(|e| db("counting pending outbox rows", e))?;
        Ok(row.get::<_, i64>(0) as u64)
    }
}

/// Waits for an outbox notification, the poll interval, or shutdown; fails when the
/// connection ended.
async fn wait(
    notifications: &mut Notifications,
    shutdown: &CancellationToken,
    poll_interval: Duration,
) -> Result<()> {
    tokio::select! {
        _ = shutdown.cancelled() => Ok(()),
        _ = tokio::time::sleep(poll_interval) => Ok(()),
        message = notifications.recv() => match message {
            Some(Ok(_)) => {
                // Coalesce a burst of notifications into one look.
                while let Ok(Ok(_)) = notifications.try_recv() {}
                Ok(())
            }
            Some(Err(reason)) => Err(connection_lost(reason)),
            None => Err(connection_lost("connection closed".into())),
        },
    }
}

fn connection_lost(reason: String) -> Error {
    Error::Backend {
        message: format!("the pgbus:relay connection ended: {reason}"),
        transient: true,
        source: None,
    }
}

fn event_from(row: &Row) -> Result<NewEvent> {
    let headers = headers_from(row);
    let id: EventId = row.get::<_, &str>("event_id").parse()?;
    let mut event = NewEvent::raw(
        row.get::<_, String>("routing_key"),
        row.get("payload"),
        ContentType::from_mime(row.get("content_type"))?,
    )?
    .id(id);
    event.headers = headers;
    Ok(event)
}
