//! The error type shared by every pgbus backend.

use crate::{MessageId, QueueName};

/// A boxed error from a backend driver, kept as the cause.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in a pgbus operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A queue name broke the naming rule; nothing was sent to the database.
    #[error("invalid queue name {name:?}: a queue name {rule} (lowercase [a-z0-9_], starting with a letter, at most 48 bytes)")]
    InvalidQueueName {
        /// The refused name.
        name: String,
        /// The rule it broke.
        rule: &'static str,
    },
    /// A stream name broke the naming rule.
    #[error("invalid stream name {name:?}: a stream name {rule} (lowercase [a-z0-9_], starting with a letter, at most 48 bytes)")]
    InvalidStreamName {
        /// The refused name.
        name: String,
        /// The rule it broke.
        rule: &'static str,
    },
    /// A routing key broke the rule (dot-separated segments of `[A-Za-z0-9_-]`).
    #[error("invalid routing key {key:?}: a routing key {rule}")]
    InvalidRoutingKey {
        /// The refused key.
        key: String,
        /// The rule it broke.
        rule: &'static str,
    },
    /// A topic pattern broke the rule (routing-key segments, `*` or `#`).
    #[error("invalid topic pattern {pattern:?}: a pattern {rule} (or `*` for one segment, `#` for any number)")]
    InvalidTopicPattern {
        /// The refused pattern.
        pattern: String,
        /// The rule it broke.
        rule: &'static str,
    },
    /// A message handed to an event subscriber carries no valid event envelope.
    #[error("not an event: {0}")]
    NotAnEvent(String),
    /// A group key was empty or too long.
    #[error("invalid group key: {0}")]
    InvalidGroupKey(&'static str),
    /// The queue does not exist.
    #[error("queue {0} does not exist")]
    QueueNotFound(QueueName),
    /// The payload is larger than the backend accepts.
    #[error("payload of {size} bytes exceeds the limit of {limit} bytes")]
    PayloadTooLarge {
        /// Size of the refused payload.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// A value could not be encoded into a payload.
    #[error("could not encode payload as {format}")]
    Encode {
        /// The target format.
        format: &'static str,
        /// The serializer's error.
        #[source]
        source: BoxError,
    },
    /// A payload could not be decoded into the expected type.
    #[error("could not decode {format} payload")]
    Decode {
        /// The payload's format.
        format: &'static str,
        /// The deserializer's error.
        #[source]
        source: BoxError,
    },
    /// The content type of a stored message is not one pgbus knows.
    #[error("unknown content type {0:?}")]
    UnknownContentType(String),
    /// A dead-lettered message with this id does not exist in the queue.
    #[error("no dead-lettered message {id} in queue {queue}")]
    DeadLetterNotFound {
        /// The queue searched.
        queue: QueueName,
        /// The missing id.
        id: MessageId,
    },
    /// A unique job with this key is already in the queue, and the send asked to be
    /// refused in that case; nothing of the send was stored.
    #[error("a job with unique key {key:?} is already in queue {queue}")]
    DuplicateJob {
        /// The queue.
        queue: QueueName,
        /// The key.
        key: String,
        /// The job holding the key, when it was still there to be named.
        existing: Option<MessageId>,
    },
    /// The database schema is older (or newer) than this version of pgbus expects.
    #[error("database schema is at version {found}, this pgbus needs version {expected}: run `pgbus migrate`")]
    SchemaMismatch {
        /// Version found in the database.
        found: i64,
        /// Version this build expects.
        expected: i64,
    },
    /// Uninstalling was refused: worker processes with a recent heartbeat are registered,
    /// and dropping the schema under them would fail every one of their statements.
    #[error("{count} live worker process(es) are registered: stop them before uninstalling pgbus, or force it")]
    WorkersRegistered {
        /// How many live processes are registered.
        count: u64,
    },
    /// An argument was out of range (a zero batch size, a negative delay, ...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The backend (database, driver, pool) failed.
    #[error("backend error: {message}")]
    Backend {
        /// What the backend was doing, and its own message.
        message: String,
        /// Whether retrying the same operation later may succeed (connection loss,
        /// serialization failure, deadlock, server shutting down, pool timeout).
        transient: bool,
        /// The driver's error.
        #[source]
        source: Option<BoxError>,
    },
}

impl Error {
    /// Whether the operation may succeed if retried later without any change: lost
    /// connections, serialization failures, deadlocks, an administrator shutdown, pool
    /// time-outs. Validation errors and missing queues are not transient.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            Error::Backend {
                transient: true,
                ..
            }
        )
    }

    /// The message with every cause after it, on one line: what a dead letter or a log
    /// line should record.
    pub fn report(&self) -> String {
        let mut text = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(cause) = source {
            text.push_str(": ");
            text.push_str(&cause.to_string());
            source = cause.source();
        }
        text
    }

    /// A backend error with the driver's error kept as its cause.
    pub fn backend(
        message: impl Into<String>,
        transient: bool,
        source: impl Into<BoxError>,
    ) -> Self {
        Error::Backend {
            message: message.into(),
            transient,
            source: Some(source.into()),
        }
    }
}

/// `Result` with [`enum@Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// The text of a caught panic's payload (`panic!` with a literal or a format string), for
/// the error a panicking handler or task is reported with.
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    if let Some(message) = panic.downcast_ref::<&'static str>() {
        message
    } else if let Some(message) = panic.downcast_ref::<String>() {
        message
    } else {
        "non-string panic payload"
    }
}
