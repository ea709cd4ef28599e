//! Ordered groups: messages sharing a group key run one at a time, in send order, across
//! all workers and processes.
//!
//! The contract splits finding work from locking it (never lock inside a multi-row
//! query):
//! - the fetch connection lists candidate groups ([`Fetcher::group_candidates`](crate::Fetcher::group_candidates))
//!   and takes no lock;
//! - each in-flight group gets a [`GroupSession`] of its own (a dedicated connection for
//!   Postgres) that locks the group, claims its next run of messages, extends their
//!   leases, settles them (claiming the next run in the same round trip), and unlocks; no
//!   other task ever uses it;
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
///
/// A session claims a group's messages in runs: the group's oldest messages, in id order,
/// as far as each is visible now and not leased ([`claim`](Self::claim)). Its holder runs
/// them one after another and [`settle`](Self::settle)s them in one round trip, which can
/// also claim the next run, so a group of short jobs costs a round trip per run rather than
/// two per message.
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

    /// Claims the group's next run: up to `max` of its oldest messages, in id order,
    /// stopping before the first that is delayed or leased (so empty when the group is
    /// empty or its head is delayed or leased, or the queue is paused). Each claim counts
    /// an attempt. Only the lock holder claims: without the lock, the run is empty.
    fn claim(
        &mut self,
        queue: &QueueName,
        group: &str,
        lease: Duration,
        max: usize,
    ) -> impl Future<Output = Result<Vec<Message>>> + Send;

    /// Takes the group's lock and claims its next run (see [`claim`](Self::claim)); `None`
    /// when another session holds the lock. An empty run releases the lock again, so
    /// `Some(vec![])` leaves nothing held. Backends may do it all in one round trip.
    fn lock_and_claim(
        &mut self,
        queue: &QueueName,
        group: &str,
        lease: Duration,
        max: usize,
    ) -> impl Future<Output = Result<Option<Vec<Message>>>> + Send {
        async move {
            if !self.try_lock(queue, group).await? {
                return Ok(None);
            }
            let run = self.claim(queue, group, lease, max).await?;
            if run.is_empty() {
                self.unlock(queue, group).await?;
            }
            Ok(Some(run))
        }
    }

    /// How long the group's lock lasts without renewal, when it can lapse at all (a lease
    /// row; an advisory lock lasts as long as the session): the worker extends its leases,
    /// which renews the lock too, at least three times within it. `None` by default.
    fn lock_lasts(&self) -> Option<Duration> {
        None
    }

    /// Extends the leases of the session's claimed messages, or reports them lost (see
    /// [`Consumer::extend`](crate::Consumer::extend)); renews the group's lock too.
    fn extend(
        &mut self,
        leases: &[Lease],
        by: Duration,
    ) -> impl Future<Output = Result<Extension>> + Send;

    /// Settles claimed messages (acks, one failure, give-backs: see [`GroupSettle`]), then
    /// does what `then` says, all in one round trip. Each settlement acts only while its
    /// lease is current.
    fn settle(
        &mut self,
        settle: &GroupSettle,
        then: GroupNext<'_>,
    ) -> impl Future<Output = Result<Settled>> + Send;

    /// Settles what a failed session of this worker left behind, each only while its
    /// claim is current:
    /// - `finished`, messages whose handlers succeeded, are acked, as
    ///   [`Consumer::ack`](crate::Consumer::ack) does (one whose ack landed before the
    ///   failure is gone already);
    /// - `unstarted` claims are given back, as [`Consumer::release`](crate::Consumer::release)
    ///   does: the lease cleared and the attempt the claim counted taken back (one that
    ///   recovery freed meanwhile, counting that attempt, is left alone).
    ///
    /// Unlike [`settle`](Self::settle) it needs no lock on their group, since the failed
    /// session's may have gone with it. The group stays blocked by what came before them:
    /// the failed session's running message stays leased until recovery frees it.
    /// Returns how many were acked and how many given back.
    fn settle_orphans(
        &mut self,
        finished: &[Lease],
        unstarted: &[Lease],
    ) -> impl Future<Output = Result<(u64, u64)>> + Send;

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

/// What a [`GroupSession::settle`] writes: built with the consuming setters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GroupSettle {
    /// Messages whose handlers succeeded: acked.
    pub ack: Vec<Lease>,
    /// The message whose handler failed, if one did.
    pub failed: Option<(Lease, GroupFailure)>,
    /// Messages claimed but never started: given back untouched, their lease cleared and
    /// the attempt their claim counted taken back.
    pub give_back: Vec<Lease>,
}

impl GroupSettle {
    /// Acks `leases` too.
    pub fn ack(mut self, leases: impl IntoIterator<Item = Lease>) -> Self {
        self.ack.extend(leases);
        self
    }

    /// Gives the message back, visible after `delay`, with `error` recorded (the group
    /// waits for it).
    pub fn retry(mut self, lease: Lease, delay: Duration, error: Option<&str>) -> Self {
        let error = error.map(str::to_owned);
        self.failed = Some((lease, GroupFailure::Retry { delay, error }));
        self
    }

    /// Moves the message to the dead letters with `reason` (the group moves on).
    pub fn dead_letter(mut self, lease: Lease, reason: &str) -> Self {
        let reason = reason.to_owned();
        self.failed = Some((lease, GroupFailure::DeadLetter { reason }));
        self
    }

    /// Gives `leases` back untouched too.
    pub fn give_back(mut self, leases: impl IntoIterator<Item = Lease>) -> Self {
        self.give_back.extend(leases);
        self
    }

    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.ack.is_empty() && self.failed.is_none() && self.give_back.is_empty()
    }
}

/// How a failed group message is settled.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GroupFailure {
    /// Given back, visible after `delay`; the group waits for it.
    Retry {
        /// When it is due again.
        delay: Duration,
        /// The error, recorded as its last error and in its history.
        error: Option<String>,
    },
    /// Moved to the dead letters; the group moves on.
    DeadLetter {
        /// Why.
        reason: String,
    },
}

/// What a [`GroupSession::settle`] does after settling, in the same round trip.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum GroupNext<'a> {
    /// Keep the lock; claim nothing.
    Keep,
    /// Claim the group's next run (see [`GroupSession::claim`]); when it is empty, release
    /// the lock.
    Claim {
        /// The queue.
        queue: &'a QueueName,
        /// The group, whose lock the session holds.
        group: &'a str,
        /// The new claims' lease.
        lease: Duration,
        /// At most this many.
        max: usize,
    },
    /// Release the group's lock.
    Release {
        /// The queue.
        queue: &'a QueueName,
        /// The group, whose lock the session holds.
        group: &'a str,
    },
}

/// What a [`GroupSession::settle`] did.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct Settled {
    /// The acked messages (those whose lease was still current).
    pub acked: Vec<MessageId>,
    /// Whether the failed message was settled (its lease was still current).
    pub failed: bool,
    /// How many were given back.
    pub given_back: u64,
    /// The next run, for [`GroupNext::Claim`].
    pub claimed: Vec<Message>,
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
