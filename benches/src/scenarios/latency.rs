//! `latency`: enqueue-to-start latency of single messages sent to an idle worker, with a
//! LISTEN wake-up source, with LISTEN beside a transaction-mode PgBouncer, and with polling
//! only.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use pgbus_core::{NewMessage, Producer, QueueAdmin, QueueName, QueueOptions, WakeupSource};
use pgbus_exec::{JobContext, Worker, WorkerMonitor};
use pgbus_pg::{PgBackend, Pooler};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{live_listener, on_fresh_database, pgbus_backend, queue};
use crate::options::Plan;
use crate::server::Server;
use crate::stats::{ms, percentile, percentiles};

/// Slots of the latency worker.
pub(crate) const CONCURRENCY: usize = 10;

/// How the idle worker learns of new work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Variant {
    /// A `PgListener` wake-up source, polling every second as the fallback.
    Listen,
    /// Sender and worker through PgBouncer in transaction mode (`Pooler::Transaction`), the
    /// `PgListener` on a direct connection (`--listen-url`).
    ListenPooled,
    /// No wake-up source: the worker polls at this interval.
    Poll(Duration),
}

impl Variant {
    pub(crate) const ALL: [Variant; 4] = [
        Variant::Listen,
        Variant::ListenPooled,
        Variant::Poll(Duration::from_secs(1)),
        Variant::Poll(Duration::from_millis(100)),
    ];

    pub(crate) fn poll_interval(self) -> Duration {
        match self {
            Variant::Listen | Variant::ListenPooled => Duration::from_secs(1),
            Variant::Poll(interval) => interval,
        }
    }

    pub(crate) fn id(self) -> String {
        match self {
            Variant::Listen => "listen_poll_1000ms".to_owned(),
            Variant::ListenPooled => "pgbouncer_transaction_listen_url".to_owned(),
            Variant::Poll(d) => format!("poll_only_{}ms", d.as_millis()),
        }
    }

    /// Whether the worker has a LISTEN wake-up source.
    pub(crate) fn listens(self) -> bool {
        !matches!(self, Variant::Poll(_))
    }

    pub(crate) fn label(self) -> String {
        match self {
            Variant::Listen => "LISTEN, poll 1 s".to_owned(),
            Variant::ListenPooled => {
                "through PgBouncer (transaction mode, pool 4), LISTEN on a direct connection"
                    .to_owned()
            }
            Variant::Poll(d) => format!("polling only, every {} ms", d.as_millis()),
        }
    }
}

/// One run's latencies, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Run {
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
    /// From the `send` call's return to the start (0 when the job started first).
    pub(crate) pickup_p50: f64,
    pub(crate) pickup_p99: f64,
    /// Median duration of the `send` call itself (a round trip and a durable commit).
    pub(crate) send_p50: f64,
}

