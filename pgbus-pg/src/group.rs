//! Ordered groups on Postgres: candidates on the fetch connection, and per-group sessions
//! (`pgbus:group`) that own a session advisory lock.

use std::collections::HashSet;
use std::time::Duration;

use pgbus_core::{
    GroupRecovery, GroupSession, Lease, Message, OpenGroupSession, QueueName, Result,
};
use tokio_postgres::{Client, Statement};

use crate::backend::{lease_arrays, message_from};
use crate::connect::connect;
use crate::error::db;
use crate::{sql, PgBackend};

/// One in-flight group's own connection. It holds the group's session advisory lock, so no
/// other task ever uses it; dropping it closes the connection, which releases any lock it
/// still holds.
pub struct PgGroupSession {
    client: Client,
    claim_head: Statement,
    ack: Statement,
    /// Groups this session has locked: a session advisory lock is re-entrant, so locking
    /// twice would need two unlocks; the set keeps one lock per group.
    held: HashSet<(QueueName, String)>,
}

impl std::fmt::Debug for PgGroupSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgGroupSession")
            .field("held", &self.held)
            .finish_non_exhaustive()
    }
}

/// A group worker's recovery connection (`pgbus:recovery`), which also carries its process
/// heartbeats.
pub struct PgGroupRecovery {
    client: Client,
}

impl std::fmt::Debug for PgGroupRecovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgGroupRecovery").finish_non_exhaustive()
    }
}

impl PgGroupRecovery {
    pub(crate) fn client(&self) -> &Client {
        &self.client
    }
}

impl OpenGroupSession for PgBackend {
    type Session = PgGroupSession;
    type Recovery = PgGroupRecovery;

    async fn open_group_session(&self) -> Result<PgGroupSession> {
        let client = connect(self.url(), "group").await?;
        let claim_head = client
            .prepare(sql::CLAIM_GROUP_HEAD)
            .await
            .map_err(|e| db("preparing the group claim", e))?;
        let ack = client
            .prepare(sql::ACK)
            .await
            .map_err(|e| db("preparing the ack", e))?;
        Ok(PgGroupSession {
            client,
            claim_head,
            ack,
            held: HashSet::new(),
        })
    }

    async fn open_group_recovery(&self) -> Result<PgGroupRecovery> {
        Ok(PgGroupRecovery {
            client: connect(self.url(), "recovery").await?,
        })
    }
}

impl GroupSession for PgGroupSession {
    async fn try_lock(&mut self, queue: &QueueName, group: &str) -> Result<bool> {
        let key = (queue.clone(), group.to_owned());
        if self.held.contains(&key) {
            return Ok(true);
        }
        let locked: bool = self
            .client
            .query_one(sql::TRY_LOCK_GROUP, &[&queue.as_str(), &group])
            .await
            .map_err(|e| db("locking a group", e))?
            .get(0);
        if locked {
            self.held.insert(key);
        }
        Ok(locked)
    }

    async fn claim_head(
        &mut self,
        queue: &QueueName,
        group: &str,
        lease: Duration,
    ) -> Result<Option<Message>> {
        let row = self
            .client
            .query_opt(
                &self.claim_head,
                &[&queue.as_str(), &group, &lease.as_secs_f64()],
            )
            .await
            .map_err(|e| db("claiming a group's next message", e))?;
        row.map(|row| message_from(queue, &row)).transpose()
    }

    async fn extend(&mut self, lease: &Lease, by: Duration) -> Result<bool> {
        let (ids, attempts) = lease_arrays(std::slice::from_ref(lease));
        let extended = self
            .client
            .execute(sql::EXTEND, &[&ids, &attempts, &by.as_secs_f64()])
            .await
            .map_err(|e| db("extending a group lease", e))?;
        Ok(extended == 1)
    }

    async fn ack(&mut self, lease: &Lease) -> Result<bool> {
        let (ids, attempts) = lease_arrays(std::slice::from_ref(lease));
        let acked: i64 = self
            .client
            .query_one(&self.ack, &[&ids, &attempts])
            .await
            .map_err(|e| db("acking a group message", e))?
            .get(0);
        Ok(acked == 1)
    }

    async fn nack(&mut self, lease: &Lease, delay: Duration, error: Option<&str>) -> Result<bool> {
        let attempt = i32::try_from(lease.attempt).unwrap_or(i32::MAX);
        let updated = self
            .client
            .execute(
                sql::NACK,
                &[&lease.id.0, &attempt, &delay.as_secs_f64(), &error],
            )
            .await
            .map_err(|e| db("returning a group message", e))?;
        Ok(updated == 1)
    }

    async fn dead_letter(&mut self, lease: &Lease, reason: &str) -> Result<bool> {
        let attempt = i32::try_from(lease.attempt).unwrap_or(i32::MAX);
        let moved = self
            .client
            .execute(sql::DEAD_LETTER, &[&lease.id.0, &attempt, &reason])
            .await
            .map_err(|e| db("dead-lettering a group message", e))?;
        Ok(moved == 1)
    }

    async fn unlock(&mut self, queue: &QueueName, group: &str) -> Result<()> {
        if !self.held.remove(&(queue.clone(), group.to_owned())) {
            return Ok(());
        }
        self.client
            .query_one(sql::UNLOCK_GROUP, &[&queue.as_str(), &group])
            .await
            .map_err(|e| db("unlocking a group", e))?;
        Ok(())
    }
}

impl GroupRecovery for PgGroupRecovery {
    async fn recover(&mut self, queues: &[QueueName]) -> Result<u64> {
        let names: Vec<&str> = queues.iter().map(QueueName::as_str).collect();
        self.client
            .execute(sql::RECOVER_GROUPS, &[&names])
            .await
            .map_err(|e| db("recovering groups of dead owners", e))
    }
}
