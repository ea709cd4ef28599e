//! Throwaway PostgreSQL clusters for tests, benchmarks and the CLI's embedded default,
//! plus the per-test database helper [`test_database`].
//!
//! A [`LocalCluster`] runs the machine's own PostgreSQL server binaries (`initdb`,
//! `pg_ctl`): it creates a data directory (a fresh temporary one unless told otherwise),
//! starts a server listening on `127.0.0.1` only, with its Unix socket inside the cluster's
//! own directory, and stops it again on drop.
//!
//! # Behaviour
//!
//! - The superuser is always `postgres`, authentication is `trust`, encoding UTF-8 with
//!   the C locale.
//! - When the current process runs as root, `initdb` and `pg_ctl` run as the `postgres`
//!   OS user (through `runuser`), because PostgreSQL refuses to run as root.
//! - A cluster that is never dropped (for instance one kept in a `static` by a test binary)
//!   does not leak: a small watchdog shell process stops the server and removes the
//!   temporary directory once the owning process has exited.
//! - Unix only: it relies on `sh`, `kill`, `chown` and `runuser`.

use std::error::Error as StdError;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

use tempfile::TempDir;

/// Tracing target of everything this module logs.
const LOG_TARGET: &str = "pgbus::cluster";
/// Environment variable naming a directory that holds `initdb` and `pg_ctl`.
const BIN_ENV: &str = "PGBUS_PG_BIN";
/// Environment variable pointing [`test_database`] at an existing server.
const TEST_URL_ENV: &str = "PGBUS_TEST_DATABASE_URL";
/// Where Debian and Ubuntu install the server binaries, one directory per major version.
const DEBIAN_PG_ROOT: &str = "/usr/lib/postgresql";
/// The database superuser, and the OS user the server runs as when we are root.
const POSTGRES: &str = "postgres";
/// Settings file written into the data directory on every start.
const SETTINGS_FILE: &str = "pgbus.conf";
/// Line added once to `postgresql.conf` so that [`SETTINGS_FILE`] is read.
const INCLUDE_LINE: &str = "include_if_exists = 'pgbus.conf'";
/// How long `pg_ctl` waits for the server to start or stop, in seconds.
const PG_CTL_TIMEOUT_SECS: &str = "60";
/// How many log lines a start failure reports.
const LOG_TAIL_LINES: usize = 30;
/// How often a start is retried on a fresh port when the picked port was taken meanwhile.
const PORT_RETRIES: u32 = 4;
/// Longest Unix socket path the kernel accepts (`sun_path` is 108 bytes with the NUL).
const MAX_SOCKET_PATH: usize = 107;
/// Environment variables of libpq and the server tools that must not leak into ours.
const PG_ENV_VARS: &[&str] = &[
    "PGDATA",
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGUSER",
    "PGDATABASE",
    "PGOPTIONS",
    "PGSERVICE",
    "PGSERVICEFILE",
    "PGPASSFILE",
    "PGSSLMODE",
];

/// Watchdog run with `sh -c`. Positional parameters: owner pid, pg_ctl path, data
/// directory, `1` to run pg_ctl as the postgres user, then the paths to remove.
/// It ignores the terminal's signals so that Ctrl-C on the test run, which kills the
/// owner, does not kill the watchdog before it has cleaned up.
const WATCHDOG_SCRIPT: &str = r#"trap '' HUP INT QUIT TERM PIPE
owner=$1; pg_ctl=$2; data=$3; as_postgres=$4; shift 4
while kill -0 "$owner" 2>/dev/null; do sleep 1; done
if [ -f "$data/postmaster.pid" ]; then
  if [ "$as_postgres" = 1 ]; then
    runuser -u postgres -- "$pg_ctl" -D "$data" -m immediate -w -t 60 stop
  else
    "$pg_ctl" -D "$data" -m immediate -w -t 60 stop
  fi
fi
for path in "$@"; do rm -rf -- "$path"; done
"#;

/// Why a [`LocalCluster`] could not be started.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// `initdb` and `pg_ctl` were not found where they were looked for.
    #[error(
        "PostgreSQL server binaries (initdb, pg_ctl) not found {searched}: install them \
         (Debian: apt-get install postgresql) or set {TEST_URL_ENV}"
    )]
    BinariesNotFound {
        /// Where they were looked for, e.g. `on PATH, in PGBUS_PG_BIN or under ...`.
        searched: String,
    },
    /// The process runs as root, which PostgreSQL refuses, and there is no `postgres` OS
    /// user to run the server as instead.
    #[error(
        "running as root, but there is no `postgres` OS user to run PostgreSQL as: \
         create one (useradd --system postgres) or run as an unprivileged user"
    )]
    NoPostgresUser,
    /// The `postgres` OS user cannot write to the cluster's directory, typically because
    /// one of its parents is not traversable by other users.
    #[error(
        "the postgres OS user cannot write to {}: put the cluster under a directory \
         every user can traverse (e.g. TMPDIR=/tmp)",
        path.display()
    )]
    NotAccessible {
        /// The directory that is not writable by `postgres`.
        path: PathBuf,
    },
    /// A builder setting is invalid; nothing was started.
    #[error("invalid cluster configuration: {0}")]
    InvalidConfig(String),
    /// No free TCP port could be picked on 127.0.0.1.
    #[error("could not pick a free TCP port on 127.0.0.1")]
    NoFreePort(#[source] io::Error),
    /// A file system operation failed.
    #[error("could not {action} {}", path.display())]
    Io {
        /// What was being done, e.g. `create directory`.
        action: &'static str,
        /// The path it was done to.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A helper program could not be executed at all.
    #[error("could not run {program}")]
    Spawn {
        /// The program, e.g. `initdb`.
        program: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A helper program ran but reported failure.
    #[error("{program} failed ({status}): {output}")]
    CommandFailed {
        /// The program, e.g. `initdb`.
        program: String,
        /// Its exit status.
        status: ExitStatus,
        /// What it printed on stderr and stdout.
        output: String,
    },
    /// `pg_ctl start` failed; the server log says why.
    #[error(
        "PostgreSQL in {} did not start ({status}): {pg_ctl_output}\n\
         last lines of the server log {}:\n{log_tail}",
        data_dir.display(),
        log_file.display()
    )]
    StartFailed {
        /// The data directory.
        data_dir: PathBuf,
        /// The server log file.
        log_file: PathBuf,
        /// Exit status of `pg_ctl start`.
        status: ExitStatus,
        /// What `pg_ctl` printed.
        pg_ctl_output: String,
        /// The last lines the server wrote to its log during this start.
        log_tail: String,
    },
    /// A server is already running on the persistent data directory.
    #[error("a PostgreSQL server is already running in {}", data_dir.display())]
    AlreadyRunning {
        /// The data directory.
        data_dir: PathBuf,
    },
}

