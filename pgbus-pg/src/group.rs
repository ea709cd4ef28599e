//! Ordered groups on Postgres: candidates on the fetch connection, and per-group sessions
//! (`pgbus:group`) that own a session advisory lock.

use std::collections::HashSet;
use std::time::Duration;

use pgbus_core::{
    check_delay, Extension, GroupFailure, GroupNext, GroupRecovery, GroupSession, GroupSettle,
    Lease, Message, MessageId, OpenGroupSession, OrphanSightings, ProcessId, QueueName, Recovered,
    Result, Settled,
};
use tokio_postgres::Client;

use crate::backend::{extension_from, lease_arrays, message_from, release_on, trip_breaker_on};
use crate::error::{db, storable};
use crate::group_locks::GroupLocks;
use crate::query::{Pooler, Reused, Typed};
use crate::{sql, PgBackend};

/// One in-flight group's own connection. In advisory mode it holds the group's session
/// advisory lock, so no other task ever uses it; dropping it closes the connection, which
/// releases any lock it still holds. In lease mode it owns lease rows under its token.
pub struct PgGroupSession {
    client: Client,
    /// [`sql::GROUP_STEP`] or its fenced twin: every claim and settlement.
    step: Reused,
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
        let pooler = self.pooler();
        // Postgres plans a prepared statement anew for its first five runs before it keeps
        // a generic plan: for the group statement about 1 ms of planning a run (2–3 times
        // its execution), on every new session, which a group worker opens by the dozen.
        // Its generic plan is as good as any (see `hot_plans`). Behind a transaction-mode
        // pooler a session setting would leak to the next client: planned each time there.
        if pooler == Pooler::Session {
            client
                .batch_execute("SET plan_cache_mode = force_generic_plan")
                .await
                .map_err(|e| db("configuring the group connection", e))?;
        }
        let (step_sql, lease) = match self.group_locks() {
            GroupLocks::Advisory => (sql::GROUP_STEP, None),
            GroupLocks::Lease { ttl } => {
                let token: String = client
                    .q_one("SELECT gen_random_uuid()::text", &[])
                    .await
                    .map_err(|e| db("making a lease token", e))?
                    .get(0);
                (sql::GROUP_STEP_FENCED, Some((token, ttl)))
            }
        };
        let step = Reused::prepare(&client, step_sql, pooler)
            .await
            .map_err(|e| db("preparing the group statement", e))?;
        Ok(PgGroupSession {
            client,
            step,
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

    /// Runs [`sql::GROUP_STEP`]: `take` the lock first, settle `settle`, claim up to `max`
    /// (when `claim` names the queue, group and lease) and `release` the lock when nothing
    /// was claimed. Returns whether the lock is held (taken or kept) and what was done.
    async fn step(
        &mut self,
        take: bool,
        settle: &GroupSettle,
        claim: Option<(&QueueName, &str, Duration, usize)>,
        release: bool,
    ) -> Result<(bool, Settled)> {
        let (queue, group, lease, max) = match claim {
            Some((queue, group, lease, max)) => (Some(queue), Some(group), lease, max),
            None => (None, None, Duration::ZERO, 0),
        };
        check_delay("a lease", lease)?;
        let (failed_id, failed_attempt, retry_secs, failed_text) = match &settle.failed {
            Some((lease, failure)) => {
                let (secs, text) = match failure {
                    GroupFailure::Retry { delay, error } => {
                        check_delay("a retry delay", *delay)?;
                        (Some(delay.as_secs_f64()), error.as_deref().map(storable))
                    }
                    GroupFailure::DeadLetter { reason } => (None, Some(storable(reason))),
                    _ => (None, None),
                };
                let attempt = i32::try_from(lease.attempt).unwrap_or(i32::MAX);
                (Some(lease.id.0), Some(attempt), secs, text)
            }
            None => (None, None, None, None),
        };
        let failed_text = failed_text.as_deref();
        let (ack_ids, ack_attempts) = lease_arrays(&settle.ack);
        let (back_ids, back_attempts) = lease_arrays(&settle.give_back);
        let queue_name = queue.map(QueueName::as_str);
        let max = i64::try_from(max).unwrap_or(i64::MAX);
        let secs = lease.as_secs_f64();
        let holder = self.process;
        let params: [&dyn crate::query::Param; 15] = [
            &queue_name,
            &group,
            &take,
            &ack_ids,
            &ack_attempts,
            &failed_id,
            &failed_attempt,
            &retry_secs,
            &failed_text,
            &back_ids,
            &back_attempts,
            &max,
            &secs,
            &holder,
            &release,
        ];
        let rows = match &self.lease {
            None => self.step.query(&self.client, &params).await,
            Some((token, ttl)) => {
                let ttl = ttl.as_secs_f64();
                let mut fenced: Vec<&dyn crate::query::Param> = params.to_vec();
                fenced.extend([token as &dyn crate::query::Param, &ttl]);
                self.step.query(&self.client, &fenced).await
            }
        }
        .map_err(|e| db("settling and claiming a group's messages", e))?;
        // The gate's row is always there, claimed messages or not.
        let first = rows.first().ok_or_else(|| pgbus_core::Error::Backend {
            message: "the group statement returned no row".to_owned(),
            transient: false,
            source: None,
        })?;
        let held: bool = first.get("held");
        let mut settled = Settled::default();
        settled.acked = first
            .get::<_, Vec<i64>>("acked")
            .into_iter()
            .map(MessageId)
            .collect();
        settled.failed = first.get("failed");
        settled.given_back = u64::try_from(first.get::<_, i64>("given_back")).unwrap_or(0);
        if let Some(queue) = queue {
            for row in &rows {
                if row.get::<_, Option<i64>>("id").is_some() {
                    settled.claimed.push(message_from(queue, row)?);
                }
            }
        }
        Ok((held, settled))
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

    async fn claim(
        &mut self,
        queue: &QueueName,
        group: &str,
        lease: Duration,
        max: usize,
    ) -> Result<Vec<Message>> {
        // Only the lock holder claims (in advisory mode the statement trusts the session).
        if !self.held.contains(&(queue.clone(), group.to_owned())) {
            return Ok(Vec::new());
        }
        let claim = Some((queue, group, lease, max));
        let (_, settled) = self
            .step(false, &GroupSettle::default(), claim, false)
            .await?;
        Ok(settled.claimed)
    }

    async fn lock_and_claim(
        &mut self,
        queue: &QueueName,
        group: &str,
        lease: Duration,
        max: usize,
    ) -> Result<Option<Vec<Message>>> {
        let key = (queue.clone(), group.to_owned());
        if self.held.contains(&key) {
            return self.claim(queue, group, lease, max).await.map(Some);
        }
        let claim = Some((queue, group, lease, max));
        let (held, settled) = self
            .step(true, &GroupSettle::default(), claim, false)
            .await?;
        if !held {
            return Ok(None);
        }
        self.held.insert(key);
        if settled.claimed.is_empty() {
            // A stale candidate: its run was claimed or settled since it was listed.
            self.unlock(queue, group).await?;
        }
        Ok(Some(settled.claimed))
    }

    fn lock_lasts(&self) -> Option<Duration> {
        self.lease.as_ref().map(|(_, ttl)| *ttl)
    }

    async fn extend(&mut self, leases: &[Lease], by: Duration) -> Result<Extension> {
        check_delay("a lease", by)?;
        self.renew().await?;
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
        .map_err(|e| db("extending group leases", e))?;
        Ok(extension_from(&row, leases))
    }

    async fn settle(&mut self, settle: &GroupSettle, then: GroupNext<'_>) -> Result<Settled> {
        let (claim, release) = match then {
            GroupNext::Claim {
                queue,
                group,
                lease,
                max,
            } => (Some((queue, group, lease, max)), Some((queue, group))),
            GroupNext::Release { queue, group } => (
                Some((queue, group, Duration::ZERO, 0)),
                Some((queue, group)),
            ),
            _ => (None, None),
        };
        // Only a lock this session holds is released (an unlock of another's would warn),
        // and only its holder claims.
        let key = release.map(|(queue, group)| (queue.clone(), group.to_owned()));
        let holds = key.as_ref().is_some_and(|key| self.held.contains(key));
        let claim = claim.filter(|_| holds);
        let (_, settled) = self.step(false, settle, claim, holds).await?;
        if let Some(key) = key {
            if settled.claimed.is_empty() {
                self.held.remove(&key);
            }
        }
        Ok(settled)
    }

    async fn settle_orphans(
        &mut self,
        finished: &[Lease],
        unstarted: &[Lease],
    ) -> Result<(u64, u64)> {
        let mut acked = 0;
        if !finished.is_empty() {
            let (ids, attempts) = lease_arrays(finished);
            let row = self
                .client
                .q_one(sql::ACK, &[&ids, &attempts])
                .await
                .map_err(|e| db("acking what a failed group session finished", e))?;
            acked = u64::try_from(row.get::<_, i64>(0)).unwrap_or(0);
        }
        // No wake-up: the group worker wakes itself, and their group's head usually stays
        // leased until recovery frees it.
        let given_back = release_on(&self.client, unstarted, false).await?;
        Ok((acked, given_back))
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
            .q(sql::RECOVER_GROUPS, &[&ids, &attempts, &names])
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
    /// Its oldest leased message: the running one, or one whose ack is on its way (a
    /// group's session leases a run of messages).
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
