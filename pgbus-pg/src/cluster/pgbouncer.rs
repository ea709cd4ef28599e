//! [`PgBouncer`]: a PgBouncer in front of a [`LocalCluster`], for tests.

use std::fs::{self, File};
use std::net::{Ipv4Addr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use super::local::LocalCluster;
use super::{
    free_port, io_err, is_executable, log_tail, running_as_root, superuser_url, write_private,
    ClusterError, Password, Runner, LOG_TARGET, PORT_RETRIES, POSTGRES,
};

/// Where Debian installs pgbouncer, outside most users' PATH.
const SBIN_PGBOUNCER: &str = "/usr/sbin/pgbouncer";
/// How long a start may take before it counts as failed.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a stop waits for pgbouncer to exit after SIGTERM before it kills it.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Watchdog run with `sh -c`. Positional parameters: owner pid, pid file, directory to
/// remove. Like the cluster's watchdog it ignores the terminal's signals.
const WATCHDOG_SCRIPT: &str = r#"trap '' HUP INT QUIT TERM PIPE
owner=$1; pidfile=$2; dir=$3
while kill -0 "$owner" 2>/dev/null; do sleep 1; done
if [ -f "$pidfile" ]; then kill -TERM "$(cat "$pidfile")" 2>/dev/null; sleep 1; fi
rm -rf -- "$dir"
"#;

/// How PgBouncer assigns server connections to clients (`pool_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PoolMode {
    /// A server connection per transaction: sessions share connections, so session state
    /// (prepared statements, `LISTEN`, advisory locks, `SET`) does not carry over.
    Transaction,
    /// A server connection per client session.
    Session,
}

impl PoolMode {
    /// The mode's name in `pgbouncer.ini`.
    pub fn as_str(self) -> &'static str {
        match self {
            PoolMode::Transaction => "transaction",
            PoolMode::Session => "session",
        }
    }
}

/// Settings of a [`PgBouncer`]; consuming setters.
#[derive(Debug, Clone)]
#[must_use]
pub struct PgBouncerOptions {
    pool_mode: PoolMode,
    pool_size: u32,
    max_client_conn: u32,
}

impl Default for PgBouncerOptions {
    /// Transaction pooling, 20 server connections per database and user (PgBouncer's
    /// default), up to 500 clients.
    fn default() -> Self {
        PgBouncerOptions {
            pool_mode: PoolMode::Transaction,
            pool_size: 20,
            max_client_conn: 500,
        }
    }
}

impl PgBouncerOptions {
    /// How server connections are assigned to clients. Default: transaction.
    pub fn pool_mode(mut self, mode: PoolMode) -> Self {
        self.pool_mode = mode;
        self
    }

    /// Server connections per database and user (`default_pool_size`). Default: 20.
    pub fn pool_size(mut self, size: u32) -> Self {
        self.pool_size = size;
        self
    }

    /// Client connections accepted at once (`max_client_conn`). Default: 500.
    pub fn max_client_conn(mut self, max: u32) -> Self {
        self.max_client_conn = max;
        self
    }
}

/// A PgBouncer on a free port of 127.0.0.1 in front of a [`LocalCluster`], in its own
/// temporary directory, stopped on drop. Any database name is passed through to the
/// cluster; clients and PgBouncer both authenticate with the cluster's superuser password
/// (`scram-sha-256`). A watchdog stops it once the owning process has exited, if it was
/// never dropped. When the process runs as root, PgBouncer runs as the `postgres` OS user.
///
/// ```no_run
/// # fn main() -> Result<(), pgbus_pg::ClusterError> {
/// use pgbus_pg::{LocalCluster, PgBouncer, PgBouncerOptions};
/// let cluster = LocalCluster::builder().fast(true).start()?;
/// let bouncer = PgBouncer::start(&cluster, PgBouncerOptions::default().pool_size(4))?;
/// println!("connect to {}", bouncer.url_for("postgres"));
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct PgBouncer {
    port: u16,
    password: Password,
    pid_file: PathBuf,
    log_file: PathBuf,
    child: Option<Child>,
    watchdog: Option<Child>,
    /// Last, so that the files outlive the process.
    dir: Option<TempDir>,
}

