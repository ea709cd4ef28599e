//! The queue contract: small capability traits every backend implements.

use std::future::Future;
use std::time::Duration;

use crate::{
    CircuitBreaker, DeadMessage, Extension, Lease, Message, MessageId, NewMessage, QueueName,
    Result, RetryPolicy,
};

/// How a queue behaves. Built with consuming setters; defaults suit most queues.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct QueueOptions {
    /// Retry policy, including the attempts before dead-lettering.
    pub retry: RetryPolicy,
    /// Default lease for claims (the worker's visibility timeout).
    pub lease: Duration,
    /// Keep acked messages in an archive instead of deleting them.
    pub keep_history: bool,
    /// How long archived messages are kept before pruning.
    pub archive_retention: Duration,
    /// Pauses the queue for a while after failures in a row; none by default.
    pub circuit_breaker: Option<CircuitBreaker>,
}

impl Default for QueueOptions {
    fn default() -> Self {
        Self {
            retry: RetryPolicy::default(),
            lease: Duration::from_secs(30),
            keep_history: false,
            archive_retention: Duration::from_secs(7 * 24 * 3600),
            circuit_breaker: None,
        }
    }
}

impl QueueOptions {
    /// Sets the retry policy.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }
    /// Sets the default lease.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease;
        self
    }
    /// Keeps acked messages in the archive.
    pub fn keep_history(mut self, keep: bool) -> Self {
        self.keep_history = keep;
        self
    }
    /// Sets the circuit breaker.
    pub fn circuit_breaker(mut self, breaker: CircuitBreaker) -> Self {
        self.circuit_breaker = Some(breaker);
        self
    }
    /// Sets how long archived messages are kept.
    pub fn archive_retention(mut self, retention: Duration) -> Self {
        self.archive_retention = retention;
        self
    }
}

/// A queue and its settings.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct QueueInfo {
    /// Queue name.
    pub name: QueueName,
    /// Settings.
    pub options: QueueOptions,
    /// Paused queues hand out no messages.
    pub paused: bool,
}

impl QueueInfo {
    /// A running (not paused) queue with these settings.
    pub fn new(name: QueueName, options: QueueOptions) -> Self {
        Self {
            name,
            options,
            paused: false,
        }
    }
}

/// Counts for one queue, taken at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueStats {
    /// Queue name.
    pub queue: QueueName,
    /// Whether the queue is paused.
    pub paused: bool,
    /// Visible now and not leased: what a claim would get.
    pub ready: u64,
    /// Claimed, with a lease that has not run out.
    pub in_flight: u64,
    /// Delayed or backing off: visible later.
    pub scheduled: u64,
    /// How long until the earliest scheduled message becomes visible (`None` when none is
    /// scheduled).
    pub next_due_in: Option<Duration>,
    /// In the dead-letter queue.
    pub dead_lettered: u64,
    /// How long the oldest ready message has been waiting.
    pub oldest_ready_age: Option<Duration>,
    /// While the queue's circuit breaker is open: how long until it resumes.
    pub breaker_open_for: Option<Duration>,
    /// Messages finished (acked or discarded) in the last minute, as workers reported
    /// them with their heartbeats.
    pub processed_per_minute: u64,
    /// Failed attempts (retried or dead-lettered) in the last minute, as workers reported
    /// them with their heartbeats.
    pub failed_per_minute: u64,
}

impl QueueStats {
    /// All counts zero.
    pub fn new(queue: QueueName) -> Self {
        Self {
            queue,
            paused: false,
            ready: 0,
            in_flight: 0,
            scheduled: 0,
            next_due_in: None,
            dead_lettered: 0,
            oldest_ready_age: None,
            breaker_open_for: None,
            processed_per_minute: 0,
            failed_per_minute: 0,
        }
    }

    /// Messages in the queue (ready, in flight and scheduled; not dead-lettered).
    pub fn depth(&self) -> u64 {
        self.ready + self.in_flight + self.scheduled
    }
}

/// Which dead-lettered messages an operation applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection<'a> {
    /// Every dead-lettered message of the queue.
    All,
    /// These ids only.
    Ids(&'a [MessageId]),
}

/// Creating, listing and managing queues.
pub trait QueueAdmin: Send + Sync {
    /// Creates the queue; returns `false` (and changes nothing) when it already exists.
    fn create_queue(
        &self,
        name: &QueueName,
        options: &QueueOptions,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Replaces the queue's settings; its messages, dead letters, archive and pause stay,
    /// and an open circuit breaker stays open unless `options` has none. Workers read a
    /// queue's retry policy, lease and breaker when they start, so running ones keep the
    /// old ones until they restart. Fails with
    /// [`Error::QueueNotFound`](crate::Error::QueueNotFound).
    fn alter_queue(
        &self,
        name: &QueueName,
        options: &QueueOptions,
    ) -> impl Future<Output = Result<()>> + Send;

    /// Drops the queue with its messages, dead letters and archive; `false` when it did
    /// not exist.
    fn drop_queue(&self, name: &QueueName) -> impl Future<Output = Result<bool>> + Send;

    /// Pauses (claims return nothing) or resumes the queue.
    fn set_paused(&self, name: &QueueName, paused: bool)
        -> impl Future<Output = Result<()>> + Send;

    /// Deletes every message of the queue (dead letters stay); returns how many.
    fn purge_queue(&self, name: &QueueName) -> impl Future<Output = Result<u64>> + Send;

    /// Opens the queue's circuit breaker: no claim hands out its messages, in any process,
    /// for `backoff` from now (on the backend's clock); then it resumes by itself.
    fn trip_breaker(
        &self,
        name: &QueueName,
        backoff: Duration,
    ) -> impl Future<Output = Result<()>> + Send;

    /// The queue's settings, or [`Error::QueueNotFound`](crate::Error::QueueNotFound).
    fn queue_info(&self, name: &QueueName) -> impl Future<Output = Result<QueueInfo>> + Send;

    /// Every queue, by name.
    fn list_queues(&self) -> impl Future<Output = Result<Vec<QueueInfo>>> + Send;
}

/// Sending messages.
pub trait Producer: Send + Sync {
    /// Sends one message.
    fn send(
        &self,
        queue: &QueueName,
        message: NewMessage,
    ) -> impl Future<Output = Result<MessageId>> + Send;