/// A PostgreSQL server started from the machine's binaries, stopped on drop.
///
/// Created with [`LocalCluster::builder`]. The server listens on `127.0.0.1` only and
/// trusts every connection; the superuser is `postgres`.
///
/// ```no_run
/// # fn main() -> Result<(), pgbus_pg::ClusterError> {
/// let cluster = pgbus_pg::LocalCluster::builder().fast(true).start()?;
/// println!("connect to {}", cluster.url());
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct LocalCluster {
    port: u16,
    data_dir: PathBuf,
    log_file: PathBuf,
    /// The temporary directory holding data directory and log, when we created one.
    own_root: Option<PathBuf>,
    pg_ctl: PathBuf,
    runner: Runner,
    /// Whether the server is ours to stop (the start succeeded and it was not stopped yet).
    running: bool,
    cleanup: Cleanup,
    watchdog: Option<Child>,
}

/// How [`LocalCluster::restart`] shuts the server down before starting it again: the
/// `-m` modes of `pg_ctl`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ShutdownMode {
    /// Disconnects every client, rolls back open transactions and writes a shutdown
    /// checkpoint (`-m fast`).
    Fast,
    /// Quits every server process at once with no checkpoint; the next start runs crash
    /// recovery (`-m immediate`).
    Immediate,
}

impl ShutdownMode {
    /// The mode's name for `pg_ctl -m`.
    pub fn as_pg_ctl(self) -> &'static str {
        match self {
            ShutdownMode::Fast => "fast",
            ShutdownMode::Immediate => "immediate",
        }
    }
}

/// Builder of a [`LocalCluster`]; see [`LocalCluster::builder`].
#[derive(Debug, Clone, Default)]
#[must_use]
pub struct LocalClusterBuilder {
    bin_dir: Option<PathBuf>,
    fast: bool,
    port: Option<u16>,
    data_dir: Option<PathBuf>,
    keep: Option<bool>,
    settings: Vec<(String, String)>,
}

/// What happens to the cluster's files once it is stopped.
#[derive(Debug)]
enum Cleanup {
    /// Nothing is removed.
    Keep,
    /// The temporary directory holding data directory and log is removed.
    TempDir(TempDir),
    /// These paths (a caller-chosen data directory and its log) are removed.
    Paths(Vec<PathBuf>),
}

impl Cleanup {
    fn paths(&self) -> Vec<PathBuf> {
        match self {
            Cleanup::Keep => Vec::new(),
            Cleanup::TempDir(dir) => vec![dir.path().to_path_buf()],
            Cleanup::Paths(paths) => paths.clone(),
        }
    }
}

impl LocalCluster {
    /// Starts configuring a cluster: a fresh temporary data directory, durable default
    /// settings and a free port, unless changed.
    pub fn builder() -> LocalClusterBuilder {
        LocalClusterBuilder::default()
    }

    /// The TCP port the server listens on (on 127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's data directory.
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The server's log file.
    pub fn log_file(&self) -> &Path {
        &self.log_file
    }

    /// URL of the `postgres` database as the `postgres` superuser.
    pub fn url(&self) -> String {
        self.url_for(POSTGRES)
    }

    /// URL of database `db` as the `postgres` superuser. `db` is used as is: it must not
    /// need percent-encoding.
    pub fn url_for(&self, db: &str) -> String {
        format!("postgres://{POSTGRES}@127.0.0.1:{}/{db}", self.port)
    }

