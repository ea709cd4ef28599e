//! Key limits on PostgreSQL: the `pgbus.limits` table and the limited claim.

use std::time::Duration;

use pgbus_core::{check_limit_key, KeyLimit, Limits, Message, ProcessId, QueueName, Result};
use tokio_postgres::Client;

use crate::backend::claim_on;
use crate::error::db;
use crate::query::{Pooler, Reused, Typed};
use crate::{sql, PgBackend};

impl Limits for PgBackend {
    async fn set_limit(&self, key: &str, limit: KeyLimit) -> Result<()> {
        check_limit_key(key)?;
        let limit = limit.build()?;
        let count = |n: u32| i32::try_from(n).unwrap_or(i32::MAX);
        let rate = limit.rate.map(|(n, _)| count(n));
        let interval = limit
            .rate
            .map(|(_, every)| i64::try_from(every.as_millis()).unwrap_or(i64::MAX));
        self.conn()
            .await?
            .exec(
                sql::SET_LIMIT,
                &[&key, &limit.concurrency.map(count), &rate, &interval],
            )
            .await
            .map_err(|e| db("setting a key limit", e))?;
        Ok(())
    }

    async fn remove_limit(&self, key: &str) -> Result<bool> {
        let removed = self
            .conn()
            .await?
            .exec(sql::REMOVE_LIMIT, &[&key])
            .await
            .map_err(|e| db("removing a key limit", e))?;
        Ok(removed == 1)
    }

    async fn limits(&self) -> Result<Vec<(String, KeyLimit)>> {
        let rows = self
            .conn()
            .await?
            .q(sql::LIST_LIMITS, &[])
            .await
            .map_err(|e| db("listing key limits", e))?;
        Ok(rows
            .iter()
            .map(|row| {
                let count = |n: i32| u32::try_from(n).unwrap_or(0);
                let mut limit = KeyLimit::default();
                limit.concurrency = row.get::<_, Option<i32>>(1).map(count);
                let rate: Option<i32> = row.get(2);
                let interval: Option<i64> = row.get(3);
                if let (Some(n), Some(ms)) = (rate, interval) {
                    limit.rate = Some((count(n), Duration::from_millis(ms.max(0) as u64)));
                }
                (row.get(0), limit)
            })
            .collect())
    }
}

/// The limited claim on a fetcher's connection for process `holder`, its statement prepared on first use (most
/// workers never see a limited job, and need not prepare it).
pub(crate) async fn claim_limited(
    client: &Client,
    statement: &mut Option<Reused>,
    pooler: Pooler,
    queue: &QueueName,
    max: usize,
    lease: Duration,
    holder: Option<ProcessId>,
) -> Result<Vec<Message>> {
    let statement = match statement {
        Some(statement) => statement,
        None => statement.insert(
            Reused::prepare(client, sql::CLAIM_LIMITED, pooler)
                .await
                .map_err(|e| db("preparing the limited claim", e))?,
        ),
    };
    claim_on(client, statement, queue, max, lease, holder).await
}
