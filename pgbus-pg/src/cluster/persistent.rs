//! [`PersistentCluster`]: the CLI's embedded default, a server that outlives its starter.

use std::fs;
use std::path::{Path, PathBuf};

use super::local::LocalCluster;
use super::{
    find_binaries, io_err, running_as_root, superuser_url, Binaries, ClusterError, Password,
    Runner, LOG_TARGET, PASSWORD_FILE, PG_CTL_TIMEOUT_SECS,
};

/// A server in a kept data directory that outlives the process that started it: the CLI's
/// embedded default. [`PersistentCluster::ensure_running`] reuses a live server or starts
/// one; [`PersistentCluster::stop`] stops it.
///
/// Like every [`LocalCluster`], it requires a password for every connection: the
/// superuser's, kept in `pgbus-password` (mode 0600) next to the data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PersistentCluster {
    /// The TCP port on 127.0.0.1.
    pub port: u16,
    /// The data directory.
    pub data_dir: PathBuf,
    /// Whether this call started the server (false: it was already running).
    pub started: bool,
    password: Password,
}

impl PersistentCluster {
    /// Reuses the server running in `data_dir`, or starts one there (creating the cluster
    /// on first use) that keeps running after this process exits.
    pub fn ensure_running(data_dir: &Path) -> Result<PersistentCluster, ClusterError> {
        // Two commands starting a fresh cluster at once would each write a password; the
        // lock makes the second wait and then find the first's server.
        let _lock = lock_beside(data_dir)?;
        let binaries = find_binaries(None)?;
        let runner = Runner {
            as_postgres: running_as_root(),
        };
        if let Some(port) = running_port(&runner, &binaries, data_dir)? {
            match Password::read_from(&password_file(data_dir)?)? {
                Some(password) => {
                    return Ok(PersistentCluster {
                        port,
                        data_dir: data_dir.to_path_buf(),
                        started: false,
                        password,
                    })
                }
                None => {
                    // Started by an older pgbus, with `trust`: stop it, so that the start
                    // below gives it a password and closes it before it serves again.
                    tracing::info!(
                        target: LOG_TARGET,
                        data_dir = %data_dir.display(),
                        "restarting the embedded PostgreSQL to close its trust authentication"
                    );
                    stop_server(&runner, &binaries, data_dir)?;
                }
            }
        }
        let mut cluster = LocalCluster::builder()
            .data_dir(data_dir.to_path_buf())
            .keep(true)
            .start()?;
        // The server stays up after this process; only the watchdog goes.
        cluster.detach();
        Ok(PersistentCluster {
            port: cluster.port(),
            data_dir: cluster.data_dir().to_path_buf(),
            started: true,
            password: Password(cluster.password().to_owned()),
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
        stop_server(&runner, &binaries, data_dir)?;
        Ok(true)
    }

    /// The `postgres` superuser's password.
    pub fn password(&self) -> &str {
        self.password.as_str()
    }

    /// URL of database `db` as the `postgres` superuser, password included (so never log
    /// it). `db` is used as is: it must not need percent-encoding.
    pub fn url_for(&self, db: &str) -> String {
        // Loopback only, where TLS adds nothing: say so, so that a PGSSLMODE=require meant
        // for another server does not break the embedded default.
        format!(
            "{}?sslmode=disable",
            superuser_url(self.port, &self.password, db)
        )
    }
}

/// An exclusive lock on `pgbus.lock` beside `data_dir`, held until the file is dropped.
fn lock_beside(data_dir: &Path) -> Result<fs::File, ClusterError> {
    let path = password_file(data_dir)?.with_file_name("pgbus.lock");
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io_err("create directory", parent))?;
    }
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err("open", &path))?;
    file.lock().map_err(io_err("lock", &path))?;
    Ok(file)
}

/// Where [`LocalCluster`] keeps the password of a cluster in `data_dir`: next to it.
fn password_file(data_dir: &Path) -> Result<PathBuf, ClusterError> {
    let data_dir = std::path::absolute(data_dir).map_err(io_err("resolve", data_dir))?;
    match data_dir.parent() {
        Some(parent) => Ok(parent.join(PASSWORD_FILE)),
        None => Err(ClusterError::InvalidConfig(format!(
            "data_dir {} has no parent directory for the password file",
            data_dir.display()
        ))),
    }
}