    /// Restarts the server in place (`pg_ctl restart -m <mode>`), waiting until it accepts
    /// connections again on the same port. Every open connection is cut; clients must
    /// reconnect. Meant for fault-injection tests (`cargo xtask chaos`).
    ///
    /// With [`ShutdownMode::Immediate`] the server processes quit without a shutdown
    /// checkpoint, as in a crash of the server (not of the OS): the start runs crash
    /// recovery from the write-ahead log, so committed transactions survive, and with
    /// [`fast`](LocalClusterBuilder::fast) settings even recently committed ones may be
    /// lost (`synchronous_commit = off`). This blocks the calling thread for the stop and
    /// the start, typically under two seconds.
    pub fn restart(&self, mode: ShutdownMode) -> Result<(), ClusterError> {
        let log_offset = fs::metadata(&self.log_file).map_or(0, |m| m.len());
        let mut command = self.runner.command(&self.pg_ctl);
        command
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&self.log_file)
            .args([
                "-m",
                mode.as_pg_ctl(),
                "-w",
                "-t",
                PG_CTL_TIMEOUT_SECS,
                "restart",
            ]);
        let output = self.runner.output("pg_ctl restart", &mut command)?;
        if output.status.success() {
            tracing::info!(target: LOG_TARGET, port = self.port, mode = mode.as_pg_ctl(), "restarted PostgreSQL cluster");
            return Ok(());
        }
        Err(ClusterError::StartFailed {
            data_dir: self.data_dir.clone(),
            log_file: self.log_file.clone(),
            status: output.status,
            pg_ctl_output: output_text(&output),
            log_tail: log_tail(&self.log_file, log_offset),
        })
    }

    /// Stops the server and removes the temporary directory (unless kept); the same as
    /// dropping the cluster, spelled out. Failures are logged, not returned: a server that
    /// could not be stopped is left to the watchdog, which stops it when this process exits.
    pub fn stop(self) {
        drop(self);
    }

    fn shutdown(&mut self) {
        let owns_data = !matches!(self.cleanup, Cleanup::Keep);
        // A temporary cluster whose start failed half-way may still have a server coming
        // up; a kept one may belong to someone else, so only stop what we started there.
        let stop = self.running || (owns_data && self.data_dir.join("postmaster.pid").exists());
        self.running = false;
        if stop {
            // Data that is thrown away needs no clean shutdown.
            let mode = if owns_data { "immediate" } else { "fast" };
            let result = self.runner.run(
                "pg_ctl stop",
                self.runner
                    .command(&self.pg_ctl)
                    .arg("-D")
                    .arg(&self.data_dir)
                    .args(["-m", mode, "-w", "-t", PG_CTL_TIMEOUT_SECS, "stop"]),
            );
            if let Err(err) = result {
                tracing::warn!(
                    target: LOG_TARGET,
                    data_dir = %self.data_dir.display(),
                    error = %error_chain(&err),
                    "could not stop PostgreSQL; the watchdog will stop it when this process exits"
                );
                // Leave the watchdog running, and the files in place for it to remove.
                if let Cleanup::TempDir(dir) = std::mem::replace(&mut self.cleanup, Cleanup::Keep) {
                    let _ = dir.keep();
                }
                return;
            }
            tracing::info!(target: LOG_TARGET, port = self.port, data_dir = %self.data_dir.display(), "stopped PostgreSQL cluster");
        }
        if let Some(mut watchdog) = self.watchdog.take() {
            // SIGKILL: the watchdog ignores the polite signals.
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
        match std::mem::replace(&mut self.cleanup, Cleanup::Keep) {
            Cleanup::Keep => {}
            Cleanup::TempDir(dir) => {
                let path = dir.path().to_path_buf();
                if let Err(err) = dir.close() {
                    tracing::warn!(target: LOG_TARGET, path = %path.display(), error = %err, "could not remove cluster directory");
                }
            }
            Cleanup::Paths(paths) => {
                for path in paths {
                    let result = if path.is_dir() {
                        fs::remove_dir_all(&path)
                    } else {
                        fs::remove_file(&path)
                    };
                    if let Err(err) = result {
                        if err.kind() != io::ErrorKind::NotFound {
                            tracing::warn!(target: LOG_TARGET, path = %path.display(), error = %err, "could not remove cluster files");
                        }
                    }
                }
            }
        }
    }

    /// Writes the settings file and runs `pg_ctl start`, retrying on a fresh port when an
    /// automatically picked port was taken in the meantime.
    fn start_server(&mut self, config: &LocalClusterBuilder) -> Result<(), ClusterError> {
        let mut retries_left = if config.port.is_some() {
            0
        } else {
            PORT_RETRIES
        };
        loop {
            self.write_settings(config)?;
            let log_offset = fs::metadata(&self.log_file).map_or(0, |m| m.len());
            let mut command = self.runner.command(&self.pg_ctl);
            command
                .arg("-D")
                .arg(&self.data_dir)
                .arg("-l")
                .arg(&self.log_file)
                .args(["-w", "-t", PG_CTL_TIMEOUT_SECS, "start"]);
            let output = self.runner.output("pg_ctl", &mut command)?;
            if output.status.success() {
                self.running = true;
                return Ok(());
            }
            let log_tail = log_tail(&self.log_file, log_offset);
            if retries_left > 0
                && (log_tail.contains("could not bind") || log_tail.contains("already in use"))
            {
                retries_left -= 1;
                let taken = self.port;
                self.port = free_port()?;
                tracing::debug!(target: LOG_TARGET, taken, port = self.port, "port was taken, retrying on another");
                continue;
            }
            return Err(ClusterError::StartFailed {
                data_dir: self.data_dir.clone(),
                log_file: self.log_file.clone(),
                status: output.status,
                pg_ctl_output: output_text(&output),
                log_tail,
            });
        }
    }

    /// (Re)writes [`SETTINGS_FILE`] and makes sure `postgresql.conf` includes it.
    fn write_settings(&self, config: &LocalClusterBuilder) -> Result<(), ClusterError> {
        let conf = self.data_dir.join("postgresql.conf");
        let text = fs::read_to_string(&conf).map_err(io_err("read", &conf))?;
        if !text.lines().any(|line| line.trim() == INCLUDE_LINE) {
            let separator = if text.ends_with('\n') || text.is_empty() {
                ""
            } else {
                "\n"
            };
            let appended = format!("{text}{separator}\n# Added by pgbus.\n{INCLUDE_LINE}\n");
            fs::write(&conf, appended).map_err(io_err("write", &conf))?;
        }

        let socket_file = self.data_dir.join(format!(".s.PGSQL.{}", self.port));
        let socket_dir = if socket_file.as_os_str().len() <= MAX_SOCKET_PATH {
            self.data_dir.to_string_lossy().into_owned()
        } else {
            // Too long for a Unix socket: TCP only (never the system-wide socket directory).
            String::new()
        };
        let mut settings: Vec<(&str, String)> = vec![
            ("listen_addresses", "127.0.0.1".to_owned()),
            ("port", self.port.to_string()),
            ("unix_socket_directories", socket_dir),
            ("max_connections", "300".to_owned()),
            ("shared_buffers", "128MB".to_owned()),
        ];
        if config.fast {
            for name in ["fsync", "synchronous_commit", "full_page_writes"] {
                settings.push((name, "off".to_owned()));
            }
        }
        settings.extend(config.settings.iter().map(|(n, v)| (n.as_str(), v.clone())));

        let mut file = String::from("# Written by pgbus on every start; edits are overwritten.\n");
        for (name, value) in settings {
            file.push_str(&format!("{name} = '{}'\n", conf_quote(&value)));
        }
        let path = self.data_dir.join(SETTINGS_FILE);
        fs::write(&path, file).map_err(io_err("write", &path))?;
        if self.runner.as_postgres {
            self.runner.chown(&path, false)?;
        }
        Ok(())
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl LocalClusterBuilder {
    /// Directory holding `initdb` and `pg_ctl`. Default: `$PGBUS_PG_BIN`, else the
    /// directory on `PATH` that has both, else the highest `/usr/lib/postgresql/*/bin`.
    pub fn bin_dir(mut self, dir: PathBuf) -> Self {
        self.bin_dir = Some(dir);
        self
    }

    /// Trades durability for speed (`fsync`, `synchronous_commit` and `full_page_writes`
    /// off): for tests and benchmarks whose data may be lost in an OS crash. Default:
    /// `false`, PostgreSQL's durable defaults.
    pub fn fast(mut self, fast: bool) -> Self {
        self.fast = fast;
        self
    }

    /// TCP port to listen on. Default: a free port picked by the OS (and another one if
    /// that was taken before the server bound it).
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Uses this data directory instead of a fresh temporary one. If it already holds a
    /// cluster (a `PG_VERSION` file) that cluster is reused, otherwise one is created.
    /// The server log goes to `postgres.log` next to it. Such a directory is kept when the
    /// cluster stops, unless [`keep(false)`](Self::keep) is set.
    pub fn data_dir(mut self, dir: PathBuf) -> Self {
        self.data_dir = Some(dir);
        self
    }

    /// Whether the cluster's files survive it. Default: `true` for a
    /// [`data_dir`](Self::data_dir), `false` for the temporary directory (keeping that one
    /// helps debugging: its path is in the start log event).
    pub fn keep(mut self, keep: bool) -> Self {
        self.keep = Some(keep);
        self
    }

    /// Adds a `postgresql.conf` setting, e.g. `setting("log_statement", "all")`. Applied
    /// after the built-in ones, so it overrides them.
    pub fn setting(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.settings.push((name.into(), value.into()));
        self
    }

    /// Creates (or reuses) the data directory and starts the server, waiting until it
    /// accepts connections.
    ///
    /// This blocks the calling thread, typically for one to two seconds (`initdb` is most
    /// of it). Async callers can run it in `tokio::task::spawn_blocking`, or accept the
    /// short block where that does not matter, as in a test.
    pub fn start(self) -> Result<LocalCluster, ClusterError> {
        let started_at = Instant::now();
        self.validate()?;
        let binaries = find_binaries(self.bin_dir.as_deref())?;
        let runner = Runner {
            as_postgres: running_as_root(),
        };
        if runner.as_postgres {
            runner.check_postgres_user()?;
        }
        let port = match self.port {
            Some(port) => port,
            None => free_port()?,
        };
        let keep = self.keep.unwrap_or(self.data_dir.is_some());

        let (data_dir, log_file, own_root, cleanup) = match &self.data_dir {
            None => {
                let temp = tempfile::Builder::new()
                    .prefix("pgbus-pg-")
                    .tempdir()
                    .map_err(io_err(
                        "create temporary directory in",
                        &std::env::temp_dir(),
                    ))?;
                let root = temp.path().to_path_buf();
                let cleanup = if keep {
                    let _ = temp.keep();
                    Cleanup::Keep
                } else {
                    Cleanup::TempDir(temp)
                };
                (
                    root.join("data"),
                    root.join("postgres.log"),
                    Some(root),
                    cleanup,
                )
            }
            Some(dir) => {
                let data_dir = std::path::absolute(dir).map_err(io_err("resolve", dir))?;
                let parent = data_dir.parent().ok_or_else(|| {
                    ClusterError::InvalidConfig(format!(
                        "data_dir {} has no parent directory for the server log",
                        data_dir.display()
                    ))
                })?;
                let log_file = parent.join("postgres.log");
                if data_dir.join("postmaster.pid").exists()
                    && runner.server_running(&binaries.pg_ctl, &data_dir)?
                {
                    return Err(ClusterError::AlreadyRunning { data_dir });
                }
                let cleanup = if keep {
                    Cleanup::Keep
                } else {
                    Cleanup::Paths(vec![data_dir.clone(), log_file.clone()])
                };
                (data_dir, log_file, None, cleanup)
            }
        };
        let fresh = !data_dir.join("PG_VERSION").exists();

        // From here on `cluster`'s Drop cleans up whatever was created, on error too.
        let mut cluster = LocalCluster {
            port,
            data_dir,
            log_file,
            own_root,
            pg_ctl: binaries.pg_ctl,
            runner,
            running: false,
            cleanup,
            watchdog: None,
        };
        cluster.prepare_dirs()?;
        cluster.watchdog = Some(cluster.spawn_watchdog()?);

        if fresh {
            let mut command = cluster.runner.command(&binaries.initdb);
            command.arg("-D").arg(&cluster.data_dir).args([
                "-U",
                POSTGRES,
                "--auth=trust",
                "-E",
                "UTF8",
                "--no-locale",
            ]);
            if !keep {
                // Nobody will read this cluster after an OS crash.
                command.arg("--no-sync");
            }
            cluster.runner.run("initdb", &mut command)?;
        }
        cluster.start_server(&self)?;

        tracing::info!(
            target: LOG_TARGET,
            port = cluster.port,
            data_dir = %cluster.data_dir.display(),
            log_file = %cluster.log_file.display(),
            fast = self.fast,
            reused = !fresh,
            elapsed_ms = started_at.elapsed().as_millis() as u64,
            "started PostgreSQL cluster"
        );
        Ok(cluster)
    }

    fn validate(&self) -> Result<(), ClusterError> {
        if self.port == Some(0) {
            return Err(ClusterError::InvalidConfig(
                "port 0: leave the port unset to have a free one picked".to_owned(),
            ));
        }
        for (name, _) in &self.settings {
            let mut chars = name.chars();
            let valid = chars
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
            if !valid {
                return Err(ClusterError::InvalidConfig(format!(
                    "{name:?} is not a PostgreSQL setting name"
                )));
            }
        }
        Ok(())
    }
}

impl LocalCluster {
    /// Creates the data directory and log file, owned by `postgres` when we are root.
    fn prepare_dirs(&self) -> Result<(), ClusterError> {
        if !self.data_dir.exists() {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&self.data_dir)
                .map_err(io_err("create directory", &self.data_dir))?;
        }
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log_file)
            .map_err(io_err("create log file", &self.log_file))?;
        if self.runner.as_postgres {
            match &self.own_root {
                // A directory we created for this cluster alone: hand all of it over.
                Some(root) => self.runner.chown(root, true)?,
                None => {
                    self.runner.chown(&self.data_dir, true)?;
                    self.runner.chown(&self.log_file, false)?;
                }
            }
            self.runner.check_writable(&self.data_dir)?;
        }
        Ok(())
    }

    /// Spawns the watchdog that cleans up after this process once it is gone.
    fn spawn_watchdog(&self) -> Result<Child, ClusterError> {
        let mut command = Command::new("sh");
        command
            .arg("-c")
            .arg(WATCHDOG_SCRIPT)
            .arg("pgbus-cluster-watchdog")
            .arg(std::process::id().to_string())
            .arg(&self.pg_ctl)
            .arg(&self.data_dir)
            .arg(if self.runner.as_postgres { "1" } else { "0" })
            .args(self.cleanup.paths())
            .current_dir("/")
            // Must not hold the test harness's pipes open, or `cargo test` waits for it.
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for var in PG_ENV_VARS {
            command.env_remove(var);
        }
        command.spawn().map_err(|source| ClusterError::Spawn {
            program: "sh (cluster watchdog)".to_owned(),
            source,
        })
    }
}

