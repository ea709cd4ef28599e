//! The driver-agnostic core of pgbus: queue names, messages, leases, the payload codec,
//! the retry policy, the error type, and the queue contract as small capability traits.
//!
//! Backends implement [`QueueAdmin`], [`Producer`], [`Consumer`], [`DeadLetters`] and
//! [`Stats`]; together they make a [`Backend`]. [`MemoryBackend`] is the in-memory
//! reference implementation, and the `conformance` feature provides the suite of tests every
//! backend runs (see `conformance_tests!`).
//!
//! ```
//! use std::time::Duration;
//! use pgbus_core::{Consumer, MemoryBackend, NewMessage, Producer, QueueAdmin, QueueName, QueueOptions};
//!
//! # #[tokio::main(flavor = "current_thread")] async fn main() -> pgbus_core::Result<()> {
//! let backend = MemoryBackend::new();
//! let queue = QueueName::new("emails")?;
//! backend.create_queue(&queue, &QueueOptions::default()).await?;
//! backend.send(&queue, NewMessage::encode("hello")?).await?;
//!
//! let claimed = backend.claim(&queue, 10, Duration::from_secs(30)).await?;
//! assert_eq!(claimed[0].decode::<String>()?, "hello");
//! backend.ack(&[claimed[0].lease()]).await?;
//! # Ok(()) }
//! ```
//!
//! # Behaviour every backend guarantees
//!
//! - **At-least-once delivery.** A claimed message is hidden for its lease. If the lease
//!   runs out before the message is acked, it is claimable again and its attempt count
//!   grows. Handlers must tolerate running twice.
//! - **Ordering.** Claims return the highest priority first, then the message that became
//!   visible first, then the lowest id. There is no ordering across concurrent claimers;
//!   ordered processing per key is the job of group keys.
//! - **Leases are fenced.** Ack, nack, extend and dead-letter act only on the delivery the
//!   lease belongs to; once a message is claimed again, the older lease does nothing.
//! - **Validation before storage.** Queue names, payload sizes and group keys are checked
//!   before anything reaches the database; a refused message is never half-stored.

#![forbid(unsafe_code)]

mod backend;
mod batch;
mod breaker;
mod codec;
mod error;
mod events;
mod group;
mod limits;
mod memory;
mod message;
mod name;
mod process;
mod queue;
mod retry;
mod schedule;
mod stream;
mod text;
pub mod trace;
mod unique;
mod wakeup;

#[cfg(feature = "conformance")]
pub mod conformance;

pub use backend::Backend;
pub use batch::{BatchCallbacks, BatchId, BatchInfo};
pub use breaker::CircuitBreaker;
pub use codec::ContentType;
pub use error::{panic_message, BoxError, Error, Result};
pub use events::{
    envelope, Binding, Bound, DedupClaim, Deduplication, Event, EventId, NewEvent, Published,
    RoutingKey, StartAt, TopicPattern, TopicStats, Topics, EVENT_ID_HEADER, MAX_ROUTING_KEY_LEN,
    PUBLISHED_AT_HEADER, ROUTING_CASES, ROUTING_KEY_HEADER,
};
pub use group::{
    GroupFailure, GroupNext, GroupRecovery, GroupSession, GroupSettle, OpenGroupSession,
    OrphanSightings, Recovered, Settled,
};
pub use limits::{check_limit_key, KeyLimit, Limits};
pub use memory::{MemoryBackend, MemoryGroupRecovery, MemoryGroupSession, MemoryStreamListener};
pub use message::{
    check_delay, check_text, DeadMessage, Extension, Headers, Lease, Message, MessageId,
    NewMessage, Visibility, DEFAULT_MAX_PAYLOAD_BYTES, MAX_DELAY, MAX_GROUP_KEY_LEN,
};
pub use name::{QueueName, MAX_QUEUE_NAME_LEN};
pub use process::{
    ProcessId, ProcessInfo, ProcessRecord, ProcessRegistry, QueueThroughput, THROUGHPUT_BUCKET,
    THROUGHPUT_RETENTION,
};
pub use queue::{
    Consumer, DeadLetters, Producer, QueueAdmin, QueueInfo, QueueOptions, QueueStats, Selection,
    Stats, TransactionalAck,
};
pub use retry::{RetryDecision, RetryPolicy, RetryPolicyBuilder};
pub use schedule::{
    tasks_from_json, MissedRuns, RecurringTask, Schedule, MAX_CATCH_UP, MAX_TASK_NAME_LEN,
};
pub use stream::{
    check_stream_texts, Horizon, SignalFn, StreamEvent, StreamListener, StreamName, StreamSignal,
    StreamStore, MAX_EPHEMERAL_BYTES, MAX_STREAM_EVENT_TYPE_LEN, MAX_STREAM_NAME_LEN,
};
pub use text::OneLine;
pub use unique::{OnConflict, Unique, UniqueStrategy, WHILE_RUNNING_PREFIX};
pub use wakeup::{Fetcher, OpenFetcher, Subscription, WakeFn, WakeupSource};

/// The crate README's example, compiled (and run, unless marked `no_run`) as a doc test so
/// the README cannot drift from the API. Only built by `cargo test --doc`.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