/// Stops the server in `data_dir` cleanly, waiting until it is down.
fn stop_server(runner: &Runner, binaries: &Binaries, data_dir: &Path) -> Result<(), ClusterError> {
    runner
        .run(
            "pg_ctl stop",
            runner
                .command(&binaries.pg_ctl)
                .arg("-D")
                .arg(data_dir)
                .args(["-m", "fast", "-w", "-t", PG_CTL_TIMEOUT_SECS, "stop"]),
        )
        .map(drop)
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::super::test_support::{assert_password_required, connect};
    use super::super::{free_port, PASSWORD_FILE, POSTGRES};
    use super::*;

    /// A directory for a persistent cluster that the `postgres` OS user can enter (it runs
    /// the server when we are root).
    fn parent_dir() -> tempfile::TempDir {
        let parent = tempfile::tempdir().unwrap();
        fs::set_permissions(parent.path(), fs::Permissions::from_mode(0o755)).unwrap();
        parent
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    /// Stops the server in a data directory when dropped, so that a failing test leaves
    /// no server behind (persistent servers have no watchdog).
    struct StopOnDrop<'a>(&'a Path);

    impl Drop for StopOnDrop<'_> {
        fn drop(&mut self) {
            let _ = PersistentCluster::stop(self.0);
        }
    }

    /// Checks that `cluster` lets in only who has its password, and answers with it.
    fn assert_closed(cluster: &PersistentCluster) {
        runtime().block_on(async {
            assert_password_required("127.0.0.1", cluster.port).await;
            let client = connect(&cluster.url_for("postgres")).await;
            let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
            assert_eq!(one, 1);
        });
    }

    #[test]
    fn embedded_cluster_requires_its_password_and_refuses_a_loose_password_file() {
        let parent = parent_dir();
        let data_dir = parent.path().join("data");
        let _stop = StopOnDrop(&data_dir);

        let cluster = PersistentCluster::ensure_running(&data_dir).unwrap();
        assert!(cluster.started);
        assert!(!format!("{cluster:?}").contains(cluster.password()));
        assert_closed(&cluster);
        let again = PersistentCluster::ensure_running(&data_dir).unwrap();
        assert!(!again.started);
        assert_eq!(again.url_for("x"), cluster.url_for("x"));
        assert!(PersistentCluster::stop(&data_dir).unwrap());

        let password_file = parent.path().join(PASSWORD_FILE);
        fs::set_permissions(&password_file, fs::Permissions::from_mode(0o640)).unwrap();
        let err = PersistentCluster::ensure_running(&data_dir).unwrap_err();
        assert!(
            matches!(err, ClusterError::UnsafePasswordFile { .. }),
            "{err:?}"
        );
        assert!(!err.to_string().contains('\n'), "{err}");
        assert!(
            !data_dir.join("postmaster.pid").exists(),
            "started with a loose password file"
        );
    }

    #[test]
    fn two_first_starts_at_once_agree_on_one_server_and_password() {
        let parent = parent_dir();
        let data_dir = parent.path().join("data");
        let _stop = StopOnDrop(&data_dir);
        let starts: Vec<_> = (0..2)
            .map(|_| {
                let data_dir = data_dir.clone();
                std::thread::spawn(move || PersistentCluster::ensure_running(&data_dir))
            })
            .collect();
        let clusters: Vec<PersistentCluster> = starts
            .into_iter()
            .map(|start| start.join().unwrap().unwrap())
            .collect();
        assert_eq!(clusters.iter().filter(|c| c.started).count(), 1);
        assert_eq!(clusters[0].url_for("x"), clusters[1].url_for("x"));
        // The password both hold is the server's and the file's.
        let reread = PersistentCluster::ensure_running(&data_dir).unwrap();
        assert_eq!(reread.url_for("x"), clusters[0].url_for("x"));
        assert_closed(&reread);
    }

    /// Creates a cluster in `data_dir` the way pgbus did before passwords: `trust` for
    /// everyone, no password file.
    fn init_trust_cluster(runner: &Runner, binaries: &Binaries, data_dir: &Path) {
        fs::create_dir(data_dir).unwrap();
        fs::set_permissions(data_dir, fs::Permissions::from_mode(0o700)).unwrap();
        if runner.as_postgres {
            runner.chown(data_dir, true).unwrap();
        }
        runner
            .run(
                "initdb",
                runner
                    .command(&binaries.initdb)
                    .arg("-D")
                    .arg(data_dir)
                    .args(["-U", POSTGRES, "--auth=trust", "--no-sync"]),
            )
            .unwrap();
    }

    #[test]
    fn embedded_clusters_created_with_trust_are_closed_on_their_next_start() {
        let binaries = find_binaries(None).unwrap();
        let runner = Runner {
            as_postgres: running_as_root(),
        };
        // An old cluster that is stopped, and one whose (trusting) server still runs.
        for old_server_running in [false, true] {
            let parent = parent_dir();
            let data_dir = parent.path().join("data");
            init_trust_cluster(&runner, &binaries, &data_dir);
            let _stop = StopOnDrop(&data_dir);
            if old_server_running {
                let port = free_port().unwrap();
                let options = format!(
                    "-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={}",
                    data_dir.display()
                );
                runner
                    .run(
                        "pg_ctl start",
                        runner
                            .command(&binaries.pg_ctl)
                            .arg("-D")
                            .arg(&data_dir)
                            .arg("-l")
                            .arg(data_dir.join("old.log"))
                            .args(["-o", &options, "-w", "start"]),
                    )
                    .unwrap();
                // Really open before the upgrade: no password needed.
                runtime().block_on(async {
                    connect(&format!("postgres://postgres@127.0.0.1:{port}/postgres")).await;
                });
            }

            let cluster = PersistentCluster::ensure_running(&data_dir).unwrap();
            assert!(cluster.started, "running: {old_server_running}");
            assert_closed(&cluster);
            let password_file = parent.path().join(PASSWORD_FILE);
            let mode = fs::metadata(&password_file).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            assert!(PersistentCluster::stop(&data_dir).unwrap());
        }
    }
}
