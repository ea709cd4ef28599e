//! `publish_fanout`: events published per second when each event goes to
//! [`Plan::fanout_queues`] bound queues, in bulk (`publish_batch`).

use std::time::Instant;

use pgbus_core::{NewEvent, QueueAdmin, QueueName, QueueOptions, StartAt, Topics};

use super::{live_listener, on_fresh_database, pgbus_backend, rate};
use crate::options::Plan;
use crate::server::Server;

/// The routing key every event carries, and the pattern every queue binds.
const ROUTING_KEY: &str = "order.paid";
const PATTERN: &str = "order.*";

/// Events per second of one measurement, on a fresh database with a live listener (the
/// copies' wake-ups are sent, as for a process with workers).
pub(crate) async fn run_once(server: &Server, plan: &Plan) -> anyhow::Result<f64> {
    on_fresh_database(server, |url| async move {
        let backend = pgbus_backend(&url, |b| b).await?;
        let _listener = live_listener(&url).await?;
        let pattern = PATTERN.parse()?;
        for i in 0..plan.fanout_queues {
            let queue = QueueName::new(format!("fanout_{i}"))?;
            backend
                .create_queue(&queue, &QueueOptions::default())
                .await?;
            backend.bind(&pattern, &queue, StartAt::Now).await?;
        }
        // Warm-up: opens the pooled connection.
        backend
            .publish(NewEvent::encode(ROUTING_KEY, &0u64)?)
            .await?;

        let started = Instant::now();
        for b in 0..plan.fanout_batches {
            let first = (b * plan.batch_size) as u64;
            let batch = (first..first + plan.batch_size as u64)
                .map(|i| NewEvent::encode(ROUTING_KEY, &i))
                .collect::<Result<Vec<_>, _>>()?;
            let published = backend.publish_batch(batch).await?;
            anyhow::ensure!(
                published
                    .iter()
                    .all(|p| p.copies == plan.fanout_queues as u64),
                "every event reaches every bound queue"
            );
        }
        let events = (plan.fanout_batches * plan.batch_size) as u64;
        Ok(rate(events, started.elapsed()))
    })
    .await
}
