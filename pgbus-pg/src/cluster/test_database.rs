//! [`test_database`]: a fresh database per test, on a shared throwaway cluster.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use super::local::LocalCluster;
use super::pgbouncer::{PgBouncer, PgBouncerOptions};
use super::{error_chain, percent_encode, ClusterError, TEST_URL_ENV};

/// Environment variable that makes the shared test cluster TLS-only when set to `1`.
const TEST_TLS_ENV: &str = "PGBUS_TEST_TLS";

/// A fresh, empty database for one test.
///
/// Made by [`test_database`]. The database is not dropped afterwards: on the shared
/// local cluster it disappears with the cluster; on a server given by
/// `PGBUS_TEST_DATABASE_URL` the `pgbus_test_*` databases are left for inspection.
#[derive(Debug, Clone)]
pub struct TestDatabase {
    url: String,
    name: String,
}

impl TestDatabase {
    /// Connection URL (or key=value connection string, matching `PGBUS_TEST_DATABASE_URL`)
    /// of the database.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's name, `pgbus_test_<pid>_<n>`.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// The cluster shared by all tests of this process, or why it could not be started.
static SHARED_CLUSTER: OnceLock<Result<SharedCluster, String>> = OnceLock::new();
/// Counter in the names of the databases [`test_database`] creates.
static NEXT_DATABASE: AtomicU64 = AtomicU64::new(0);

/// The shared test cluster, and how clients reach it.
#[derive(Debug)]
pub(super) struct SharedCluster {
    pub(super) cluster: LocalCluster,
    /// The CA certificate that verifies the server, for a TLS cluster.
    ca_file: Option<PathBuf>,
}

impl SharedCluster {
    /// URL of database `db` as the superuser: over TLS with full verification of the
    /// name `localhost` for a TLS cluster.
    pub(super) fn url_for(&self, db: &str) -> String {
        match &self.ca_file {
            None => self.cluster.url_for(db),
            Some(ca_file) => format!(
                "postgres://postgres:{}@localhost:{}/{db}?sslmode=verify-full&sslrootcert={}",
                percent_encode(self.cluster.password(), b""),
                self.cluster.port(),
                percent_encode(&ca_file.to_string_lossy(), b"/")
            ),
        }
    }
}

/// Creates a fresh database for one test.
///
/// Uses the server at `PGBUS_TEST_DATABASE_URL` when that is set (`CREATE DATABASE` on
/// it, so the URL's user needs the `CREATEDB` privilege), else one [`LocalCluster`] with
/// fast settings shared by the whole test process, started on first use. Safe to call
/// from many `#[tokio::test]`s at once, each on its own runtime; needs a tokio runtime.
///
/// With `PGBUS_TEST_TLS=1` (and no `PGBUS_TEST_DATABASE_URL`) the shared cluster accepts
/// TCP connections over TLS only, with a server certificate for `localhost` and
/// `127.0.0.1` from a fresh test CA, and the URLs read
/// `postgres://postgres:PW@localhost:PORT/DB?sslmode=verify-full&sslrootcert=CA_FILE`
/// ([`tls_ca_file`] gives `CA_FILE`). That needs the `test-tls` feature.
///
/// # Panics
///
/// With a one-line message when no server can be had (no PostgreSQL binaries and no
/// `PGBUS_TEST_DATABASE_URL`, a server that cannot be reached, ...). It never skips.
pub async fn test_database() -> TestDatabase {
    let admin_url = match std::env::var(TEST_URL_ENV) {
        Ok(url) if !url.trim().is_empty() => url,
        _ => {
            let cluster = tokio::task::spawn_blocking(shared_cluster)
                .await
                .expect("starting the shared test cluster panicked");
            match cluster {
                Ok(shared) => shared.url_for("postgres"),
                Err(message) => panic!("pgbus test database: {message}"),
            }
        }
    };
    match create_test_database(&admin_url).await {
        Ok(database) => database,
        Err(err) => panic!(
            "pgbus test database: could not create a database via {}: {}",
            source_name(),
            error_chain(&err)
        ),
    }
}

/// A fresh database for one test on the shared local cluster, and a PgBouncer in front
/// of the cluster with `pool_size` server connections and transaction pooling. Connect
/// through the bouncer with `bouncer.url_for(database.name())`; `database.url()` stays
/// direct. The bouncer stops when dropped.
///
/// # Panics
///
/// Like [`test_database`], and when PgBouncer is not installed or does not start, or
/// `PGBUS_TEST_DATABASE_URL` is set (the bouncer needs the shared cluster's password).
pub async fn test_database_behind_pgbouncer(pool_size: u32) -> (TestDatabase, PgBouncer) {
    if matches!(std::env::var(TEST_URL_ENV), Ok(url) if !url.trim().is_empty()) {
        panic!(
            "pgbus test database: a PgBouncer needs the shared local cluster; unset {TEST_URL_ENV}"
        );
    }
    let database = test_database().await;
    let bouncer = tokio::task::spawn_blocking(move || {
        let shared = shared_cluster().map_err(str::to_owned)?;
        PgBouncer::start(
            &shared.cluster,
            PgBouncerOptions::default().pool_size(pool_size),
        )
        .map_err(|err| error_chain(&err))
    })
    .await
    .expect("starting PgBouncer panicked");
    match bouncer {
        Ok(bouncer) => (database, bouncer),
        Err(message) => panic!("pgbus test database: {message}"),
    }
}

/// The CA certificate file that verifies the shared test cluster's server certificate,
/// when the TLS pass is on (`PGBUS_TEST_TLS=1`): for tests that build their own URLs,
/// e.g. one naming a host the certificate does not cover. `None` without the TLS pass,
/// with `PGBUS_TEST_DATABASE_URL`, or before the process's first [`test_database`] (this
/// starts nothing).
pub fn tls_ca_file() -> Option<PathBuf> {
    match SHARED_CLUSTER.get() {
        Some(Ok(shared)) => shared.ca_file.clone(),
        _ => None,
    }
}

/// Starts the shared cluster once; every later call gets the same outcome.
pub(super) fn shared_cluster() -> Result<&'static SharedCluster, &'static str> {
    SHARED_CLUSTER
        .get_or_init(|| start_shared_cluster().map_err(|err| error_chain(&err)))
        .as_ref()
        .map_err(String::as_str)
}

fn start_shared_cluster() -> Result<SharedCluster, ClusterError> {
    match std::env::var(TEST_TLS_ENV) {
        Ok(value) if value.trim() == "1" => start_tls_cluster(),
        _ => Ok(SharedCluster {
            cluster: LocalCluster::builder().fast(true).start()?,
            ca_file: None,
        }),
    }
}

/// A TLS-only cluster with a server certificate from a fresh test CA, whose certificate
/// is kept in the cluster's own directory (removed with it).
#[cfg(feature = "test-tls")]
fn start_tls_cluster() -> Result<SharedCluster, ClusterError> {
    let ca = super::TestCa::new("pgbus test CA")?;
    // Only until the cluster has copied certificate and key into its data directory.
    let certs = tempfile::Builder::new()
        .prefix("pgbus-certs-")
        .tempdir()
        .map_err(super::io_err(
            "create temporary directory in",
            &std::env::temp_dir(),
        ))?;
    let server = ca.server_cert(certs.path(), "server", &["localhost", "127.0.0.1", "::1"])?;
    let cluster = LocalCluster::builder()
        .fast(true)
        .tls(&server.cert, &server.key)
        .start()?;
    let ca_file = ca.write_cert(&cluster.beside_data_dir("ca.crt")?)?;
    Ok(SharedCluster {
        cluster,
        ca_file: Some(ca_file),
    })
}

#[cfg(not(feature = "test-tls"))]
fn start_tls_cluster() -> Result<SharedCluster, ClusterError> {
    Err(ClusterError::InvalidConfig(format!(
        "{TEST_TLS_ENV}=1 needs pgbus-pg's `test-tls` feature (e.g. cargo test --features pgbus-pg/test-tls)"
    )))
}

/// Where the admin connection goes, for messages (never the URL: it may hold a password).
fn source_name() -> String {
    match std::env::var(TEST_URL_ENV) {
        Ok(url) if !url.trim().is_empty() => TEST_URL_ENV.to_owned(),
        _ => "the shared local cluster".to_owned(),
    }
}

/// Creates the next free `pgbus_test_<pid>_<n>` database on the server at `admin_url`.
async fn create_test_database(admin_url: &str) -> pgbus_core::Result<TestDatabase> {
    // pgbus's own connector, so that the URL's TLS settings apply.
    let client = crate::connect::connect(admin_url, "test-admin").await?;
    let pid = std::process::id();
    loop {
        let name = format!(
            "pgbus_test_{pid}_{}",
            NEXT_DATABASE.fetch_add(1, Ordering::Relaxed)
        );
        match client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
        {
            Ok(()) => {
                return Ok(TestDatabase {
                    url: with_database(admin_url, &name),
                    name,
                })
            }
            // Left over by an earlier process with the same pid (another container, a
            // reboot): take the next number.
            Err(err)
                if err.code() == Some(&tokio_postgres::error::SqlState::DUPLICATE_DATABASE) => {}
            Err(err) => return Err(crate::error::db("creating a test database", err)),
        }
    }
}

/// `url` with its database replaced by `db`; `url` is a `postgres://` URL or a key=value
/// connection string. `db` must not need quoting or percent-encoding.
fn with_database(url: &str, db: &str) -> String {
    let url = url.trim();
    for scheme in ["postgres://", "postgresql://"] {
        if let Some(rest) = url.strip_prefix(scheme) {
            let (before_query, query) = match rest.find('?') {
                Some(at) => rest.split_at(at),
                None => (rest, ""),
            };
            let authority = before_query.split('/').next().unwrap_or_default();
            return format!("{scheme}{authority}/{db}{query}");
        }
    }
    // Key=value form: a later `dbname` overrides an earlier one.
    format!("{url} dbname={db}")
}

#[cfg(test)]
mod tests {
    use super::super::test_support::connect;
    use super::*;

