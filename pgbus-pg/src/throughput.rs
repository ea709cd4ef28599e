//! Throughput per queue (`pgbus.throughput`): 10-second buckets of the counts workers
//! report with their heartbeats, kept for an hour.

use std::time::{Duration, SystemTime};

use pgbus_core::{QueueName, QueueThroughput, Result, THROUGHPUT_BUCKET, THROUGHPUT_RETENTION};
use tokio_postgres::GenericClient;

use crate::error::db;
use crate::query::Typed;
use crate::topics::prune_in_batches;
use crate::{sql, PgBackend};

/// Rows per pruning statement.
const PRUNE_BATCH: usize = 1000;

/// One queue's counts in one bucket, for charts.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ThroughputPoint {
    /// The queue.
    pub queue: QueueName,
    /// When the bucket starts; it covers 10 seconds
    /// ([`THROUGHPUT_BUCKET`](pgbus_core::THROUGHPUT_BUCKET)).
    pub bucket: SystemTime,
    /// Messages finished (acked or discarded) in the bucket.
    pub processed: u64,
    /// Failed attempts (retried or dead-lettered) in the bucket.
    pub failed: u64,
}

fn count(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Adds the counts to the current buckets, then prunes buckets past retention.
pub(crate) async fn record(
    client: &(impl GenericClient + Sync),
    counts: &[QueueThroughput],
) -> Result<()> {
    if !counts.is_empty() {
        let queues: Vec<&str> = counts.iter().map(|c| c.queue.as_str()).collect();
        let processed: Vec<i64> = counts.iter().map(|c| count(c.processed)).collect();
        let failed: Vec<i64> = counts.iter().map(|c| count(c.failed)).collect();
        client
            .exec(
                sql::RECORD_THROUGHPUT,
                &[
                    &queues,
                    &processed,
                    &failed,
                    &THROUGHPUT_BUCKET.as_secs_f64(),
                ],
            )
            .await
            .map_err(|e| db("recording throughput", e))?;
    }
    prune_in_batches(
        client,
        sql::PRUNE_THROUGHPUT,
        THROUGHPUT_RETENTION,
        PRUNE_BATCH,
        "pruning throughput buckets",
    )
    .await?;
    Ok(())
}

impl PgBackend {
    /// Every queue's throughput buckets that started within `since` (at most an hour is
    /// kept), oldest bucket first, then by queue. Buckets with nothing reported are
    /// absent.
    pub async fn throughput_history(&self, since: Duration) -> Result<Vec<ThroughputPoint>> {
        let rows = self
            .conn()
            .await?
            .q(sql::THROUGHPUT_HISTORY, &[&since.as_secs_f64()])
            .await
            .map_err(|e| db("reading throughput history", e))?;
        rows.iter()
            .map(|row| {
                Ok(ThroughputPoint {
                    queue: QueueName::new(row.get::<_, String>("queue"))?,
                    bucket: row.get("bucket"),
                    processed: row.get::<_, i64>("processed").max(0) as u64,
                    failed: row.get::<_, i64>("failed").max(0) as u64,
                })
            })
            .collect()
    }
}
