//! The idempotent subscriber of the kill tests (`tests/tests/events_pg.rs`), shared by the
//! test process and the `idempotent_subscriber` binary that runs it as the killed child.

use std::time::Duration;

use pgbus_core::{Event, EventId, QueueName};
use pgbus_exec::{JobContext, Subscription, Worker, WorkerReport};
use pgbus_pg::{connect, PgBackend};
use tokio_util::sync::CancellationToken;

/// The child's pool connections are `pgbus:child`, so a test can find them.
pub const CHILD_ROLE: &str = "child";

/// The event the kill tests publish.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Paid {
    /// Which order was paid.
    pub order: u64,
}

/// How a handler run goes. Either way it first records that it started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Run {
    /// Records that it finished and returns.
    Finishes,
    /// Never finishes: its process is killed meanwhile.
    Hangs,
}

impl Run {
    /// The command-line word for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Finishes => "finishes",
            Self::Hangs => "hangs",
        }
    }

    /// The run a command-line word names.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "finishes" => Some(Self::Finishes),
            "hangs" => Some(Self::Hangs),
            _ => None,
        }
    }
}

/// Records a handler run's phase in `test_runs` on a connection of its own (committed at
/// once, so the row outlives a kill).
async fn record(url: &str, event: EventId, attempt: u32, phase: &str) {
    let client = connect(url, "handler").await.unwrap();
    let attempt = i32::try_from(attempt).unwrap();
    client
        .execute(
            "INSERT INTO test_runs (event_id, attempt, phase) VALUES ($1, $2, $3)",
            &[&event.to_string(), &attempt, &phase],
        )
        .await
        .unwrap();
}

/// An idempotent subscriber whose handler records its runs and goes as `run` says,
/// started on its own backend with pool connections named `pgbus:<role>`. Returns the task
/// running it (never cancelled: a child is killed, a test's task aborted).
pub fn start_subscriber(
    url: &str,
    queue: &QueueName,
    role: &str,
    run: Run,
) -> tokio::task::JoinHandle<pgbus_core::Result<WorkerReport>> {
    let backend = PgBackend::builder(url)
        .role(role)
        .max_connections(4)
        .build()
        .unwrap();
    let url = url.to_owned();
    let handler = move |ctx: JobContext<PgBackend>, event: Event<Paid>| {
        let url = url.clone();
        async move {
            record(&url, event.id, ctx.attempt(), "started").await;
            if run == Run::Hangs {
                std::future::pending::<()>().await;
            }
            record(&url, event.id, ctx.attempt(), "finished").await;
        }
    };
    let subscription = Subscription::new(queue.clone())
        .on("order.*".parse().unwrap(), handler)
        .idempotent();
    let worker = Worker::builder(backend)
        .poll_interval(Duration::from_millis(50))
        .subscribe(subscription)
        .build()
        .unwrap();
    tokio::spawn(worker.run(CancellationToken::new()))
}
