//! `pgbus stream publish|url`.

use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use pgbus_core::{StreamName, StreamStore};

use crate::support::database::Database;
use crate::support::stream_secret::signer;
use crate::support::time::positive_duration;

#[derive(Debug, Subcommand)]
pub(crate) enum StreamCommand {
    /// Publish an event to a stream: stored durably (printing its id), or with
    /// --ephemeral only broadcast to the clients following it now.
    Publish {
        /// Stream name: lowercase [a-z0-9_], starting with a letter.
        stream: String,
        /// The event data (any text; each line becomes one `data:` line).
        data: String,
        /// The SSE event type.
        #[arg(long, default_value = "message")]
        event: String,
        /// Do not store: deliver to current followers only (stored anyway when too large
        /// for a notification).
        #[arg(long)]
        ephemeral: bool,
    },
    /// Print the signed path that `pgbus serve` streams this stream at.
    Url {
        /// Stream name.
        stream: String,
        /// How long the path is good for: a browser that reconnects after that is refused
        /// (403) and needs a newly signed one.
        #[arg(long, value_parser = positive_duration, default_value = "24h", conflicts_with = "no_expiry")]
        ttl: std::time::Duration,
        /// Sign without an expiry: the path is good until the secret that signed it is
        /// removed from PGBUS_STREAM_SECRET.
        #[arg(long)]
        no_expiry: bool,
    },
}

/// `pgbus stream ...`.
pub(crate) async fn run(command: StreamCommand, db: &Database) -> anyhow::Result<ExitCode> {
    match command {
        StreamCommand::Url {
            stream,
            ttl,
            no_expiry,
        } => {
            let stream = StreamName::new(stream)?;
            let signer = signer()?;
            let path = if no_expiry {
                signer.url_path(&stream)
            } else {
                let expires_at = std::time::SystemTime::now()
                    .checked_add(ttl)
                    .context("--ttl reaches past the end of time")?;
                signer.url_path_until(&stream, expires_at)
            };
            println!("{path}");
        }
        StreamCommand::Publish {
            stream,
            data,
            event,
            ephemeral,
        } => {
            let stream = StreamName::new(stream)?;
            let backend = db.ready().await?;
            let stored = if ephemeral {
                backend.broadcast(&stream, &event, &data).await?
            } else {
                Some(backend.publish(&stream, &event, &data).await?)
            };
            match stored {
                Some(id) => println!("{id}"),
                None => println!("broadcast"),
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
