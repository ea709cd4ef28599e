//! `xmin_pinned`: a steady send + work load while one `REPEATABLE READ` transaction holds a
//! snapshot (so vacuum can remove no dead version made after it): claim latency before,
//! during and after the pin, the backlog, the hot table's dead tuples, and how long the
//! backlog takes to come back after the snapshot ends.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use pgbus_core::{NewMessage, Producer};
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::{on_fresh_database, pgbus_backend, queue, ClaimAck};
use crate::server::{connect, Server};
use crate::stats::{ms, percentiles};

/// The steady load: a `send_batch` of [`PER_SEND`] every [`SEND_EVERY`], 2,000 jobs/s.
pub(crate) const PER_SEND: usize = 20;
pub(crate) const SEND_EVERY: Duration = Duration::from_millis(10);
/// Messages per claim, at most.
pub(crate) const CLAIM_SIZE: usize = 100;
/// How long the consumer waits after a claim that found nothing (a worker would wait for a
/// wake-up; at this pace one arrives every [`SEND_EVERY`]).
pub(crate) const IDLE_WAIT: Duration = Duration::from_millis(5);
/// How often the backlog is sampled, and the dead tuples.
const SAMPLE_EVERY: Duration = Duration::from_millis(100);

const DEAD_TUPLES: &str = "
SELECT n_dead_tup FROM pg_stat_user_tables WHERE relid = 'pgbus.messages'::regclass";

/// How long each phase lasts.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Phases {
    pub(crate) before: Duration,
    pub(crate) pinned: Duration,
    pub(crate) after: Duration,
}

/// The consumer's cycles in one phase.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Claims {
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) mean_ms: f64,
    pub(crate) count: usize,
    /// Messages per claim, on average.
    pub(crate) per_claim: f64,
    /// The acks' p99.
    pub(crate) ack_p99_ms: f64,
}

/// One cycle of the consumer: when its claim started, how long the claim and the ack
/// took, and how many messages it claimed.
#[derive(Debug, Clone, Copy)]
struct Claimed {
    at: Instant,
    claim_ms: f64,
    ack_ms: f64,
    messages: usize,
}

/// One second of the run, for the chart.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Second {
    /// Seconds since the load started.
    pub(crate) at_s: f64,
    /// The highest backlog sampled in it.
    pub(crate) backlog: u64,
    /// The last dead-tuple count sampled in it.
    pub(crate) dead_tuples: i64,
    /// The p99 of the claims that started in it (0 without claims).
    pub(crate) claim_p99_ms: f64,
}

/// One run's figures.
#[derive(Debug, Clone)]
pub(crate) struct PinnedRun {
    pub(crate) before: Claims,
    pub(crate) pinned: Claims,
    pub(crate) after: Claims,
    /// The highest backlog (sent and not yet acked) before the pin: the steady state.
    pub(crate) steady_backlog: u64,
    /// The highest backlog from the pin's start to the end of the run.
    pub(crate) peak_backlog: u64,
    /// The most dead tuples `pg_stat_user_tables` showed for `pgbus.messages`, and the
    /// last count, at the end of the run.
    pub(crate) peak_dead_tuples: i64,
    pub(crate) final_dead_tuples: i64,
    /// From the snapshot's end until the backlog was back at its steady state for good
    /// (the last sample above it, or zero if none was); `None` when it was still above it
    /// at the end of the run.
    pub(crate) recovery: Option<Duration>,
    /// From the snapshot's end until the first sample at or below the steady state (zero
    /// when the first sample after it was); `None` when none was. Beside `recovery`, which
    /// a single later sample above the steady state (a load spike on a shared machine)
    /// pushes back to that sample.
    pub(crate) first_back: Option<Duration>,
    /// The backlog at the end of the run.
    pub(crate) final_backlog: u64,
    /// Jobs sent and acked per second over the run.
    pub(crate) sent_per_s: f64,
    pub(crate) acked_per_s: f64,
    /// When the snapshot was taken and released, in seconds since the load started.
    pub(crate) pin_s: (f64, f64),
    /// The run second by second.
    pub(crate) timeline: Vec<Second>,
}

