//! [`PersistentCluster`]: the CLI's embedded default, a server that outlives its starter.

use std::fs;
use std::path::{Path, PathBuf};

use super::local::LocalCluster;
use super::{
    find_binaries, io_err, running_as_root, Binaries, ClusterError, Runner, PG_CTL_TIMEOUT_SECS,
    POSTGRES,
};

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
        // The server stays up after this process; only the watchdog goes.
        cluster.detach();
        Ok(PersistentCluster {
            port: cluster.port(),
            data_dir: cluster.data_dir().to_path_buf(),
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
