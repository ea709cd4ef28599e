//! `backlog`: how claim cost grows with the table. A backlog of ready messages is built in
//! one `INSERT ... SELECT generate_series` (optionally beside archived history), then one
//! [`ClaimAck`] loop claims [`CLAIM_SIZE`] at a time and acks them, timed claim by claim.

use std::time::Instant;

use anyhow::{ensure, Context};
use pgbus_core::{QueueAdmin, QueueOptions};
use pgbus_pg::PgBackend;

use super::{on_fresh_database, queue, rate, vacuum_analyze, ClaimAck, QUEUE};
use crate::report::thousands;
use crate::server::{connect, Server};
use crate::stats::{ms, percentiles};

/// Messages per claim.
pub(crate) const CLAIM_SIZE: usize = 50;
/// Jobs claimed and acked per run, at most (and at most half the backlog, so that every
/// claim still looks at a backlog of about the size measured).
pub(crate) const MEASURED_JOBS: usize = 10_000;

/// The backlog: the columns a plain send fills, payloads the MessagePack of `i` as a u64
/// (`0xcf` and 8 bytes), all visible now (so the claim takes them in id order).
const BUILD_BACKLOG: &str = "
INSERT INTO pgbus.messages (queue, visible_at, content_type, payload)
SELECT $1, now(), 'application/msgpack', '\\xcf'::bytea || int8send(i)
FROM generate_series(1, $2::int8) AS i";

/// History: `$2` archived messages of the queue, ids `1..=$2` (the backlog's ids follow).
const BUILD_ARCHIVE: &str = "
INSERT INTO pgbus.archive (id, queue, priority, enqueued_at, attempts, content_type, headers,
                           payload, acked_at)
SELECT i, $1, 0, now(), 1, 'application/msgpack', '{}', '\\xcf'::bytea || int8send(i), now()
FROM generate_series(1, $2::int8) AS i";

const SKIP_ARCHIVED_IDS: &str =
    "SELECT setval(pg_get_serial_sequence('pgbus.messages', 'id'), $1::int8)";

/// What a run starts from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shape {
    /// Ready messages.
    pub(crate) ready: usize,
    /// Archived messages of the same queue, which keeps history (so its acks archive).
    pub(crate) archived: usize,
}

impl Shape {
    /// "100,000 ready" or "100,000 ready + 5,000,000 archived".
    pub(crate) fn label(self) -> String {
        let ready = format!("{} ready", thousands(self.ready as i64));
        if self.archived == 0 {
            ready
        } else {
            format!("{ready} + {} archived", thousands(self.archived as i64))
        }
    }

    /// "100k" or "100k_archived_5m", for figure ids.
    pub(crate) fn id(self) -> String {
        if self.archived == 0 {
            short(self.ready)
        } else {
            format!("{}_archived_{}", short(self.ready), short(self.archived))
        }
    }

    /// Jobs timed in a run of this shape.
    pub(crate) fn measured_jobs(self) -> usize {
        MEASURED_JOBS.min(self.ready / 2)
    }
}

/// 10k, 1m, 1500: a count for an id.
fn short(n: usize) -> String {
    match n {
        n if n >= 1_000_000 && n.is_multiple_of(1_000_000) => format!("{}m", n / 1_000_000),
        n if n >= 1_000 && n.is_multiple_of(1_000) => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

/// One run's figures.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BacklogRun {
    pub(crate) jobs_per_s: f64,
    pub(crate) claim_p50_ms: f64,
    pub(crate) claim_p99_ms: f64,
    /// Building the backlog (and the history), not timed in the figures above.
    pub(crate) build_s: f64,
}

/// On a fresh database: builds the shape's backlog, `VACUUM ANALYZE`s it, then times one
/// [`ClaimAck`] loop through [`Shape::measured_jobs`] jobs, and checks that exactly those
/// left the table.
pub(crate) async fn run_once(server: &Server, shape: Shape) -> anyhow::Result<BacklogRun> {
    on_fresh_database(server, |url| async move {
        let backend = PgBackend::builder(&url).build()?;
        backend.migrate().await.context("migrating")?;
        let options = QueueOptions::default().keep_history(shape.archived > 0);
        backend
            .create_queue(&queue(), &options)
            .await
            .context("creating the bench queue")?;
        let client = connect(&url).await?;
        let built = Instant::now();
        if shape.archived > 0 {
            let archived = shape.archived as i64;
            client.execute(BUILD_ARCHIVE, &[&QUEUE, &archived]).await?;
            client.query_one(SKIP_ARCHIVED_IDS, &[&archived]).await?;
        }
        client
            .execute(BUILD_BACKLOG, &[&QUEUE, &(shape.ready as i64)])
            .await
            .context("building the backlog")?;
        vacuum_analyze(&client).await?;
        let build_s = built.elapsed().as_secs_f64();

        let jobs = shape.measured_jobs();
        let mut consumer = ClaimAck::open(&backend).await?;
        let mut claims = Vec::with_capacity(jobs.div_ceil(CLAIM_SIZE));
        let mut done = 0;
        let started = Instant::now();
        while done < jobs {
            let cycle = consumer.cycle(CLAIM_SIZE.min(jobs - done)).await?;
            ensure!(
                cycle.claimed > 0,
                "a claim found nothing with {} of {jobs} jobs still to claim",
                jobs - done
            );
            claims.push(ms(cycle.claim));
            done += cycle.claimed;
        }
        let elapsed = started.elapsed();
        let left: i64 = client
            .query_one("SELECT count(*) FROM pgbus.messages", &[])
            .await?
            .get(0);
        ensure!(
            done == jobs && left as usize == shape.ready - jobs,
            "claimed {done} of {jobs} jobs; {left} of {} messages left",
            shape.ready
        );
        let [p50, p99] = percentiles(&claims, [50.0, 99.0]).context("no claims")?;
        Ok(BacklogRun {
            jobs_per_s: rate(done as u64, elapsed),
            claim_p50_ms: p50,
            claim_p99_ms: p99,
            build_s,
        })
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_name_themselves() {
        let plain = Shape {
            ready: 1_000_000,
            archived: 0,
        };
        assert_eq!(plain.id(), "1m");
        assert_eq!(plain.label(), "1,000,000 ready");
        assert_eq!(plain.measured_jobs(), MEASURED_JOBS);
        let history = Shape {
            ready: 100_000,
            archived: 5_000_000,
        };
        assert_eq!(history.id(), "100k_archived_5m");
        assert_eq!(history.label(), "100,000 ready + 5,000,000 archived");
        let small = Shape {
            ready: 10_000,
            archived: 0,
        };
        assert_eq!(
            (small.id(), small.measured_jobs()),
            ("10k".to_owned(), 5_000)
        );
        assert_eq!(short(1_500), "1500");
    }
}