impl PgBouncer {
    /// Starts PgBouncer in front of `cluster` and waits until it accepts connections.
    /// Blocks the calling thread, typically for well under a second.
    pub fn start(
        cluster: &LocalCluster,
        options: PgBouncerOptions,
    ) -> Result<PgBouncer, ClusterError> {
        if options.pool_size == 0 || options.max_client_conn == 0 {
            return Err(ClusterError::InvalidConfig(
                "PgBouncer pool_size and max_client_conn must be at least 1".to_owned(),
            ));
        }
        let binary = find_pgbouncer()?;
        let tracks_prepared = tracks_prepared_statements(&binary);
        let runner = Runner {
            as_postgres: running_as_root(),
        };
        if runner.as_postgres {
            runner.check_postgres_user()?;
        }
        let dir = tempfile::Builder::new()
            .prefix("pgbus-pgbouncer-")
            .tempdir()
            .map_err(io_err(
                "create temporary directory in",
                &std::env::temp_dir(),
            ))?;
        let password = Password(cluster.password().to_owned());
        let mut bouncer = PgBouncer {
            port: free_port()?,
            password,
            pid_file: dir.path().join("pgbouncer.pid"),
            log_file: dir.path().join("pgbouncer.log"),
            child: None,
            watchdog: None,
            dir: Some(dir),
        };
        let dir = bouncer.dir()?.to_path_buf();
        let auth_file = dir.join("userlist.txt");
        // Plain text: PgBouncer then speaks SCRAM to clients and to the server alike.
        write_private(
            &auth_file,
            format!("\"{POSTGRES}\" \"{}\"\n", bouncer.password.as_str()).as_bytes(),
        )?;
        bouncer.watchdog = Some(bouncer.spawn_watchdog()?);

        let mut retries_left = PORT_RETRIES;
        loop {
            let ini = dir.join("pgbouncer.ini");
            fs::write(
                &ini,
                bouncer.ini(cluster, &options, &auth_file, tracks_prepared),
            )
            .map_err(io_err("write", &ini))?;
            if runner.as_postgres {
                // PgBouncer refuses to run as root; as `postgres` it must own its files.
                runner.chown(&dir, true)?;
            }
            let log_offset = fs::metadata(&bouncer.log_file).map_or(0, |m| m.len());
            let stderr_file = dir.join("pgbouncer.stderr");
            let stderr = File::create(&stderr_file).map_err(io_err("create", &stderr_file))?;
            let mut command = runner.command(&binary);
            command.arg(&ini).stdout(Stdio::null()).stderr(stderr);
            let child = command.spawn().map_err(|source| ClusterError::Spawn {
                program: binary.display().to_string(),
                source,
            })?;
            bouncer.child = Some(child);
            match bouncer.wait_until_listening() {
                Ok(()) => break,
                Err(exited) => {
                    bouncer.stop_process();
                    let log = log_tail(&bouncer.log_file, log_offset);
                    let stderr = fs::read_to_string(&stderr_file).unwrap_or_default();
                    let output = format!("{}\n{log}", stderr.trim()).trim().to_owned();
                    if retries_left > 0 && output.contains("in use") {
                        retries_left -= 1;
                        bouncer.port = free_port()?;
                        continue;
                    }
                    return Err(ClusterError::PgBouncerFailed {
                        reason: exited,
                        output,
                    });
                }
            }
        }
        tracing::info!(
            target: LOG_TARGET,
            port = bouncer.port,
            cluster_port = cluster.port(),
            pool_mode = options.pool_mode.as_str(),
            pool_size = options.pool_size,
            dir = %dir.display(),
            "started PgBouncer"
        );
        Ok(bouncer)
    }

    /// The TCP port PgBouncer listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// PgBouncer's log file.
    pub fn log_file(&self) -> &Path {
        &self.log_file
    }

    /// URL of database `db` through PgBouncer as the cluster's `postgres` superuser,
    /// password included. `pgbouncer` is PgBouncer's admin console (`SHOW POOLS`, ...;
    /// simple query protocol only).
    pub fn url_for(&self, db: &str) -> String {
        superuser_url(self.port, &self.password, db)
    }

    fn dir(&self) -> Result<&Path, ClusterError> {
        self.dir
            .as_ref()
            .map(TempDir::path)
            .ok_or_else(|| ClusterError::InvalidConfig("PgBouncer's directory is gone".to_owned()))
    }

