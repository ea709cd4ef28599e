//! Messages: what is sent, what is claimed, and the lease that proves a claim.

use std::collections::BTreeMap;
use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{de::DeserializeOwned, Serialize};

use crate::{ContentType, Error, QueueName, Result, Unique};

/// The largest payload accepted by default: 1 MiB. Backends make it configurable.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 1024 * 1024;

/// The longest group key accepted, in bytes.
pub const MAX_GROUP_KEY_LEN: usize = 255;

/// The longest delay accepted: 100 years (of 365.25 days). It bounds a message's delay
/// and scheduled time (at most this far after now), a lease and a retry delay. A larger
/// value (such as `Duration::MAX` meant as "never") is refused with
/// [`Error::InvalidArgument`], never clamped and never allowed to overflow a timestamp.
pub const MAX_DELAY: Duration = Duration::from_secs(3_155_760_000);

/// Refuses a delay or lease longer than [`MAX_DELAY`]; `what` names it in the error.
pub fn check_delay(what: &str, delay: Duration) -> Result<()> {
    if delay > MAX_DELAY {
        return Err(Error::InvalidArgument(format!(
            "{what} of {} s is longer than the limit of {} s (100 years)",
            delay.as_secs(),
            MAX_DELAY.as_secs()
        )));
    }
    Ok(())
}

/// Refuses text that a backend could not store as given: PostgreSQL text (and `jsonb`)
/// cannot hold a NUL character. Checked for keys, header names and values and stream
/// texts before anything is sent; `what` names the text in the error.
pub fn check_text(what: &str, text: &str) -> Result<()> {
    if text.contains('\0') {
        return Err(Error::InvalidArgument(format!(
            "{what} contains a NUL character, which PostgreSQL text cannot hold"
        )));
    }
    Ok(())
}

/// Checks every header name and value with [`check_text`].
pub(crate) fn check_headers(headers: &Headers) -> Result<()> {
    for (name, value) in headers {
        check_text("a header name", name)?;
        check_text(&format!("header {name:?}"), value)?;
    }
    Ok(())
}

impl Visibility {
    /// Checks the bounds every backend enforces: a delay of at most [`MAX_DELAY`], a
    /// scheduled time from the Unix epoch to [`MAX_DELAY`] after now (a time in the past
    /// makes the message visible at once).
    pub fn check(self) -> Result<()> {
        match self {
            Visibility::Now => Ok(()),
            Visibility::After(delay) => check_delay("a delay", delay),
            Visibility::At(at) if at < UNIX_EPOCH => Err(Error::InvalidArgument(
                "a scheduled time before 1970-01-01 is refused".into(),
            )),
            Visibility::At(at) => match at.duration_since(SystemTime::now()) {
                Ok(ahead) => check_delay("a scheduled time ahead", ahead),
                Err(_) => Ok(()),
            },
        }
    }
}

/// Message headers: free-form string pairs carried beside the payload.
pub type Headers = BTreeMap<String, String>;

/// A message id: unique across all queues and increasing in send order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MessageId(pub i64);

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// When a new message becomes visible to claimers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Visibility {
    /// At once.
    #[default]
    Now,
    /// After a delay, measured on the backend's clock.
    After(Duration),
    /// At a point in time.
    At(SystemTime),
}

/// A message to send, built with consuming setters.
///
/// ```
/// use std::time::Duration;
/// use pgbus_core::NewMessage;
///
/// #[derive(serde::Serialize)]
/// struct Email<'a> { to: &'a str }
///
/// let msg = NewMessage::encode(&Email { to: "a@example.com" })
///     .unwrap()
///     .priority(5)
///     .delay(Duration::from_secs(10))
///     .group("customer_42")
///     .header("trace_id", "abc");
/// assert_eq!(msg.priority, 5);
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct NewMessage {
    /// Encoded payload.
    pub payload: Vec<u8>,
    /// How the payload is encoded.
    pub content_type: ContentType,
    /// Headers.
    pub headers: Headers,
    /// Higher runs first. Default 0.
    pub priority: i16,
    /// When the message becomes visible.
    pub visibility: Visibility,
    /// Messages with the same group key run one at a time, in order.
    pub group_key: Option<String>,
    /// At most one unfinished job per key and queue.
    pub unique: Option<Unique>,
    /// The key whose concurrency and rate limits the job obeys (see
    /// [`KeyLimit`](crate::KeyLimit)).
    pub limit_key: Option<String>,
}

