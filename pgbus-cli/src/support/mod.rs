//! What more than one command needs, one module per concern. Nothing here imports
//! `crate::commands` or `crate::cli`, so any command can use any of it.

pub(crate) mod audit;
pub(crate) mod database;
pub(crate) mod json;
pub(crate) mod output;
pub(crate) mod signals;
pub(crate) mod stdin;
#[cfg(feature = "stream")]
pub(crate) mod stream_secret;
#[cfg(feature = "otel")]
pub(crate) mod telemetry;
pub(crate) mod time;
