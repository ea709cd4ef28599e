//! `peer_pgmq`: the same no-op jobs through a real peer, the `pgmq` crate, through its
//! public API: its SQL installed from the crate itself (no extension), one timed
//! `send_batch` of all the jobs, then readers that each read batches of [`READ_SIZE`] and
//! delete them, until the queue is empty; checked exactly-once. Beside it, pgbus's
//! `send_batch` of the same jobs in one call, timed the same way.
//!
//! The pgmq side is `pgbus-peer-bench` (`benches/peer/`, a Cargo project outside the
//! workspace, so that no workspace build compiles pgmq and sqlx), run here as a child
//! process on the fresh database; `cargo xtask bench` builds it for the full run and names
//! it in [`PEER_BENCH_ENV`].

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Instant;

use anyhow::{ensure, Context};
use pgbus_core::{NewMessage, Producer};
use serde::Deserialize;

use super::{on_fresh_database, pgbus_backend, queue, rate};
use crate::server::Server;

/// The environment variable that names the `pgbus-peer-bench` binary; unset, the scenario
/// is not measured.
pub(crate) const PEER_BENCH_ENV: &str = "PGBUS_PEER_BENCH";
/// Reader counts measured: pgmq's best settings on a 2-core machine.
pub(crate) const READERS: [usize; 2] = [2, 4];
/// Messages per `read_batch`.
pub(crate) const READ_SIZE: i32 = 100;

/// One run of the peer, as `pgbus-peer-bench` prints it.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
pub(crate) struct PeerRun {
    /// Messages per second of the one `send_batch`.
    pub(crate) send_per_s: f64,
    /// Jobs read and deleted per second.
    pub(crate) drain_per_s: f64,
}

/// The peer binary named in [`PEER_BENCH_ENV`], if any.
pub(crate) fn peer_binary() -> Option<PathBuf> {
    std::env::var_os(PEER_BENCH_ENV)
        .filter(|path| !path.is_empty())
        .map(PathBuf::from)
}

/// On a fresh database, runs `binary` (`pgbus-peer-bench`) for `n` messages and `readers`
/// readers: it installs pgmq, sends, `VACUUM ANALYZE`s (as every drain here starts),
/// drains, checks exactly-once and prints its figures, which this reads.
pub(crate) async fn run_once(
    server: &Server,
    binary: &Path,
    n: usize,
    readers: usize,
) -> anyhow::Result<PeerRun> {
    on_fresh_database(server, |url| async move {
        let output = tokio::process::Command::new(binary)
            // In the environment, not on the command line (`ps` shows arguments to all).
            .env("PGBUS_PEER_DATABASE_URL", &url)
            .args(["--jobs", &n.to_string()])
            .args(["--readers", &readers.to_string()])
            .args(["--read-size", &READ_SIZE.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            // Its errors go straight to the harness's stderr.
            .stderr(Stdio::inherit())
            // Gone with the run if the run's deadline passes.
            .kill_on_drop(true)
            .output()
            .await
            .with_context(|| format!("could not run the pgmq peer {}", binary.display()))?;
        ensure!(
            output.status.success(),
            "the pgmq peer {} failed ({})",
            binary.display(),
            output.status
        );
        parse_peer_output(&output.stdout)
    })
    .await
}

/// The figures in the peer's output: its last line, a JSON object.
fn parse_peer_output(stdout: &[u8]) -> anyhow::Result<PeerRun> {
    let text = String::from_utf8_lossy(stdout);
    let line = text
        .lines()
        .rev()
        .find(|line| !line.trim().is_empty())
        .context("the pgmq peer printed no figures")?;
    serde_json::from_str(line)
        .with_context(|| format!("the pgmq peer printed `{line}`, not its figures"))
}

/// pgbus's `send_batch` of `n` messages (the payloads `drain` drains) in one call, on a
/// fresh database; messages per second, encoding included.
pub(crate) async fn pgbus_send_batch(server: &Server, n: usize) -> anyhow::Result<f64> {
    on_fresh_database(server, |url| async move {
        let backend = pgbus_backend(&url, |b| b).await?;
        // The encoding is timed, as pgmq's JSON encoding inside its `send_batch` is: both
        // sides are handed the same values.
        let started = Instant::now();
        let messages = (0..n as u64)
            .map(|i| NewMessage::encode(&i))
            .collect::<Result<Vec<_>, _>>()?;
        let ids = backend.send_batch(&queue(), messages).await?;
        let per_s = rate(ids.len() as u64, started.elapsed());
        ensure!(ids.len() == n, "pgbus sent {} of {n} messages", ids.len());
        Ok(per_s)
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::{parse_peer_output, PeerRun};

    #[test]
    fn reads_the_peers_figures_from_its_last_line() {
        assert_eq!(
            parse_peer_output(b"{\"send_per_s\": 1000.5, \"drain_per_s\": 20}\n").unwrap(),
            PeerRun {
                send_per_s: 1000.5,
                drain_per_s: 20.0
            }
        );
        assert_eq!(
            parse_peer_output(b"noise\n{\"send_per_s\":1,\"drain_per_s\":2}\n\n")
                .unwrap()
                .drain_per_s,
            2.0
        );
        assert!(parse_peer_output(b"").is_err());
        assert!(parse_peer_output(b"{\"send_per_s\": 1}\n").is_err());
        assert!(parse_peer_output(b"error: nope\n").is_err());
    }
}
