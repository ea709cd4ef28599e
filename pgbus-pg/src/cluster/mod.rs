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
//! - The superuser is always `postgres`, encoding UTF-8 with the C locale.
//! - Every connection, TCP or Unix socket, authenticates with `scram-sha-256`: the
//!   superuser gets a random password, kept in a mode-0600 file beside the data directory
//!   (`pgbus-password`) and put in the cluster's URLs. pgbus rewrites `pg_hba.conf` on
//!   every start, so a cluster created with `trust` by an earlier version is closed (and
//!   given a password) on its next start.
//! - When the current process runs as root, `initdb` and `pg_ctl` run as the `postgres`
//!   OS user (through `runuser`), because PostgreSQL refuses to run as root.
//! - A cluster that is never dropped (for instance one kept in a `static` by a test binary)
//!   does not leak: a small watchdog shell process stops the server and removes the
//!   temporary directory once the owning process has exited.
//! - Unix only: it relies on `sh`, `kill`, `chown` and `runuser`.

#[cfg(feature = "test-tls")]
mod certs;
mod local;
mod persistent;
mod pgbouncer;
mod test_database;

use std::error::Error as StdError;
use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};

#[cfg(feature = "test-tls")]
pub use certs::{CertFiles, TestCa};
pub use local::{LocalCluster, LocalClusterBuilder, ShutdownMode};
pub use persistent::PersistentCluster;
pub use pgbouncer::{PgBouncer, PgBouncerOptions, PoolMode};
pub use test_database::{test_database, test_database_behind_pgbouncer, tls_ca_file, TestDatabase};

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
/// The superuser's password file, beside the data directory (in a throwaway cluster's
/// temporary directory, or next to a caller-chosen data directory).
const PASSWORD_FILE: &str = "pgbus-password";
/// Length of the generated passwords, in alphanumerics (about 190 bits).
const PASSWORD_LEN: usize = 32;
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
    "PGPASSWORD",
    "PGSSLROOTCERT",
    "PGSSLCERT",
    "PGSSLKEY",
];

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
    /// The password file is not safe to use (other users may read it, or it is not ours).
    #[error("refusing the password file {}: {reason}", path.display())]
    UnsafePasswordFile {
        /// The password file.
        path: PathBuf,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// No `pgbouncer` binary on PATH or in /usr/sbin.
    #[error("pgbouncer not found on PATH or in /usr/sbin: install pgbouncer (Debian: apt-get install pgbouncer)")]
    PgBouncerNotFound,
    /// PgBouncer did not start.
    #[error("PgBouncer did not start: {reason}: {output}")]
    PgBouncerFailed {
        /// Why it counts as failed, e.g. `it exited (exit status: 1)`.
        reason: String,
        /// What it wrote to stderr and its log.
        output: String,
    },
    /// A test certificate could not be generated.
    #[error("could not generate a test certificate")]
    Certificate(#[source] Box<dyn StdError + Send + Sync>),
    /// A server is already running on the persistent data directory.
    #[error("a PostgreSQL server is already running in {}", data_dir.display())]
    AlreadyRunning {
        /// The data directory.
        data_dir: PathBuf,
    },
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

    /// Hands `path` to the `postgres` OS user when the server runs as that user.
    fn chown_if_root(&self, path: &Path) -> Result<(), ClusterError> {
        if self.as_postgres {
            self.chown(path, false)
        } else {
            Ok(())
        }
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

/// Where `initdb` and `pg_ctl` are.
#[derive(Debug)]
struct Binaries {
    initdb: PathBuf,
    pg_ctl: PathBuf,
    /// The server itself, for single-user mode.
    postgres: PathBuf,
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
    let postgres = dir.join("postgres");
    if !is_executable(&initdb) || !is_executable(&pg_ctl) || !is_executable(&postgres) {
        return None;
    }
    // Resolve symlinks such as /usr/local/bin/pg_ctl, for clearer logs and errors.
    let resolve = |path: PathBuf| fs::canonicalize(&path).unwrap_or(path);
    Some(Binaries {
        initdb: resolve(initdb),
        pg_ctl: resolve(pg_ctl),
        postgres: resolve(postgres),
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
    effective_uid() == Some(0)
}

/// This process's effective uid (read from /proc, else `id -u`), if it can be found.
fn effective_uid() -> Option<u32> {
    if let Ok(status) = fs::read_to_string("/proc/self/status") {
        if let Some(uids) = status.lines().find_map(|line| line.strip_prefix("Uid:")) {
            // Real, effective, saved and file-system uid.
            return uids.split_whitespace().nth(1)?.parse().ok();
        }
    }
    let output = Command::new("id")
        .arg("-u")
        .stdin(Stdio::null())
        .output()
        .ok()?;
    String::from_utf8_lossy(&output.stdout).trim().parse().ok()
}

/// The superuser's password. Its `Debug` output is redacted, so that logging a cluster
/// never prints it.
#[derive(Clone, PartialEq, Eq)]
struct Password(String);

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

impl Password {
    /// A fresh random password of [`PASSWORD_LEN`] alphanumerics: nothing to quote or
    /// percent-encode anywhere.
    fn generate() -> Password {
        use rand::Rng;
        let password = rand::rng()
            .sample_iter(rand::distr::Alphanumeric)
            .take(PASSWORD_LEN)
            .map(char::from)
            .collect();
        Password(password)
    }

    fn as_str(&self) -> &str {
        &self.0
    }

    /// Writes the password to `path`, mode 0600, replacing the file atomically (a reader
    /// never sees half a password, and a crash leaves the old file or the new one).
    fn write_to(&self, path: &Path) -> Result<(), ClusterError> {
        let mut temp_name = path.as_os_str().to_owned();
        temp_name.push(".tmp");
        let temp = PathBuf::from(temp_name);
        match fs::remove_file(&temp) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => {
                return Err(io_err("remove", &temp)(err));
            }
            _ => {}
        }
        // create_new with mode 0600: the password is never readable by others, not even
        // for a moment, and a symlink planted at the temporary path is not followed.
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temp)
            .map_err(io_err("create", &temp))?;
        file.write_all(format!("{}\n", self.0).as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io_err("write", &temp))?;
        fs::rename(&temp, path).map_err(io_err("rename into place", path))
    }

    /// Reads a password file written by [`Password::write_to`]; `None` when there is none.
    /// Refuses a file other users could read or write, or one that is not ours.
    fn read_from(path: &Path) -> Result<Option<Password>, ClusterError> {
        let unsafe_file = |reason: String| ClusterError::UnsafePasswordFile {
            path: path.to_path_buf(),
            reason,
        };
        let metadata = match fs::symlink_metadata(path) {
            Ok(metadata) => metadata,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(io_err("inspect", path)(err)),
        };
        if !metadata.file_type().is_file() {
            return Err(unsafe_file("not a regular file".to_owned()));
        }
        let mode = metadata.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(unsafe_file(format!(
                "mode {mode:o} lets other users at it (chmod 600 {})",
                path.display()
            )));
        }
        if let Some(uid) = effective_uid() {
            if metadata.uid() != uid {
                return Err(unsafe_file(format!(
                    "owned by uid {}, not by this user (uid {uid})",
                    metadata.uid()
                )));
            }
        }
        let text = fs::read_to_string(path).map_err(io_err("read", path))?;
        let password = text.trim_end_matches(['\r', '\n']);
        if password.is_empty() || password.contains(['\r', '\n']) {
            return Err(unsafe_file(
                "expected one line holding the password".to_owned(),
            ));
        }
        Ok(Some(Password(password.to_owned())))
    }
}

/// Writes `bytes` to `path` with mode 0600, also when the file existed with another mode:
/// for passwords and private keys (PostgreSQL and libpq refuse looser key files).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), ClusterError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err("create", path))?;
    // `mode` only applies to a new file.
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .map_err(io_err("set permissions of", path))?;
    file.write_all(bytes).map_err(io_err("write", path))
}

/// URL of database `db` on 127.0.0.1:`port` as the `postgres` superuser with `password`.
/// `db` is used as is: it must not need percent-encoding.
fn superuser_url(port: u16, password: &Password, db: &str) -> String {
    format!(
        "postgres://{POSTGRES}:{}@127.0.0.1:{port}/{db}",
        percent_encode(password.as_str(), b"")
    )
}

/// Percent-encodes everything but RFC 3986's unreserved characters and the bytes in
/// `keep`, for a URL's userinfo (`keep` empty) or a query value holding a path (`/`).
fn percent_encode(text: &str, keep: &[u8]) -> String {
    let mut encoded = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) || keep.contains(&byte) {
            encoded.push(char::from(byte));
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// Spawns `sh -c script` with `args` after the owner's pid: a watchdog that cleans up
/// after this process once it is gone. It must not hold the test harness's pipes open
/// (or `cargo test` waits for it), nor see libpq's environment.
fn spawn_watchdog<I, S>(
    script: &str,
    name: &str,
    args: I,
) -> Result<std::process::Child, ClusterError>
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let mut command = Command::new("sh");
    command
        .arg("-c")
        .arg(script)
        .arg(name)
        .arg(std::process::id().to_string())
        .args(args)
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    for var in PG_ENV_VARS {
        command.env_remove(var);
    }
    command.spawn().map_err(|source| ClusterError::Spawn {
        program: format!("sh ({name})"),
        source,
    })
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

#[cfg(test)]
pub(super) mod test_support {
    //! Helpers shared by the cluster module's tests.

    use std::io;
    use std::net::{Ipv4Addr, TcpStream};
    use std::time::{Duration, Instant};

    use super::error_chain;

    pub(crate) async fn connect(url: &str) -> tokio_postgres::Client {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|err| panic!("connect to {url}: {}", error_chain(&err)));
        tokio::spawn(connection);
        client
    }

    /// Asserts that the server at `host`:`port` (a TCP host or a Unix socket directory)
    /// lets `postgres` in neither without a password nor with a wrong one.
    pub(crate) async fn assert_password_required(host: &str, port: u16) {
        let mut config = tokio_postgres::Config::new();
        config
            .host(host)
            .port(port)
            .user("postgres")
            .dbname("postgres");
        let err = config
            .connect(tokio_postgres::NoTls)
            .await
            .err()
            .unwrap_or_else(|| panic!("{host}:{port} let postgres in without a password"));
        // tokio-postgres gives up when the server asks for a password it does not have.
        assert!(error_chain(&err).contains("password"), "{err:?}");

        config.password("not-the-password");
        let err = config
            .connect(tokio_postgres::NoTls)
            .await
            .err()
            .unwrap_or_else(|| panic!("{host}:{port} let postgres in with a wrong password"));
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD),
            "{err:?}"
        );
    }

    pub(crate) async fn show(client: &tokio_postgres::Client, setting: &str) -> String {
        client
            .query_one(&format!("SHOW {setting}"), &[])
            .await
            .unwrap()
            .get(0)
    }

    pub(crate) fn refuses_connections(port: u16) -> bool {
        TcpStream::connect((Ipv4Addr::LOCALHOST, port))
            .is_err_and(|err| err.kind() == io::ErrorKind::ConnectionRefused)
    }

    /// Runs `sql` with psql (libpq, which does TLS) on `url`: stdout, or stderr on failure.
    #[cfg(feature = "test-tls")]
    pub(crate) fn psql(url: &str, sql: &str) -> Result<String, String> {
        let psql = super::find_binaries(None)
            .unwrap()
            .pg_ctl
            .with_file_name("psql");
        let mut command = std::process::Command::new(psql);
        command.args(["-X", "-A", "-t", "-c", sql, url]);
        for var in super::PG_ENV_VARS {
            command.env_remove(var);
        }
        let output = command.stdin(std::process::Stdio::null()).output().unwrap();
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).trim().to_owned())
        } else {
            Err(String::from_utf8_lossy(&output.stderr).trim().to_owned())
        }
    }

    /// Polls `condition` until it holds or `timeout` passes; returns whether it held.
    pub(crate) fn eventually(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if condition() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        condition()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_are_random_alphanumerics_and_redacted_in_debug() {
        let first = Password::generate();
        let second = Password::generate();
        assert_ne!(first, second);
        assert_eq!(first.as_str().len(), PASSWORD_LEN);
        assert!(first.as_str().bytes().all(|b| b.is_ascii_alphanumeric()));
        assert!(!format!("{first:?}").contains(first.as_str()));
        assert_eq!(percent_encode(first.as_str(), b""), first.as_str());
        assert_eq!(percent_encode("a b@c/d:%", b""), "a%20b%40c%2Fd%3A%25");
        assert_eq!(percent_encode("/tmp/a b/ca.crt", b"/"), "/tmp/a%20b/ca.crt");
    }

    #[test]
    fn password_files_are_private_and_loose_ones_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(PASSWORD_FILE);
        assert_eq!(Password::read_from(&path).unwrap(), None);
        let password = Password::generate();
        password.write_to(&path).unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(Password::read_from(&path).unwrap(), Some(password.clone()));

        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let err = Password::read_from(&path).unwrap_err();
        assert!(
            matches!(err, ClusterError::UnsafePasswordFile { .. }),
            "{err:?}"
        );
        let message = err.to_string();
        assert!(!message.contains('\n'), "{message}");
        assert!(message.contains("chmod 600"), "{message}");
        assert!(!message.contains(password.as_str()), "{message}");
    }

    #[test]
    fn conf_values_are_quoted() {
        assert_eq!(conf_quote(r"it's a\b"), r"it''s a\\b");
    }
}
