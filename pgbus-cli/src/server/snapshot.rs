//! The snapshot behind the dashboard, its live updates and `/metrics`: read by one task
//! every refresh interval, shared with every client through a watch channel.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use pgbus_core::{
    BatchInfo, ProcessRecord, ProcessRegistry, QueueStats, Stats, TopicStats, Topics,
};
use pgbus_pg::{GroupInFlight, PgBackend, ScheduleInfo, ThroughputPoint};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::support::json::{
    batches_json, processes_json, queues_json, schedules_json, topics_json,
};
use crate::support::time::{millis, rfc3339};

/// How far back the dashboard's throughput chart reaches.
const CHARTED: Duration = Duration::from_secs(30 * 60);

/// Most groups in flight the dashboard lists.
const GROUPS_LISTED: usize = 200;

/// What the database said at one moment.
pub(crate) struct Data {
    pub(crate) queues: Vec<QueueStats>,
    pub(crate) processes: Vec<ProcessRecord>,
    pub(crate) groups: Vec<GroupInFlight>,
    pub(crate) topics: Vec<TopicStats>,
    pub(crate) batches: Vec<BatchInfo>,
    pub(crate) schedules: Vec<ScheduleInfo>,
    pub(crate) throughput: Vec<ThroughputPoint>,
}

/// This process's streamer: followed streams and their connections.
#[derive(Default)]
pub(crate) struct StreamsView {
    pub(crate) census: Vec<(String, usize)>,
    pub(crate) connections: u64,
    pub(crate) delivered: u64,
    pub(crate) dropped_slow: u64,
}

/// One refresh: the data (or why it could not be read), and its JSON, rendered once.
pub(crate) struct Snapshot {
    pub(crate) data: Result<Data, String>,
    pub(crate) streams: StreamsView,
    // Read by the dashboard API only.
    #[cfg_attr(not(feature = "dashboard"), allow(dead_code))]
    pub(crate) json: Arc<str>,
}

/// The latest snapshot, for handlers.
#[derive(Clone)]
pub(crate) struct Snapshots {
    rx: watch::Receiver<Arc<Snapshot>>,
}

/// The streamer instance `pgbus serve` runs, whose clients the snapshot counts.
#[cfg(feature = "stream")]
pub(crate) type Streamer = pgbus_stream::Instance<PgBackend, pgbus_pg::PgStreamListener>;

impl Snapshots {
    /// Starts the refresh task; it ends with `stop`.
    pub(crate) fn start(
        backend: PgBackend,
        every: Duration,
        #[cfg(feature = "stream")] streamer: Streamer,
        stop: CancellationToken,
    ) -> Self {
        let first = Snapshot::render(Err("starting".into()), StreamsView::default());
        let (tx, rx) = watch::channel(Arc::new(first));
        tokio::spawn(async move {
            loop {
                let data = read_supervised(&backend).await;
                #[cfg(feature = "stream")]
                let streams = streams_view(&streamer).await;
                #[cfg(not(feature = "stream"))]
                let streams = StreamsView::default();
                if let Err(err) = &data {
                    tracing::warn!(target: "pgbus::serve", error = %err, "could not read the dashboard snapshot");
                }
                tx.send_replace(Arc::new(Snapshot::render(data, streams)));
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
            }
        });
        Self { rx }
    }

    /// The latest snapshot.
    pub(crate) fn latest(&self) -> Arc<Snapshot> {
        self.rx.borrow().clone()
    }

    /// A receiver that sees every new snapshot.
    #[cfg(feature = "dashboard")]
    pub(crate) fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.rx.clone()
    }
}

/// One refresh's read on a task of its own, so that a bug it hits (a panic) is logged and
/// shown as an error, and the next refresh tries again: the dashboard and `/metrics`
/// never freeze on the last snapshot.
async fn read_supervised(backend: &PgBackend) -> Result<Data, String> {
    let backend = backend.clone();
    supervised(async move { read(&backend).await.map_err(|err| err.report().to_string()) }).await
}