    #[tokio::test]
    async fn test_databases_are_distinct_and_accept_connections() {
        let first = test_database().await;
        let second = test_database().await;
        assert_ne!(first.name(), second.name());
        assert_ne!(first.url(), second.url());
        let prefix = format!("pgbus_test_{}_", std::process::id());
        for db in [&first, &second] {
            assert!(db.name().starts_with(&prefix), "{}", db.name());
            let client = connect(db.url()).await;
            let current: String = client
                .query_one("SELECT current_database()", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(current, db.name());
        }
    }

    /// The TLS pass's URLs work with libpq (pgbus's own connector does TLS separately).
    #[cfg(feature = "test-tls")]
    #[test]
    fn the_tls_shared_cluster_verifies_as_localhost() {
        use super::super::test_support::psql;

        let shared = start_tls_cluster().unwrap();
        let url = shared.url_for("postgres");
        assert!(url.contains("@localhost:"), "{url}");
        assert!(url.contains("sslmode=verify-full&sslrootcert="), "{url}");
        let encrypted = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
        assert_eq!(psql(&url, encrypted).as_deref(), Ok("t"));
        let plaintext = url.replace("sslmode=verify-full", "sslmode=disable");
        assert!(psql(&plaintext, "SELECT 1").is_err(), "{plaintext}");
    }

    #[tokio::test]
    async fn a_test_database_is_reachable_through_pgbouncer() {
        let (database, bouncer) = test_database_behind_pgbouncer(2).await;
        let client = connect(&bouncer.url_for(database.name())).await;
        let rows = client
            .simple_query("SELECT current_database()")
            .await
            .unwrap();
        let current = rows.iter().find_map(|message| match message {
            tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0),
            _ => None,
        });
        assert_eq!(current, Some(database.name()));
    }

    #[test]
    fn database_is_replaced_in_urls_and_connection_strings() {
        assert_eq!(
            with_database("postgres://u:p@h:5432/postgres?sslmode=disable", "t1"),
            "postgres://u:p@h:5432/t1?sslmode=disable"
        );
        assert_eq!(
            with_database("postgresql://u@h", "t1"),
            "postgresql://u@h/t1"
        );
        assert_eq!(
            with_database("postgres://u@h?application_name=x", "t1"),
            "postgres://u@h/t1?application_name=x"
        );
        assert_eq!(
            with_database("host=h user=u dbname=postgres", "t1"),
            "host=h user=u dbname=postgres dbname=t1"
        );
        let config: tokio_postgres::Config = with_database("host=h dbname=postgres", "t1")
            .parse()
            .unwrap();
        assert_eq!(config.get_dbname(), Some("t1"));
    }
}
