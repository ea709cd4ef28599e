//! [`LocalCluster`]: a server started from the machine's binaries, stopped on drop.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Instant;

use tempfile::TempDir;

use super::{
    conf_quote, error_chain, find_binaries, free_port, io_err, log_tail, output_text,
    running_as_root, superuser_url, write_private, Binaries, ClusterError, Password, Runner,
    INCLUDE_LINE, LOG_TARGET, MAX_SOCKET_PATH, PASSWORD_FILE, PG_CTL_TIMEOUT_SECS, PORT_RETRIES,
    POSTGRES, SETTINGS_FILE,
};

/// Transient copy of the password for `initdb --pwfile`, beside the data directory (when
/// we are root, `initdb` runs as `postgres` and cannot read our own password file).
const INITDB_PASSWORD_FILE: &str = ".pgbus-initdb-password";
/// The server's certificate and key of a TLS cluster, copied into the data directory (the
/// server insists on owning its key file).
const TLS_CERT_FILE: &str = "pgbus-server.crt";
const TLS_KEY_FILE: &str = "pgbus-server.key";

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

/// A PostgreSQL server started from the machine's binaries, stopped on drop.
///
/// Created with [`LocalCluster::builder`]. The server listens on `127.0.0.1` only; the
/// superuser is `postgres` with a random password, which [`url`](LocalCluster::url)
/// carries. Every connection must authenticate (`scram-sha-256`), over TCP and the Unix
/// socket alike.
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
    password: Password,
    password_file: PathBuf,
    /// Whether TCP connections must use TLS.
    tls: bool,
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
    tls: Option<ServerTls>,
}

/// The certificate (chain) and private key a TLS cluster serves, as PEM files; see
/// [`LocalClusterBuilder::tls`].
#[derive(Debug, Clone)]
struct ServerTls {
    cert: PathBuf,
    key: PathBuf,
}

