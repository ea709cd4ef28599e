//! Streams for pgbus: browsers follow live event streams over Server-Sent Events, with
//! gap-free replay from their last event id.
//!
//! An [`Instance`] per web process composes a [`StreamListener`](pgbus_core::StreamListener)
//! (one LISTEN connection), a dispatcher task (the single owner of the registry and of
//! every connection's cursor), a heartbeat and a pruner, over any
//! [`StreamStore`](pgbus_core::StreamStore). [`http::Streams::router`] serves it with axum at
//! `GET /streams/{signed_name}`; names are signed with a [`Signer`].

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
