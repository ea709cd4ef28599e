//! Scenario 7, the outbox relay under kills: a writer commits bursts of `pgbus.outbox`
//! rows (half with `write_outbox`, half with plain SQL) while several `pgbus relay`
//! processes publish them; relays are SIGKILLed right after a burst (while they are busy
//! with it) and restarted, and their connections are terminated. At the end every row is
//! published, and exactly once: one copy in each queue bound to its routing key and one
//! entry in the event log (the relay publishes and marks a batch in one transaction).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use anyhow::Context;
use pgbus_core::{NewEvent, QueueAdmin, QueueName, QueueOptions, StartAt, Topics};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;
use serde_json::json;
use tokio::sync::watch;
use tokio_postgres::types::ToSql;

use super::env::{Counting, Env, Procs, Side};
use super::report::ScenarioReport;
use super::Plan;

/// The queues and the patterns that bind them: every event, and half of them.
const BINDINGS: [(&str, &str); 2] = [("relayed_all", "#"), ("relayed_even", "chaos.even.*")];
/// Rows each relay takes per transaction: small, so a burst is many batches.
const RELAY_BATCH: &str = "10";
/// How long the rows written before a fault may take to be published after it.
const RECOVER_WITHIN: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// SIGKILL one relay process, start it again.
    Kill,
    /// `pg_terminate_backend` on every `pgbus:relay` connection.
    Terminate,
}

