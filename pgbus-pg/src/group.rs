//! Ordered groups on Postgres: candidates on the fetch connection, and per-group sessions
//! (`pgbus:group`) that own a session advisory lock.

use std::collections::HashSet;
use std::time::Duration;

use pgbus_core::{
    check_delay, Extension, GroupRecovery, GroupSession, Lease, Message, MessageId,
    OpenGroupSession, OrphanSightings, ProcessId, QueueName, Recovered, Result,
};
use tokio_postgres::Client;

use crate::backend::{extension_from, lease_arrays, message_from, trip_breaker_on};
use crate::error::{db, storable};
use crate::group_locks::GroupLocks;
use crate::query::{Reused, Typed};
use crate::{sql, PgBackend};

/// One in-flight group's own connection. In advisory mode it holds the group's session
/// advisory lock, so no other task ever uses it; dropping it closes the connection, which
/// releases any lock it still holds. In lease mode it owns lease rows under its token.
pub struct PgGroupSession {
    client: Client,
    claim_head: Reused,
    ack: Reused,
    /// Lease mode: this session's owner token and lease length.
    lease: Option<(String, Duration)>,
    /// Groups this session has locked: a session advisory lock is re-entrant, so locking
    /// twice would need two unlocks; the set keeps one lock per group.
    held: HashSet<(QueueName, String)>,
    /// The registered process its claims name as their lease holder.
    process: Option<i64>,
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
    locks: GroupLocks,
    sightings: OrphanSightings,
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
        let client = self.dedicated("group").await?;
        let (claim_sql, ack_sql, lease) = match self.group_locks() {
            GroupLocks::Advisory => (sql::CLAIM_GROUP_HEAD, sql::ACK, None),
            GroupLocks::Lease { ttl } => {
                let token: String = client
                    .q_one("SELECT gen_random_uuid()::text", &[])
                    .await
                    .map_err(|e| db("making a lease token", e))?
                    .get(0);
                (
                    sql::CLAIM_GROUP_HEAD_FENCED,
                    sql::ACK_FENCED,
                    Some((token, ttl)),
                )
            }
        };
        let claim_head = Reused::prepare(&client, claim_sql, self.pooler())
            .await
            .map_err(|e| db("preparing the group claim", e))?;
        let ack = Reused::prepare(&client, ack_sql, self.pooler())
            .await
            .map_err(|e| db("preparing the ack", e))?;
        Ok(PgGroupSession {
            client,
            claim_head,
            ack,
            lease,
            held: HashSet::new(),
            process: None,
        })
    }

    async fn open_group_recovery(&self) -> Result<PgGroupRecovery> {
        Ok(PgGroupRecovery {
            client: self.dedicated("recovery").await?,
            locks: self.group_locks(),
            sightings: OrphanSightings::default(),
        })
    }
}

impl PgGroupSession {
    /// Lease mode: renews every lease this session owns (a no-op in advisory mode).
    async fn renew(&self) -> Result<()> {
        if let Some((token, ttl)) = &self.lease {
            self.client
                .exec(sql::RENEW_GROUP_LEASES, &[token, &ttl.as_secs_f64()])
                .await
                .map_err(|e| db("renewing group leases", e))?;
        }
        Ok(())
    }

    fn token(&self) -> Option<&String> {
        self.lease.as_ref().map(|(token, _)| token)
    }
}

impl GroupSession for PgGroupSession {
    fn is_alive(&self) -> bool {
        !self.client.is_closed()
    }

    fn set_process(&mut self, process: Option<ProcessId>) {
        self.process = process.map(|id| id.0);
    }

    async fn try_lock(&mut self, queue: &QueueName, group: &str) -> Result<bool> {
        let key = (queue.clone(), group.to_owned());
        if self.held.contains(&key) {
            return Ok(true);
        }
        let locked = match &self.lease {
            None => self
                .client
                .q_one(sql::TRY_LOCK_GROUP, &[&queue.as_str(), &group])
                .await
                .map_err(|e| db("locking a group", e))?
                .get(0),
            Some((token, ttl)) => self
                .client
                .q_opt(
                    sql::TRY_LEASE_GROUP,
                    &[&queue.as_str(), &group, token, &ttl.as_secs_f64()],
                )
                .await
                .map_err(|e| db("leasing a group", e))?
                .is_some(),
        };
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
        check_delay("a lease", lease)?;
        self.renew().await?;
        let secs = lease.as_secs_f64();
        let holder = self.process;
        let row = match self.token() {
            None => {
                self.claim_head
                    .query_opt(&self.client, &[&queue.as_str(), &group, &secs, &holder])
                    .await
            }
            Some(token) => {
                self.claim_head
                    .query_opt(
                        &self.client,
                        &[&queue.as_str(), &group, &secs, token, &holder],
                    )
                    .await
            }
        }
        .map_err(|e| db("claiming a group's next message", e))?;
        row.map(|row| message_from(queue, &row)).transpose()
    }

    async fn extend(&mut self, lease: &Lease, by: Duration) -> Result<Extension> {
        check_delay("a lease", by)?;
        self.renew().await?;
        let leases = std::slice::from_ref(lease);
        let (ids, attempts) = lease_arrays(leases);
        let secs = by.as_secs_f64();
        let row = match self.token() {
            None => {
                self.client
                    .q_one(sql::EXTEND, &[&ids, &attempts, &secs])
                    .await
            }
            Some(token) => {
                self.client
                    .q_one(sql::EXTEND_FENCED, &[&ids, &attempts, &secs, token])
                    .await
            }
        }
        .map_err(|e| db("extending a group lease", e))?;
        Ok(extension_from(&row, leases))
    }