/// Sends `plan.latency_messages` messages one at a time, at least `plan.latency_spacing_ms`
/// apart, from another connection (a `pgbus:sender` pool) to an idle worker; each carries
/// its send time, and the handler measures how long ago that was when it starts. With
/// LISTEN each send waits for the previous message's start (sequential send-then-start
/// cycles); polling only, messages are sent on the pace alone (a cycle would last up to
/// the poll interval), so one poll may find several.
pub(crate) async fn run_once(
    server: &Server,
    plan: &Plan,
    variant: Variant,
) -> anyhow::Result<Run> {
    on_fresh_database(server, |url| async move {
        // The sender and the worker's statements go where the variant says; LISTEN always
        // goes directly to PostgreSQL.
        let (statements_url, pooler) = match variant {
            Variant::ListenPooled => (server.pooled_url(&url).await?, Pooler::Transaction),
            _ => (url.clone(), Pooler::Session),
        };
        let backend = pgbus_backend(&statements_url, |b| b.pooler(pooler)).await?;
        let sender = PgBackend::builder(&statements_url)
            .role("sender")
            .pooler(pooler)
            .build()?;
        // Opens the sender's connection on a queue nobody works.
        let warmup = QueueName::new("warmup")?;
        backend
            .create_queue(&warmup, &QueueOptions::default())
            .await?;
        sender.send(&warmup, NewMessage::encode(&0u64)?).await?;

        let listener = match variant {
            Variant::Listen | Variant::ListenPooled => Some(live_listener(&url).await?),
            Variant::Poll(_) => None,
        };
        let base = Instant::now();
        // (send time, start time), both measured from `base`.
        let (started_tx, mut started_rx) = mpsc::unbounded_channel::<(u64, Duration)>();
        let mut builder = Worker::builder(backend.clone())
            .concurrency(CONCURRENCY)
            .poll_interval(variant.poll_interval())
            .handle(queue(), move |_ctx: JobContext<PgBackend>, sent_at: u64| {
                let _ = started_tx.send((sent_at, base.elapsed()));
                async {}
            });
        if let Some(listener) = &listener {
            builder = builder.wakeups(Arc::clone(listener) as Arc<dyn WakeupSource>);
        }
        let worker = builder.build()?;
        let monitor = worker.monitor();
        let stop = CancellationToken::new();
        let run = tokio::spawn(worker.run(stop.clone()));
        wait_until_idle(&monitor, variant).await?;

        let n = plan.latency_messages;
        let mut sends = Vec::with_capacity(n);
        let mut returned_at = HashMap::with_capacity(n);
        let mut starts = Vec::with_capacity(n);
        let deadline = variant.poll_interval() + Duration::from_secs(10);
        let mut ticks = tokio::time::interval(Duration::from_millis(plan.latency_spacing_ms));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let q = queue();
        for _ in 0..n {
            ticks.tick().await;
            let sent_at = base.elapsed().as_nanos() as u64;
            sender.send(&q, NewMessage::encode(&sent_at)?).await?;
            let returned = base.elapsed();
            sends.push(ms(returned - Duration::from_nanos(sent_at)));
            returned_at.insert(sent_at, returned);
            if variant.listens() {
                // One cycle: the next message goes only once this one has started.
                starts.push(next_start(&mut started_rx, deadline, starts.len(), n).await?);
            }
        }
        while starts.len() < n {
            starts.push(next_start(&mut started_rx, deadline, starts.len(), n).await?);
        }
        let (mut latencies, mut pickups) = (Vec::with_capacity(n), Vec::with_capacity(n));
        for (sent_at, started) in starts {
            latencies.push(ms(started.saturating_sub(Duration::from_nanos(sent_at))));
            let returned = returned_at.get(&sent_at).context("an unknown message")?;
            pickups.push(ms(started.saturating_sub(*returned)));
        }
        stop.cancel();
        run.await.context("the worker panicked")??;
        let [p50, p99, max] = percentiles(&latencies, [50.0, 99.0, 100.0]).unwrap_or([f64::NAN; 3]);
        let [pickup_p50, pickup_p99] = percentiles(&pickups, [50.0, 99.0]).unwrap_or([f64::NAN; 2]);
        Ok(Run {
            p50,
            p99,
            max,
            pickup_p50,
            pickup_p99,
            send_p50: percentile(&sends, 50.0).unwrap_or(f64::NAN),
        })
    })
    .await
}

/// The next (send time, start time) the handler reported.
async fn next_start(
    started: &mut mpsc::UnboundedReceiver<(u64, Duration)>,
    deadline: Duration,
    so_far: usize,
    n: usize,
) -> anyhow::Result<(u64, Duration)> {
    match tokio::time::timeout(deadline, started.recv()).await {
        Ok(Some(start)) => Ok(start),
        _ => bail!("only {so_far} of {n} messages started"),
    }
}

/// Waits until the worker has found its queue empty (and, with LISTEN, wake-ups are live).
async fn wait_until_idle(monitor: &WorkerMonitor, variant: Variant) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let meta = monitor.metadata();
        if meta.idle && (!variant.listens() || meta.wakeups_live) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the latency worker did not become idle (wake-ups live: {})",
                meta.wakeups_live
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
