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

use std::future::Future;
use std::time::Duration;

use crate::{Lease, Message, ProcessRegistry, QueueName, Result};

/// One in-flight group's own session.
pub trait GroupSession: Send + 'static {
    /// Tries to take the group's lock without waiting; `false` when another session holds
    /// it (the group is skipped).
    fn try_lock(
        &mut self,
        queue: &QueueName,
        group: &str,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Claims the group's oldest message if it is visible now (`None` when the group is
    /// empty or its head is delayed or leased). Only the lock holder may call it.
    fn claim_head(
        &mut self,
        queue: &QueueName,
        group: &str,
        lease: Duration,
    ) -> impl Future<Output = Result<Option<Message>>> + Send;

    /// Extends the lease of the running head; `false` when it is no longer current.
    fn extend(&mut self, lease: &Lease, by: Duration) -> impl Future<Output = Result<bool>> + Send;

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
    /// by any live session (the owner died); returns how many.
    fn recover(&mut self, queues: &[QueueName]) -> impl Future<Output = Result<u64>> + Send;
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
