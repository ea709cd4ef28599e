//! [`test_database`]: a fresh database per test, on a shared throwaway cluster.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use super::local::LocalCluster;
use super::{error_chain, LOG_TARGET, TEST_URL_ENV};

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
static SHARED_CLUSTER: OnceLock<Result<LocalCluster, String>> = OnceLock::new();
/// Counter in the names of the databases [`test_database`] creates.
static NEXT_DATABASE: AtomicU64 = AtomicU64::new(0);

/// Creates a fresh database for one test.
///
/// Uses the server at `PGBUS_TEST_DATABASE_URL` when that is set (`CREATE DATABASE` on
/// it, so the URL's user needs the `CREATEDB` privilege), else one [`LocalCluster`] with
/// fast settings shared by the whole test process, started on first use. Safe to call
/// from many `#[tokio::test]`s at once, each on its own runtime; needs a tokio runtime.
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
                Ok(cluster) => cluster.url(),
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

/// Starts the shared cluster once; every later call gets the same outcome.
fn shared_cluster() -> Result<&'static LocalCluster, &'static str> {
    SHARED_CLUSTER
        .get_or_init(|| {
            LocalCluster::builder()
                .fast(true)
                .start()
                .map_err(|err| error_chain(&err))
        })
        .as_ref()
        .map_err(String::as_str)
}

/// Where the admin connection goes, for messages (never the URL: it may hold a password).
fn source_name() -> String {
    match std::env::var(TEST_URL_ENV) {
        Ok(url) if !url.trim().is_empty() => TEST_URL_ENV.to_owned(),
        _ => "the shared local cluster".to_owned(),
    }
}

/// Creates the next free `pgbus_test_<pid>_<n>` database on the server at `admin_url`.
async fn create_test_database(admin_url: &str) -> Result<TestDatabase, tokio_postgres::Error> {
    let mut config: tokio_postgres::Config = admin_url.parse()?;
    config.application_name("pgbus:test-admin");
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        if let Err(err) = connection.await {
            tracing::debug!(target: LOG_TARGET, error = %err, "test admin connection failed");
        }
    });
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
            Err(err) => return Err(err),
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
