//! Opening connections. Every connection pgbus opens is named `pgbus:<role>` in
//! `application_name`, so its use can be counted in `pg_stat_activity`.

use std::str::FromStr;

use pgbus_core::{Error, Result};
use tokio_postgres::{Client, Config, NoTls};

use crate::error::db;

/// Parses a connection URL (or key=value string) and names the connection `pgbus:<role>`.
pub fn config_for(url: &str, role: &str) -> Result<Config> {
    let mut config = Config::from_str(url).map_err(|err| Error::Backend {
        message: format!("invalid database URL: {err}"),
        transient: false,
        source: Some(err.into()),
    })?;
    config.application_name(format!("pgbus:{role}"));
    Ok(config)
}

/// Opens one dedicated connection (not from a pool) named `pgbus:<role>`. Its I/O runs on a
/// spawned task that ends when the client is dropped or the connection breaks.
pub async fn connect(url: &str, role: &str) -> Result<Client> {
    let config = config_for(url, role)?;
    open(&config, role)
        .await
        .map_err(|err| db(&format!("opening a pgbus:{role} connection"), err))
}

/// Opens a connection with `config`, its I/O on a spawned task that logs how it ended
/// (dedicated connections and the pool's alike).
pub(crate) async fn open(config: &Config, role: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = config.connect(NoTls).await?;
    let role = role.to_owned();
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::warn!(target: "pgbus::connection", role = %role, error = %err, "connection closed with an error");
        }
    });
    Ok(client)
}