    fn ini(
        &self,
        cluster: &LocalCluster,
        options: &PgBouncerOptions,
        auth_file: &Path,
        tracks_prepared: bool,
    ) -> String {
        // A TLS-only cluster refuses PgBouncer's server connections without TLS.
        let server_tls = if cluster.is_tls() {
            "server_tls_sslmode = require\n"
        } else {
            ""
        };
        // PgBouncer 1.21+ can carry named prepared statements across transactions (on by
        // default from 1.22): turned off, so the tests see what a transaction pooler
        // without it does to a client that prepares.
        let prepared = if tracks_prepared {
            "max_prepared_statements = 0\n"
        } else {
            ""
        };
        format!(
            "; Written by pgbus for one test run.\n\
             [databases]\n\
             * = host=127.0.0.1 port={cluster_port}\n\
             \n\
             [pgbouncer]\n\
             listen_addr = 127.0.0.1\n\
             listen_port = {port}\n\
             unix_socket_dir =\n\
             auth_type = scram-sha-256\n\
             auth_file = {auth_file}\n\
             admin_users = {POSTGRES}\n\
             pool_mode = {pool_mode}\n\
             default_pool_size = {pool_size}\n\
             max_client_conn = {max_client_conn}\n\
             ignore_startup_parameters = extra_float_digits,options\n\
             logfile = {log_file}\n\
             pidfile = {pid_file}\n\
             {server_tls}{prepared}",
            cluster_port = cluster.port(),
            port = self.port,
            auth_file = auth_file.display(),
            pool_mode = options.pool_mode.as_str(),
            pool_size = options.pool_size,
            max_client_conn = options.max_client_conn,
            log_file = self.log_file.display(),
            pid_file = self.pid_file.display(),
        )
    }

    /// Waits until PgBouncer accepts TCP connections; `Err` says why it never did.
    fn wait_until_listening(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut() {
                match child.try_wait() {
                    Ok(Some(status)) => return Err(format!("it exited ({status})")),
                    Ok(None) => {}
                    Err(err) => return Err(format!("could not watch it: {err}")),
                }
            }
            if TcpStream::connect((Ipv4Addr::LOCALHOST, self.port)).is_ok() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "it did not listen on port {} within {}s",
                    self.port,
                    START_TIMEOUT.as_secs()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the PgBouncer process: SIGTERM to PgBouncer itself (through `runuser` a
    /// SIGKILL could not be passed on), then SIGKILL if it lingers.
    fn stop_process(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(None) = child.try_wait() {
            let pid = fs::read_to_string(&self.pid_file)
                .ok()
                .and_then(|text| text.trim().parse::<u32>().ok())
                .unwrap_or_else(|| child.id());
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + STOP_TIMEOUT;
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Ok(None) = child.try_wait() {
                tracing::warn!(target: LOG_TARGET, port = self.port, "PgBouncer ignored SIGTERM; killing it");
                let _ = child.kill();
            }
        }
        let _ = child.wait();
        // A stale pid file must not make a later stop signal a stranger.
        let _ = fs::remove_file(&self.pid_file);
    }

    /// Spawns the watchdog that stops PgBouncer once this process is gone.
    fn spawn_watchdog(&self) -> Result<Child, ClusterError> {
        let args = [self.pid_file.as_os_str(), self.dir()?.as_os_str()];
        super::spawn_watchdog(WATCHDOG_SCRIPT, "pgbus-pgbouncer-watchdog", args)
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        self.stop_process();
        if let Some(mut watchdog) = self.watchdog.take() {
            // SIGKILL: the watchdog ignores the polite signals.
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        if let Some(dir) = self.dir.take() {
            let path = dir.path().to_path_buf();
            if let Err(err) = dir.close() {
                tracing::warn!(target: LOG_TARGET, path = %path.display(), error = %err, "could not remove PgBouncer's directory");
            }
        }
        tracing::debug!(target: LOG_TARGET, port = self.port, "stopped PgBouncer");
    }
}

/// Whether this PgBouncer knows `max_prepared_statements` (1.21 and later), from
/// `pgbouncer --version` ("PgBouncer 1.18.0"); unknown versions are taken as older.
fn tracks_prepared_statements(binary: &Path) -> bool {
    let Ok(output) = Command::new(binary).arg("--version").output() else {
        return false;
    };
    let text = String::from_utf8_lossy(&output.stdout);
    let version: Vec<u32> = text
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .split('.')
        .map_while(|part| part.parse().ok())
        .collect();
    version.as_slice() >= [1, 21].as_slice()
}

/// `pgbouncer` on PATH, else Debian's `/usr/sbin/pgbouncer`.
fn find_pgbouncer() -> Result<PathBuf, ClusterError> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join("pgbouncer"))
        .chain([PathBuf::from(SBIN_PGBOUNCER)])
        .find(|path| is_executable(path))
        .ok_or(ClusterError::PgBouncerNotFound)
}

#[cfg(test)]
mod tests {
    use tokio_postgres::{Client, SimpleQueryMessage};