impl NewMessage {
    /// A message with an already encoded payload.
    pub fn raw(payload: Vec<u8>, content_type: ContentType) -> Self {
        Self {
            payload,
            content_type,
            headers: Headers::new(),
            priority: 0,
            visibility: Visibility::Now,
            group_key: None,
            unique: None,
            limit_key: None,
        }
    }

    /// Encodes `value` as MessagePack (the default codec).
    pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Self> {
        Self::encode_as(ContentType::MessagePack, value)
    }

    /// Encodes `value` as JSON.
    pub fn json<T: Serialize + ?Sized>(value: &T) -> Result<Self> {
        Self::encode_as(ContentType::Json, value)
    }

    /// Encodes `value` with the given codec.
    pub fn encode_as<T: Serialize + ?Sized>(content_type: ContentType, value: &T) -> Result<Self> {
        Ok(Self::raw(content_type.encode(value)?, content_type))
    }

    /// Sets the priority (higher first).
    pub fn priority(mut self, priority: i16) -> Self {
        self.priority = priority;
        self
    }

    /// Makes the message visible only after `delay`.
    pub fn delay(mut self, delay: Duration) -> Self {
        self.visibility = Visibility::After(delay);
        self
    }

    /// Makes the message visible only at `at`.
    pub fn at(mut self, at: SystemTime) -> Self {
        self.visibility = Visibility::At(at);
        self
    }

    /// Puts the message in an ordered group.
    pub fn group(mut self, key: impl Into<String>) -> Self {
        self.group_key = Some(key.into());
        self
    }

    /// Makes the job unique in its queue (see [`Unique`]).
    pub fn unique(mut self, unique: Unique) -> Self {
        self.unique = Some(unique);
        self
    }

    /// Makes the job obey the limits of `key` (see [`KeyLimit`](crate::KeyLimit)). A job
    /// cannot have both a limit key and a group key.
    pub fn limit_key(mut self, key: impl Into<String>) -> Self {
        self.limit_key = Some(key.into());
        self
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Checks the message against the limits every backend enforces before storing it:
    /// payload size, group and job key lengths, no NUL in keys and headers (see
    /// [`check_text`]), delay and scheduled time (see [`Visibility::check`]).
    pub fn check(&self, max_payload_bytes: usize) -> Result<()> {
        self.visibility.check()?;
        check_headers(&self.headers)?;
        if let Some(unique) = &self.unique {
            crate::unique::check_key(&unique.key, "a unique key")?;
        }
        if let Some(key) = &self.limit_key {
            crate::check_limit_key(key)?;
        }
        let while_running = self
            .unique
            .as_ref()
            .is_some_and(|u| u.strategy == crate::UniqueStrategy::WhileRunning);
        if while_running && self.limit_key.is_some() {
            return Err(Error::InvalidArgument(
                "a job unique while running cannot also have a limit key".into(),
            ));
        }
        if (while_running || self.limit_key.is_some()) && self.group_key.is_some() {
            return Err(Error::InvalidArgument(
                "a job cannot have both a group key and a limit key".into(),
            ));
        }
        check_payload_size(&self.payload, max_payload_bytes)?;
        match &self.group_key {
            Some(key) if key.is_empty() => Err(Error::InvalidGroupKey("must not be empty")),
            Some(key) if key.len() > MAX_GROUP_KEY_LEN => {
                Err(Error::InvalidGroupKey("must be at most 255 bytes long"))
            }
            Some(key) if key.contains('\0') => Err(Error::InvalidGroupKey(
                "must not contain a NUL character (PostgreSQL text cannot hold one)",
            )),
            _ => Ok(()),
        }
    }
}

/// Refuses a payload over the backend's limit.
pub(crate) fn check_payload_size(payload: &[u8], limit: usize) -> Result<()> {
    if payload.len() > limit {
        return Err(Error::PayloadTooLarge {
            size: payload.len(),
            limit,
        });
    }
    Ok(())
}

/// Proof of a claim. Ack, nack, extend and dead-letter take the lease, and act only while
/// the message has not been claimed again since: a worker whose lease expired cannot ack
/// or fail the delivery that replaced it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Lease {
    /// The claimed message.
    pub id: MessageId,
    /// The attempt this claim started (1 for the first delivery).
    pub attempt: u32,
}

