//! Streams: ordered event logs that browsers follow live (over SSE, in `pgbus-stream`).
//!
//! A durable event gets a monotonic id and is stored for a retention period, so a client
//! can resume after its last id. An ephemeral broadcast is delivered only to clients
//! connected at that moment and carries no id.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::{Error, Result};

/// The longest stream name accepted, in bytes.
pub const MAX_STREAM_NAME_LEN: usize = 48;

/// The largest ephemeral broadcast carried in a notification (Postgres allows 8,000 bytes
/// of payload; the rest is envelope). Larger ones are stored durably instead.
pub const MAX_EPHEMERAL_BYTES: usize = 7_900;

/// A stream name: the same rule as queue names (lowercase `[a-z0-9_]`, starting with a
/// letter, at most 48 bytes), so a name can be part of a notification channel name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamName(String);

impl StreamName {
    /// Validates `name`.
    pub fn new(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        match crate::QueueName::new(name.clone()) {
            Ok(_) => Ok(Self(name)),
            Err(Error::InvalidQueueName { rule, .. }) => {
                Err(Error::InvalidStreamName { name, rule })
            }
            Err(other) => Err(other),
        }
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for StreamName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The longest stream event type, in bytes (the SSE `event:` field).
pub const MAX_STREAM_EVENT_TYPE_LEN: usize = 255;

/// Checks an event's type and data with [`check_text`](crate::check_text) and refuses
/// data over `max_data_bytes` (the store's payload limit) and a type over
/// [`MAX_STREAM_EVENT_TYPE_LEN`], as every store does before publishing or broadcasting.
pub fn check_stream_texts(event: &str, data: &str, max_data_bytes: usize) -> Result<()> {
    crate::check_text("a stream event type", event)?;
    if event.len() > MAX_STREAM_EVENT_TYPE_LEN {
        return Err(crate::Error::InvalidArgument(format!(
            "a stream event type is at most {MAX_STREAM_EVENT_TYPE_LEN} bytes long, not {}",
            event.len()
        )));
    }
    crate::check_text("stream event data", data)?;
    crate::message::check_payload_size(data.as_bytes(), max_data_bytes)
}

/// A stored event.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamEvent {
    /// Monotonic id within the whole store; ids of one stream increase in commit order.
    pub id: i64,
    /// The stream.
    pub stream: StreamName,
    /// Event type (the SSE `event:` field).
    pub event: String,
    /// Payload text (sent as `data:` lines).
    pub data: String,
    /// When it was published.
    pub published_at: SystemTime,
}

impl StreamEvent {
    /// An event as a backend read it.
    pub fn new(
        id: i64,
        stream: StreamName,
        event: String,
        data: String,
        published_at: SystemTime,
    ) -> Self {
        Self {
            id,
            stream,
            event,
            data,
            published_at,
        }
    }
}

/// Where a client's replay starts, compared with what is retained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Horizon {
    /// Everything after the cursor is still stored.
    Complete,
    /// Events after the cursor were pruned: the client missed some (`gap-detected`).
    Gap,
}

/// Durable stream storage.
pub trait StreamStore: Send + Sync + Clone + 'static {
    /// Stores an event and wakes the stream's listeners once the publishing transaction
    /// commits; returns its id. Publishes to one stream commit in id order, so a reader
    /// that has seen id N will never later find an id below N.
    fn publish(
        &self,
        stream: &StreamName,
        event: &str,
        data: &str,
    ) -> impl Future<Output = Result<i64>> + Send;

    /// Broadcasts to the stream's current listeners only, without storing; a message too
    /// large for a notification is stored durably instead, and its id returned.
    fn broadcast(
        &self,
        stream: &StreamName,
        event: &str,
        data: &str,
    ) -> impl Future<Output = Result<Option<i64>>> + Send;

    /// Events of `stream` with ids above `after`, in id order, at most `limit`.
    fn read_after(
        &self,
        stream: &StreamName,
        after: i64,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<StreamEvent>>> + Send;

    /// The highest id the stream has had (0 for a stream never published to): where a
    /// client that gives no cursor starts.
    fn latest(&self, stream: &StreamName) -> impl Future<Output = Result<i64>> + Send;

    /// Whether everything after `cursor` is still retained.
    fn horizon(
        &self,
        stream: &StreamName,
        cursor: i64,
    ) -> impl Future<Output = Result<Horizon>> + Send;

    /// Deletes events older than `retention`, at most `batch` per statement; returns how
    /// many.
    fn prune(&self, retention: Duration, batch: usize) -> impl Future<Output = Result<u64>> + Send;
}

/// What a [`StreamListener`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamSignal {
    /// Durable events were committed on the stream: read them from the store.
    Published(StreamName),
    /// An ephemeral broadcast, delivered only to the clients connected now.
    Broadcast {
        /// The stream.
        stream: StreamName,
        /// Event type.
        event: String,
        /// Payload text.
        data: String,
    },
    /// The listener (re)connected and re-listened: signals sent meanwhile were lost, so
    /// every stream must be read again.
    Reconnected,
}

/// Receives a listener's signals; called from the listener's task, so it must not block.
pub type SignalFn = Arc<dyn Fn(StreamSignal) + Send + Sync>;

/// Tells its owner when streams have news: the stream counterpart of
/// [`WakeupSource`](crate::WakeupSource), one per streamer instance.
pub trait StreamListener: Send + Sync + 'static {
    /// Starts delivering signals to `signal` in the background; called once, before any
    /// [`listen`](Self::listen).
    fn start(&self, signal: SignalFn) -> Result<()>;

    /// Subscribes to `stream`, resolving once the subscription is active: every commit on
    /// the stream after that is signalled. Fails while the listener is disconnected.
    fn listen(&self, stream: &StreamName) -> impl Future<Output = Result<()>> + Send;

    /// Ends the subscription to `stream`.
    fn unlisten(&self, stream: &StreamName) -> impl Future<Output = Result<()>> + Send;

    /// Stops the background work; no signal is delivered after this resolves.
    fn stop(&self) -> impl Future<Output = ()> + Send;

    /// Whether signals are being delivered now.
    fn is_live(&self) -> bool;
}
