//! The fetch loop's own connection (`pgbus:fetch`), with the claim statement prepared once.

use std::time::Duration;

use pgbus_core::{Fetcher, Message, OpenFetcher, QueueInfo, QueueName, Result};
use tokio_postgres::{Client, Statement};

use crate::backend::claim_on;
use crate::connect::connect;
use crate::error::db;
use crate::{sql, PgBackend};

/// A dedicated connection for a worker's claims: one backend session for the life of the
/// fetch loop instead of a pool checkout per claim. Drop it after an error and open a new
/// one.
pub struct PgFetcher {
    client: Client,
    claim: Statement,
    claim_limited: Option<Statement>,
}

impl std::fmt::Debug for PgFetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgFetcher").finish_non_exhaustive()
    }
}

impl OpenFetcher for PgBackend {
    type Fetcher = PgFetcher;

    async fn open_fetcher(&self) -> Result<PgFetcher> {
        let client = connect(self.url(), "fetch").await?;
        // A claim lost in a crash only means the message is delivered again when its lease
        // would have run out anyway: claims need not wait for the WAL flush. Postgres
        // plans a prepared claim anew each time (its generic plan looks costlier with the
        // claim size unknown), which cost about a tenth of a drain's database time; the
        // claim's generic plan is as good as any (see `sql::CLAIM`), and the few other
        // statements here are key lookups (the limited claim keeps custom plans: see
        // migration 14).
        client
            .batch_execute("SET synchronous_commit = off; SET plan_cache_mode = force_generic_plan")
            .await
            .map_err(|e| db("configuring the fetch connection", e))?;
        let claim = client
            .prepare(sql::CLAIM)
            .await
            .map_err(|e| db("preparing the claim statement", e))?;
        Ok(PgFetcher {
            client,
            claim,
            claim_limited: None,
        })
    }
}

impl Fetcher for PgFetcher {
    async fn queue_info(&mut self, queue: &QueueName) -> Result<QueueInfo> {
        crate::backend::queue_info_on(&self.client, queue).await
    }

    async fn group_candidates(
        &mut self,
        queue: &QueueName,
        limit: usize,
        exclude: &[String],
    ) -> Result<Vec<String>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .client
            .query(sql::GROUP_CANDIDATES, &[&queue.as_str(), &limit, &exclude])
            .await
            .map_err(|e| db("finding candidate groups", e))?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    async fn claim(
        &mut self,
        queue: &QueueName,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Message>> {
        claim_on(&self.client, &self.claim, queue, max, lease).await
    }

    async fn claim_limited(
        &mut self,
        queue: &QueueName,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Message>> {
        crate::limits::claim_limited(&self.client, &mut self.claim_limited, queue, max, lease).await
    }
}
