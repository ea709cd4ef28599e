//! `raw_sql`: the yardstick. The plain claim/ack lifecycle on tokio-postgres, with no
//! pgbus code at all. Kept exactly as plain as the benchmarks issue describes it: it is the
//! reference, not something to tune. It runs with pgbus's commit settings (claims on a
//! connection with `synchronous_commit = off`, as pgbus's fetch connection; deletes
//! durable, as pgbus's acks) and with every commit durable.

use std::time::Instant;

use anyhow::ensure;

use super::{on_fresh_database, rate, vacuum_analyze, QUEUE};
use crate::server::{connect, Server};

/// Claim loops, and jobs per claim (the `LIMIT` of [`CLAIM`]).
pub(crate) const LOOPS: usize = 2;
pub(crate) const CLAIM_SIZE: usize = 100;

const SCHEMA: &str = "
CREATE TABLE jobs (
    id           bigserial PRIMARY KEY,
    queue        text NOT NULL,
    payload      bytea NOT NULL,
    priority     smallint NOT NULL DEFAULT 0,
    run_at       timestamptz NOT NULL DEFAULT now(),
    attempts     int NOT NULL DEFAULT 0,
    locked_until timestamptz
);
CREATE INDEX jobs_claim_idx ON jobs (queue, priority, run_at, id);";

/// All jobs in one statement.
const INSERT: &str = "
INSERT INTO jobs (queue, payload, priority, run_at, attempts)
SELECT $1, p, 0, now(), 0 FROM unnest($2::bytea[]) AS p";

const CLAIM: &str = "
UPDATE jobs SET locked_until = now() + interval '5 min', attempts = attempts + 1
WHERE id IN (
    SELECT id FROM jobs
    WHERE queue = $1 AND run_at <= now() AND (locked_until IS NULL OR locked_until < now())
    ORDER BY priority, run_at, id
    LIMIT 100
    FOR UPDATE SKIP LOCKED
)
RETURNING id";

const ACK: &str = "DELETE FROM jobs WHERE id = ANY($1)";

/// How the loops commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Commits {
    /// As pgbus does: claims commit asynchronously (`synchronous_commit = off` on the
    /// claiming connection), deletes durably (on a second connection of the loop).
    LikePgbus,
    /// Claims and deletes durable, on one connection per loop.
    Durable,
}

/// Inserts `n` jobs, then times [`LOOPS`] loops that claim [`CLAIM_SIZE`] jobs and delete
/// them until the table is empty, committing as `commits` says. Returns jobs/s.
pub(crate) async fn run_once(server: &Server, n: usize, commits: Commits) -> anyhow::Result<f64> {
    on_fresh_database(server, |url| async move {
        let setup = connect(&url).await?;
        setup.batch_execute(SCHEMA).await?;
        // Payloads of the size pgbus's MessagePack-encoded u64 has, give or take a byte.
        let payloads: Vec<Vec<u8>> = (0..n as u64).map(|i| i.to_be_bytes().to_vec()).collect();
        setup.execute(INSERT, &[&QUEUE, &payloads]).await?;
        vacuum_analyze(&setup).await?;

        let mut clients = Vec::with_capacity(LOOPS);
        for _ in 0..LOOPS {
            let claimer = connect(&url).await?;
            let acker = match commits {
                Commits::LikePgbus => {
                    claimer
                        .batch_execute("SET synchronous_commit = off")
                        .await?;
                    Some(connect(&url).await?)
                }
                Commits::Durable => None,
            };
            clients.push((claimer, acker));
        }
        let started = Instant::now();
        let loops: Vec<_> = clients
            .into_iter()
            .map(|(claimer, acker)| {
                tokio::spawn(async move {
                    let acker = acker.as_ref().unwrap_or(&claimer);
                    let claim = claimer.prepare(CLAIM).await?;
                    let ack = acker.prepare(ACK).await?;
                    let mut done = 0u64;
                    loop {
                        let rows = claimer.query(&claim, &[&QUEUE]).await?;
                        if rows.is_empty() {
                            return Ok::<_, anyhow::Error>(done);
                        }
                        let ids: Vec<i64> = rows.iter().map(|row| row.get(0)).collect();
                        // A no-op job: nothing to run between the claim and the ack.
                        acker.execute(&ack, &[&ids]).await?;
                        done += ids.len() as u64;
                    }
                })
            })
            .collect();
        let mut done = 0;
        for handle in loops {
            done += handle.await??;
        }
        let elapsed = started.elapsed();
        let left: i64 = setup
            .query_one("SELECT count(*) FROM jobs", &[])
            .await?
            .get(0);
        ensure!(
            done == n as u64 && left == 0,
            "raw_sql drained {done} of {n} jobs, {left} left"
        );
        Ok(rate(done, elapsed))
    })
    .await
}
