//! `peer_pgmq` (feature `peer`): the same no-op jobs through a real peer, the `pgmq`
//! crate, through its public API: its SQL installed from the crate itself (no extension),
//! one timed `send_batch` of all the jobs, then readers that each read batches of
//! [`READ_SIZE`] and delete them, until the queue is empty; checked exactly-once. Beside
//! it, pgbus's `send_batch` of the same jobs in one call, timed the same way.

use std::str::FromStr;
use std::time::Instant;

use anyhow::{ensure, Context};
use pgbus_core::{NewMessage, Producer};
use pgmq::PGMQueueExt;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

use super::{on_fresh_database, pgbus_backend, queue, rate, vacuum_analyze, QUEUE};
use crate::server::{connect, Server, BENCH_APP};

/// Reader counts measured: pgmq's best settings on a 2-core machine.
pub(crate) const READERS: [usize; 2] = [2, 4];
/// Messages per `read_batch`.
pub(crate) const READ_SIZE: i32 = 100;
/// Visibility timeout of a read, in seconds: far longer than a run, so a message is read
/// once unless something fails.
const VISIBILITY_TIMEOUT_S: i32 = 30;

/// One run of the peer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct PeerRun {
    /// Messages per second of the one `send_batch`.
    pub(crate) send_per_s: f64,
    /// Jobs read and deleted per second.
    pub(crate) drain_per_s: f64,
}

/// On a fresh database: installs pgmq, sends `n` messages (`0..n` as JSON numbers) in one
/// timed `send_batch`, `VACUUM ANALYZE`s (as every drain here starts), then times
/// `readers` loops reading and deleting until the queue is empty, and checks that every
/// message was read exactly once.
pub(crate) async fn run_once(server: &Server, n: usize, readers: usize) -> anyhow::Result<PeerRun> {
    on_fresh_database(server, |url| async move {
        // The pool `PGMQueueExt::new` makes (sqlx's defaults, acquire timeout 10 s, as many
        // connections as readers), named like the bench's other connections.
        let options = PgConnectOptions::from_str(&url)
            .context("invalid database URL")?
            .application_name(&format!("{BENCH_APP}:pgmq"));
        let pool = PgPoolOptions::new()
            .acquire_timeout(std::time::Duration::from_secs(10))
            .max_connections(readers as u32)
            .connect_with(options)
            .await
            .context("connecting pgmq's pool")?;
        let pgmq = PGMQueueExt::new_with_pool(pool).await;
        pgmq.install_sql_from_embedded()
            .await
            .context("installing pgmq's SQL")?;
        pgmq.create(QUEUE)
            .await
            .context("creating the pgmq queue")?;

        let payloads: Vec<u64> = (0..n as u64).collect();
        let started = Instant::now();
        let sent = pgmq.send_batch(QUEUE, &payloads).await?;
        let send_per_s = rate(sent.len() as u64, started.elapsed());
        ensure!(sent.len() == n, "pgmq sent {} of {n} messages", sent.len());
        vacuum_analyze(&connect(&url).await?).await?;

        let started = Instant::now();
        let loops: Vec<_> = (0..readers)
            .map(|_| {
                let pgmq = pgmq.clone();
                tokio::spawn(async move {
                    let mut read = Vec::new();
                    loop {
                        let batch = pgmq
                            .read_batch::<u64>(QUEUE, VISIBILITY_TIMEOUT_S, READ_SIZE)
                            .await?;
                        if batch.is_empty() {
                            return Ok::<_, anyhow::Error>(read);
                        }
                        let ids: Vec<i64> = batch.iter().map(|m| m.msg_id).collect();
                        // A no-op job: nothing to run between the read and the delete.
                        let deleted = pgmq.delete_batch(QUEUE, &ids).await?;
                        ensure!(
                            deleted == ids.len(),
                            "pgmq deleted {deleted} of {}",
                            ids.len()
                        );
                        read.extend(batch.into_iter().map(|m| m.message));
                    }
                })
            })
            .collect();
        let mut read = Vec::with_capacity(n);
        for handle in loops {
            read.extend(handle.await??);
        }
        let drain_per_s = rate(read.len() as u64, started.elapsed());
        exactly_once(&mut read, n)?;
        let left: i64 = connect(&url)
            .await?
            .query_one(&format!("SELECT count(*) FROM pgmq.q_{QUEUE}"), &[])
            .await?
            .get(0);
        ensure!(left == 0, "{left} pgmq messages left after the drain");
        Ok(PeerRun {
            send_per_s,
            drain_per_s,
        })
    })
    .await
}

/// Checks that the payloads read are `0..n`, each once.
fn exactly_once(read: &mut [u64], n: usize) -> anyhow::Result<()> {
    read.sort_unstable();
    let expected = (0..n as u64).collect::<Vec<_>>();
    if read == expected.as_slice() {
        return Ok(());
    }
    let duplicates = read.windows(2).filter(|w| w[0] == w[1]).count();
    anyhow::bail!(
        "pgmq delivered {} messages for {n} sent ({duplicates} duplicates)",
        read.len()
    )
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
    use super::exactly_once;

    #[test]
    fn exactly_once_refuses_losses_and_duplicates() {
        assert!(exactly_once(&mut [2, 0, 1], 3).is_ok());
        assert!(exactly_once(&mut [0, 1], 3).is_err());
        assert!(exactly_once(&mut [0, 1, 1], 3).is_err());
        assert!(exactly_once(&mut [0, 1, 2, 2], 3).is_err());
    }
}
