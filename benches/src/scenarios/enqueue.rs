//! `enqueue`: sends per second, single (sequential and from concurrent senders) and bulk,
//! with the wake-up notification on and off.

use std::time::Instant;

use pgbus_core::{NewMessage, Producer};
use pgbus_pg::PgBackend;

use super::{live_listener, on_fresh_database, pgbus_backend, queue, rate};
use crate::options::Plan;
use crate::server::Server;

/// How the messages are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `send`, one after the other.
    Sequential,
    /// `send`, from several tasks at once, each with its own pooled connection.
    Concurrent,
    /// `send_batch`.
    Bulk,
}

impl Kind {
    pub(crate) const ALL: [Kind; 3] = [Kind::Sequential, Kind::Concurrent, Kind::Bulk];

    pub(crate) fn id(self) -> &'static str {
        match self {
            Kind::Sequential => "single_sequential",
            Kind::Concurrent => "single_concurrent",
            Kind::Bulk => "bulk",
        }
    }

    pub(crate) fn label(self, plan: &Plan) -> String {
        match self {
            Kind::Sequential => "single send, sequential".to_owned(),
            Kind::Concurrent => format!("single send, {} concurrent senders", plan.senders),
            Kind::Bulk => format!("bulk send_batch of {}", plan.batch_size),
        }
    }
}

/// Messages sent per second by one measurement, on a fresh database with a live listener
/// (as a worker process would have), after a warm-up that opens the pooled connections.
pub(crate) async fn run_once(
    server: &Server,
    plan: &Plan,
    kind: Kind,
    notify: bool,
) -> anyhow::Result<f64> {
    on_fresh_database(server, |url| async move {
        let backend = pgbus_backend(&url, |b| {
            b.notify(notify).max_connections(plan.senders as u32)
        })
        .await?;
        let _listener = live_listener(&url).await?;
        concurrently(&backend, plan.senders, 1).await?;

        let started = Instant::now();
        let sent = match kind {
            Kind::Sequential => {
                let q = queue();
                for i in 0..plan.single_sends as u64 {
                    backend.send(&q, NewMessage::encode(&i)?).await?;
                }
                plan.single_sends
            }
            Kind::Concurrent => {
                concurrently(&backend, plan.senders, plan.sends_per_sender).await?;
                plan.senders * plan.sends_per_sender
            }
            Kind::Bulk => {
                let q = queue();
                for b in 0..plan.bulk_batches {
                    let first = (b * plan.batch_size) as u64;
                    let batch = (first..first + plan.batch_size as u64)
                        .map(|i| NewMessage::encode(&i))
                        .collect::<Result<Vec<_>, _>>()?;
                    backend.send_batch(&q, batch).await?;
                }
                plan.bulk_batches * plan.batch_size
            }
        };
        Ok(rate(sent as u64, started.elapsed()))
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