/// Runs the server tools, as the `postgres` OS user when we are root.
#[derive(Debug, Clone, Copy)]
struct Runner {
    as_postgres: bool,
}

impl Runner {
    fn command(&self, program: &Path) -> Command {
        let mut command = if self.as_postgres {
            let mut command = Command::new("runuser");
            command.args(["-u", POSTGRES, "--"]).arg(program);
            command
        } else {
            Command::new(program)
        };
        // The postgres user may not be able to enter our working directory.
        command.current_dir("/").stdin(Stdio::null());
        for var in PG_ENV_VARS {
            command.env_remove(var);
        }
        command
    }

    /// Runs `command` to completion, capturing its output.
    fn output(&self, name: &str, command: &mut Command) -> Result<Output, ClusterError> {
        command.output().map_err(|source| ClusterError::Spawn {
            program: name.to_owned(),
            source,
        })
    }

    /// Runs `command`, failing unless it succeeds.
    fn run(&self, name: &str, command: &mut Command) -> Result<Output, ClusterError> {
        let output = self.output(name, command)?;
        if output.status.success() {
            Ok(output)
        } else {
            Err(ClusterError::CommandFailed {
                program: name.to_owned(),
                status: output.status,
                output: output_text(&output),
            })
        }
    }

    fn check_postgres_user(&self) -> Result<(), ClusterError> {
        let found = Command::new("id")
            .args(["-u", POSTGRES])
            .stdin(Stdio::null())
            .output()
            .is_ok_and(|output| output.status.success());
        if found {
            Ok(())
        } else {
            Err(ClusterError::NoPostgresUser)
        }
    }

