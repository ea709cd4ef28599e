//! Which database a command runs on: `--database-url`, `DATABASE_URL`, or the embedded
//! default.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};

use pgbus_core::WakeupSource;
use pgbus_pg::{running_as_root, ConnectOptions, PersistentCluster, PgBackend, PgListener, Pooler};

/// Connections in a command's pool (`serve` keeps open files for them); `work` keeps to
/// its own budget (`work::POOL_CONNECTIONS`).
pub(crate) const POOL_SIZE: u32 = 8;

/// The database of this run.
pub(crate) struct Database {
    pub(crate) url: String,
    pub(crate) backend: PgBackend,
    embedded: bool,
    pooler: Pooler,
    /// `--listen-url`, kept behind a transaction-mode pooler only.
    listen_url: Option<String>,
}

/// Where the embedded database lives: `$PGBUS_HOME`, else `$XDG_DATA_HOME/pgbus`, else
/// `~/.local/share/pgbus`; as root with neither variable set, `/var/lib/pgbus` (the server
/// runs as the `postgres` user, who cannot enter root's home).
pub(crate) fn home() -> anyhow::Result<PathBuf> {
    if let Some(home) = std::env::var_os("PGBUS_HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(home));
    }
    if let Some(data) = std::env::var_os("XDG_DATA_HOME").filter(|h| !h.is_empty()) {
        return Ok(PathBuf::from(data).join("pgbus"));
    }
    if running_as_root() {
        return Ok(PathBuf::from("/var/lib/pgbus"));
    }
    match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
        Some(home) => Ok(PathBuf::from(home).join(".local/share/pgbus")),
        None => bail!("no PGBUS_HOME, XDG_DATA_HOME or HOME to keep the embedded database in; set PGBUS_HOME or --database-url"),
    }
}

/// Starts the embedded database if it is not running; returns its URL.
pub(crate) async fn embedded() -> anyhow::Result<String> {
    let home = home()?;
    std::fs::create_dir_all(&home)
        .with_context(|| format!("creating the pgbus home {}", home.display()))?;
    let data_dir = home.join("data");
    let cluster = tokio::task::spawn_blocking(move || PersistentCluster::ensure_running(&data_dir))
        .await?
        .context(
            "starting the embedded PostgreSQL (set --database-url or DATABASE_URL to use your own)",
        )?;
    if cluster.started {
        // Port and directory only: the URL holds the password.
        crate::support::output::note(format_args!(
            "started the embedded PostgreSQL in {} on port {} (`pgbus db stop` stops it)",
            cluster.data_dir.display(),
            cluster.port
        ));
    }
    Ok(cluster.url_for("postgres"))
}

impl Database {
    /// The database, with a backend whose pool holds at most `pool_size` connections.
    pub(crate) async fn resolve(
        url: Option<&str>,
        pooler: Pooler,
        listen_url: Option<&str>,
        pool_size: u32,
    ) -> anyhow::Result<Self> {
        let (url, embedded) = match url.filter(|u| !u.trim().is_empty()) {
            Some(url) => (url.to_owned(), false),
            None => (embedded().await?, true),
        };
        let backend = PgBackend::builder(&url)
            .max_connections(pool_size)
            .pooler(pooler)
            .build()?;
        let listen_url = match pooler {
            Pooler::Transaction => listen_url.filter(|u| !u.trim().is_empty()),
            _ => None,
        };
        if let Some(listen_url) = listen_url {
            // Checked now, so a bad URL fails at start, not in a reconnect loop.
            ConnectOptions::parse(listen_url).context("--listen-url")?;
        }
        Ok(Self {
            url,
            backend,
            embedded,
            pooler,
            listen_url: listen_url.map(str::to_owned),
        })
    }

    /// `--listen-url`, when it applies (behind a transaction-mode pooler).
    pub(crate) fn listen_url(&self) -> Option<&str> {
        self.listen_url.as_deref()
    }

    /// The URL for connections that need a session of their own (LISTEN): the database
    /// URL, or behind a transaction-mode pooler the `--listen-url`, if one was given.
    pub(crate) fn session_url(&self) -> Option<&str> {
        match self.pooler {
            Pooler::Transaction => self.listen_url(),
            _ => Some(&self.url),
        }
    }

    /// Wake-ups for workers: a LISTEN connection on the session URL, or none behind a
    /// transaction-mode pooler without `--listen-url` (said once; workers then poll).
    pub(crate) fn wakeups(
        &self,
        poll_interval: std::time::Duration,
    ) -> anyhow::Result<Option<Arc<dyn WakeupSource>>> {
        match self.session_url() {
            Some(url) => Ok(Some(Arc::new(PgListener::start(url)?))),
            None => {
                tracing::warn!(
                    target: "pgbus::listen",
                    "--pooler transaction without --listen-url: no LISTEN, workers poll every {}",
                    humantime::format_duration(poll_interval)
                );
                Ok(None)
            }
        }
    }

    /// Makes sure the schema is current: the embedded database is migrated as needed; a
    /// database of the user's is only checked (`pgbus migrate` changes it).
    pub(crate) async fn ready(&self) -> anyhow::Result<&PgBackend> {
        if self.embedded {
            self.backend.migrate().await?;
        } else {
            self.backend.check_schema().await?;
        }
        Ok(&self.backend)
    }
}