    use super::super::test_support::{connect, refuses_connections};
    use super::*;

    /// The first column of the first row `sql` returns, through the simple query protocol
    /// (which transaction pooling and the admin console support).
    async fn value(client: &Client, sql: &str) -> String {
        client
            .simple_query(sql)
            .await
            .unwrap()
            .into_iter()
            .find_map(|message| match message {
                SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
                _ => None,
            })
            .unwrap_or_else(|| panic!("no row from {sql}"))
    }

    #[tokio::test]
    async fn clients_share_server_connections_through_pgbouncer() {
        let cluster = LocalCluster::builder().fast(true).start().unwrap();
        let bouncer = PgBouncer::start(&cluster, PgBouncerOptions::default().pool_size(1)).unwrap();
        assert_ne!(bouncer.port(), cluster.port());

        let first = connect(&bouncer.url_for("postgres")).await;
        let second = connect(&bouncer.url_for("postgres")).await;
        // Both went through to the cluster, over its one pooled server connection: with
        // transaction pooling two open sessions take turns on it.
        assert_eq!(
            value(&first, "SELECT inet_server_port()").await,
            cluster.port().to_string()
        );
        let backend = value(&first, "SELECT pg_backend_pid()").await;
        assert_eq!(value(&second, "SELECT pg_backend_pid()").await, backend);

        let admin = connect(&bouncer.url_for("pgbouncer")).await;
        let pool_mode = admin
            .simple_query("SHOW CONFIG")
            .await
            .unwrap()
            .into_iter()
            .find_map(|message| match message {
                SimpleQueryMessage::Row(row) if row.get(0) == Some("pool_mode") => {
                    row.get(1).map(str::to_owned)
                }
                _ => None,
            });
        assert_eq!(pool_mode.as_deref(), Some("transaction"));

        // The bouncer wants the password too.
        let no_password = format!("postgres://postgres@127.0.0.1:{}/postgres", bouncer.port());
        assert!(tokio_postgres::connect(&no_password, tokio_postgres::NoTls)
            .await
            .is_err());

        let port = bouncer.port();
        let dir = bouncer.dir().unwrap().to_path_buf();
        drop(bouncer);
        assert!(
            refuses_connections(port),
            "PgBouncer still listens on {port}"
        );
        assert!(!dir.exists(), "{} still exists", dir.display());
    }

    #[cfg(feature = "test-tls")]
    #[tokio::test]
    async fn pgbouncer_reaches_a_tls_only_cluster_over_tls() {
        let certs = tempfile::tempdir().unwrap();
        let ca = crate::TestCa::new("pgbus test CA").unwrap();
        let server = ca
            .server_cert(certs.path(), "server", &["localhost", "127.0.0.1"])
            .unwrap();
        let cluster = LocalCluster::builder()
            .fast(true)
            .tls(&server.cert, &server.key)
            .start()
            .unwrap();
        let bouncer = PgBouncer::start(&cluster, PgBouncerOptions::default()).unwrap();
        // Plain text from the client to PgBouncer, TLS from PgBouncer to the server.
        let client = connect(&bouncer.url_for("postgres")).await;
        assert_eq!(
            value(
                &client,
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
            )
            .await,
            "t"
        );
    }

    #[tokio::test]
    async fn session_pooling_gives_each_client_its_own_server_connection() {
        let cluster = LocalCluster::builder().fast(true).start().unwrap();
        let options = PgBouncerOptions::default()
            .pool_mode(PoolMode::Session)
            .pool_size(2);
        let bouncer = PgBouncer::start(&cluster, options).unwrap();
        let first = connect(&bouncer.url_for("postgres")).await;
        let second = connect(&bouncer.url_for("postgres")).await;
        assert_ne!(
            value(&first, "SELECT pg_backend_pid()").await,
            value(&second, "SELECT pg_backend_pid()").await
        );
    }
}
