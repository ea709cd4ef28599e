//! `pgbus stream publish|url`, and the secret that signs stream names for them and for
//! `pgbus serve`.

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use anyhow::Context;
use clap::Subcommand;
use pgbus_core::{StreamName, StreamStore};
use pgbus_stream::Signer;

use crate::database::Database;

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
    },
}

/// Where the generated signing secret is kept when `PGBUS_STREAM_SECRET` is not set.
const SECRET_FILE: &str = "stream-secret";

/// The signer shared by `pgbus stream url` and `pgbus serve`: `PGBUS_STREAM_SECRET`
/// (at least 16 bytes), else a random secret generated on first use and kept in the pgbus
/// home, readable by its owner only. Every `serve` of one deployment must share it, or
/// the URLs one hands out are refused by the others: set the variable in production.
pub(crate) fn signer() -> anyhow::Result<Signer> {
    if let Some(secret) = std::env::var_os("PGBUS_STREAM_SECRET").filter(|s| !s.is_empty()) {
        let secret = secret
            .into_string()
            .map_err(|_| anyhow::anyhow!("PGBUS_STREAM_SECRET is not UTF-8"))?;
        return Signer::new(secret).context("PGBUS_STREAM_SECRET");
    }
    let home = crate::database::home()?;
    std::fs::create_dir_all(&home)
        .with_context(|| format!("creating the pgbus home {}", home.display()))?;
    let path = home.join(SECRET_FILE);
    let secret = match std::fs::read_to_string(&path) {
        Ok(secret) => secret,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => create_secret(&path)?,
        Err(err) => return Err(err).with_context(|| format!("reading {}", path.display())),
    };
    Signer::new(secret.trim()).with_context(|| format!("the secret in {}", path.display()))
}

fn create_secret(path: &Path) -> anyhow::Result<String> {
    use rand::Rng;
    use std::os::unix::fs::OpenOptionsExt;
    let bytes: [u8; 32] = rand::rng().random();
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let created = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path);
    match created {
        Ok(mut file) => {
            file.write_all(secret.as_bytes())
                .with_context(|| format!("writing {}", path.display()))?;
            Ok(secret)
        }
        // Another process created it first: use theirs.
        Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
        }
        Err(err) => Err(err).with_context(|| format!("creating {}", path.display())),
    }
}

pub(crate) async fn stream(
    db: &Database,
    command: StreamCommand,
    quiet: bool,
) -> anyhow::Result<ExitCode> {
    match command {
        StreamCommand::Url { stream } => {
            println!("{}", signer()?.url_path(&StreamName::new(stream)?));
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
            match (stored, quiet) {
                (Some(id), _) => println!("{id}"),
                (None, false) => println!("broadcast"),
                (None, true) => {}
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