    fn chown(&self, path: &Path, recursive: bool) -> Result<(), ClusterError> {
        let mut command = Command::new("chown");
        if recursive {
            command.arg("-R");
        }
        command
            .arg(format!("{POSTGRES}:"))
            .arg(path)
            .stdin(Stdio::null());
        self.run("chown", &mut command).map(drop)
    }

    fn check_writable(&self, dir: &Path) -> Result<(), ClusterError> {
        let mut command = self.command(Path::new("test"));
        command.arg("-w").arg(dir);
        let writable = self.output("test", &mut command)?.status.success();
        if writable {
            Ok(())
        } else {
            Err(ClusterError::NotAccessible {
                path: dir.to_path_buf(),
            })
        }
    }

    /// Whether `pg_ctl status` sees a live server in `data_dir`.
    fn server_running(&self, pg_ctl: &Path, data_dir: &Path) -> Result<bool, ClusterError> {
        let mut command = self.command(pg_ctl);
        command.arg("-D").arg(data_dir).arg("status");
        Ok(self.output("pg_ctl status", &mut command)?.status.success())
    }
}

/// A server in a kept data directory that outlives the process that started it: the CLI's
/// embedded default. [`PersistentCluster::ensure_running`] reuses a live server or starts
/// one; [`PersistentCluster::stop`] stops it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PersistentCluster {
    /// The TCP port on 127.0.0.1.
    pub port: u16,
    /// The data directory.
    pub data_dir: PathBuf,
    /// Whether this call started the server (false: it was already running).
    pub started: bool,
}