/// What a lease extension found ([`Consumer::extend`](crate::Consumer::extend),
/// [`GroupSession::extend`](crate::GroupSession::extend)). A lease neither extended nor
/// lost was skipped because another statement held its message (being settled or changed
/// right now): the next extension tells which it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Extension {
    /// Leases extended.
    pub extended: u64,
    /// Leases that are gone for good: their message was settled or deleted, claimed again
    /// (another attempt), or given back. Whoever runs one should stop: its settlement will
    /// change nothing.
    pub lost: Vec<Lease>,
}

impl Extension {
    /// What an extension found: `extended` leases extended, `lost` gone.
    pub fn new(extended: u64, lost: Vec<Lease>) -> Self {
        Self { extended, lost }
    }
}

/// A claimed message.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Message {
    /// Message id.
    pub id: MessageId,
    /// The queue it was claimed from.
    pub queue: QueueName,
    /// Encoded payload.
    pub payload: Vec<u8>,
    /// How the payload is encoded.
    pub content_type: ContentType,
    /// Headers.
    pub headers: Headers,
    /// Priority (higher first).
    pub priority: i16,
    /// When it was sent.
    pub enqueued_at: SystemTime,
    /// Deliveries so far, including this one.
    pub attempts: u32,
    /// Ordered group, if any.
    pub group_key: Option<String>,
    /// The error recorded by the previous failed attempt, if any.
    pub last_error: Option<String>,
    /// When this claim's lease runs out, unless extended.
    pub lease_expires_at: SystemTime,
}

impl Message {
    /// A message with the given identity and payload; the other fields start empty (no
    /// headers, priority 0, first attempt, times set to now) for the backend to fill in.
    pub fn new(
        id: MessageId,
        queue: QueueName,
        payload: Vec<u8>,
        content_type: ContentType,
    ) -> Self {
        let now = SystemTime::now();
        Self {
            id,
            queue,
            payload,
            content_type,
            headers: Headers::new(),
            priority: 0,
            enqueued_at: now,
            attempts: 1,
            group_key: None,
            last_error: None,
            lease_expires_at: now,
        }
    }

    /// The lease of this delivery.
    pub fn lease(&self) -> Lease {
        Lease {
            id: self.id,
            attempt: self.attempts,
        }
    }

    /// Decodes the payload with the message's own codec.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T> {
        self.content_type.decode(&self.payload)
    }
}

/// A message in the dead-letter queue.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct DeadMessage {
    /// Message id (kept when it is retried).
    pub id: MessageId,
    /// The queue it failed in.
    pub queue: QueueName,
    /// Encoded payload.
    pub payload: Vec<u8>,
    /// How the payload is encoded.
    pub content_type: ContentType,
    /// Headers.
    pub headers: Headers,
    /// Priority.
    pub priority: i16,
    /// Ordered group, if any.
    pub group_key: Option<String>,
    /// When it was first sent.
    pub enqueued_at: SystemTime,
    /// Deliveries made before it was dead-lettered.
    pub attempts: u32,
    /// When it was dead-lettered.
    pub failed_at: SystemTime,
    /// Why: the last error text.
    pub error: String,
    /// The limit key it keeps when retried.
    pub limit_key: Option<String>,
}

impl DeadMessage {
    /// A dead letter with the given identity, payload and reason; the other fields start
    /// empty (no headers, priority 0, times set to now) for the backend to fill in.
    pub fn new(
        id: MessageId,
        queue: QueueName,
        payload: Vec<u8>,
        content_type: ContentType,
        error: String,
    ) -> Self {
        let now = SystemTime::now();
        Self {
            id,
            queue,
            payload,
            content_type,
            headers: Headers::new(),
            priority: 0,
            group_key: None,
            enqueued_at: now,
            attempts: 0,
            failed_at: now,
            error,
            limit_key: None,
        }
    }
}
