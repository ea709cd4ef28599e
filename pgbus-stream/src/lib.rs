//! Streams for pgbus: browsers follow live event streams over Server-Sent Events, with
//! gap-free replay from their last event id.
//!
//! An [`Instance`] per web process composes a [`StreamListener`](pgbus_core::StreamListener)
//! (one LISTEN connection), a dispatcher task (the single owner of the registry and of
//! every connection's cursor), a heartbeat and a pruner, over any
//! [`StreamStore`](pgbus_core::StreamStore). [`http::Streams::router`] serves it with axum at
//! `GET /streams/{signed_name}`; names are signed with a [`Signer`].
//!
//! ```
//! use futures_util::StreamExt;
//! use pgbus_core::{MemoryBackend, StreamName, StreamStore};
//! use pgbus_stream::{http::Streams, Config, Instance, Signer, Start};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let backend = MemoryBackend::new();
//! let instance = Instance::new(backend.clone(), backend.stream_listener(), Config::default());
//! instance.start()?; // listener, dispatcher, heartbeat, pruner
//!
//! let signer = Signer::new("a secret of at least 16 bytes")?;
//! let orders = StreamName::new("orders")?;
//! let path = signer.url_path(&orders); // what the page opens with `new EventSource(path)`
//! assert!(path.starts_with("/streams/orders."));
//! let app: axum::Router = Streams::new(instance.clone(), signer).router();
//! // Serve `app` on an `http::WriteDeadline` listener (see `http`).
//!
//! // What one connection following the stream receives: SSE frames.
//! let mut events = instance.register(orders.clone(), Start::Latest).await?;
//! let id = backend.publish(&orders, "order.paid", r#"{"id":42}"#).await?;
//! while let Some(frame) = events.next().await {
//!     if String::from_utf8_lossy(&frame).contains(&format!("id: {id}\n")) {
//!         break;
//!     }
//! }
//! instance.shutdown().await; // every client gets `event: shutdown`
//! # Ok(()) }
//! ```
//!
//! # Behaviour
//!
//! - **Replay without gap or duplicate.** A connection's stream is listened to before its
//!   registration reaches the dispatcher, which replays what is stored after the cursor
//!   and then applies the signals that arrived meanwhile against it. A cursor older than
//!   the retention gets `event: gap-detected` first.
//! - **One rendering per event.** The dispatcher reads the store per batch, renders each
//!   event once and queues the same bytes to every client following the stream.
//! - **Slow clients never stall others.** Each connection has a bounded queue; a client
//!   that falls behind is caught up from the store once it drains, and one whose queue
//!   stays full past the write deadline is dropped.
//! - **Shutdown** ([`Instance::shutdown`]) sends every client `event: shutdown` (no `id:`,
//!   so the browser keeps its cursor) and ends its response.

mod client;
mod config;
mod cursor;
mod dispatcher;
mod frame;
pub mod http;
mod instance;
mod mailbox;
pub mod parse;
mod signing;

pub use client::EventStream;
pub use config::{Config, IterationHook};
pub use cursor::{parse_cursor, start_from, CursorError, Start};
pub use instance::{Instance, InstanceStats, RegisterError};
pub use signing::{SignatureError, Signer, WeakSecret, MIN_SECRET_LEN};

/// The crate README's example, compiled (and run, unless marked `no_run`) as a doc test so
/// the README cannot drift from the API. Only built by `cargo test --doc`.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