    async fn ack(&mut self, lease: &Lease) -> Result<bool> {
        let (ids, attempts) = lease_arrays(std::slice::from_ref(lease));
        let acked: i64 = match self.token() {
            None => self.ack.query_one(&self.client, &[&ids, &attempts]).await,
            Some(token) => {
                self.ack
                    .query_one(&self.client, &[&ids, &attempts, token])
                    .await
            }
        }
        .map_err(|e| db("acking a group message", e))?
        .get(0);
        Ok(acked == 1)
    }

    async fn nack(&mut self, lease: &Lease, delay: Duration, error: Option<&str>) -> Result<bool> {
        check_delay("a retry delay", delay)?;
        let error = error.map(storable);
        let error = error.as_deref();
        let attempt = i32::try_from(lease.attempt).unwrap_or(i32::MAX);
        let secs = delay.as_secs_f64();
        let updated = match self.token() {
            None => {
                self.client
                    .exec(sql::NACK, &[&lease.id.0, &attempt, &secs, &error])
                    .await
            }
            Some(token) => {
                self.client
                    .exec(
                        sql::NACK_FENCED,
                        &[&lease.id.0, &attempt, &secs, &error, token],
                    )
                    .await
            }
        }
        .map_err(|e| db("returning a group message", e))?;
        Ok(updated == 1)
    }

    async fn dead_letter(&mut self, lease: &Lease, reason: &str) -> Result<bool> {
        let reason = &*storable(reason);
        let attempt = i32::try_from(lease.attempt).unwrap_or(i32::MAX);
        let moved = match self.token() {
            None => {
                self.client
                    .exec(sql::DEAD_LETTER, &[&lease.id.0, &attempt, &reason])
                    .await
            }
            Some(token) => {
                self.client
                    .exec(
                        sql::DEAD_LETTER_FENCED,
                        &[&lease.id.0, &attempt, &reason, token],
                    )
                    .await
            }
        }
        .map_err(|e| db("dead-lettering a group message", e))?;
        Ok(moved == 1)
    }

    async fn trip_breaker(&mut self, queue: &QueueName, backoff: Duration) -> Result<()> {
        trip_breaker_on(&self.client, queue, backoff).await
    }

    async fn unlock(&mut self, queue: &QueueName, group: &str) -> Result<()> {
        if !self.held.remove(&(queue.clone(), group.to_owned())) {
            return Ok(());
        }
        match self.token() {
            None => self
                .client
                .q_one(sql::UNLOCK_GROUP, &[&queue.as_str(), &group])
                .await
                .map(|_| ()),
            Some(token) => self
                .client
                .exec(sql::RELEASE_GROUP_LEASE, &[&queue.as_str(), &group, token])
                .await
                .map(|_| ()),
        }
        .map_err(|e| db("unlocking a group", e))
    }
}

impl GroupRecovery for PgGroupRecovery {
    async fn recover(&mut self, queues: &[QueueName], grace: Duration) -> Result<Recovered> {
        let names: Vec<&str> = queues.iter().map(QueueName::as_str).collect();
        if let GroupLocks::Lease { .. } = self.locks {
            // An expired lease already is the grace period: free at once.
            let row = self
                .client
                .q_one(sql::RECOVER_LEASED_GROUPS, &[&names])
                .await
                .map_err(|e| db("recovering groups of dead owners", e))?;
            return Ok(Recovered {
                freed: row.get::<_, i64>(0) as u64,
                waiting: 0,
            });
        }
        let due = self.sightings.due(grace);
        let ids: Vec<i64> = due.iter().map(|(id, _)| id.0).collect();
        let attempts: Vec<i32> = due
            .iter()
            .map(|(_, attempt)| i32::try_from(*attempt).unwrap_or(i32::MAX))
            .collect();
        let rows = self
            .client
            .q(sql::RECOVER_GROUPS, &[&names, &ids, &attempts])
            .await
            .map_err(|e| db("recovering groups of dead owners", e))?;
        let mut freed = 0;
        let mut waiting = Vec::new();
        for row in &rows {
            if row.get::<_, bool>("freed") {
                freed += 1;
            } else {
                let attempt = u32::try_from(row.get::<_, i32>("attempts")).unwrap_or(0);
                waiting.push((MessageId(row.get("id")), attempt));
            }
        }
        let waiting = self.sightings.observe(waiting);
        Ok(Recovered { freed, waiting })
    }
}

/// A group with a message running now.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupInFlight {
    /// The queue.
    pub queue: String,
    /// The group key.
    pub group: String,
    /// The running message.
    pub message: MessageId,
    /// Its attempt.
    pub attempt: u32,
    /// When its lease runs out unless renewed.
    pub lease_until: std::time::SystemTime,
}

impl PgBackend {
    /// The groups with a message running now (at most `limit`), by queue and group.
    pub async fn groups_in_flight(&self, limit: usize) -> Result<Vec<GroupInFlight>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .conn()
            .await?
            .q(sql::GROUPS_IN_FLIGHT, &[&limit])
            .await
            .map_err(|e| db("listing groups in flight", e))?;
        Ok(rows
            .iter()
            .map(|row| GroupInFlight {
                queue: row.get("queue"),
                group: row.get("group_key"),
                message: MessageId(row.get("id")),
                attempt: u32::try_from(row.get::<_, i32>("attempts")).unwrap_or(0),
                lease_until: row.get("lease_until"),
            })
            .collect())
    }
}
