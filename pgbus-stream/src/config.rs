//! How an [`Instance`](crate::Instance) is tuned.

use std::sync::Arc;
use std::time::Duration;

/// Called by the dispatcher after each message it handled (tests use it to check that no
/// pooled connection is held between iterations).
pub type IterationHook = Arc<dyn Fn() + Send + Sync>;

/// Tuning of an [`Instance`](crate::Instance).
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Config {
    /// How often every connection gets a keep-alive comment.
    pub heartbeat: Duration,
    /// How long a connection's queue may stay full before the client is dropped (checked
    /// on each heartbeat).
    pub write_deadline: Duration,
    /// A connection that received no event for this long is closed (the browser
    /// reconnects with its last id), which also reaps half-open connections.
    pub idle_timeout: Duration,
    /// Frames queued per connection before it counts as lagging.
    pub queue_capacity: usize,
    /// Events read per statement when replaying or fanning out.
    pub read_batch: usize,
    /// Connections beyond this are refused ([`RegisterError::Full`](crate::RegisterError::Full)).
    pub max_connections: usize,
    /// Sent to each client as `retry:`, the browser's reconnection delay.
    pub client_retry: Option<Duration>,
    /// Durable events older than this are pruned (in bounded batches, once a minute).
    pub retention: Option<Duration>,
    /// Ephemeral broadcasts waiting for the dispatcher beyond this are dropped (and
    /// counted in [`InstanceStats::dropped_broadcasts`](crate::InstanceStats)); a
    /// stream's durable events never are.
    pub max_queued_broadcasts: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(15),
            write_deadline: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(30 * 60),
            queue_capacity: 256,
            read_batch: 500,
            max_connections: 10_000,
            client_retry: Some(Duration::from_secs(2)),
            retention: Some(Duration::from_secs(24 * 3600)),
            max_queued_broadcasts: 1024,
        }
    }
}
