//! Idempotent consumers' two-phase dedup records on Postgres.

use std::time::Duration;

use pgbus_core::{DedupClaim, Deduplication, EventId, Lease, QueueName, Result};

use crate::backend::lease_arrays;
use crate::error::db;
use crate::query::Typed;
use crate::topics::prune_in_batches;
use crate::{sql, PgBackend};

impl Deduplication for PgBackend {
    async fn claim_event(
        &self,
        subscriber: &QueueName,
        event: EventId,
        lease: &Lease,
    ) -> Result<DedupClaim> {
        let (ids, attempts) = lease_arrays(std::slice::from_ref(lease));
        let row = self
            .conn()
            .await?
            .q_opt(
                sql::CLAIM_EVENT,
                &[
                    &subscriber.as_str(),
                    &event.to_string(),
                    &ids[0],
                    &attempts[0],
                ],
            )
            .await
            .map_err(|e| db("claiming an event's dedup record", e))?;
        Ok(match row.as_ref().map(|r| r.get::<_, &str>(0)) {
            Some("run") => DedupClaim::Run,
            Some("done") => DedupClaim::Done,
            _ => DedupClaim::Busy,
        })
    }

    async fn complete_event(
        &self,
        subscriber: &QueueName,
        event: EventId,
        lease: &Lease,
    ) -> Result<bool> {
        let (ids, attempts) = lease_arrays(std::slice::from_ref(lease));
        let updated = self
            .conn()
            .await?
            .exec(
                sql::COMPLETE_EVENT,
                &[
                    &subscriber.as_str(),
                    &event.to_string(),
                    &ids[0],
                    &attempts[0],
                ],
            )
            .await
            .map_err(|e| db("completing an event's dedup record", e))?;
        Ok(updated == 1)
    }

    async fn prune_dedup(&self, retention: Duration, batch: usize) -> Result<u64> {
        let conn = self.conn().await?;
        prune_in_batches(
            &**conn,
            sql::PRUNE_DEDUP,
            retention,
            batch,
            "pruning dedup records",
        )
        .await
    }
}