/// One run on a fresh database: the load for `phases.before`, then the snapshot held for
/// `phases.pinned`, then the load alone for `phases.after`.
pub(crate) async fn run_once(server: &Server, phases: Phases) -> anyhow::Result<PinnedRun> {
    on_fresh_database(server, |url| async move {
        let backend = pgbus_backend(&url, |b| b).await?;
        let sent = Arc::new(AtomicU64::new(0));
        let acked = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let started = Instant::now();

        let sender = tokio::spawn({
            let (backend, sent, stop) = (backend.clone(), Arc::clone(&sent), stop.clone());
            async move {
                let q = queue();
                let mut tick = tokio::time::interval(SEND_EVERY);
                // Sends that fell behind catch up, so the load stays at its rate.
                tick.set_missed_tick_behavior(MissedTickBehavior::Burst);
                let mut next = 0u64;
                while !stop.is_cancelled() {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tick.tick() => {}
                    }
                    let batch = (next..next + PER_SEND as u64)
                        .map(|i| NewMessage::encode(&i))
                        .collect::<Result<Vec<_>, _>>()?;
                    next += PER_SEND as u64;
                    backend.send_batch(&q, batch).await?;
                    sent.fetch_add(PER_SEND as u64, Ordering::Relaxed);
                }
                Ok::<_, anyhow::Error>(())
            }
        });
        let consumer = tokio::spawn({
            let (backend, acked, stop) = (backend.clone(), Arc::clone(&acked), stop.clone());
            async move {
                let mut consumer = ClaimAck::open(&backend).await?;
                let mut claims = Vec::new();
                while !stop.is_cancelled() {
                    let at = Instant::now();
                    let cycle = consumer.cycle(CLAIM_SIZE).await?;
                    claims.push(Claimed {
                        at,
                        claim_ms: ms(cycle.claim),
                        ack_ms: ms(cycle.ack),
                        messages: cycle.claimed,
                    });
                    acked.fetch_add(cycle.claimed as u64, Ordering::Relaxed);
                    if cycle.claimed == 0 {
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = tokio::time::sleep(IDLE_WAIT) => {}
                        }
                    }
                }
                Ok::<_, anyhow::Error>(claims)
            }
        });
        let sampler = tokio::spawn({
            let (url, sent, acked, stop) = (
                url.clone(),
                Arc::clone(&sent),
                Arc::clone(&acked),
                stop.clone(),
            );
            async move {
                let client = connect(&url).await?;
                let mut samples = Vec::new();
                let mut tick = tokio::time::interval(SAMPLE_EVERY);
                while !stop.is_cancelled() {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tick.tick() => {}
                    }
                    let backlog = sent
                        .load(Ordering::Relaxed)
                        .saturating_sub(acked.load(Ordering::Relaxed));
                    let dead: Option<i64> =
                        client.query_opt(DEAD_TUPLES, &[]).await?.map(|r| r.get(0));
                    samples.push(Sample {
                        at: Instant::now(),
                        backlog,
                        dead_tuples: dead.unwrap_or(0),
                    });
                }
                Ok::<_, anyhow::Error>(samples)
            }
        });

        // The pin: a snapshot taken by a query, held open on a connection of its own.
        let pin = connect(&url).await?;
        let outcome = async {
            tokio::time::sleep(phases.before).await;
            pin.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
                .await?;
            pin.query_one("SELECT count(*) FROM pgbus.messages", &[])
                .await?;
            let pin_start = Instant::now();
            tokio::time::sleep(phases.pinned).await;
            pin.batch_execute("COMMIT").await?;
            let pin_end = Instant::now();
            tokio::time::sleep(phases.after).await;
            Ok::<_, anyhow::Error>((pin_start, pin_end))
        }
        .await;
        stop.cancel();
        let elapsed = started.elapsed();
        sender.await.context("the sender panicked")??;
        let claims = consumer.await.context("the consumer panicked")??;
        let samples = sampler.await.context("the sampler panicked")??;
        let (pin_start, pin_end) = outcome?;
        Ok(summarise(
            &claims,
            &samples,
            (started, pin_start, pin_end),
            (sent.load(Ordering::Relaxed), acked.load(Ordering::Relaxed)),
            elapsed,
        ))
    })
    .await
}

/// One look at the load.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    backlog: u64,
    dead_tuples: i64,
}

