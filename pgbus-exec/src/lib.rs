//! Execution pools and the worker runtime of pgbus.
//!
//! A [`Worker`] claims messages from any [`Backend`](pgbus_core::Backend), runs them with
//! typed [`Handler`]s on an [`ExecutionPool`], and settles each [`Outcome`]. It never
//! depends on a particular database: the Postgres backend lives in `pgbus-pg`, and
//! everything here is tested on the in-memory backend too.
//!
//! ```
//! use std::time::Duration;
//! use pgbus_core::{MemoryBackend, NewMessage, Producer, QueueAdmin, QueueName, QueueOptions};
//! use pgbus_exec::{CancellationToken, JobContext, Outcome, Worker};
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct Email { to: String }
//!
//! # #[tokio::main] async fn main() -> pgbus_core::Result<()> {
//! let backend = MemoryBackend::new();
//! let queue = QueueName::new("emails")?;
//! backend.create_queue(&queue, &QueueOptions::default()).await?;
//! backend.send(&queue, NewMessage::encode(&Email { to: "a@example.com".into() })?).await?;
//!
//! let worker = Worker::builder(backend.clone())
//!     .concurrency(16)
//!     .handle(queue.clone(), |ctx: JobContext<MemoryBackend>, email: Email| async move {
//!         if email.to.is_empty() {
//!             return Outcome::dead_letter("no recipient");
//!         }
//!         println!("attempt {} of message {}", ctx.attempt(), ctx.message_id());
//!         Outcome::Ack
//!     })
//!     .build()?;
//! // Runs until nothing is ready, in flight or due (within `Duration::ZERO`) in the
//! // worker's queues; cancelling `stop` ends it early. A long-running worker calls
//! // `worker.run(stop)` instead.
//! let stop = CancellationToken::new();
//! let report = worker.run_until_empty(Duration::ZERO, stop).await?;
//! assert_eq!(report.worker.acked, 1);
//! # Ok(()) }
//! ```
//!
//! # Behaviour
//!
//! - **Claims match free slots, plus what the slots start soon.** Each round claims as
//!   many messages as the pool has free slots plus the room in a claim-ahead buffer
//!   ([`WorkerBuilder::claim_ahead`], four per slot by default, at most 512), visiting
//!   the worker's queues in turn; a slot that frees starts the buffer's first message at
//!   once, and the buffer is refilled while the slots are busy, once it is half empty.
//!   The buffer holds only what the slots should start within about 50 ms at the slower
//!   of the handlers' measured paces on the queue claimed from and on all the worker's
//!   queues (nothing before a job of that queue has finished), and a buffered message
//!   that waits for a slot longer than [`WorkerBuilder::claim_ahead_wait`] (1 s) is given
//!   back, idle workers woken for it. Buffered messages are leased and their leases kept alive like running jobs'. When
//!   every slot is busy (and the buffer full) the worker waits for one to free (the pool's
//!   state-change callback); when the queues are empty it waits for a wake-up
//!   ([`WorkerBuilder::wakeups`]), a freed slot, or the poll interval, whichever comes
//!   first.
//! - **Outcomes.** [`Outcome::Ack`] is acked in batches (whatever completed while the
//!   previous ack ran goes in the next statement). A retry follows the queue's
//!   [`RetryPolicy`](pgbus_core::RetryPolicy) and dead-letters once attempts are used up;
//!   a payload that does not decode is dead-lettered at once with the decoder's reason.
//!   A handler may also ack inside its own transaction ([`JobContext::ack_in`]).
//!   Every failed attempt is a warning (target `pgbus::worker`) with `queue.name`,
//!   `job.id`, `attempt`, `retry_in` and the error text, escaped onto one line and cut
//!   after 1 KiB (the message keeps all of it).
//! - **Limited jobs** (with a limit key, see [`KeyLimit`](pgbus_core::KeyLimit)) are
//!   claimed by a second, limited claim, made only with the slots plain jobs left free:
//!   a queue of plain jobs pays nothing for them.
//! - **Circuit breakers.** For a queue with a
//!   [`CircuitBreaker`](pgbus_core::CircuitBreaker), every worker (plain or group) counts
//!   failed jobs (retried or dead-lettered) in a row and opens the queue's breaker when
//!   they reach the limit; after the backoff one more failure opens it again, a success
//!   closes it. A group worker opens it on the failing group's own session.
//! - **Leases** of running jobs are extended every third of the lease, so a long job is
//!   not delivered again while it runs. A job past the per-job timeout is cancelled (its
//!   [`JobContext::cancellation`] fires) and retried.
//! - **Shutdown** ([`Worker::run`]'s token): stop claiming, give the claimed-ahead
//!   messages back at once (claimable again, their attempt not counted), let running jobs finish up to
//!   the drain timeout and settle them, then cancel the rest, whose messages stay leased in
//!   the database and are delivered again when the lease runs out. Nothing is lost.
//! - **Processes** register in the backend's process registry and heartbeat with their busy
//!   count; entries silent for three heartbeat intervals are pruned.
//! - **Modes.** [`ExecutionMode::Async`] runs jobs as tokio tasks bounded by the capacity
//!   (thousands of I/O-bound jobs); [`ExecutionMode::Threads`] runs each job on one of
//!   `capacity` OS threads (blocking or CPU-bound handlers), driven with the caller's
//!   runtime handle so database connections and timers keep working. Each pool is a cargo
//!   feature (`threads`, `async`, both by default; at least one): a build without one
//!   still parses its mode but refuses to build a worker for it
//!   ([`ExecError::NotBuilt`]). The default mode is async when built, else threads.
//! - **Kinds of worker.** A [`Worker`] runs messages without a group key, a
//!   [`GroupWorker`] ordered groups; a [`MixedWorker`] runs both kinds of its queues on one
//!   set of `concurrency` slots, one fetch connection and one process entry, dividing the
//!   slots fairly while both kinds wait for them (what `pgbus work` runs).
//!
//! # Connection budget (Postgres backend)
//!
//! Per worker: one dedicated `pgbus:fetch` connection for claims. Shared through the
//! backend's pool (`pgbus:pool`, sized by `PgBackend::builder(..).max_connections(n)`):
//! batched acks, nacks, lease extension and process heartbeats, which use a connection
//! only for the duration of a statement. Per process: one `pgbus:listen` connection when a
//! `PgListener` is used. The budget does not grow with the execution mode or the
//! concurrency: 1,000 concurrent async jobs run on the same few connections as 16 threads,
//! unless handlers take pooled connections of their own (for transactional completion,
//! one per job while its transaction is open). Ordered groups add one `pgbus:recovery`
//! connection and one `pgbus:group` connection per running group (at most the
//! concurrency); a [`MixedWorker`] opens them only while it has grouped work, and a group
//! session unused for the group idle timeout is closed.

