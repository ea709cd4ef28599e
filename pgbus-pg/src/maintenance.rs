//! The maintenance loop: prunes the archive, the dedup records and the event log so they
//! do not grow forever.
//!
//! Safe to run in any number of processes at once: every prune is one short statement that
//! takes at most a batch of rows with `FOR UPDATE SKIP LOCKED` and deletes them. A pruner
//! never waits for a row another pruner (or a consumer claiming a dedup record) has locked,
//! so concurrent runs share the rows instead of blocking or deadlocking; a batch that
//! comes back short because another process holds the rest simply ends that table's pass.

use std::time::Duration;

use pgbus_core::{check_delay, Deduplication, Error, Result, Topics};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::PgBackend;

const TARGET: &str = "pgbus::maintenance";

/// Configures a [`Maintenance`] loop; see [`Maintenance::builder`].
#[derive(Debug, Clone)]
pub struct MaintenanceBuilder {
    backend: PgBackend,
    dedup_retention: Duration,
    event_log_retention: Duration,
    interval: Duration,
    batch: usize,
}

impl MaintenanceBuilder {
    /// How long dedup records of idempotent consumers are kept after their last change;
    /// default 7 days. An event redelivered after its record is pruned runs again, so keep
    /// it longer than any redelivery (a lost ack, an outbox row relayed twice) can take.
    pub fn dedup_retention(mut self, retention: Duration) -> Self {
        self.dedup_retention = retention;
        self
    }
    /// How long events stay in the event log (what a new binding with a start position
    /// can replay); default 7 days.
    pub fn event_log_retention(mut self, retention: Duration) -> Self {
        self.event_log_retention = retention;
        self
    }
    /// Time between passes; default 1 minute. The first pass runs at start.
    pub fn interval(mut self, interval: Duration) -> Self {
        self.interval = interval;
        self
    }
    /// Rows deleted per statement; default 1,000.
    pub fn batch(mut self, rows: usize) -> Self {
        self.batch = rows;
        self
    }
    /// Checks the settings.
    pub fn build(self) -> Result<Maintenance> {
        if self.batch == 0 {
            return Err(Error::InvalidArgument(
                "maintenance batch must be at least 1".into(),
            ));
        }
        if self.interval.is_zero() {
            return Err(Error::InvalidArgument(
                "maintenance interval must be positive".into(),
            ));
        }
        if self.dedup_retention.is_zero() {
            return Err(Error::InvalidArgument(
                "dedup retention must be positive (a pruned record no longer stops a duplicate)"
                    .into(),
            ));
        }
        check_delay("dedup retention", self.dedup_retention)?;
        check_delay("event log retention", self.event_log_retention)?;
        Ok(Maintenance {
            backend: self.backend,
            dedup_retention: self.dedup_retention,
            event_log_retention: self.event_log_retention,
            interval: self.interval,
            batch: self.batch,
        })
    }
}

/// Prunes, every interval, archived messages past their queue's retention, dedup records
/// and event-log entries past theirs, with the backend's own pruning
/// ([`PgBackend::prune_archive`], [`Deduplication::prune_dedup`],
/// [`Topics::prune_event_log`]): each table in batches until a batch comes back short,
/// every batch one short statement on one pooled connection, so a pass never holds many
/// locks. Errors are logged as warnings and the next interval tries again.
#[derive(Debug)]
pub struct Maintenance {
    backend: PgBackend,
    dedup_retention: Duration,
    event_log_retention: Duration,
    interval: Duration,
    batch: usize,
}

/// Rows one pass deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Pruned {
    /// Archived messages past their queue's retention.
    pub archive: u64,
    /// Dedup records past the dedup retention.
    pub dedup: u64,
    /// Event-log entries past the event-log retention.
    pub event_log: u64,
}

/// What a pass prunes.
#[derive(Debug, Clone, Copy)]
enum Table {
    Archive,
    Dedup,
    EventLog,
}

impl Table {
    const ALL: [Table; 3] = [Table::Archive, Table::Dedup, Table::EventLog];

    fn name(self) -> &'static str {
        match self {
            Table::Archive => "archive",
            Table::Dedup => "dedup",
            Table::EventLog => "event_log",
        }
    }
}

impl Maintenance {
    /// A maintenance loop on `backend`'s pool.
    pub fn builder(backend: PgBackend) -> MaintenanceBuilder {
        MaintenanceBuilder {
            backend,
            dedup_retention: Duration::from_secs(7 * 24 * 3600),
            event_log_retention: Duration::from_secs(7 * 24 * 3600),
            interval: Duration::from_secs(60),
            batch: 1000,
        }
    }

    /// Prunes now and then every interval until `stop` is cancelled. A table's pruning
    /// under way is finished (its statements are short), no further table is started.
    pub async fn run(self, stop: CancellationToken) {
        let mut ticks = tokio::time::interval(self.interval);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                _ = ticks.tick() => {}
            }
            self.pass(&stop).await;
        }
        tracing::debug!(target: TARGET, "maintenance stopped");
    }

    /// One pass over every table now, returning what it pruned or the first error (the
    /// loop of [`run`](Self::run) logs errors instead and goes on with the other tables).
    pub async fn prune_once(&self) -> Result<Pruned> {
        Ok(Pruned {
            archive: self.prune(Table::Archive).await?,
            dedup: self.prune(Table::Dedup).await?,
            event_log: self.prune(Table::EventLog).await?,
        })
    }

    /// One pass over every table; a table that fails does not keep the others waiting.
    async fn pass(&self, stop: &CancellationToken) {
        let mut pruned = [0u64; 3];
        for (table, count) in Table::ALL.into_iter().zip(&mut pruned) {
            if stop.is_cancelled() {
                break;
            }
            match self.prune(table).await {
                Ok(n) => *count = n,
                Err(err) => tracing::warn!(
                    target: TARGET,
                    table = table.name(),
                    error = %err.report(),
                    retry_in = ?self.interval,
                    "pruning failed"
                ),
            }
        }
        let [archive, dedup, event_log] = pruned;
        if archive + dedup + event_log > 0 {
            tracing::info!(target: TARGET, archive, dedup, event_log, "pruned");
        } else {
            tracing::debug!(target: TARGET, "nothing to prune");
        }
    }

    /// Prunes `table` a batch at a time until a batch comes back short.
    async fn prune(&self, table: Table) -> Result<u64> {
        match table {
            Table::Archive => self.backend.prune_archive(self.batch).await,
            Table::Dedup => {
                self.backend
                    .prune_dedup(self.dedup_retention, self.batch)
                    .await
            }
            Table::EventLog => {
                self.backend
                    .prune_event_log(self.event_log_retention, self.batch)
                    .await
            }
        }
    }
}