fn summarise(
    claims: &[Claimed],
    samples: &[Sample],
    (started, pin_start, pin_end): (Instant, Instant, Instant),
    (sent, acked): (u64, u64),
    elapsed: Duration,
) -> PinnedRun {
    let phase = |keep: &dyn Fn(Instant) -> bool| {
        let cycles: Vec<&Claimed> = claims.iter().filter(|c| keep(c.at)).collect();
        let latencies: Vec<f64> = cycles.iter().map(|c| c.claim_ms).collect();
        let acks: Vec<f64> = cycles
            .iter()
            .filter(|c| c.messages > 0)
            .map(|c| c.ack_ms)
            .collect();
        let Some([p50, p99]) = percentiles(&latencies, [50.0, 99.0]) else {
            return Claims::default();
        };
        let count = cycles.len();
        Claims {
            p50_ms: p50,
            p99_ms: p99,
            mean_ms: latencies.iter().sum::<f64>() / count as f64,
            count,
            per_claim: cycles.iter().map(|c| c.messages).sum::<usize>() as f64 / count as f64,
            ack_p99_ms: percentiles(&acks, [99.0]).map_or(0.0, |[p]| p),
        }
    };
    let steady_backlog = samples
        .iter()
        .filter(|s| s.at < pin_start)
        .map(|s| s.backlog)
        .max()
        .unwrap_or(0);
    let peak_backlog = samples
        .iter()
        .filter(|s| s.at >= pin_start)
        .map(|s| s.backlog)
        .max()
        .unwrap_or(0);
    let after: Vec<&Sample> = samples.iter().filter(|s| s.at >= pin_end).collect();
    let final_backlog = samples.last().map_or(0, |s| s.backlog);
    // Back for good: after the last sample above the steady state, which must not be the
    // last sample of the run.
    let recovery = match after.iter().rposition(|s| s.backlog > steady_backlog) {
        None => Some(Duration::ZERO),
        Some(last) => after.get(last + 1).map(|s| s.at - pin_end),
    };
    let first_back = after
        .iter()
        .find(|s| s.backlog <= steady_backlog)
        .map(|s| s.at.saturating_duration_since(pin_end));
    let secs = |at: Instant| at.saturating_duration_since(started).as_secs_f64();
    let mut timeline: Vec<Second> = Vec::new();
    for sample in samples {
        let second = secs(sample.at).floor();
        match timeline.last_mut() {
            Some(last) if last.at_s == second => {
                last.backlog = last.backlog.max(sample.backlog);
                last.dead_tuples = sample.dead_tuples;
            }
            _ => timeline.push(Second {
                at_s: second,
                backlog: sample.backlog,
                dead_tuples: sample.dead_tuples,
                claim_p99_ms: 0.0,
            }),
        }
    }
    for second in &mut timeline {
        let latencies: Vec<f64> = claims
            .iter()
            .filter(|c| secs(c.at).floor() == second.at_s)
            .map(|c| c.claim_ms)
            .collect();
        second.claim_p99_ms = percentiles(&latencies, [99.0]).map_or(0.0, |[p]| p);
    }
    PinnedRun {
        before: phase(&|at| at < pin_start),
        pinned: phase(&|at| at >= pin_start && at < pin_end),
        after: phase(&|at| at >= pin_end),
        steady_backlog,
        peak_backlog,
        peak_dead_tuples: samples.iter().map(|s| s.dead_tuples).max().unwrap_or(0),
        final_dead_tuples: samples.last().map_or(0, |s| s.dead_tuples),
        recovery,
        first_back,
        final_backlog,
        sent_per_s: sent as f64 / elapsed.as_secs_f64(),
        acked_per_s: acked as f64 / elapsed.as_secs_f64(),
        pin_s: (secs(pin_start), secs(pin_end)),
        timeline,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovery_runs_from_the_pin_end_until_the_backlog_stays_steady() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let sample = |ms, backlog| Sample {
            at: at(ms),
            backlog,
            dead_tuples: ms as i64,
        };
        let samples = [
            sample(0, 10),
            sample(100, 30),
            sample(200, 500),
            sample(300, 900),
            sample(400, 20),
            sample(500, 40),
            sample(1200, 25),
        ];
        let cycle = |ms, claim_ms, messages| Claimed {
            at: at(ms),
            claim_ms,
            ack_ms: 1.0,
            messages,
        };
        let claims = [cycle(50, 1.0, 10), cycle(250, 9.0, 100), cycle(450, 2.0, 0)];
        let pin = (t0, at(150), at(350));
        let run = summarise(&claims, &samples, pin, (1000, 975), Duration::from_secs(1));
        assert_eq!((run.steady_backlog, run.peak_backlog), (30, 900));
        assert_eq!(
            run.recovery,
            Some(Duration::from_millis(850)),
            "back for good only after the rise at 500 ms"
        );
        assert_eq!(
            run.first_back,
            Some(Duration::from_millis(50)),
            "first back at 400 ms, 50 ms after the pin's end"
        );
        assert_eq!(
            (run.before.p99_ms, run.pinned.p99_ms, run.after.p99_ms),
            (1.0, 9.0, 2.0)
        );
        assert_eq!((run.pinned.per_claim, run.after.ack_p99_ms), (100.0, 0.0));
        assert_eq!((run.peak_dead_tuples, run.final_dead_tuples), (1200, 1200));
        assert_eq!(run.timeline.len(), 2, "{:?}", run.timeline);
        assert_eq!(
            (run.timeline[0].backlog, run.timeline[0].claim_p99_ms),
            (900, 9.0)
        );
        let still_high = summarise(&claims, &samples[..6], pin, (0, 0), Duration::from_secs(1));
        assert_eq!(still_high.recovery, None);
        assert_eq!(still_high.first_back, Some(Duration::from_millis(50)));
        let never_high = summarise(&claims, &samples[..2], pin, (0, 0), Duration::from_secs(1));
        assert_eq!(never_high.recovery, Some(Duration::ZERO));
        assert_eq!(never_high.first_back, None, "no sample after the pin");
    }
}
