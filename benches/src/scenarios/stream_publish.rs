//! `stream_publish`: durable stream publishes per second from concurrent publishers, all
//! to one stream or each to its own: what serialising a stream's publishes (an advisory
//! lock per stream, held until the publishing transaction commits) costs.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use pgbus_core::{StreamListener, StreamName, StreamStore};
use pgbus_pg::{PgBackend, PgStreamListener};

use super::{on_fresh_database, pgbus_backend, rate, wait_stream_listener_live};
use crate::options::Plan;
use crate::server::Server;

/// Where the publishers publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Spread {
    /// Every publisher to the same stream: they take its lock in turn.
    OneStream,
    /// Each publisher to a stream of its own.
    OwnStreams,
}

impl Spread {
    pub(crate) const ALL: [Spread; 2] = [Spread::OneStream, Spread::OwnStreams];

    pub(crate) fn id(self) -> &'static str {
        match self {
            Spread::OneStream => "one_stream",
            Spread::OwnStreams => "own_streams",
        }
    }

    pub(crate) fn label(self, plan: &Plan) -> String {
        match self {
            Spread::OneStream => format!("{} publishers, one stream", plan.senders),
            Spread::OwnStreams => format!(
                "{} publishers, {} different streams",
                plan.senders, plan.senders
            ),
        }
    }

    fn streams(self, publishers: usize) -> anyhow::Result<Vec<StreamName>> {
        (0..publishers)
            .map(|p| match self {
                Spread::OneStream => StreamName::new("bench"),
                Spread::OwnStreams => StreamName::new(format!("bench_{p}")),
            })
            .collect::<Result<_, _>>()
            .map_err(Into::into)
    }
}

/// Publishes per second of one measurement: `plan.senders` tasks, each making
/// `plan.sends_per_sender` durable publishes in turn on its own pooled connection, on a
/// fresh database where a `PgStreamListener` LISTENs on the streams (as a streamer's
/// would), after a warm-up that opens the pooled connections.
pub(crate) async fn run_once(server: &Server, plan: &Plan, spread: Spread) -> anyhow::Result<f64> {
    on_fresh_database(server, |url| async move {
        let backend = pgbus_backend(&url, |b| b.max_connections(plan.senders as u32)).await?;
        let streams = spread.streams(plan.senders)?;
        let listener = PgStreamListener::new(&url)?;
        listener.start(Arc::new(|_| {}))?;
        wait_stream_listener_live(&listener).await?;
        for stream in streams.iter().collect::<BTreeSet<_>>() {
            listener.listen(stream).await?;
        }
        concurrently(&backend, &streams, 1).await?;

        let started = Instant::now();
        concurrently(&backend, &streams, plan.sends_per_sender).await?;
        let published = rate(
            (plan.senders * plan.sends_per_sender) as u64,
            started.elapsed(),
        );
        listener.stop().await;
        Ok(published)
    })
    .await
}

/// One task per stream in `streams`, each publishing `each` events to it in turn.
async fn concurrently(
    backend: &PgBackend,
    streams: &[StreamName],
    each: usize,
) -> anyhow::Result<()> {
    let tasks: Vec<_> = streams
        .iter()
        .map(|stream| {
            let (backend, stream) = (backend.clone(), stream.clone());
            tokio::spawn(async move {
                for i in 0..each {
                    backend.publish(&stream, "bench", &i.to_string()).await?;
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
