//! Counting pgbus's connections while a scenario runs.

use std::time::Duration;

use anyhow::{bail, Context};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::server::connect;

/// How often the observer looks at `pg_stat_activity`.
pub(crate) const SAMPLE_EVERY: Duration = Duration::from_millis(20);

/// How long the setup's connections may take to close.
const SETUP_GONE_WITHIN: Duration = Duration::from_secs(5);

/// Every connection pgbus opens is named `pgbus:<role>`; the observer's own is not.
const COUNT_PGBUS_CONNECTIONS: &str = "
SELECT count(*) FROM pg_stat_activity
WHERE datname = current_database() AND application_name LIKE 'pgbus:%'";

/// Samples the number of pgbus connections to one database on a connection of its own,
/// every [`SAMPLE_EVERY`], and keeps the peak.
pub(crate) struct ConnectionObserver {
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<i64>>,
}

impl ConnectionObserver {
    /// Connects, waits until the connections of the run's setup are gone (no pgbus
    /// connection left), and takes the first sample before returning.
    pub(crate) async fn start(url: &str) -> anyhow::Result<Self> {
        let client = connect(url).await?;
        let statement = client.prepare(COUNT_PGBUS_CONNECTIONS).await?;
        let deadline = tokio::time::Instant::now() + SETUP_GONE_WITHIN;
        let first = loop {
            let now: i64 = client.query_one(&statement, &[]).await?.get(0);
            if now == 0 {
                break now;
            }
            if tokio::time::Instant::now() > deadline {
                bail!("{now} pgbus connections of the setup are still open");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let stop = CancellationToken::new();
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let mut peak = first;
            let mut ticks = tokio::time::interval(SAMPLE_EVERY);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stopped.cancelled() => break,
                    _ = ticks.tick() => {}
                }
                let now: i64 = client.query_one(&statement, &[]).await?.get(0);
                peak = peak.max(now);
            }
            Ok(peak)
        });
        Ok(ConnectionObserver { stop, task })
    }

    /// Stops sampling; returns the peak seen.
    pub(crate) async fn finish(self) -> anyhow::Result<i64> {
        self.stop.cancel();
        self.task
            .await
            .context("the connection observer panicked")?
            .context("the connection observer failed")
    }
}
