//! A queue workload run by real `pgbus work` processes: messages sent up front, workers
//! started, faults injected by the scenario at chosen points of progress, then drained and
//! checked.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use pgbus_core::{NewMessage, Producer, QueueAdmin, QueueName, QueueOptions, RetryPolicy};
use serde_json::json;

use super::check::{analyze, Analysis, Faults, KillRecovery, Layout, Window};
use super::env::{Env, Procs, ScenarioDb};
use super::record::Record;
use super::report::ScenarioReport;
use super::{Part, Plan};

/// The queue every workload uses (one database per scenario).
pub(crate) const QUEUE: &str = "chaos";
/// The queue's lease. Long enough that a busy 2-core machine cannot outlast it (it is
/// extended every third of it, so a worker would have to stall for over 6 s), so a
/// duplicate no fault explains is a failure; work held by a SIGKILLed worker comes back
/// after it.
pub(crate) const LEASE: Duration = Duration::from_secs(10);
/// Attempts before a message is dead-lettered. Faults cost attempts (every delivery
/// counts one), so this is generous: a dead letter means a handler failed for real.
const MAX_ATTEMPTS: u32 = 25;
/// Longest time without any message completing before a run counts as stalled.
const STALL: Duration = Duration::from_secs(90);

/// What to send and how to work it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Workload {
    pub(crate) layout: Layout,
    /// `pgbus work` processes.
    pub(crate) processes: usize,
    /// `--concurrency` of each.
    pub(crate) concurrency: usize,
    /// How long each handler run takes.
    pub(crate) sleep_ms: u64,
    /// How long draining may take once the faults are done.
    pub(crate) drain: Duration,
    /// Run one `pgbus work --processes N` supervisor instead of N plain worker processes.
    pub(crate) supervised: bool,
    /// Send the messages spread over this long instead of all up front.
    pub(crate) send_over: Duration,
}

impl Workload {
    /// The plan's workers on `part`'s messages, all sent up front.
    pub(crate) fn of(plan: &Plan, part: &Part) -> Workload {
        Workload {
            layout: part.layout,
            processes: plan.processes,
            concurrency: plan.concurrency,
            sleep_ms: part.sleep_ms,
            drain: plan.drain,
            supervised: false,
            send_over: Duration::ZERO,
        }
    }
}

/// A workload in progress.
pub(crate) struct QueueRun {
    pub(crate) db: ScenarioDb,
    pub(crate) workload: Workload,
    pub(crate) record: Record,
    pub(crate) workers: Arc<Procs>,
    /// Faults that hit every worker at once (restarts, locks, connection storms).
    pub(crate) windows: Vec<Window>,
    pub(crate) report: ScenarioReport,
    /// The background sender of a trickling workload.
    sender: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    /// The most a 20 ms sleep of the harness overran, in ms: how busy the machine was.
    lag: Arc<AtomicU64>,
    lag_monitor: tokio::task::JoinHandle<()>,
    started: Instant,
    last_progress: (usize, Instant),
}

