//! `pgbus db start|url|stop`: the embedded database.

use std::process::ExitCode;

use clap::Subcommand;
use pgbus_pg::PersistentCluster;

use crate::support::database::{embedded, home};

#[derive(Debug, Subcommand)]
pub(crate) enum DbCommand {
    /// Start the embedded database if needed and print its URL.
    Start,
    /// Start the embedded database if needed and print its URL, password included (for
    /// psql and other clients).
    Url,
    /// Stop the embedded database.
    Stop,
}

/// `pgbus db ...`: runs without connecting first (it may start the database).
pub(crate) async fn run(command: &DbCommand) -> anyhow::Result<ExitCode> {
    match command {
        DbCommand::Start | DbCommand::Url => {
            let url = embedded().await?;
            println!("{url}");
        }
        DbCommand::Stop => {
            let data_dir = home()?.join("data");
            let stopped =
                tokio::task::spawn_blocking(move || PersistentCluster::stop(&data_dir)).await??;
            println!(
                "{}",
                if stopped {
                    "stopped the embedded PostgreSQL"
                } else {
                    "the embedded PostgreSQL was not running"
                }
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}
