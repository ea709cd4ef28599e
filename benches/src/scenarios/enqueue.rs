//! `enqueue`: sends per second. Single `send`s from 1, 8 and 64 concurrent senders (each
//! send its own transaction), wake-ups on and off, and bulk `send_batch`; beside the raw
//! yardsticks measured in the same run on the same table: a plain single-row `INSERT` per
//! transaction, and the same insert with a `pg_notify`, from as many tokio-postgres
//! clients with a prepared statement.

use std::time::Instant;

use pgbus_core::{NewMessage, Producer};
use pgbus_pg::PgBackend;

use super::{live_listener, on_fresh_database, pgbus_backend, queue, rate, QUEUE};
use crate::options::Plan;
use crate::server::{connect, Server};

/// Concurrent senders (or raw clients) of the single-send rows.
pub(crate) const SENDERS: [usize; 3] = [1, 8, 64];

/// The raw yardstick: one row into `pgbus.messages` (its indexes, foreign key and
/// triggers), the columns a pgbus send fills without options.
const RAW_INSERT: &str = "
INSERT INTO pgbus.messages (queue, visible_at, content_type, payload)
VALUES ($1, now(), 'application/msgpack', $2)";

/// The raw yardstick with the wake-up pgbus sends, in the same statement and transaction.
const RAW_INSERT_NOTIFY: &str = "
WITH ins AS (
    INSERT INTO pgbus.messages (queue, visible_at, content_type, payload)
    VALUES ($1, now(), 'application/msgpack', $2)
    RETURNING id
)
SELECT pg_notify('pgbus_wakeup', $1) FROM ins";

/// What one measurement sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// pgbus `send` from this many concurrent tasks, each with its own pooled connection.
    Send(usize),
    /// pgbus `send_batch`.
    Bulk,
    /// Raw prepared single-row inserts from this many clients.
    RawInsert(usize),
    /// Raw prepared single-row insert + `pg_notify` from this many clients.
    RawInsertNotify(usize),
}

/// Messages sent per second by one measurement, on a fresh database with a live listener
/// (as a worker process would have), after a warm-up that opens every connection.
/// `notify` only matters to pgbus's sends.
pub(crate) async fn run_once(
    server: &Server,
    plan: &Plan,
    kind: Kind,
    notify: bool,
) -> anyhow::Result<f64> {
    on_fresh_database(server, |url| async move {
        let senders = match kind {
            Kind::Send(n) | Kind::RawInsert(n) | Kind::RawInsertNotify(n) => n,
            Kind::Bulk => 1,
        };
        let backend =
            pgbus_backend(&url, |b| b.notify(notify).max_connections(senders as u32)).await?;
        let _listener = live_listener(&url).await?;
        match kind {
            Kind::Send(n) => {
                concurrently(&backend, n, 1).await?;
                let each = plan.enqueue_sends / n;
                let started = Instant::now();
                concurrently(&backend, n, each).await?;
                Ok(rate((n * each) as u64, started.elapsed()))
            }
            Kind::Bulk => {
                let q = queue();
                let started = Instant::now();
                for b in 0..plan.bulk_batches {
                    let first = (b * plan.batch_size) as u64;
                    let batch = (first..first + plan.batch_size as u64)
                        .map(|i| NewMessage::encode(&i))
                        .collect::<Result<Vec<_>, _>>()?;
                    backend.send_batch(&q, batch).await?;
                }
                Ok(rate(
                    (plan.bulk_batches * plan.batch_size) as u64,
                    started.elapsed(),
                ))
            }
            Kind::RawInsert(n) => raw(&url, RAW_INSERT, n, plan.enqueue_sends / n).await,
            Kind::RawInsertNotify(n) => {
                raw(&url, RAW_INSERT_NOTIFY, n, plan.enqueue_sends / n).await
            }
        }
    })
    .await
}

/// `senders` tasks, each sending `each` single messages in turn.
async fn concurrently(backend: &PgBackend, senders: usize, each: usize) -> anyhow::Result<()> {
    let tasks: Vec<_> = (0..senders)
        .map(|s| {
            let backend = backend.clone();
            tokio::spawn(async move {
                let q = queue();
                for i in 0..each {
                    backend
                        .send(&q, NewMessage::encode(&((s * each + i) as u64))?)
                        .await?;
                }
                Ok::<_, anyhow::Error>(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// `clients` connections, each running `sql` prepared `each` times (autocommit: one
/// transaction per row) after one untimed warm-up row; rows per second.
async fn raw(url: &str, sql: &'static str, clients: usize, each: usize) -> anyhow::Result<f64> {
    let mut ready = Vec::with_capacity(clients);
    for _ in 0..clients {
        let client = connect(url).await?;
        let statement = client.prepare(sql).await?;
        // The MessagePack of a u64, the payload of pgbus's sends here.
        let payload = NewMessage::encode(&0u64)?.payload;
        client.execute(&statement, &[&QUEUE, &payload]).await?;
        ready.push((client, statement));
    }
    let started = Instant::now();
    let tasks: Vec<_> = ready
        .into_iter()
        .enumerate()
        .map(|(c, (client, statement))| {
            tokio::spawn(async move {
                for i in 0..each {
                    let payload = NewMessage::encode(&((c * each + i) as u64))?.payload;
                    client.execute(&statement, &[&QUEUE, &payload]).await?;
                }
                Ok::<_, anyhow::Error>(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    Ok(rate((clients * each) as u64, started.elapsed()))
}