impl QueueRun {
    /// Creates the scenario's database and queue, sends every message, starts the workers.
    pub(crate) async fn start(
        env: &Env,
        mut report: ScenarioReport,
        workload: Workload,
    ) -> anyhow::Result<QueueRun> {
        let started = Instant::now();
        let db = env.database(report.name).await?;
        let queue = QueueName::new(QUEUE)?;
        let retry = RetryPolicy::builder()
            .base(Duration::from_millis(100))
            .cap(Duration::from_secs(1))
            .max_attempts(MAX_ATTEMPTS)
            .build()?;
        db.backend
            .create_queue(&queue, &QueueOptions::default().lease(LEASE).retry(retry))
            .await?;
        let layout = workload.layout;
        let order = send_order(&layout);
        let sender = if workload.send_over.is_zero() {
            send(&db.backend, &queue, &layout, &order).await?;
            None
        } else {
            // A steady trickle: one batch every 100 ms.
            let batches = (workload.send_over.as_millis() / 100).max(1) as usize;
            let per_batch = order.len().div_ceil(batches).max(1);
            let (backend, queue) = (db.backend.clone(), queue.clone());
            Some(tokio::spawn(async move {
                let mut ticker = tokio::time::interval(Duration::from_millis(100));
                for chunk in order.chunks(per_batch) {
                    ticker.tick().await;
                    send(&backend, &queue, &layout, chunk).await?;
                }
                anyhow::Ok(())
            }))
        };
        report.sent = layout.total();

        let lag = Arc::new(AtomicU64::new(0));
        let record_path = db.dir.join("record.txt");
        let exec = env.handler_command(&record_path, workload.sleep_ms);
        let (pgbus, url) = (env.pgbus.clone(), db.url.clone());
        let concurrency = workload.concurrency.to_string();
        let (count, name, supervise) = if workload.supervised {
            (1, "supervisor", Some(workload.processes.to_string()))
        } else {
            (workload.processes, "worker", None)
        };
        let workers =
            Procs::start_tracking(name, &db.dir, count, supervise.is_some(), move || {
                let mut command = std::process::Command::new(&pgbus);
                if let Some(processes) = &supervise {
                    command.args(["work", "--processes", processes]);
                } else {
                    command.arg("work");
                }
                command
                    .args([QUEUE, "--concurrency", &concurrency])
                    .args(["--poll-interval", "500ms", "--drain-timeout", "10s"])
                    .args(["--exec", &exec])
                    .env("DATABASE_URL", &url)
                    .env("PGBUS_LOG", "warn,pgbus=info");
                command
            })?;
        println!(
            "chaos: {}: {} messages ({} plain, {} groups x {}), {} workers{} x {} slots, {} ms jobs",
            report.name,
            layout.total(),
            layout.plain,
            layout.groups,
            layout.per_group,
            workload.processes,
            if workload.supervised { " under one supervisor" } else { "" },
            workload.concurrency,
            workload.sleep_ms
        );
        Ok(QueueRun {
            record: Record::new(record_path, layout.total()),
            db,
            workload,
            workers,
            windows: Vec::new(),
            report,
            sender,
            lag_monitor: tokio::spawn(watch_lag(Arc::clone(&lag))),
            lag,
            started,
            last_progress: (0, Instant::now()),
        })
    }

    /// Reads the record; returns the fraction of messages completed so far.
    pub(crate) fn progress(&mut self) -> anyhow::Result<f64> {
        self.record.refresh().context("reading the record")?;
        let done = self.record.done_count();
        if done != self.last_progress.0 {
            self.last_progress = (done, Instant::now());
        }
        Ok(done as f64 / self.workload.layout.total().max(1) as f64)
    }