impl PersistentCluster {
    /// Reuses the server running in `data_dir`, or starts one there (creating the cluster
    /// on first use) that keeps running after this process exits.
    pub fn ensure_running(data_dir: &Path) -> Result<PersistentCluster, ClusterError> {
        let binaries = find_binaries(None)?;
        let runner = Runner {
            as_postgres: running_as_root(),
        };
        if let Some(port) = running_port(&runner, &binaries, data_dir)? {
            return Ok(PersistentCluster {
                port,
                data_dir: data_dir.to_path_buf(),
                started: false,
            });
        }
        let mut cluster = LocalCluster::builder()
            .data_dir(data_dir.to_path_buf())
            .keep(true)
            .start()?;
        // Detach: the server stays up after this process; only the watchdog goes.
        cluster.running = false;
        Ok(PersistentCluster {
            port: cluster.port,
            data_dir: cluster.data_dir.clone(),
            started: true,
        })
    }

    /// Stops the server running in `data_dir`; `false` when none was running.
    pub fn stop(data_dir: &Path) -> Result<bool, ClusterError> {
        let binaries = find_binaries(None)?;
        let runner = Runner {
            as_postgres: running_as_root(),
        };
        if running_port(&runner, &binaries, data_dir)?.is_none() {
            return Ok(false);
        }
        runner.run(
            "pg_ctl stop",
            runner
                .command(&binaries.pg_ctl)
                .arg("-D")
                .arg(data_dir)
                .args(["-m", "fast", "-w", "-t", PG_CTL_TIMEOUT_SECS, "stop"]),
        )?;
        Ok(true)
    }

    /// URL of database `db` as the `postgres` superuser.
    pub fn url_for(&self, db: &str) -> String {
        format!("postgres://{POSTGRES}@127.0.0.1:{}/{db}", self.port)
    }
}

/// The port of the live server in `data_dir` (line 4 of `postmaster.pid`), if any.
fn running_port(
    runner: &Runner,
    binaries: &Binaries,
    data_dir: &Path,
) -> Result<Option<u16>, ClusterError> {
    let pid_file = data_dir.join("postmaster.pid");
    if !pid_file.exists() || !runner.server_running(&binaries.pg_ctl, data_dir)? {
        return Ok(None);
    }
    let text = fs::read_to_string(&pid_file).map_err(io_err("read", &pid_file))?;
    Ok(text
        .lines()
        .nth(3)
        .and_then(|line| line.trim().parse().ok()))
}

/// Where `initdb` and `pg_ctl` are.
#[derive(Debug)]
struct Binaries {
    initdb: PathBuf,
    pg_ctl: PathBuf,
}

fn find_binaries(bin_dir: Option<&Path>) -> Result<Binaries, ClusterError> {
    let not_found = |searched: String| ClusterError::BinariesNotFound { searched };
    if let Some(dir) = bin_dir {
        return binaries_in(dir).ok_or_else(|| not_found(format!("in {}", dir.display())));
    }
    if let Some(dir) = std::env::var_os(BIN_ENV).filter(|dir| !dir.is_empty()) {
        let dir = PathBuf::from(dir);
        return binaries_in(&dir)
            .ok_or_else(|| not_found(format!("in {BIN_ENV}={}", dir.display())));
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .find_map(|dir| binaries_in(&dir));
    on_path.or_else(debian_binaries).ok_or_else(|| {
        not_found(format!(
            "on PATH, in {BIN_ENV} or under {DEBIAN_PG_ROOT}/*/bin"
        ))
    })
}

/// Both binaries from one directory, so that their versions match.
fn binaries_in(dir: &Path) -> Option<Binaries> {
    let initdb = dir.join("initdb");
    let pg_ctl = dir.join("pg_ctl");
    if !is_executable(&initdb) || !is_executable(&pg_ctl) {
        return None;
    }
    // Resolve symlinks such as /usr/local/bin/pg_ctl, for clearer logs and errors.
    let resolve = |path: PathBuf| fs::canonicalize(&path).unwrap_or(path);
    Some(Binaries {
        initdb: resolve(initdb),
        pg_ctl: resolve(pg_ctl),
    })
}

/// The highest-versioned `/usr/lib/postgresql/<version>/bin` holding both binaries.
fn debian_binaries() -> Option<Binaries> {
    let mut versions: Vec<(Vec<u32>, PathBuf)> = fs::read_dir(DEBIAN_PG_ROOT)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name();
            let version = name
                .to_str()?
                .split('.')
                .map(str::parse)
                .collect::<Result<Vec<u32>, _>>()
                .ok()?;
            Some((version, entry.path().join("bin")))
        })
        .collect();
    versions.sort();
    versions.iter().rev().find_map(|(_, dir)| binaries_in(dir))
}

