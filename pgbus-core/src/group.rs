//! Ordered groups: messages sharing a group key run one at a time, in send order, across
//! all workers and processes.
//!
//! The contract splits finding work from locking it (never lock inside a multi-row
//! query):
//! - the fetch connection lists candidate groups ([`Fetcher::group_candidates`](crate::Fetcher::group_candidates))
//!   and takes no lock;
//! - each in-flight group gets a [`GroupSession`] of its own (a dedicated connection for
//!   Postgres) that locks the group, claims its head message, extends the lease, settles,
//!   and unlocks; no other task ever uses it;
//! - a [`GroupRecovery`] session finds groups whose owner died and makes their work
//!   claimable again, and carries the process's registry heartbeats so a group worker
//!   needs no pooled connection at all.
//!
//! Plain claims ([`Consumer::claim`](crate::Consumer::claim)) never return grouped
//! messages.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::{Duration, Instant};

use crate::{Extension, Lease, Message, MessageId, ProcessId, ProcessRegistry, QueueName, Result};

/// One in-flight group's own session.
pub trait GroupSession: Send + 'static {
    /// Tries to take the group's lock without waiting; `false` when another session holds
    /// it (the group is skipped).
    fn try_lock(
        &mut self,
        queue: &QueueName,
        group: &str,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Records the registered process whose worker claims on this session: later claims
    /// name it as their lease holder (`None`: unknown). Backends that do not record lease
    /// holders ignore it.
    fn set_process(&mut self, process: Option<ProcessId>) {
        let _ = process;
    }

    /// Claims the group's oldest message if it is visible now (`None` when the group is
    /// empty or its head is delayed or leased). Only the lock holder may call it.
    fn claim_head(
        &mut self,
        queue: &QueueName,
        group: &str,
        lease: Duration,
    ) -> impl Future<Output = Result<Option<Message>>> + Send;

    /// Extends the lease of the running head, or reports it lost (see
    /// [`Consumer::extend`](crate::Consumer::extend)).
    fn extend(
        &mut self,
        lease: &Lease,
        by: Duration,
    ) -> impl Future<Output = Result<Extension>> + Send;

    /// Acks the head; `false` when the lease was no longer current.
    fn ack(&mut self, lease: &Lease) -> impl Future<Output = Result<bool>> + Send;

    /// Gives the head back, visible after `delay` (the group waits for it).
    fn nack(
        &mut self,
        lease: &Lease,
        delay: Duration,
        error: Option<&str>,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Moves the head to the dead-letter queue (the group moves on).
    fn dead_letter(
        &mut self,
        lease: &Lease,
        reason: &str,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Opens the queue's circuit breaker for `backoff` (see
    /// [`QueueAdmin::trip_breaker`](crate::QueueAdmin::trip_breaker)), on this session so
    /// the group worker stays within its connection budget.
    fn trip_breaker(
        &mut self,
        queue: &QueueName,
        backoff: Duration,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Whether the session's connection is still open (checked often while a handler runs,
    /// so a group whose lock died with its connection stops its handler quickly).
    fn is_alive(&self) -> bool {
        true
    }

    /// Releases the group's lock. Call only after a successful [`try_lock`](Self::try_lock).
    fn unlock(&mut self, queue: &QueueName, group: &str)
        -> impl Future<Output = Result<()>> + Send;
}

/// The recovery session of a group worker, which also records its process heartbeats.
pub trait GroupRecovery: ProcessRegistry + Send + 'static {
    /// Makes claimable again the in-flight messages of `queues` whose group is not locked
    /// by any live session (the owner died), once an earlier pass of this session saw them
    /// so at least `grace` ago (see [`OrphanSightings`]). Backends whose group locks
    /// expire by themselves (leases) may free at once.
    fn recover(
        &mut self,
        queues: &[QueueName],
        grace: Duration,
    ) -> impl Future<Output = Result<Recovered>> + Send;
}

/// What one recovery pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Messages made claimable again.
    pub freed: u64,
    /// Messages found without their group's lock, not yet for the grace period: a later
    /// pass frees them if they are still so.
    pub waiting: u64,
}

/// The claims a recovery session has found orphaned (leased, their group unlocked), and
/// since when.
///
/// A lock vanishes the instant its connection dies, but the worker that held it notices
/// only at its next liveness check, and stops its handler then. Freeing the message at
/// first sight would let another worker run it beside that handler; freeing it only after
/// it has been seen orphaned for a grace period longer than the liveness check keeps the
/// group's handlers one at a time. A claim is `(message, attempt)`: a new claim of the
/// same message is a new sighting.
#[derive(Debug, Clone, Default)]
pub struct OrphanSightings {
    first_seen: HashMap<(MessageId, u32), Instant>,
}

impl OrphanSightings {
    /// The claims seen orphaned for at least `grace`: the ones to free now.
    pub fn due(&self, grace: Duration) -> HashSet<(MessageId, u32)> {
        self.first_seen
            .iter()
            .filter(|(_, seen)| seen.elapsed() >= grace)
            .map(|(claim, _)| *claim)
            .collect()
    }

    /// Records the claims this pass found orphaned and did not free, forgetting every
    /// other; returns how many are waiting.
    pub fn observe(&mut self, orphaned: impl IntoIterator<Item = (MessageId, u32)>) -> u64 {
        let now = Instant::now();
        let mut first_seen = HashMap::new();
        for claim in orphaned {
            let seen = self.first_seen.get(&claim).copied().unwrap_or(now);
            first_seen.insert(claim, seen);
        }
        self.first_seen = first_seen;
        self.first_seen.len() as u64
    }
}

/// Opening group sessions.
pub trait OpenGroupSession: Send + Sync {
    /// A group's session.
    type Session: GroupSession;
    /// The recovery session.
    type Recovery: GroupRecovery;

    /// Opens a session (for Postgres, a `pgbus:group` connection).
    fn open_group_session(&self) -> impl Future<Output = Result<Self::Session>> + Send;

    /// Opens the recovery session (for Postgres, a `pgbus:recovery` connection).
    fn open_group_recovery(&self) -> impl Future<Output = Result<Self::Recovery>> + Send;
}