    /// Waits until `fraction` of the messages completed.
    pub(crate) async fn wait_progress(&mut self, fraction: f64) -> anyhow::Result<()> {
        while self.progress()? < fraction {
            if self.last_progress.1.elapsed() > STALL {
                bail!(
                    "no message completed for {STALL:?} ({} of {} done)",
                    self.record.done_count(),
                    self.workload.layout.total()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Waits for the first handler start after `at`; how long after `at` it came.
    pub(crate) async fn wait_resumed_after(
        &mut self,
        at: u64,
        timeout: Duration,
    ) -> anyhow::Result<Option<Duration>> {
        let deadline = Instant::now() + timeout;
        loop {
            self.progress()?;
            if let Some(start) = self.record.first_start_after(at) {
                return Ok(Some(Duration::from_nanos(start - at)));
            }
            if Instant::now() >= deadline
                || self.record.done_count() as u64 == self.workload.layout.total()
            {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Records how long processing took to resume after a fault that ended at `at`.
    pub(crate) async fn expect_resumed(&mut self, fault: &str, at: u64) -> anyhow::Result<()> {
        match self.wait_resumed_after(at, Duration::from_secs(60)).await? {
            Some(took) => {
                println!(
                    "chaos:     processing resumed {} ms later",
                    took.as_millis()
                );
                self.report.recovered(fault, took);
            }
            None if self.record.done_count() as u64 == self.workload.layout.total() => {
                self.report.notes.push(format!(
                    "{fault}: every message was done before the fault ended"
                ));
            }
            None => self.report.check(
                format!("processing resumes after {fault}"),
                false,
                "no job started within 60 s",
            ),
        }
        Ok(())
    }

    /// Fraction `done` as a percentage for log lines.
    pub(crate) fn percent(&self) -> String {
        format!(
            "{:.0}%",
            100.0 * self.record.done_count() as f64 / self.workload.layout.total().max(1) as f64
        )
    }

    /// Waits for the queue to drain, stops the workers, analyses the record and adds the
    /// checks every workload must pass. Returns the analysis for scenario-specific checks.
    pub(crate) async fn finish(mut self) -> anyhow::Result<(ScenarioReport, Analysis)> {
        if let Some(sender) = self.sender.take() {
            sender.await.context("the sender task")??;
        }
        let total = self.workload.layout.total();
        let deadline = Instant::now() + self.workload.drain;
        while Instant::now() < deadline {
            self.progress()?;
            if self.record.done_count() as u64 == total && self.db.side.left(QUEUE).await?.0 == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        // Orphaned handlers of killed workers finish within their sleep.
        tokio::time::sleep(Duration::from_millis(self.workload.sleep_ms + 200)).await;
        let stop_problems = self.workers.stop_all(Duration::from_secs(30)).await;
        self.progress()?;
        let (messages_left, dead) = self.db.side.left(QUEUE).await?;
        let kills = self.workers.kills();
        let workers = self.workers.all_pids();
        let faults = Faults {
            workers: &workers,
            kills: &kills,
            windows: &self.windows,
        };
        let analysis = analyze(&self.workload.layout, self.record.lines(), &faults);

        let report = &mut self.report;
        report.processed = analysis.processed;
        report.duplicates = analysis.duplicates;
        report.lost = analysis.lost.len() as u64;
        report.check(
            "every message processed at least once",
            analysis.lost.is_empty(),
            match analysis.lost.len() {
                0 => format!("{} of {total}", analysis.processed),
                n => format!(
                    "{n} never completed, e.g. {:?}",
                    &analysis.lost[..n.min(10)]
                ),
            },
        );
        report.check(
            "queue drained",
            messages_left == 0,
            format!("{messages_left} messages left in pgbus.messages"),
        );
        report.check(
            "dead-letter queue empty",
            dead == 0,
            format!("{dead} dead letters (max attempts {MAX_ATTEMPTS})"),
        );
        // Every duplicate must be one a kill or fault window lost the ack of: the lease is
        // too long for a merely busy machine to lose one.
        let lag = self.lag.load(Ordering::Relaxed);
        self.lag_monitor.abort();
        report.check(
            "duplicates only where a fault explains them",
            analysis.unexplained_duplicates == 0,
            if analysis.unexplained_duplicates == 0 {
                format!(
                    "{} duplicates, each near a kill or fault that lost its ack",
                    analysis.duplicates
                )
            } else {
                format!(
                    "{} of {} duplicates with no kill or fault near the lost ack (lease {} s; \
                     the harness's 20 ms timer was up to {lag} ms late)",
                    analysis.unexplained_duplicates,
                    analysis.duplicates,
                    LEASE.as_secs()
                )
            },
        );
        report.notes.push(format!(
            "the harness's 20 ms timer was up to {lag} ms late (machine load)"
        ));
        self.workers.check_exits(report, "worker", &stop_problems);
        report.check(
            "handler record intact",
            self.record.malformed().is_empty(),
            format!("{} malformed lines", self.record.malformed().len()),
        );
        if self.workload.layout.groups > 0 {
            report.check(
                "groups: every message starts after its predecessor completed",
                analysis.order_violations.is_empty(),
                summary(&analysis.order_violations),
            );
            report.check(
                "groups: no two completed runs of a group overlap",
                analysis.overlaps.is_empty(),
                format!(
                    "{} ({} runs cut off by kills left out)",
                    summary(&analysis.overlaps),
                    analysis.cut_off
                ),
            );
        }
        for (i, (kill, took)) in kills.iter().zip(&analysis.kill_recoveries).enumerate() {
            let fault = format!("SIGKILL #{} (pid {})", i + 1, kill.worker);
            match took {
                KillRecovery::Recovered(ns) => report.recovered(
                    format!("{fault}: its running jobs completed by other workers"),
                    Duration::from_nanos(*ns),
                ),
                KillRecovery::Idle => report
                    .notes
                    .push(format!("{fault}: it was running nothing")),
                KillRecovery::Never => report.notes.push(format!(
                    "{fault}: a job it was running was never completed by another worker"
                )),
            }
        }
        report.seconds = self.started.elapsed().as_secs_f64();
        Ok((self.report, analysis))
    }
}

/// Records in `lag` the most a 20 ms sleep overran (ms), until aborted.
async fn watch_lag(lag: Arc<AtomicU64>) {
    let tick = Duration::from_millis(20);
    loop {
        let before = Instant::now();
        tokio::time::sleep(tick).await;
        let late = before.elapsed().saturating_sub(tick).as_millis() as u64;
        lag.fetch_max(late, Ordering::Relaxed);
    }
}

/// Sends messages `numbers` of `layout`, 1,000 per statement.
async fn send(
    backend: &pgbus_pg::PgBackend,
    queue: &QueueName,
    layout: &Layout,
    numbers: &[u64],
) -> anyhow::Result<()> {
    for batch in numbers.chunks(1000) {
        let messages = batch
            .iter()
            .map(|&n| {
                let message = NewMessage::encode(&json!({ "n": n }))?;
                Ok(match layout.group_of(n) {
                    Some((group, _)) => message.group(format!("g{group}")),
                    None => message,
                })
            })
            .collect::<pgbus_core::Result<Vec<_>>>()?;
        backend.send_batch(queue, messages).await?;
    }
    Ok(())
}

fn summary(lines: &[String]) -> String {
    match lines {
        [] => "none".to_owned(),
        [one] => one.clone(),
        [first, rest @ ..] => format!("{first} (and {} more)", rest.len()),
    }
}

/// The order messages are sent in: grouped messages in sequence order (a group's order is
/// its send order), groups interleaved, plain messages spread evenly among them.
fn send_order(layout: &Layout) -> Vec<u64> {
    let grouped: Vec<u64> = (0..layout.per_group)
        .flat_map(|seq| (0..layout.groups).map(move |g| layout.number(g, seq)))
        .collect();
    let (plain_total, grouped_total) = (layout.plain, grouped.len() as u64);
    let mut order = Vec::with_capacity(layout.total() as usize);
    let (mut plain_sent, mut grouped_sent) = (0u64, 0u64);
    while plain_sent + grouped_sent < plain_total + grouped_total {
        // Plain next while its share so far is at most its share of the total.
        let plain_next = grouped_sent == grouped_total
            || (plain_sent < plain_total
                && plain_sent * grouped_total <= grouped_sent * plain_total);
        if plain_next {
            order.push(plain_sent);
            plain_sent += 1;
        } else {
            order.push(grouped[grouped_sent as usize]);
            grouped_sent += 1;
        }
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn send_order_keeps_group_order_and_mixes_plain_messages_in() {
        let layout = Layout {
            plain: 4,
            groups: 2,
            per_group: 2,
        };
        let order = send_order(&layout);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..8).collect::<Vec<_>>());
        // Group 0 is messages 4, 5; group 1 is 6, 7: each in sequence order.
        let at = |n: u64| order.iter().position(|&m| m == n).unwrap();
        assert!(at(4) < at(5) && at(6) < at(7), "{order:?}");
        // Plain messages are spread, not all first.
        assert!(at(3) > at(4), "{order:?}");
        assert_eq!(
            send_order(&Layout {
                plain: 3,
                groups: 0,
                per_group: 0
            }),
            [0, 1, 2]
        );
    }
}
