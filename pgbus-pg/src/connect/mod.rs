//! Opening connections. A database URL is read once into [`ConnectOptions`]: libpq's TLS
//! settings (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`) and password sources
//! (`PGPASSWORD`, the password file) are resolved there, so every connection opened from
//! it, pooled or dedicated, is secured the same way. Every connection pgbus opens is named
//! `pgbus:<role>` in `application_name`, so its use can be counted in `pg_stat_activity`.

mod params;
mod pgpass;
mod tls;

use std::sync::Arc;

use pgbus_core::Result;
use tokio_postgres::tls::MakeTlsConnect;
use tokio_postgres::{Client, Config, Socket};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::error::{db, invalid};

pub use tls::SslMode;

/// A connection's I/O half, TLS or plain (decided per connection by `sslmode`).
pub(crate) type Connection =
    tokio_postgres::Connection<Socket, <MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream>;

/// How to reach a database: its URL (or key=value connection string) read once, with
/// libpq's TLS and password settings applied. Cheap to clone; clones share the TLS setup.
///
/// Follows libpq where tokio-postgres does not:
/// - `sslmode`: `disable`, `prefer` (the default: TLS when the server offers it, not
///   verified), `require` (TLS, verified against `sslrootcert` when one is given or
///   `~/.postgresql/root.crt` exists, as libpq does), `verify-ca` (the chain), `verify-full`
///   (the chain and the host name);
/// - `sslrootcert`: a PEM file, or `system` for the platform's roots (which implies
///   `verify-full`); `sslcert` and `sslkey`: a client certificate and its key;
/// - where the URL leaves them out: `PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT`, `PGSSLKEY`,
///   then the `~/.postgresql/` defaults; a missing password comes from `PGPASSWORD`, else
///   the password file (`PGPASSFILE`, default `~/.pgpass`, ignored unless `0600` or
///   stricter).
#[derive(Clone)]
pub struct ConnectOptions {
    inner: Arc<Inner>,
}

struct Inner {
    config: Config,
    mode: SslMode,
    tls: MakeRustlsConnect,
}

impl std::fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the config: it holds the password.
        f.debug_struct("ConnectOptions")
            .field("hosts", &self.inner.config.get_hosts())
            .field("ports", &self.inner.config.get_ports())
            .field("dbname", &self.inner.config.get_dbname())
            .field("sslmode", &self.inner.mode)
            .finish_non_exhaustive()
    }
}

impl ConnectOptions {
    /// Reads `url`: a `postgres://` URL or a key=value connection string. Fails with a
    /// one-line error that never repeats the URL (it may hold a password) on a malformed
    /// URL, an unknown `sslmode`, or a certificate or key file that cannot be read.
    pub fn parse(url: &str) -> Result<Self> {
        let params::Split { rest, ssl } = params::split(url)?;
        let mut config: Config = rest.parse().map_err(|err: tokio_postgres::Error| {
            invalid(format!("invalid database URL: {err}"))
        })?;
        let settings = tls::Settings::resolve(ssl)?;
        // libpq never uses TLS on a Unix socket (the kernel keeps it local), whatever
        // sslmode says; tokio-postgres would fail instead.
        let all_unix = !config.get_hosts().is_empty()
            && config.get_hostaddrs().is_empty()
            && config
                .get_hosts()
                .iter()
                .all(|host| matches!(host, tokio_postgres::config::Host::Unix(_)));
        config.ssl_mode(if all_unix {
            tokio_postgres::config::SslMode::Disable
        } else {
            settings.mode.driver_mode()
        });
        if config.get_password().is_none() {
            if let Some(password) = pgpass::password_for(&config) {
                config.password(password);
            }
        }
        let tls = MakeRustlsConnect::new(settings.client_config()?);
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                mode: settings.mode,
                tls,
            }),
        })
    }

    /// The `sslmode` in effect.
    pub fn ssl_mode(&self) -> SslMode {
        self.inner.mode
    }

    /// The driver's configuration for a connection named `pgbus:<role>`.
    pub(crate) fn config(&self, role: &str) -> Config {
        let mut config = self.inner.config.clone();
        config.application_name(format!("pgbus:{role}"));
        config
    }

    /// Opens one dedicated connection (not from a pool) named `pgbus:<role>`. Its I/O runs
    /// on a spawned task that ends when the client is dropped or the connection breaks.
    pub async fn connect(&self, role: &str) -> Result<Client> {
        self.open(role)
            .await
            .map_err(|err| db(&format!("opening a pgbus:{role} connection"), err))
    }

    /// Opens a connection named `pgbus:<role>`, its I/O on a spawned task that logs how it
    /// ended (dedicated connections and the pool's alike).
    pub(crate) async fn open(&self, role: &str) -> Result<Client, tokio_postgres::Error> {
        let (client, connection) = self.open_raw(role).await?;
        let role = role.to_owned();
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::warn!(target: "pgbus::connection", role = %role, error = %err, "connection closed with an error");
            }
        });
        Ok(client)
    }

    /// Opens a connection whose I/O half the caller drives (to read its notifications).
    pub(crate) async fn open_raw(
        &self,
        role: &str,
    ) -> Result<(Client, Connection), tokio_postgres::Error> {
        self.config(role).connect(self.inner.tls.clone()).await
    }
}

/// Opens one dedicated connection named `pgbus:<role>` to the database at `url`: the same
/// as [`ConnectOptions::parse`] then [`ConnectOptions::connect`].
pub async fn connect(url: &str, role: &str) -> Result<Client> {
    ConnectOptions::parse(url)?.connect(role).await
}

/// A connection string kept as given, whose `Debug` never shows it (it may hold a
/// password), so structs that keep one can derive `Debug`.
#[derive(Clone)]
pub(crate) struct SecretUrl(pub(crate) std::sync::Arc<str>);

impl std::fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"<database URL>\"")
    }
}

impl<T: Into<std::sync::Arc<str>>> From<T> for SecretUrl {
    fn from(url: T) -> Self {
        Self(url.into())
    }
}