#![forbid(unsafe_code)]

#[cfg(not(any(feature = "threads", feature = "async")))]
compile_error!(
    "pgbus-exec needs at least one execution pool: enable the feature `threads`, `async` or both"
);

#[cfg(feature = "async")]
mod async_pool;
mod breaker;
mod builder;
mod group;
mod handler;
mod lane;
mod mixed;
mod pace;
mod pool;
mod report;
mod share;
mod slots;
mod subscriber;
mod telemetry;
#[cfg(feature = "threads")]
mod threads;
mod until_empty;
mod worker;

#[cfg(feature = "async")]
pub use async_pool::AsyncPool;
pub use builder::{default_execution_mode, set_default_execution_mode, WorkerBuilder};
pub use group::GroupWorker;
pub use handler::{handler_fn, FnHandler, Handler, IntoOutcome, JobContext, Outcome};
pub use mixed::MixedWorker;
pub use pool::{
    ExecError, ExecutionMode, ExecutionPool, Job, PoolMetadata, Refused, RefusedReason,
    StateChangeCallback,
};
pub use report::WorkerReport;
pub use subscriber::Subscription;
#[cfg(feature = "threads")]
pub use threads::ThreadPool;
/// The shutdown signal every `run` takes, re-exported so callers need no `tokio-util`
/// dependency of their own.
pub use tokio_util::sync::CancellationToken;
pub use until_empty::{Left, QueueLeft, UntilEmptyReport};
pub use worker::{Worker, WorkerMetadata, WorkerMonitor};

/// The crate README's example, compiled (and run, unless marked `no_run`) as a doc test so
/// the README cannot drift from the API. Only built by `cargo test --doc`.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