fn is_executable(path: &Path) -> bool {
    fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether this process's effective user is root (read from /proc, else `id -u`).
pub fn running_as_root() -> bool {
    if let Ok(status) = fs::read_to_string("/proc/self/status") {
        if let Some(uids) = status.lines().find_map(|line| line.strip_prefix("Uid:")) {
            // Real, effective, saved and file-system uid.
            return uids.split_whitespace().nth(1) == Some("0");
        }
    }
    Command::new("id")
        .arg("-u")
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|output| String::from_utf8_lossy(&output.stdout).trim() == "0")
}

/// A port that was free on 127.0.0.1 a moment ago.
fn free_port() -> Result<u16, ClusterError> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(ClusterError::NoFreePort)
}

/// Quotes a value for a single-quoted `postgresql.conf` string.
fn conf_quote(value: &str) -> String {
    value.replace('\\', "\\\\").replace('\'', "''")
}

/// The last [`LOG_TAIL_LINES`] lines written to `log` from byte `offset` on.
fn log_tail(log: &Path, offset: u64) -> String {
    let mut text = String::new();
    let read = fs::File::open(log).and_then(|mut file| {
        file.seek(SeekFrom::Start(offset))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        text = String::from_utf8_lossy(&bytes).into_owned();
        Ok(())
    });
    if let Err(err) = read {
        return format!("(could not read the server log: {err})");
    }
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

/// A command's stderr and stdout, trimmed, on one string.
fn output_text(output: &Output) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    [stderr.trim(), stdout.trim()]
        .into_iter()
        .filter(|text| !text.is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

fn io_err(action: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ClusterError {
    let path = path.to_path_buf();
    move |source| ClusterError::Io {
        action,
        path,
        source,
    }
}

/// An error and its causes on one line, skipping causes the message already contains.
fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

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
    use std::io::BufRead;
    use std::net::TcpStream;
    use std::time::Duration;

    use super::*;

    async fn connect(url: &str) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|err| panic!("connect to {url}: {}", error_chain(&err)));
        tokio::spawn(connection);
        client
    }

    async fn show(client: &tokio_postgres::Client, setting: &str) -> String {
        client
            .query_one(&format!("SHOW {setting}"), &[])
            .await
            .unwrap()
            .get(0)
    }

    fn refuses_connections(port: u16) -> bool {
        TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .is_err_and(|err| err.kind() == io::ErrorKind::ConnectionRefused)
    }

    /// Polls `condition` until it holds or `timeout` passes; returns whether it held.
    fn eventually(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if condition() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        condition()
    }

    #[tokio::test]
    async fn fast_cluster_answers_queries_with_its_settings() {
        let cluster = LocalCluster::builder()
            .fast(true)
            .setting("work_mem", "8MB")
            .start()
            .unwrap();
        assert_eq!(
            cluster.url(),
            format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.port())
        );
        let client = connect(&cluster.url()).await;
        let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
        assert_eq!(one, 1);
        assert_eq!(show(&client, "fsync").await, "off");
        assert_eq!(show(&client, "synchronous_commit").await, "off");
        assert_eq!(show(&client, "full_page_writes").await, "off");
        assert_eq!(show(&client, "work_mem").await, "8MB");
        assert_eq!(show(&client, "max_connections").await, "300");
        assert_eq!(
            show(&client, "unix_socket_directories").await,
            cluster.data_dir().to_string_lossy()
        );
    }

    #[tokio::test]
    async fn dropping_a_cluster_stops_the_server_and_removes_its_directory() {
        let cluster = LocalCluster::builder().start().unwrap();
        let port = cluster.port();
        let root = cluster.data_dir().parent().unwrap().to_path_buf();
        let client = connect(&cluster.url()).await;
        // Durable by default.
        assert_eq!(show(&client, "fsync").await, "on");
        assert!(!refuses_connections(port));

        drop(cluster);

        assert!(
            refuses_connections(port),
            "server still listening on {port}"
        );
        assert!(!root.exists(), "{} still exists", root.display());
        assert!(client.query_one("SELECT 1", &[]).await.is_err());
    }

    /// The postmaster's pid, line 1 of `postmaster.pid` (readable by us even when the
    /// server runs as `postgres`: the file is mode 0600 but we are then root).
    fn postmaster_pid(cluster: &LocalCluster) -> String {
        fs::read_to_string(cluster.data_dir().join("postmaster.pid"))
            .unwrap()
            .lines()
            .next()
            .unwrap()
            .to_owned()
    }

    #[tokio::test]
    async fn restart_cuts_connections_and_keeps_committed_data() {
        let cluster = LocalCluster::builder().start().unwrap();
        let client = connect(&cluster.url()).await;
        client
            .batch_execute("CREATE TABLE survivor (id int); INSERT INTO survivor VALUES (1)")
            .await
            .unwrap();
        for (mode, value) in [(ShutdownMode::Fast, 2), (ShutdownMode::Immediate, 3)] {
            let before = postmaster_pid(&cluster);
            let log_offset = fs::metadata(cluster.log_file()).unwrap().len();
            let client = connect(&cluster.url()).await;
            client
                .execute("INSERT INTO survivor VALUES ($1)", &[&value])
                .await
                .unwrap();

            cluster.restart(mode).unwrap();

            assert_ne!(
                postmaster_pid(&cluster),
                before,
                "{mode:?}: same postmaster"
            );
            assert!(
                client.query_one("SELECT 1", &[]).await.is_err(),
                "{mode:?}: an old connection survived the restart"
            );
            let client = connect(&cluster.url()).await;
            let ids: Vec<i32> = client
                .query("SELECT id FROM survivor ORDER BY id", &[])
                .await
                .unwrap()
                .iter()
                .map(|row| row.get(0))
                .collect();
            assert_eq!(ids, (1..=value).collect::<Vec<_>>(), "{mode:?}");
            let log = fs::read(cluster.log_file()).unwrap();
            let recovered =
                String::from_utf8_lossy(&log[log_offset as usize..]).contains("automatic recovery");
            assert_eq!(
                recovered,
                mode == ShutdownMode::Immediate,
                "{mode:?}: crash recovery ran {recovered}"
            );
        }
        drop(client);
    }

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
    fn persistent_data_dir_is_reused_and_kept() {
        let parent = tempfile::tempdir().unwrap();
        // When we are root the server runs as `postgres`, which must reach the directory.
        fs::set_permissions(parent.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let data_dir = parent.path().join("cluster");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();

        let cluster = LocalCluster::builder()
            .data_dir(data_dir.clone())
            .start()
            .unwrap();
        runtime.block_on(async {
            let client = connect(&cluster.url()).await;
            client
                .batch_execute("CREATE TABLE survivor (id int); INSERT INTO survivor VALUES (7)")
                .await
                .unwrap();
        });
        cluster.stop();
        assert!(data_dir.join("PG_VERSION").exists());

        let cluster = LocalCluster::builder()
            .data_dir(data_dir.clone())
            .start()
            .unwrap();
        let id: i32 = runtime.block_on(async {
            let client = connect(&cluster.url()).await;
            client
                .query_one("SELECT id FROM survivor", &[])
                .await
                .unwrap()
                .get(0)
        });
        assert_eq!(id, 7);
        drop(cluster);
        assert!(data_dir.join("PG_VERSION").exists());
        assert!(parent.path().join("postgres.log").exists());
    }

    #[test]
    fn missing_binaries_are_reported_on_one_line() {
        let err = LocalCluster::builder()
            .bin_dir(PathBuf::from("/nonexistent/pgbus/bin"))
            .start()
            .unwrap_err();
        assert!(
            matches!(err, ClusterError::BinariesNotFound { .. }),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(!message.contains('\n'), "{message}");
        assert!(message.contains("/nonexistent/pgbus/bin"), "{message}");
        assert!(message.contains(TEST_URL_ENV), "{message}");
    }

    #[test]
    fn invalid_settings_are_rejected_before_anything_starts() {
        let err = LocalCluster::builder()
            .setting("work_mem = 1; fsync", "off")
            .start()
            .unwrap_err();
        assert!(matches!(err, ClusterError::InvalidConfig(_)), "{err:?}");
        let err = LocalCluster::builder().port(0).start().unwrap_err();
        assert!(matches!(err, ClusterError::InvalidConfig(_)), "{err:?}");
    }

    #[test]
    fn conf_values_are_quoted() {
        assert_eq!(conf_quote(r"it's a\b"), r"it''s a\\b");
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

    /// Set in the child process of [`watchdog_cleans_up_after_a_process_that_never_drops`].
    const WATCHDOG_CHILD_ENV: &str = "PGBUS_CLUSTER_WATCHDOG_CHILD";

    /// Helper run in a child process by the test below: starts a cluster, reports it on
    /// stdout and exits without dropping it. A no-op in an ordinary test run.
    #[test]
    fn watchdog_child_process() {
        if std::env::var_os(WATCHDOG_CHILD_ENV).is_none() {
            return;
        }
        let cluster = LocalCluster::builder().fast(true).start().unwrap();
        println!(
            "CLUSTER {} {}",
            cluster.port(),
            cluster.data_dir().parent().unwrap().display()
        );
        std::process::exit(0);
    }

    #[test]
    fn watchdog_cleans_up_after_a_process_that_never_drops() {
        let child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "cluster::tests::watchdog_child_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(WATCHDOG_CHILD_ENV, "1")
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .output()
            .unwrap();
        assert!(child.status.success(), "child failed: {child:?}");
        let line = child
            .stdout
            .lines()
            .map_while(Result::ok)
            // The harness prints the test's name on the same line.
            .find_map(|line| line.split_once("CLUSTER ").map(|(_, rest)| rest.to_owned()))
            .unwrap_or_else(|| {
                panic!(
                    "child did not report its cluster: {}",
                    String::from_utf8_lossy(&child.stdout)
                )
            });
        let mut parts = line.split_whitespace();
        let port: u16 = parts.next().unwrap().parse().unwrap();
        let root = PathBuf::from(parts.next().unwrap());

        // The child exited without stopping its server; the watchdog polls once a second.
        assert!(
            eventually(Duration::from_secs(30), || refuses_connections(port)
                && !root.exists()),
            "watchdog left the server on {port} or {} behind",
            root.display()
        );
    }
}
