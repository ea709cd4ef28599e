//! The server the benchmarks run on, and one fresh database per scenario run.

use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use pgbus_pg::{LocalCluster, PgBouncer, PgBouncerOptions};
use tokio_postgres::{Client, Config, NoTls};

/// `application_name` of the bench's own connections. It does not start with `pgbus:`, so
/// the connection counts in `pg_stat_activity` see only what pgbus itself opens.
pub(crate) const BENCH_APP: &str = "pgbus-bench";

/// How long pgbus's connections may take to close after a run.
const CONNECTIONS_CLOSE_WITHIN: Duration = Duration::from_secs(5);

const OPEN_PGBUS_CONNECTIONS: &str = "
SELECT count(*) FROM pg_stat_activity WHERE datname = $1 AND application_name LIKE 'pgbus:%'";

/// The statements that took the most server time since the last reset, over every
/// database (a scenario's runs each have their own), utility statements not tracked.
const TOP_STATEMENTS: &str = "
SELECT regexp_replace(query, '\\s+', ' ', 'g'), sum(calls)::int8, sum(total_exec_time)
FROM pg_stat_statements
GROUP BY 1
ORDER BY 3 DESC
LIMIT $1";

/// One statement's share of a scenario's server time (`pg_stat_statements`).
#[derive(Debug, Clone)]
pub(crate) struct TopStatement {
    /// Normalised text, whitespace folded.
    pub(crate) query: String,
    pub(crate) calls: i64,
    pub(crate) total_ms: f64,
}

/// A throwaway local cluster, or a server given by URL.
pub(crate) struct Server {
    cluster: Option<LocalCluster>,
    /// Whether `pg_stat_statements` is loaded and installed in the admin database.
    statements: bool,
    /// A PgBouncer in transaction mode in front of the local cluster, started on first use.
    bouncer: tokio::sync::OnceCell<PgBouncer>,
    admin_url: String,
    next_database: AtomicU32,
}

/// A database made for one scenario run.
pub(crate) struct Database {
    name: String,
    url: String,
}

impl Database {
    pub(crate) fn url(&self) -> &str {
        &self.url
    }
}

impl Server {
    /// Starts a local cluster with PostgreSQL's durable defaults, unless `url` is given.
    pub(crate) async fn start(url: Option<&str>) -> anyhow::Result<Self> {
        let (cluster, admin_url) = match url {
            Some(url) => (None, url.to_owned()),
            None => {
                let cluster = tokio::task::spawn_blocking(|| {
                    // With `pg_stat_statements` where the machine has it; without, if the
                    // server refuses to start with it.
                    LocalCluster::builder()
                        .setting("shared_preload_libraries", "pg_stat_statements")
                        .setting("pg_stat_statements.track_utility", "off")
                        .start()
                        .or_else(|_| LocalCluster::builder().start())
                })
                .await
                .context("starting the local cluster panicked")?
                .context("could not start a throwaway PostgreSQL cluster")?;
                let url = cluster.url();
                (Some(cluster), url)
            }
        };
        let mut server = Server {
            cluster,
            statements: false,
            bouncer: tokio::sync::OnceCell::new(),
            admin_url,
            next_database: AtomicU32::new(0),
        };
        // Fail early, with the reason, when the server cannot be reached.
        let admin = server.admin().await?;
        server.statements = admin
            .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
            .await
            .is_ok()
            && admin
                .batch_execute("SELECT pg_stat_statements_reset()")
                .await
                .is_ok();
        Ok(server)
    }

    /// Where the benchmarks run, for the report (never the URL: it may hold a password).
    pub(crate) fn describe(&self) -> String {
        match &self.cluster {
            Some(cluster) => format!(
                "throwaway local cluster (`LocalCluster`, PostgreSQL's durable defaults) on 127.0.0.1:{}",
                cluster.port()
            ),
            None => "the server given by --database-url".to_owned(),
        }
    }

    /// A connection to the database named in the URL (or `postgres` of the local cluster).
    pub(crate) async fn admin(&self) -> anyhow::Result<Client> {
        connect(&self.admin_url)
            .await
            .context("could not connect to the benchmark server")
    }

    /// The URL of `direct_url`'s database through a PgBouncer in transaction mode (the
    /// local cluster only: a server given by URL has no PgBouncer of ours in front).
    pub(crate) async fn pooled_url(&self, direct_url: &str) -> anyhow::Result<String> {
        let Some(cluster) = &self.cluster else {
            bail!("the pooler variant needs the local cluster, not --database-url");
        };
        let bouncer = self
            .bouncer
            .get_or_try_init(|| async {
                // Fewer server connections than the latency worker's slots, as in production.
                PgBouncer::start(cluster, PgBouncerOptions::default().pool_size(4))
                    .context("could not start PgBouncer")
            })
            .await?;
        let config = Config::from_str(direct_url).context("invalid database URL")?;
        let database = config.get_dbname().context("a URL without a database")?;
        Ok(bouncer.url_for(database))
    }