/// Runs `work` on a task of its own; a panic is logged and becomes a generic error.
async fn supervised<T: Send + 'static>(
    work: impl Future<Output = Result<T, String>> + Send + 'static,
) -> Result<T, String> {
    match tokio::spawn(work).await {
        Ok(result) => result,
        Err(err) => {
            let panic = err
                .try_into_panic()
                .map(|panic| pgbus_core::panic_message(&*panic).to_owned())
                .unwrap_or_else(|err| err.to_string());
            tracing::error!(target: "pgbus::serve", panic = %panic, "reading the dashboard snapshot panicked; trying again on the next refresh");
            Err("internal error (see the server log)".into())
        }
    }
}

async fn read(backend: &PgBackend) -> pgbus_core::Result<Data> {
    Ok(Data {
        queues: backend.stats().await?,
        processes: backend.processes().await?,
        groups: backend.groups_in_flight(GROUPS_LISTED).await?,
        topics: backend.topic_stats().await?,
        batches: backend.open_batches().await?,
        schedules: backend.schedules().await?,
        throughput: backend.throughput_history(CHARTED).await?,
    })
}

#[cfg(feature = "stream")]
async fn streams_view(streamer: &Streamer) -> StreamsView {
    let stats = streamer.stats();
    StreamsView {
        census: streamer
            .census()
            .await
            .into_iter()
            .map(|(name, n)| (name.to_string(), n))
            .collect(),
        connections: stats.connections,
        delivered: stats.delivered,
        dropped_slow: stats.dropped_slow,
    }
}

fn groups_json(groups: &[GroupInFlight], now: SystemTime) -> Value {
    groups
        .iter()
        .map(|g| {
            json!({
                "queue": g.queue,
                "group": g.group,
                "message": g.message.0,
                "attempt": g.attempt,
                "lease_left_ms": millis(g.lease_until.duration_since(now).unwrap_or_default()),
            })
        })
        .collect()
}

/// Per-queue series of per-bucket counts, for the chart.
fn throughput_json(points: &[ThroughputPoint]) -> Value {
    let mut series = serde_json::Map::new();
    for p in points {
        let at = p
            .bucket
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(millis)
            .unwrap_or(0);
        if let Value::Array(list) = series
            .entry(p.queue.as_str())
            .or_insert_with(|| Value::Array(Vec::new()))
        {
            list.push(json!([at, p.processed, p.failed]));
        }
    }
    json!({ "bucket_ms": millis(pgbus_core::THROUGHPUT_BUCKET), "series": series })
}

impl Snapshot {
    fn render(data: Result<Data, String>, streams: StreamsView) -> Self {
        let now = SystemTime::now();
        let streams_json = json!({
            "connections": streams.connections,
            "delivered": streams.delivered,
            "dropped_slow": streams.dropped_slow,
            "followed": streams.census.iter().map(|(name, n)| json!({
                "stream": name, "connections": n,
            })).collect::<Vec<_>>(),
        });
        let value = match &data {
            Ok(d) => json!({
                "at": rfc3339(now),
                "database": { "ok": true },
                "queues": queues_json(&d.queues),
                "processes": processes_json(&d.processes, now),
                "groups": groups_json(&d.groups, now),
                "topics": topics_json(&d.topics),
                "batches": batches_json(&d.batches),
                "schedules": schedules_json(&d.schedules),
                "throughput": throughput_json(&d.throughput),
                "streams": streams_json,
            }),
            Err(err) => json!({
                "at": rfc3339(now),
                "database": { "ok": false, "error": err },
                "streams": streams_json,
            }),
        };
        Self {
            data,
            streams,
            json: value.to_string().into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_read_is_an_error_and_the_next_one_runs() {
        let panicked: Result<(), String> = supervised(async { panic!("a bad row") }).await;
        assert_eq!(panicked, Err("internal error (see the server log)".into()));
        assert_eq!(supervised(async { Ok(7) }).await, Ok(7));
    }
}