    /// Sends many messages in one round trip; ids are returned in input order. Either all
    /// are stored or none.
    fn send_batch(
        &self,
        queue: &QueueName,
        messages: Vec<NewMessage>,
    ) -> impl Future<Output = Result<Vec<MessageId>>> + Send;
}

/// Claiming and settling messages.
pub trait Consumer: Send + Sync {
    /// Claims up to `max` visible messages, highest priority first, then oldest, leasing
    /// each for `lease` and counting an attempt. A message whose lease runs out is
    /// claimable again (at-least-once delivery). Returns nothing for a paused queue.
    fn claim(
        &self,
        queue: &QueueName,
        max: usize,
        lease: Duration,
    ) -> impl Future<Output = Result<Vec<Message>>> + Send;

    /// Completes the deliveries (deleting the messages, or archiving them when the queue
    /// keeps history); returns how many leases were still current.
    fn ack(&self, leases: &[Lease]) -> impl Future<Output = Result<u64>> + Send;

    /// Extends current leases to run out `lease` from now. Reports how many were extended
    /// and which are lost (see [`Extension`]), so a worker can stop the jobs whose message
    /// was taken from them; a lease whose message is busy elsewhere is skipped, never
    /// waited for.
    fn extend(
        &self,
        leases: &[Lease],
        lease: Duration,
    ) -> impl Future<Output = Result<Extension>> + Send;

    /// Gives the message back, visible again after `delay`, recording `error`; `false`
    /// when the lease was no longer current.
    fn nack(
        &self,
        lease: &Lease,
        delay: Duration,
        error: Option<&str>,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Moves the message to the dead-letter queue with `reason`; `false` when the lease
    /// was no longer current.
    fn dead_letter(&self, lease: &Lease, reason: &str)
        -> impl Future<Output = Result<bool>> + Send;

    /// Gives back claims whose jobs never started (a worker's claimed-ahead messages when
    /// it stops): each lease ends and the attempt its claim counted is taken back, so the
    /// message is claimable at once, in the place it had (its visibility time is kept),
    /// with the attempts and last error it had before. Unlike a [`nack`](Self::nack), no
    /// attempt is used up and nothing is recorded. Returns how many leases were still
    /// current (a lease already settled, released or run out and claimed again is left
    /// alone).
    fn release(&self, leases: &[Lease]) -> impl Future<Output = Result<u64>> + Send;
}

/// Inspecting and recovering dead-lettered messages.
pub trait DeadLetters: Send + Sync {
    /// Dead-lettered messages of the queue, oldest failure first, at most `limit`.
    fn list_dead(
        &self,
        queue: &QueueName,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<DeadMessage>>> + Send;

    /// Puts dead-lettered messages back in the queue, visible now, attempts reset;
    /// returns how many.
    fn retry_dead(
        &self,
        queue: &QueueName,
        which: Selection<'_>,
    ) -> impl Future<Output = Result<u64>> + Send;

    /// Deletes dead-lettered messages for good; returns how many.
    fn discard_dead(
        &self,
        queue: &QueueName,
        which: Selection<'_>,
    ) -> impl Future<Output = Result<u64>> + Send;
}

/// Queue statistics.
pub trait Stats: Send + Sync {
    /// Counts for every queue, by name.
    fn stats(&self) -> impl Future<Output = Result<Vec<QueueStats>>> + Send;

    /// Counts for one queue, the same as its entry in [`stats`](Stats::stats), at a cost
    /// that does not grow with the other queues (what a loop watching a few queues polls).
    /// [`Error::QueueNotFound`](crate::Error::QueueNotFound) when it does not exist.
    fn queue_stats(&self, queue: &QueueName) -> impl Future<Output = Result<QueueStats>> + Send;
}

/// Completing a delivery inside a transaction the handler also writes in, so that its
/// database writes and the ack commit together or not at all.
pub trait TransactionalAck: Send + Sync {
    /// An open transaction; dropping it uncommitted rolls it back.
    type Tx: Send + 'static;

    /// Opens a transaction.
    fn begin(&self) -> impl Future<Output = Result<Self::Tx>> + Send;

    /// Acks `lease` inside `tx` and commits. When the lease is no longer current (it
    /// expired and the message was claimed again), rolls back instead and returns `false`:
    /// the handler's writes are undone along with the ack that cannot happen.
    fn ack_and_commit(
        &self,
        tx: Self::Tx,
        lease: &Lease,
    ) -> impl Future<Output = Result<bool>> + Send;
}