    /// The `n` statements that took the most server time since the last call (then
    /// resets the counts); `None` without `pg_stat_statements`.
    pub(crate) async fn top_statements(&self, n: i64) -> anyhow::Result<Option<Vec<TopStatement>>> {
        if !self.statements {
            return Ok(None);
        }
        let admin = self.admin().await?;
        let rows = admin.query(TOP_STATEMENTS, &[&n]).await?;
        admin
            .batch_execute("SELECT pg_stat_statements_reset()")
            .await?;
        Ok(Some(
            rows.iter()
                .map(|row| TopStatement {
                    query: row.get(0),
                    calls: row.get(1),
                    total_ms: row.get(2),
                })
                .collect(),
        ))
    }

    /// Creates an empty database for one scenario run.
    pub(crate) async fn fresh_database(&self) -> anyhow::Result<Database> {
        let n = self.next_database.fetch_add(1, Ordering::Relaxed);
        let name = format!("pgbus_bench_{}_{n}", std::process::id());
        self.admin()
            .await?
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .with_context(|| format!("could not create database {name}"))?;
        let url = match &self.cluster {
            Some(cluster) => cluster.url_for(&name),
            None => url_with_database(&self.admin_url, &name)?,
        };
        Ok(Database { name, url })
    }

    /// Drops a database made by [`fresh_database`](Self::fresh_database). pgbus closes its
    /// connections as their owners are dropped, a moment after the run; the drop waits for
    /// that (and says so if they stay open), then closes whatever is left.
    pub(crate) async fn drop_database(&self, database: Database) -> anyhow::Result<()> {
        let admin = self.admin().await?;
        let deadline = Instant::now() + CONNECTIONS_CLOSE_WITHIN;
        loop {
            let open: i64 = admin
                .query_one(OPEN_PGBUS_CONNECTIONS, &[&database.name])
                .await?
                .get(0);
            if open == 0 {
                break;
            }
            if Instant::now() > deadline {
                eprintln!(
                    "warning: {open} pgbus connection(s) still open on {} {:?} after their \
                     owners were dropped",
                    database.name, CONNECTIONS_CLOSE_WITHIN
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        admin
            .batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                database.name
            ))
            .await
            .with_context(|| format!("could not drop database {}", database.name))
    }

    /// Stops the local cluster, if there is one.
    pub(crate) async fn stop(self) {
        // PgBouncer before the cluster behind it.
        drop(self.bouncer);
        if let Some(cluster) = self.cluster {
            let _ = tokio::task::spawn_blocking(move || cluster.stop()).await;
        }
    }
}

/// Opens a connection named [`BENCH_APP`].
pub(crate) async fn connect(url: &str) -> anyhow::Result<Client> {
    let mut config = Config::from_str(url).context("invalid database URL")?;
    config.application_name(BENCH_APP);
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// `url` with its database replaced by `database`: the path of a `postgres://` URL, or a
/// `dbname=` appended to a key=value string (the last value of a key wins).
fn url_with_database(url: &str, database: &str) -> anyhow::Result<String> {
    let Some(scheme_end) = ["postgres://", "postgresql://"]
        .iter()
        .find_map(|scheme| url.starts_with(scheme).then_some(scheme.len()))
    else {
        if url.contains('=') {
            return Ok(format!("{url} dbname={database}"));
        }
        bail!("--database-url is neither a postgres:// URL nor a key=value string");
    };
    let rest = &url[scheme_end..];
    let end_of_authority = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end_of_authority);
    let query = tail.find('?').map_or("", |at| &tail[at..]);
    Ok(format!(
        "{}{authority}/{database}{query}",
        &url[..scheme_end]
    ))
}

#[cfg(test)]
mod tests {
    use super::url_with_database;

    #[test]
    fn replaces_the_database_of_a_url() {
        let cases = [
            ("postgres://u@h:5432/app", "postgres://u@h:5432/db"),
            ("postgres://u@h:5432", "postgres://u@h:5432/db"),
            (
                "postgresql://h/app?sslmode=disable",
                "postgresql://h/db?sslmode=disable",
            ),
            (
                "postgres://h?sslmode=disable",
                "postgres://h/db?sslmode=disable",
            ),
            (
                "host=h user=u dbname=app",
                "host=h user=u dbname=app dbname=db",
            ),
        ];
        for (url, expected) in cases {
            assert_eq!(url_with_database(url, "db").unwrap(), expected, "{url}");
        }
        assert!(url_with_database("nonsense", "db").is_err());
    }
}
