//! One module per subcommand, as cargo's `commands/` are: each owns its clap arguments
//! (an `Args` struct or a `Subcommand` enum) and its entry point,
//! `pub(crate) async fn run(args, ...)`. Commands import the shared helpers in
//! `crate::support` (and the HTTP server in `crate::server`), never each other; `cli.rs`
//! only composes them. Adding a command is one file here and one variant (with its `run`
//! arm) in `cli.rs`.

pub(crate) mod cron;
pub(crate) mod db;
pub(crate) mod demo;
pub(crate) mod dlq;
pub(crate) mod job;
pub(crate) mod migrate;
pub(crate) mod publish;
pub(crate) mod queue;
pub(crate) mod relay;
pub(crate) mod send;
#[cfg(feature = "serve")]
pub(crate) mod serve;
pub(crate) mod stats;
#[cfg(feature = "stream")]
pub(crate) mod stream;
pub(crate) mod topic;
pub(crate) mod uninstall;
pub(crate) mod work;
