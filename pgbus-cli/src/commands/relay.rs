//! `pgbus relay`: runs the outbox relay until SIGTERM/SIGINT.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use pgbus_pg::{OutboxRelay, PgBackend};

use crate::support::database::Database;
use crate::support::output;
use crate::support::signals::stop_on_signals;
use crate::support::time::{duration, positive_duration};

#[derive(Debug, Args)]
pub(crate) struct RelayArgs {
    /// The database holding `pgbus.outbox` when it is not the one events are published to
    /// (--database-url); run `pgbus migrate` there first.
    #[arg(long, env = "PGBUS_OUTBOX_URL", hide_env_values = true)]
    pub(crate) outbox_url: Option<String>,
    /// Outbox rows per batch (one publish statement, one transaction).
    #[arg(long, default_value_t = 500)]
    pub(crate) batch: usize,
    /// Longest wait between looks at the outbox when no insert notification arrives.
    #[arg(long, value_parser = positive_duration, default_value = "1s", allow_hyphen_values = true)]
    pub(crate) poll_interval: Duration,
    /// How long published rows are kept before they are pruned.
    #[arg(long, value_parser = duration, default_value = "1day", allow_hyphen_values = true)]
    pub(crate) retention: Duration,
    /// How often published rows past the retention are pruned.
    #[arg(long, value_parser = positive_duration, default_value = "1m", allow_hyphen_values = true)]
    pub(crate) prune_interval: Duration,
}

/// `pgbus relay`.
pub(crate) async fn run(args: RelayArgs, db: &Database) -> anyhow::Result<ExitCode> {
    let outbox_url = args.outbox_url.filter(|u| !u.trim().is_empty());
    // Built first: the settings are checked before anything connects.
    let mut builder = OutboxRelay::builder(db.backend.clone())
        .batch(args.batch)
        .poll_interval(args.poll_interval)
        .retention(args.retention)
        .prune_interval(args.prune_interval);
    if let Some(url) = &outbox_url {
        builder = builder.source_url(url);
    } else if let Some(url) = db.listen_url() {
        // Behind a transaction-mode pooler the relay's one connection (it LISTENs) goes to
        // --listen-url, directly to PostgreSQL; without one it polls through the pooler.
        builder = builder.direct_url(url);
    }
    let relay = builder.build()?;
    db.ready().await?;
    let source = match &outbox_url {
        Some(url) => {
            let name = describe(url);
            check_outbox(url)
                .await
                .with_context(|| format!("the outbox database {name}"))?;
            name
        }
        None => format!("{} (the same database)", describe(&db.url)),
    };
    let stop = stop_on_signals()?;
    output::note(format_args!(
        "relaying pgbus.outbox of {source}; SIGTERM or Ctrl-C stops"
    ));
    relay.run(stop).await?;
    Ok(ExitCode::SUCCESS)
}

/// The relay reconnects through outages for ever, so a URL that is wrong from the start is
/// refused now, in one line: one connection says why it cannot connect (a pool would only
/// time out), then the schema must be current there.
async fn check_outbox(url: &str) -> anyhow::Result<()> {
    drop(pgbus_pg::connect(url, "relay").await?);
    PgBackend::builder(url)
        .max_connections(1)
        .role("relay")
        .build()?
        .check_schema()
        .await?;
    Ok(())
}

/// Names a database without its password: `host:port/dbname` for a URL, the `host`,
/// `port` and `dbname` settings of a key=value string.
fn describe(url: &str) -> String {
    if let Ok(parsed) = reqwest::Url::parse(url) {
        if matches!(parsed.scheme(), "postgres" | "postgresql") {
            let host = parsed.host_str().unwrap_or("localhost");
            return match parsed.port() {
                Some(port) => format!("{host}:{port}{}", parsed.path()),
                None => format!("{host}{}", parsed.path()),
            };
        }
    }
    let kept: Vec<&str> = url
        .split_whitespace()
        .filter(|pair| {
            let key = pair.split('=').next().unwrap_or_default();
            matches!(key, "host" | "hostaddr" | "port" | "dbname")
        })
        .collect();
    if kept.is_empty() {
        "the database given".to_owned()
    } else {
        kept.join(" ")
    }
}

#[cfg(test)]
mod tests {
    use super::describe;

    #[test]
    fn databases_are_named_without_passwords() {
        assert_eq!(
            describe("postgres://app:secret@db.internal:5433/orders?sslmode=disable"),
            "db.internal:5433/orders"
        );
        assert_eq!(describe("postgresql://app@localhost/app"), "localhost/app");
        assert_eq!(
            describe("host=/tmp port=5432 user=app password=secret dbname=orders"),
            "host=/tmp port=5432 dbname=orders"
        );
        assert_eq!(describe("user=app password=secret"), "the database given");
    }
}