/// Removes `path`, logging (not failing) when that does not work.
fn remove_quietly(path: &Path) {
    if let Err(err) = fs::remove_file(path) {
        if err.kind() != io::ErrorKind::NotFound {
            tracing::warn!(target: LOG_TARGET, path = %path.display(), error = %err, "could not remove file");
        }
    }
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

    /// The `postgres` superuser's password.
    pub fn password(&self) -> &str {
        self.password.as_str()
    }

    /// The file holding the superuser's password (mode 0600): `pgbus-password` in the
    /// temporary directory, or next to a caller-chosen data directory.
    pub fn password_file(&self) -> &Path {
        &self.password_file
    }

    /// Whether the server accepts TCP connections over TLS only (built with
    /// [`tls`](LocalClusterBuilder::tls)).
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// URL of the `postgres` database as the `postgres` superuser, password included.
    pub fn url(&self) -> String {
        self.url_for(POSTGRES)
    }

    /// URL of database `db` as the `postgres` superuser, password included. `db` is used
    /// as is: it must not need percent-encoding.
    pub fn url_for(&self, db: &str) -> String {
        superuser_url(self.port, &self.password, db)
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

    /// Leaves the server running when this value is dropped (the files are kept too only
    /// if the builder kept them): for [`PersistentCluster`](super::PersistentCluster).
    pub(super) fn detach(&mut self) {
        self.running = false;
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
        if let Some(tls) = &config.tls {
            let cert = self.data_dir.join(TLS_CERT_FILE);
            let key = self.data_dir.join(TLS_KEY_FILE);
            self.copy_private(&tls.cert, &cert)?;
            self.copy_private(&tls.key, &key)?;
            settings.push(("ssl", "on".to_owned()));
            settings.push(("ssl_cert_file", cert.to_string_lossy().into_owned()));
            settings.push(("ssl_key_file", key.to_string_lossy().into_owned()));
        }
        settings.extend(config.settings.iter().map(|(n, v)| (n.as_str(), v.clone())));

        let mut file = String::from("# Written by pgbus on every start; edits are overwritten.\n");
        for (name, value) in settings {
            file.push_str(&format!("{name} = '{}'\n", conf_quote(&value)));
        }
        let path = self.data_dir.join(SETTINGS_FILE);
        fs::write(&path, file).map_err(io_err("write", &path))?;
        self.runner.chown_if_root(&path)?;
        self.write_hba(config.tls.is_some())
    }

    /// Copies `from` to `to` with mode 0600, owned by the server's OS user: PostgreSQL
    /// refuses a key file that others can read.
    fn copy_private(&self, from: &Path, to: &Path) -> Result<(), ClusterError> {
        let bytes = fs::read(from).map_err(io_err("read", from))?;
        write_private(to, &bytes)?;
        self.runner.chown_if_root(to)
    }

    /// (Re)writes `pg_hba.conf`: password authentication for every connection, over TLS
    /// only for TCP when `tls`, nothing else. Written on every start so that no earlier
    /// configuration (such as `trust` from clusters created by older pgbus versions)
    /// survives.
    fn write_hba(&self, tls: bool) -> Result<(), ClusterError> {
        let host = if tls { "hostssl" } else { "host" };
        let text = format!(
            "# Written by pgbus on every start; edits are overwritten.\n\
             local all all scram-sha-256\n\
             {host} all all 127.0.0.1/32 scram-sha-256\n\
             {host} all all ::1/128 scram-sha-256\n"
        );
        let path = self.data_dir.join("pg_hba.conf");
        fs::write(&path, text).map_err(io_err("write", &path))?;
        self.runner.chown_if_root(&path)
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

    /// Serves TLS with this certificate (chain) and private key, both PEM files, and
    /// refuses TCP connections without TLS (`hostssl` only in `pg_hba.conf`; the Unix
    /// socket stays available). The files are copied into the data directory on every
    /// start, the key with mode 0600 as PostgreSQL requires. Test certificates come from
    /// `TestCa` (feature `test-tls`). [`LocalCluster::url`] carries no TLS parameters:
    /// add `sslmode` and `sslrootcert` for the client, and use a host name the
    /// certificate names.
    pub fn tls(mut self, cert_pem: impl Into<PathBuf>, key_pem: impl Into<PathBuf>) -> Self {
        self.tls = Some(ServerTls {
            cert: cert_pem.into(),
            key: key_pem.into(),
        });
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

        let (data_dir, log_file, password_file, own_root, cleanup) = match &self.data_dir {
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
                    root.join(PASSWORD_FILE),
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
                let password_file = parent.join(PASSWORD_FILE);
                if data_dir.join("postmaster.pid").exists()
                    && runner.server_running(&binaries.pg_ctl, &data_dir)?
                {
                    return Err(ClusterError::AlreadyRunning { data_dir });
                }
                let cleanup = if keep {
                    Cleanup::Keep
                } else {
                    Cleanup::Paths(vec![
                        data_dir.clone(),
                        log_file.clone(),
                        password_file.clone(),
                    ])
                };
                (data_dir, log_file, password_file, None, cleanup)
            }
        };
        let fresh = !data_dir.join("PG_VERSION").exists();
        // A reused cluster without a password file was created by an older pgbus, with
        // `trust`: it gets a password before its server starts.
        let (password, set_password) = if fresh {
            (Password::generate(), false)
        } else {
            match Password::read_from(&password_file)? {
                Some(password) => (password, false),
                None => (Password::generate(), true),
            }
        };

        // From here on `cluster`'s Drop cleans up whatever was created, on error too.
        let mut cluster = LocalCluster {
            port,
            data_dir,
            log_file,
            password,
            password_file,
            tls: self.tls.is_some(),
            own_root,
            pg_ctl: binaries.pg_ctl.clone(),
            runner,
            running: false,
            cleanup,
            watchdog: None,
        };
        cluster.prepare_dirs()?;
        cluster.watchdog = Some(cluster.spawn_watchdog()?);

        if fresh {
            // Written first: should initdb fail, the next attempt starts afresh anyway.
            cluster.password.write_to(&cluster.password_file)?;
            cluster.initdb(&binaries, keep)?;
        } else if set_password {
            cluster.set_password(&binaries)?;
            // Only once the server knows it: a file with a password the server does not
            // have would lock us out for good.
            cluster.password.write_to(&cluster.password_file)?;
            tracing::info!(
                target: LOG_TARGET,
                data_dir = %cluster.data_dir.display(),
                password_file = %cluster.password_file.display(),
                "closed a cluster created with trust authentication: the postgres user now has a password"
            );
        }
        cluster.start_server(&self)?;

        tracing::info!(
            target: LOG_TARGET,
            port = cluster.port,
            data_dir = %cluster.data_dir.display(),
            log_file = %cluster.log_file.display(),
            fast = self.fast,
            reused = !fresh,
            password_file = %cluster.password_file.display(),
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
    /// Creates the cluster with `initdb`: the `postgres` superuser with our password, and
    /// password authentication for every connection from the start.
    fn initdb(&self, binaries: &Binaries, keep: bool) -> Result<(), ClusterError> {
        let pwfile = self.beside_data_dir(INITDB_PASSWORD_FILE)?;
        self.password.write_to(&pwfile)?;
        let result = self.runner.chown_if_root(&pwfile).and_then(|()| {
            let mut pwfile_arg = std::ffi::OsString::from("--pwfile=");
            pwfile_arg.push(&pwfile);
            let mut command = self.runner.command(&binaries.initdb);
            command
                .arg("-D")
                .arg(&self.data_dir)
                .args([
                    "-U",
                    POSTGRES,
                    "--auth-host=scram-sha-256",
                    "--auth-local=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--no-locale",
                ])
                .arg(pwfile_arg);
            if !keep {
                // Nobody will read this cluster after an OS crash.
                command.arg("--no-sync");
            }
            self.runner.run("initdb", &mut command).map(drop)
        });
        remove_quietly(&pwfile);
        result
    }

    /// Sets the superuser's password in the stopped cluster, through single-user mode: no
    /// server accepts connections meanwhile, and the password travels on a pipe, not on a
    /// command line other users can see.
    fn set_password(&self, binaries: &Binaries) -> Result<(), ClusterError> {
        let mut command = self.runner.command(&binaries.postgres);
        command
            .arg("--single")
            .arg("-D")
            .arg(&self.data_dir)
            .arg(POSTGRES)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let spawn_err = |source| ClusterError::Spawn {
            program: "postgres --single".to_owned(),
            source,
        };
        let mut child = command.spawn().map_err(spawn_err)?;
        // Single-user mode runs each line as a statement. The generated password is
        // alphanumeric, so the quoting is only a safeguard.
        // PostgreSQL 13 and older hash new passwords with md5 unless told otherwise, and
        // pg_hba.conf accepts only scram-sha-256.
        let statement = format!(
            "SET password_encryption = 'scram-sha-256'\nALTER ROLE {POSTGRES} PASSWORD '{}'\n",
            self.password.as_str().replace('\'', "''")
        );
        let written = match child.stdin.take() {
            Some(mut stdin) => stdin.write_all(statement.as_bytes()),
            None => Ok(()),
        };
        let output = child.wait_with_output().map_err(spawn_err)?;
        written.map_err(spawn_err)?;
        let text = output_text(&output);
        // Single-user mode exits 0 after a failed statement; its ERROR lines tell.
        if !output.status.success() || text.contains("ERROR:") || text.contains("FATAL:") {
            return Err(ClusterError::CommandFailed {
                program: "postgres --single (ALTER ROLE postgres PASSWORD ...)".to_owned(),
                status: output.status,
                output: text,
            });
        }
        Ok(())
    }

    /// `name` in the directory holding the data directory.
    pub(super) fn beside_data_dir(&self, name: &str) -> Result<PathBuf, ClusterError> {
        match self.data_dir.parent() {
            Some(parent) => Ok(parent.join(name)),
            None => Err(ClusterError::InvalidConfig(format!(
                "data_dir {} has no parent directory",
                self.data_dir.display()
            ))),
        }
    }

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
        let mut args = vec![
            self.pg_ctl.clone().into_os_string(),
            self.data_dir.clone().into_os_string(),
            (if self.runner.as_postgres { "1" } else { "0" }).into(),
        ];
        args.extend(
            self.cleanup
                .paths()
                .into_iter()
                .map(PathBuf::into_os_string),
        );
        super::spawn_watchdog(WATCHDOG_SCRIPT, "pgbus-cluster-watchdog", args)
    }
}

#[cfg(test)]
mod tests {
    use std::io::BufRead;
    use std::process::Command;
    use std::time::Duration;

    #[cfg(feature = "test-tls")]
    use super::super::test_support::psql;
    use super::super::test_support::{
        assert_password_required, connect, eventually, refuses_connections, show,
    };
    use super::super::TEST_URL_ENV;
    use super::*;
    #[cfg(feature = "test-tls")]
    use std::os::unix::fs::PermissionsExt;

    #[tokio::test]
    async fn fast_cluster_answers_queries_with_its_settings() {
        let cluster = LocalCluster::builder()
            .fast(true)
            .setting("work_mem", "8MB")
            .start()
            .unwrap();
        assert_eq!(
            cluster.url(),
            format!(
                "postgres://postgres:{}@127.0.0.1:{}/postgres",
                cluster.password(),
                cluster.port()
            )
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
    async fn every_connection_needs_the_password() {
        let cluster = LocalCluster::builder().fast(true).start().unwrap();
        assert_password_required("127.0.0.1", cluster.port()).await;
        // The Unix socket is in the data directory.
        assert_password_required(&cluster.data_dir().to_string_lossy(), cluster.port()).await;
        let hba = fs::read_to_string(cluster.data_dir().join("pg_hba.conf")).unwrap();
        assert!(!hba.contains("trust"), "{hba}");

        let client = connect(&cluster.url()).await;
        let user: String = client
            .query_one("SELECT current_user", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(user, "postgres");
        let password_file = cluster.password_file();
        assert_eq!(
            fs::read_to_string(password_file).unwrap().trim(),
            cluster.password()
        );
        let mode = fs::metadata(password_file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{}", password_file.display());
        assert!(!format!("{cluster:?}").contains(cluster.password()));
    }

    #[cfg(feature = "test-tls")]
    #[tokio::test]
    async fn tls_cluster_accepts_verified_tls_only() {
        use crate::TestCa;

        let certs = tempfile::tempdir().unwrap();
        let ca = TestCa::new("pgbus test CA").unwrap();
        let ca_file = ca.write_cert(&certs.path().join("ca.crt")).unwrap();
        let server = ca
            .server_cert(certs.path(), "server", &["localhost", "127.0.0.1"])
            .unwrap();
        let other_ca = TestCa::new("some other CA").unwrap();
        let other_ca_file = other_ca
            .write_cert(&certs.path().join("other.crt"))
            .unwrap();
        let cluster = LocalCluster::builder()
            .fast(true)
            .tls(&server.cert, &server.key)
            .start()
            .unwrap();
        assert!(cluster.is_tls());
        let key = cluster.data_dir().join(TLS_KEY_FILE);
        assert_eq!(
            fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );

        let url = |host: &str, query: &str| {
            format!(
                "postgres://postgres:{}@{host}:{}/postgres?{query}",
                cluster.password(),
                cluster.port()
            )
        };
        let verified = |ca: &Path| format!("sslmode=verify-full&sslrootcert={}", ca.display());
        let encrypted = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";
        assert_eq!(
            psql(&url("localhost", &verified(&ca_file)), encrypted).as_deref(),
            Ok("t")
        );
        assert_eq!(
            psql(&url("127.0.0.1", &verified(&ca_file)), encrypted).as_deref(),
            Ok("t")
        );

        let err = psql(&url("127.0.0.1", "sslmode=disable"), "SELECT 1").unwrap_err();
        assert!(err.contains("no pg_hba.conf entry"), "{err}");
        let err = psql(&url("localhost", &verified(&other_ca_file)), "SELECT 1").unwrap_err();
        assert!(err.contains("certificate verify failed"), "{err}");
        let wrong_name = format!("{}&hostaddr=127.0.0.1", verified(&ca_file));
        let err = psql(&url("db.example.invalid", &wrong_name), "SELECT 1").unwrap_err();
        assert!(err.contains("does not match host name"), "{err}");

        // tokio-postgres without TLS is refused by pg_hba.conf.
        let err = tokio_postgres::connect(&cluster.url(), tokio_postgres::NoTls)
            .await
            .err()
            .expect("a plaintext connection was accepted");
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
            "{err:?}"
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
                "cluster::local::tests::watchdog_child_process",
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
