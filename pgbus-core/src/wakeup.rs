//! Contracts for fetching on a dedicated connection and for wake-ups.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::{Message, ProcessId, QueueInfo, QueueName, Result};

/// A claimer that keeps one connection for itself (a worker's fetch loop), instead of
/// taking a pooled connection for every claim.
pub trait Fetcher: Send + 'static {
    /// Records the registered process whose worker claims through this fetcher: later
    /// claims name it as their lease holder, so operators see who runs a job (`None`:
    /// unknown). Backends that do not record lease holders ignore it.
    fn set_process(&mut self, process: Option<ProcessId>) {
        let _ = process;
    }

    /// Claims like [`Consumer::claim`](crate::Consumer::claim), on this fetcher's own
    /// connection.
    fn claim(
        &mut self,
        queue: &QueueName,
        max: usize,
        lease: Duration,
    ) -> impl Future<Output = Result<Vec<Message>>> + Send;

    /// Claims up to `max` visible messages that carry a limit key, as far as their keys'
    /// limits allow (see [`KeyLimit`](crate::KeyLimit)); [`claim`](Self::claim) never
    /// returns them. A backend without limits has none to return.
    fn claim_limited(
        &mut self,
        queue: &QueueName,
        max: usize,
        lease: Duration,
    ) -> impl Future<Output = Result<Vec<Message>>> + Send {
        let _ = (queue, max, lease);
        async { Ok(Vec::new()) }
    }

    /// The queue's settings, read on this fetcher's connection (so a worker needs no
    /// pooled connection to start).
    fn queue_info(&mut self, queue: &QueueName) -> impl Future<Output = Result<QueueInfo>> + Send;

    /// Groups of `queue` whose oldest message is visible now, oldest first, at most
    /// `limit`, leaving out `exclude` (the groups this process already runs). Takes no
    /// lock: a candidate may turn out locked elsewhere. A backend may look at a window of
    /// the queue's groups per call, going round them from call to call, so that a call's
    /// cost does not grow with the groups (Postgres: four times `limit`, 64 to 1,024
    /// groups); "oldest first" then holds within the window.
    fn group_candidates(
        &mut self,
        queue: &QueueName,
        limit: usize,
        exclude: &[String],
    ) -> impl Future<Output = Result<Vec<String>>> + Send;
}

/// Opening [`Fetcher`]s.
pub trait OpenFetcher: Send + Sync {
    /// The fetcher type.
    type Fetcher: Fetcher;

    /// Opens a fetcher with its own connection. After an error from it, drop it and open
    /// a new one.
    fn open_fetcher(&self) -> impl Future<Output = Result<Self::Fetcher>> + Send;
}

/// Called when a queue may have new work.
pub type WakeFn = Arc<dyn Fn() + Send + Sync + 'static>;

/// A source of "new work in queue X" signals (for Postgres: one LISTEN connection per
/// process). Workers subscribe for their queues; a source that cannot deliver signals
/// reports it through [`is_live`](Self::is_live), and workers fall back to polling.
pub trait WakeupSource: Send + Sync + 'static {
    /// Calls `wake` whenever one of `queues` may have new work, and after the source
    /// (re)connects (notifications may have been missed meanwhile). Returns a guard; the
    /// subscription ends when it is dropped.
    fn subscribe(&self, queues: &[QueueName], wake: WakeFn) -> Box<dyn Subscription>;

    /// Whether signals are being delivered now.
    fn is_live(&self) -> bool;
}

/// Keeps a [`WakeupSource`] subscription alive; dropping it unsubscribes.
pub trait Subscription: Send + Sync {}
