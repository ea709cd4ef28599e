//! The fetch loop's own connection (`pgbus:fetch`), with the claim statement prepared once
//! (unless a transaction-mode pooler rules that out).

use std::collections::HashMap;
use std::time::Duration;

use pgbus_core::{Fetcher, Message, OpenFetcher, ProcessId, QueueInfo, QueueName, Result};
use tokio_postgres::Client;

use crate::backend::claim_on;
use crate::error::db;
use crate::query::{Pooler, Reused, Typed};
use crate::{sql, PgBackend};

/// The fetch connection's session settings (why the first two: in `open_fetcher`).
///
/// `enable_seqscan = off` because the claim's generic plan is made once, at the first
/// claim, often on an empty table: with no pages, a scan of the whole table looked cheaper
/// than fetching the picked rows by tuple id, and the plan stayed until autovacuum next
/// touched the table, reading the whole backlog on every claim meanwhile (the
/// `hot_plans` test). Every statement here has an index or a tuple id to go by; the
/// setting only prices the scan out, it forbids nothing.
pub(crate) const FETCH_SESSION_SETTINGS: &str = "SET synchronous_commit = off; \
     SET plan_cache_mode = force_generic_plan; SET enable_seqscan = off";

/// A dedicated connection for a worker's claims: one backend session for the life of the
/// fetch loop instead of a pool checkout per claim. Drop it after an error and open a new
/// one.
pub struct PgFetcher {
    client: Client,
    pooler: Pooler,
    claim: Reused,
    claim_limited: Option<Reused>,
    /// The registered process its claims name as their lease holder.
    process: Option<ProcessId>,
    /// Per queue, the group where the next candidate window starts (see
    /// [`sql::GROUP_CANDIDATES`]).
    group_windows: HashMap<QueueName, String>,
}

/// Groups one candidate call looks at, for `limit` candidates: a few times the free
/// sessions, so groups locked elsewhere or running here leave enough behind.
fn group_window(limit: usize) -> i64 {
    i64::try_from(limit.saturating_mul(4).clamp(64, 1024)).unwrap_or(1024)
}

impl std::fmt::Debug for PgFetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgFetcher").finish_non_exhaustive()
    }
}

impl OpenFetcher for PgBackend {
    type Fetcher = PgFetcher;

    async fn open_fetcher(&self) -> Result<PgFetcher> {
        let client = self.dedicated("fetch").await?;
        let pooler = self.pooler();
        // A claim lost in a crash only means the message is delivered again when its lease
        // would have run out anyway: claims need not wait for the WAL flush. Postgres
        // plans a prepared claim anew each time (its generic plan looks costlier with the
        // claim size unknown), which cost about a tenth of a drain's database time; the
        // claim's generic plan is as good as any (see `sql::CLAIM`), and the few other
        // statements here are key lookups (the limited claim keeps custom plans: see
        // migration 14). Behind a transaction-mode pooler a session setting would leak to
        // whichever client gets the server session next, so claims there commit durably
        // and are planned each time.
        if pooler == Pooler::Session {
            client
                .batch_execute(FETCH_SESSION_SETTINGS)
                .await
                .map_err(|e| db("configuring the fetch connection", e))?;
        }
        let claim = Reused::prepare(&client, sql::CLAIM, pooler)
            .await
            .map_err(|e| db("preparing the claim statement", e))?;
        Ok(PgFetcher {
            client,
            pooler,
            claim,
            claim_limited: None,
            process: None,
            group_windows: HashMap::new(),
        })
    }
}

impl Fetcher for PgFetcher {
    fn set_process(&mut self, process: Option<ProcessId>) {
        self.process = process;
    }

    async fn queue_info(&mut self, queue: &QueueName) -> Result<QueueInfo> {
        crate::backend::queue_info_on(&self.client, queue).await
    }

    async fn group_candidates(
        &mut self,
        queue: &QueueName,
        limit: usize,
        exclude: &[String],
    ) -> Result<Vec<String>> {
        let window = group_window(limit);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let start = self.group_windows.get(queue).map_or("", String::as_str);
        let row = self
            .client
            .q_one(
                sql::GROUP_CANDIDATES,
                &[&queue.as_str(), &limit, &exclude, &start, &window],
            )
            .await
            .map_err(|e| db("finding candidate groups", e))?;
        let candidates: Vec<String> = row.get(0);
        match row.get::<_, Option<String>>(1) {
            Some(last) => self.group_windows.insert(queue.clone(), last),
            None => self.group_windows.remove(queue),
        };
        Ok(candidates)
    }

    async fn claim(
        &mut self,
        queue: &QueueName,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Message>> {
        claim_on(&self.client, &self.claim, queue, max, lease, self.process).await
    }

    async fn claim_limited(
        &mut self,
        queue: &QueueName,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Message>> {
        crate::limits::claim_limited(
            &self.client,
            &mut self.claim_limited,
            self.pooler,
            queue,
            max,
            lease,
            self.process,
        )
        .await
    }
}
