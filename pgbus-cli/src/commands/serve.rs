//! `pgbus serve`: the HTTP server (see `crate::server`) until SIGTERM or Ctrl-C.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::server::{listen_addr, start};
use crate::support::database::Database;
use crate::support::output;
use crate::support::signals::stop_on_signals;
use crate::support::time::positive_duration;

// No doc comment: the `Command` variant's is the command's about.
#[derive(Debug, Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on: IP:PORT, or localhost:PORT. Anything but a loopback address
    /// needs --token.
    #[arg(long, value_parser = listen_addr, default_value = "127.0.0.1:8080")]
    pub(crate) listen: SocketAddr,
    /// Required from every client (Authorization: Bearer, or ?token= once in a browser)
    /// except for /livez, /readyz and signed stream URLs.
    #[arg(long, env = "PGBUS_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
    /// How often the dashboard and /metrics snapshot is refreshed.
    #[arg(long, value_parser = positive_duration, default_value = "2s", allow_hyphen_values = true)]
    pub(crate) refresh: Duration,
}

/// `pgbus serve`.
pub(crate) async fn run(args: ServeArgs, db: &Database) -> anyhow::Result<ExitCode> {
    let backend = db.ready().await?.clone();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let stop = stop_on_signals()?;
    let server = start(
        db.session_url(),
        backend,
        listener,
        args.token,
        args.refresh,
        stop.clone(),
    )
    .await?;
    output::note(format_args!("serving the dashboard at {}", server.url()));
    server.wait().await?;
    Ok(ExitCode::SUCCESS)
}