pub(crate) async fn relay(
    env: &Env,
    plan: &Plan,
    rng: &mut StdRng,
) -> anyhow::Result<ScenarioReport> {
    let mut report = ScenarioReport::new(
        "relay",
        "Outbox relays SIGKILLed and their connections terminated while they publish",
    );
    let started = Instant::now();
    let db = env.database(report.name).await?;
    for (queue, pattern) in BINDINGS {
        let queue = QueueName::new(queue)?;
        db.backend
            .create_queue(&queue, &QueueOptions::default())
            .await?;
        db.backend
            .bind(&pattern.parse()?, &queue, StartAt::Now)
            .await?;
    }
    let (pgbus, url) = (env.pgbus.clone(), db.url.clone());
    let relays = Procs::start("relay", &db.dir, plan.relay_processes, move || {
        let mut command = std::process::Command::new(&pgbus);
        command
            .args(["relay", "--batch", RELAY_BATCH, "--poll-interval", "500ms"])
            .env("DATABASE_URL", &url)
            .env("PGBUS_LOG", "warn,pgbus=info");
        command
    })?;
    let connected = db
        .side
        .wait_for_role(
            "relay",
            Counting::Connected,
            plan.relay_processes,
            Duration::from_secs(30),
        )
        .await?;
    anyhow::ensure!(
        connected == plan.relay_processes,
        "{connected} of {} relays connected after 30 s",
        plan.relay_processes
    );
    println!(
        "chaos: relay: {} outbox rows in bursts of {} every {} ms, {} relays (batch {RELAY_BATCH})",
        plan.relay_bursts * plan.relay_burst,
        plan.relay_burst,
        plan.relay_every.as_millis(),
        plan.relay_processes
    );

    // The writer: bursts of rows, one transaction each; `written` counts the bursts.
    let (written_tx, mut written) = watch::channel(0u64);
    let writer = {
        let client = db.side.dedicated().await?;
        let (bursts, burst, every) = (plan.relay_bursts, plan.relay_burst, plan.relay_every);
        tokio::spawn(async move {
            let mut client = client;
            let mut ticker = tokio::time::interval(every);
            for b in 0..bursts {
                ticker.tick().await;
                write_burst(&mut client, b, burst)
                    .await
                    .with_context(|| format!("writing outbox burst {b}"))?;
                written_tx.send_replace(b + 1);
            }
            anyhow::Ok(())
        })
    };

    let mut faults: Vec<Fault> = std::iter::repeat_n(Fault::Kill, plan.relay_kills)
        .chain(std::iter::repeat_n(
            Fault::Terminate,
            plan.relay_terminations,
        ))
        .collect();
    faults.shuffle(rng);
    let mut at: Vec<f64> = (0..faults.len())
        .map(|_| rng.random_range(0.05..0.9))
        .collect();
    at.sort_by(f64::total_cmp);
    let (mut kills, mut terminated) = (0, 0);
    for (i, (fault, point)) in faults.iter().zip(at).enumerate() {
        let target = (point * plan.relay_bursts as f64) as u64;
        written.wait_for(|n| *n >= target).await?;
        // Right after the next burst commits, while the relays are busy with it.
        if written.changed().await.is_err() {
            break;
        }
        let burst = *written.borrow();
        tokio::time::sleep(Duration::from_millis(rng.random_range(0..60))).await;
        let written_before = max_outbox_id(&db.side).await?;
        let fault_began = Instant::now();
        let label = match fault {
            Fault::Kill => {
                let slot = rng.random_range(0..relays.slots());
                let pause = Duration::from_millis(rng.random_range(0..300));
                let Some(kill) = relays.kill(slot) else {
                    report
                        .notes
                        .push(format!("fault {}: slot {slot} had no relay", i + 1));
                    continue;
                };
                tokio::time::sleep(pause).await;
                let pid = relays.restart(slot)?;
                kills += 1;
                format!(
                    "SIGKILL relay {} (slot {slot}); restarted as {pid} after {} ms",
                    kill.worker,
                    pause.as_millis()
                )
            }
            Fault::Terminate => {
                let pids = db.side.role_pids("relay").await?;
                let n = db.side.terminate(&pids).await?;
                terminated += n;
                report.check(
                    format!(
                        "fault {}: pgbus:relay connections found to terminate",
                        i + 1
                    ),
                    n > 0,
                    format!("{n} terminated"),
                );
                format!("{n} pgbus:relay connections terminated")
            }
        };
        report.faults += 1;
        // Recovered once every row written before the fault is published (the rows the
        // killed relay held included).
        let recovered = wait_published_through(&db.side, written_before, RECOVER_WITHIN).await?;
        let took = fault_began.elapsed();
        println!(
            "chaos:   fault {} after burst {burst}: {label}; rows written before it published {} ms later",
            i + 1,
            took.as_millis()
        );
        if recovered {
            report.recovered(format!("fault {}: {label}", i + 1), took);
        } else {
            report.check(
                format!("fault {}: rows written before it published", i + 1),
                false,
                format!("rows up to id {written_before} still pending after {RECOVER_WITHIN:?}"),
            );
        }
        if *fault == Fault::Terminate {
            let back = db
                .side
                .wait_for_role(
                    "relay",
                    Counting::Connected,
                    plan.relay_processes,
                    RECOVER_WITHIN,
                )
                .await?;
            report.check(
                format!("fault {}: every relay reconnected", i + 1),
                back >= plan.relay_processes,
                format!(
                    "{back} of {} pgbus:relay connections back",
                    plan.relay_processes
                ),
            );
        }
    }
    writer.await.context("the outbox writer")??;
    let last = max_outbox_id(&db.side).await?;
    let drained = wait_published_through(&db.side, last, plan.drain).await?;
    let stop_problems = relays.stop_all(Duration::from_secs(20)).await;

    // What the outbox holds, what each queue got, what the event log recorded.
    let rows = db
        .side
        .query(
            "SELECT count(*) FILTER (WHERE published_at IS NULL AND error IS NULL),
                    count(*) FILTER (WHERE error IS NOT NULL),
                    count(*)
             FROM pgbus.outbox",
            &[],
        )
        .await?;
    let count = |i| u64::try_from(rows[0].get::<_, i64>(i)).unwrap_or(0);
    let (pending, failed, total) = (count(0), count(1), count(2));
    report.sent = total;
    report.check(
        "every outbox row published",
        drained && pending == 0,
        format!("{pending} of {total} rows pending"),
    );
    report.check(
        "no outbox row failed",
        failed == 0,
        format!("{failed} rows kept with an error"),
    );
    let mut lost_total = 0;
    let mut duplicates_total = 0;
    for (queue, pattern) in BINDINGS {
        let expected: BTreeSet<String> = db
            .side
            .query(
                "SELECT o.event_id::text FROM pgbus.outbox o
                 JOIN pgbus.topic_bindings b ON ('.' || o.routing_key) ~ b.regex
                 WHERE b.queue = $1",
                &[&queue],
            )
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        let copies = counts(
            &db.side,
            "SELECT headers->>'pgbus-event-id', count(*) FROM pgbus.messages
             WHERE queue = $1 GROUP BY 1",
            &[&queue],
        )
        .await?;
        let tally = Tally::of(&expected, &copies);
        lost_total += tally.lost.len() as u64;
        duplicates_total += tally.duplicates;
        if queue == BINDINGS[0].0 {
            report.processed = tally.delivered;
        }
        tally.check(
            &mut report,
            &format!("queue {queue} (bound to {pattern})"),
            "copy",
        );
    }
    let expected: BTreeSet<String> = db
        .side
        .query("SELECT event_id::text FROM pgbus.outbox", &[])
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let logged = counts(
        &db.side,
        "SELECT id::text, count(*) FROM pgbus.events GROUP BY 1",
        &[],
    )
    .await?;
    let tally = Tally::of(&expected, &logged);
    lost_total += tally.lost.len() as u64;
    duplicates_total += tally.duplicates;
    tally.check(&mut report, "the event log", "entry");
    report.lost = lost_total;
    report.duplicates = duplicates_total;
    relays.check_exits(&mut report, "relay", &stop_problems);
    report.fault_summary = format!("{kills} SIGKILL + {terminated} pgbus:relay terminated");
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Writes burst `b`: rows `b * size ..`, with `write_outbox` for even bursts and plain SQL
/// (the event id the column's default) for odd ones; routing keys alternate between
/// `chaos.even.*` and `chaos.odd.*`.
async fn write_burst(client: &mut tokio_postgres::Client, b: u64, size: u64) -> anyhow::Result<()> {
    let first = b * size;
    let tx = client.transaction().await?;
    if b.is_multiple_of(2) {
        let events = (first..first + size)
            .map(|n| {
                let parity = if n % 2 == 0 { "even" } else { "odd" };
                NewEvent::json(format!("chaos.{parity}.k{}", n % 5), &json!({ "n": n }))
            })
            .collect::<pgbus_core::Result<Vec<_>>>()?;
        pgbus_pg::write_outbox(&tx, events).await?;
    } else {
        let (from, to) = (first as i64, (first + size - 1) as i64);
        tx.execute(
            "INSERT INTO pgbus.outbox (routing_key, payload)
             SELECT 'chaos.' || CASE WHEN n % 2 = 0 THEN 'even' ELSE 'odd' END || '.k' || n % 5,
                    convert_to(json_build_object('n', n)::text, 'UTF8')
             FROM generate_series($1::bigint, $2::bigint) AS n",
            &[&from, &to],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

async fn max_outbox_id(side: &Side) -> anyhow::Result<i64> {
    let rows = side
        .query("SELECT coalesce(max(id), 0) FROM pgbus.outbox", &[])
        .await?;
    Ok(rows[0].get(0))
}

/// Waits until no row with an id up to `id` is pending; whether that happened in time.
async fn wait_published_through(side: &Side, id: i64, timeout: Duration) -> anyhow::Result<bool> {
    let deadline = Instant::now() + timeout;
    loop {
        let pending = side
            .query(
                "SELECT EXISTS (SELECT FROM pgbus.outbox
                                WHERE id <= $1 AND published_at IS NULL AND error IS NULL)",
                &[&id],
            )
            .await?;
        if !pending[0].get::<_, bool>(0) {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `(event id, count)` rows of `sql`.
async fn counts(
    side: &Side,
    sql: &str,
    params: &[&(dyn ToSql + Sync)],
) -> anyhow::Result<BTreeMap<String, u64>> {
    Ok(side
        .query(sql, params)
        .await?
        .iter()
        .map(|row| {
            let id: Option<String> = row.get(0);
            let n: i64 = row.get(1);
            (id.unwrap_or_default(), u64::try_from(n).unwrap_or(0))
        })
        .collect())
}

/// Event ids expected somewhere against how often each arrived there.
#[derive(Debug, Default, PartialEq, Eq)]
struct Tally {
    /// Expected ids that arrived.
    delivered: u64,
    /// Expected ids that never arrived.
    lost: Vec<String>,
    /// Copies beyond the first, over every id.
    duplicates: u64,
    /// Ids that arrived more than once.
    repeated: Vec<String>,
    /// Ids that arrived without being expected.
    foreign: Vec<String>,
}

impl Tally {
    fn of(expected: &BTreeSet<String>, arrived: &BTreeMap<String, u64>) -> Tally {
        let mut tally = Tally::default();
        for id in expected {
            match arrived.get(id) {
                Some(_) => tally.delivered += 1,
                None => tally.lost.push(id.clone()),
            }
        }
        for (id, n) in arrived {
            if *n > 1 {
                tally.duplicates += n - 1;
                tally.repeated.push(id.clone());
            }
            if !expected.contains(id) {
                tally.foreign.push(id.clone());
            }
        }
        tally
    }

    fn check(&self, report: &mut ScenarioReport, place: &str, unit: &str) {
        let example = |ids: &[String]| {
            ids.first()
                .map_or(String::new(), |id| format!(", e.g. {id}"))
        };
        report.check(
            format!("{place}: every row's event once"),
            self.lost.is_empty() && self.duplicates == 0,
            format!(
                "{} of {} delivered, {} missing{}; {} events with more than one {unit} ({} extra){}",
                self.delivered,
                self.delivered + self.lost.len() as u64,
                self.lost.len(),
                example(&self.lost),
                self.repeated.len(),
                self.duplicates,
                example(&self.repeated)
            ),
        );
        report.check(
            format!("{place}: nothing but the outbox's events"),
            self.foreign.is_empty(),
            format!(
                "{} unknown event ids{}",
                self.foreign.len(),
                example(&self.foreign)
            ),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tally_counts_lost_repeated_and_foreign_ids() {
        let expected: BTreeSet<String> = ["a", "b", "c"].map(String::from).into();
        let arrived: BTreeMap<String, u64> = [("a", 1), ("b", 3), ("x", 1)]
            .map(|(id, n)| (id.to_owned(), n))
            .into();
        let tally = Tally::of(&expected, &arrived);
        assert_eq!(
            tally,
            Tally {
                delivered: 2,
                lost: vec!["c".into()],
                duplicates: 2,
                repeated: vec!["b".into()],
                foreign: vec!["x".into()],
            }
        );
        let mut report = ScenarioReport::new("relay", "t");
        tally.check(&mut report, "q", "copy");
        assert!(!report.passed());
        let clean = Tally::of(
            &expected,
            &expected.iter().map(|id| (id.clone(), 1)).collect(),
        );
        let mut report = ScenarioReport::new("relay", "t");
        clean.check(&mut report, "q", "copy");
        assert!(report.passed(), "{:?}", report.checks);
    }
}
