//! The PostgreSQL backend of pgbus, on tokio-postgres and bb8.
//!
//! ```no_run
//! use pgbus_core::{Consumer, NewMessage, Producer, QueueAdmin, QueueName, QueueOptions};
//! use pgbus_pg::PgBackend;
//! use std::time::Duration;
//!
//! # async fn run() -> pgbus_core::Result<()> {
//! let backend = PgBackend::connect("postgres://postgres@127.0.0.1:5432/app")?;
//! backend.migrate().await?;
//! let queue = QueueName::new("emails")?;
//! backend.create_queue(&queue, &QueueOptions::default()).await?;
//! backend.send(&queue, NewMessage::encode("hello")?).await?;
//! for message in backend.claim(&queue, 10, Duration::from_secs(30)).await? {
//!     println!("{}", message.decode::<String>()?);
//!     backend.ack(&[message.lease()]).await?;
//! }
//! # Ok(()) }
//! ```
//!
//! # Behaviour
//!
//! - **Claim** is one statement: `SELECT ... FOR UPDATE SKIP LOCKED` over the queue's visible
//!   rows (highest priority, then earliest visible, then lowest id), updated in place to
//!   lease them and count the attempt. Concurrent claimers never block one another and never
//!   receive the same message while its lease holds.
//! - **Claims commit asynchronously** (`synchronous_commit = off` on the fetch connection,
//!   and for a group session's statements that settle nothing): a claim lost in a server
//!   crash only makes the message claimable again, which at-least-once delivery allows (the
//!   attempt count may then undercount by one). Acks, sends and dead-letters stay durable.
//! - **Leases** are a `lease_until` in the future, an unindexed column, so a claim is a HOT
//!   update; an expired lease makes the message claimable again with no sweeper. Settling operations are fenced by the attempt number.
//! - **Completed work leaves the hot table**: acked messages are deleted, or moved to
//!   `pgbus.archive` for queues that keep history; [`PgBackend::prune_archive`] trims the
//!   archive in bounded batches.
//! - **Maintenance**: a [`Maintenance`] loop (run by every `pgbus work` process) prunes the
//!   archive, idempotent consumers' dedup records and the event log every interval, in
//!   bounded `SKIP LOCKED` batches, so any number of processes may run it at once.
//! - **Transactions**: [`PgBackend::send_in`] and [`PgBackend::send_batch_in`] write inside
//!   the caller's transaction; a rollback leaves no message.
//! - **Topics**: [`PgBackend::publish_batch_in`] fans events out to every queue with a
//!   matching binding in one statement inside the caller's transaction; bindings with a
//!   start position replay the event log. [`OutboxRelay`] publishes `pgbus.outbox` rows
//!   written by producers in their own transactions: exactly once from the outbox of the
//!   database it publishes to (publish and mark commit together), at least once from
//!   another database's.
//! - **Migrations** run in one transaction under an advisory lock; any number of processes
//!   may call [`PgBackend::migrate`] at once.
//! - **Connections** are named `pgbus:<role>` in `application_name` (`pgbus:pool` for the
//!   pool, `pgbus:migrate` for migrations, `pgbus:relay` for an outbox relay).

#![forbid(unsafe_code)]

mod backend;
mod batch;
mod bulk;
mod cluster;
mod connect;
pub mod console;
mod dedup;
mod error;
mod fetcher;
mod group;
mod group_locks;
mod headers;
#[cfg(test)]
mod hot_plans;
mod limits;
mod listener;
mod maintenance;
mod migrate;
mod notify_limit;
mod outbox;
mod pool;
mod query;
mod registry;
mod scheduler;
mod send;
mod sql;
mod stream;
mod stream_listener;
mod telemetry;
mod throughput;
mod topics;
mod transaction;
mod unique;

pub use backend::{PgBackend, PgBackendBuilder, DEFAULT_NOTIFY_WINDOW};
pub use cluster::*;
pub use connect::{connect, ConnectOptions, SslMode};
pub use fetcher::PgFetcher;
pub use group::{GroupInFlight, PgGroupRecovery, PgGroupSession};
pub use group_locks::GroupLocks;
pub use listener::PgListener;
pub use maintenance::{Maintenance, MaintenanceBuilder, Pruned};
pub use migrate::{Uninstalled, SCHEMA_VERSION};
pub use outbox::{write_outbox, OutboxRelay, OutboxRelayBuilder, RelayStats};
pub use query::Pooler;
pub use scheduler::{ScheduleInfo, Scheduler, SchedulerBuilder, SchedulerMonitor};
pub use stream_listener::PgStreamListener;
pub use throughput::ThroughputPoint;
pub use transaction::PgTransaction;

/// The crate README's example, compiled (and run, unless marked `no_run`) as a doc test so
/// the README cannot drift from the API. Only built by `cargo test --doc`.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
