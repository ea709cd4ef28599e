//! Scenario 8, the scheduler under kills: several `pgbus cron run` processes share short
//! schedules (every 0.5 s, and a seconds cron `*/2 * * * * *`), both catching up missed
//! occurrences, while the harness SIGKILLs the leader (found from
//! `pgbus.scheduler_lease`: its owner is the token the leading process logs), any
//! scheduler, or all of them at once, and terminates their connections. At the end every
//! occurrence from each task's first declaration to its last enqueued one has exactly one
//! job (`pgbus-scheduled-at`) and one record in `pgbus.schedule_runs`: none twice, none
//! skipped.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use pgbus_core::{QueueAdmin, QueueName, QueueOptions, RecurringTask};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

use super::env::{Env, Procs, Side};
use super::report::ScenarioReport;
use super::Plan;

const QUEUE: &str = "ticks";
/// The schedulers' lease (`--lease`): a dead leader's tasks wait at most this long for a
/// new leader (the tick is a third of it, 1 s).
const LEASE: Duration = Duration::from_secs(3);
/// How many missed occurrences a new leader enqueues: far more than the longest time
/// without a leader holds (all schedulers down for a few seconds, then a lease).
const CATCH_UP: u32 = 1_000;
/// How long after a fault an occurrence must be enqueued again.
const RESUME_WITHIN: Duration = Duration::from_secs(30);

/// The tasks every scheduler process runs.
fn config() -> String {
    serde_json::json!([
        {"name": "every_half_second", "queue": QUEUE, "every_secs": 0.5,
         "payload": {"task": "every_half_second"}, "catch_up": CATCH_UP},
        {"name": "cron_every_two", "queue": QUEUE, "cron": "*/2 * * * * *",
         "payload": {"task": "cron_every_two"}, "catch_up": CATCH_UP},
    ])
    .to_string()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// SIGKILL the leading scheduler, start it again.
    Leader,
    /// SIGKILL a random scheduler (leading or not), start it again.
    Any,
    /// SIGKILL every scheduler, start them again a few seconds later.
    All,
    /// `pg_terminate_backend` on every `pgbus:scheduler` connection.
    Terminate,
}

pub(crate) async fn scheduler(
    env: &Env,
    plan: &Plan,
    rng: &mut StdRng,
) -> anyhow::Result<ScenarioReport> {
    let mut report = ScenarioReport::new(
        "scheduler",
        "Schedulers SIGKILLed (the leader, any one, all at once) and their connections terminated",
    );
    let started = Instant::now();
    let db = env.database(report.name).await?;
    db.backend
        .create_queue(&QueueName::new(QUEUE)?, &QueueOptions::default())
        .await?;
    let config = config();
    let tasks = pgbus_core::tasks_from_json(&config)?;
    let config_path = db.dir.join("tasks.json");
    std::fs::write(&config_path, &config)
        .with_context(|| format!("writing {}", config_path.display()))?;
    let (pgbus, url) = (env.pgbus.clone(), db.url.clone());
    let lease = format!("{}s", LEASE.as_secs());
    let schedulers = Procs::start("scheduler", &db.dir, plan.scheduler_processes, move || {
        let mut command = std::process::Command::new(&pgbus);
        command
            .args(["cron", "run", "--lease", &lease, "--config"])
            .arg(&config_path)
            .env("DATABASE_URL", &url)
            .env("PGBUS_LOG", "warn,pgbus=info");
        command
    })?;
    leader(&schedulers, &db.side).await?;
    println!(
        "chaos: scheduler: {} schedulers, lease {} s, tasks every 0.5 s and `*/2 * * * * *` (catch-up {CATCH_UP}), {} s",
        plan.scheduler_processes,
        LEASE.as_secs(),
        plan.scheduler_run.as_secs()
    );

    let (leaders, any, all, storms) = plan.scheduler_faults;
    let mut faults: Vec<Fault> = [
        (Fault::Leader, leaders),
        (Fault::Any, any),
        (Fault::All, all),
        (Fault::Terminate, storms),
    ]
    .into_iter()
    .flat_map(|(fault, n)| std::iter::repeat_n(fault, n))
    .collect();
    faults.shuffle(rng);
    let spacing = plan.scheduler_run.as_secs_f64() / (faults.len() as f64 + 1.0);
    let (mut kills, mut terminated, mut longest) = (0, 0, 0.0f64);
    for (i, fault) in faults.iter().enumerate() {
        let at = spacing * (i as f64 + 1.0) + rng.random_range(-0.25..0.25) * spacing;
        tokio::time::sleep_until((started + Duration::from_secs_f64(at)).into()).await;
        let began = db_now(&db.side).await?;
        let label = match fault {
            Fault::Leader => {
                let (slot, owner) = leader(&schedulers, &db.side).await?;
                let (pid, pause) = kill_and_restart(&schedulers, slot, rng, 0..1_000).await?;
                kills += 1;
                format!("SIGKILL the leader (slot {slot}, lease owner {owner}); restarted as {pid} after {pause} ms")
            }
            Fault::Any => {
                let slot = rng.random_range(0..schedulers.slots());
                let (pid, pause) = kill_and_restart(&schedulers, slot, rng, 0..1_000).await?;
                kills += 1;
                format!("SIGKILL scheduler slot {slot}; restarted as {pid} after {pause} ms")
            }
            Fault::All => {
                for slot in 0..schedulers.slots() {
                    kills += u64::from(schedulers.kill(slot).is_some());
                }
                let pause = rng.random_range(1_000..4_000);
                tokio::time::sleep(Duration::from_millis(pause)).await;
                for slot in 0..schedulers.slots() {
                    schedulers.restart(slot)?;
                }
                format!(
                    "SIGKILL all {} schedulers; restarted after {pause} ms",
                    schedulers.slots()
                )
            }
            Fault::Terminate => {
                let pids = db.side.role_pids("scheduler").await?;
                let n = db.side.terminate(&pids).await?;
                terminated += n;
                report.check(
                    format!(
                        "fault {}: pgbus:scheduler connections found to terminate",
                        i + 1
                    ),
                    n > 0,
                    format!("{n} terminated"),
                );
                format!("{n} pgbus:scheduler connections terminated")
            }
        };
        report.faults += 1;
        // Recovered at the first occurrence enqueued after the fault began (a new
        // leader's catch-up, or the same leader's next one), on the database's clock.
        match first_enqueued_after(&db.side, began, RESUME_WITHIN).await? {
            Some(took) => {
                longest = longest.max(took.as_secs_f64());
                println!(
                    "chaos:   fault {}: {label}; an occurrence enqueued {} ms after it began",
                    i + 1,
                    took.as_millis()
                );
                report.recovered(format!("fault {}: {label}", i + 1), took);
            }
            None => report.check(
                format!("fault {}: occurrences enqueued again after {label}", i + 1),
                false,
                format!("none within {RESUME_WITHIN:?}"),
            ),
        }
    }
    tokio::time::sleep_until((started + plan.scheduler_run).into()).await;

    // Current when stopped: each task's latest occurrence due now is enqueued.
    let end = db_now(&db.side).await?;
    let current = wait_current(&db.side, &tasks, end, RESUME_WITHIN).await?;
    let stop_problems = schedulers.stop_all(Duration::from_secs(20)).await;

    let mut expected_total = 0;
    for task in &tasks {
        let outcome = Outcome::read(&db.side, task).await?;
        expected_total += outcome.expected.len() as u64;
        report.processed += outcome.enqueued();
        report.duplicates += outcome.duplicates();
        report.lost += outcome.skipped().len() as u64;
        outcome.check(&mut report, task, current.get(&task.name).copied());
    }
    report.sent = expected_total;
    report.notes.push(format!(
        "the longest a fault kept occurrences from being enqueued: {longest:.1} s (lease {} s)",
        LEASE.as_secs()
    ));
    schedulers.check_exits(&mut report, "scheduler", &stop_problems);
    report.fault_summary = format!(
        "{leaders} leader, {any} any, {all} all-at-once SIGKILL ({kills} processes) + \
         {terminated} pgbus:scheduler terminated"
    );
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// SIGKILLs the scheduler in `slot`, waits a random pause (ms in `pause`), starts it
/// again; returns the new pid and the pause.
async fn kill_and_restart(
    schedulers: &Procs,
    slot: usize,
    rng: &mut StdRng,
    pause: std::ops::Range<u64>,
) -> anyhow::Result<(u32, u64)> {
    let pause = rng.random_range(pause);
    schedulers.kill(slot);
    tokio::time::sleep(Duration::from_millis(pause)).await;
    Ok((schedulers.restart(slot)?, pause))
}

/// The slot of the leading scheduler and its lease token: the owner of a live
/// `pgbus.scheduler_lease` row, which the leading process logs when it takes the lease.
async fn leader(schedulers: &Procs, side: &Side) -> anyhow::Result<(usize, String)> {
    let deadline = Instant::now() + RESUME_WITHIN;
    loop {
        let rows = side
            .query(
                "SELECT owner FROM pgbus.scheduler_lease
                 WHERE name = 'pgbus:scheduler' AND expires_at > clock_timestamp()",
                &[],
            )
            .await?;
        if let Some(owner) = rows.first().map(|row| row.get::<_, String>(0)) {
            if let Some(slot) = schedulers.slot_logging(&owner) {
                return Ok((slot, owner));
            }
        }
        if Instant::now() >= deadline {
            anyhow::bail!("no running scheduler led within {RESUME_WITHIN:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn db_now(side: &Side) -> anyhow::Result<SystemTime> {
    Ok(side.query("SELECT clock_timestamp()", &[]).await?[0].get(0))
}

/// How long after `after` (database clock) the first occurrence was enqueued, waiting up
/// to `timeout` for one.
async fn first_enqueued_after(
    side: &Side,
    after: SystemTime,
    timeout: Duration,
) -> anyhow::Result<Option<Duration>> {
    let deadline = Instant::now() + timeout;
    loop {
        let rows = side
            .query(
                "SELECT extract(epoch FROM min(enqueued_at) - $1::timestamptz)::float8
                 FROM pgbus.schedule_runs WHERE enqueued_at > $1",
                &[&after],
            )
            .await?;
        if let Some(secs) = rows[0].get::<_, Option<f64>>(0) {
            return Ok(Some(Duration::from_secs_f64(secs.max(0.0))));
        }
        if Instant::now() >= deadline {
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every task's latest enqueued occurrence reaches its latest one due at
/// `end`; returns, per task, whether it did.
async fn wait_current(
    side: &Side,
    tasks: &[RecurringTask],
    end: SystemTime,
    timeout: Duration,
) -> anyhow::Result<BTreeMap<String, bool>> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut current = BTreeMap::new();
        for task in tasks {
            let due = task.schedule.latest_at_or_before(end);
            let rows = side
                .query(
                    "SELECT last_at FROM pgbus.schedules WHERE task = $1",
                    &[&task.name],
                )
                .await?;
            let last: Option<SystemTime> = rows.first().and_then(|row| row.get(0));
            current.insert(task.name.clone(), last.is_some() && last >= due);
        }
        if current.values().all(|ok| *ok) || Instant::now() >= deadline {
            return Ok(current);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One task's occurrences: those due from its first declaration to its last enqueued one,
/// the jobs in the queue by `pgbus-scheduled-at`, and the records in
/// `pgbus.schedule_runs`.
#[derive(Debug)]
struct Outcome {
    expected: BTreeSet<SystemTime>,
    /// Occurrence to the number of jobs for it.
    jobs: BTreeMap<SystemTime, u64>,
    runs: BTreeSet<SystemTime>,
    /// `pgbus.schedules.last_at`.
    last_at: Option<SystemTime>,
}

impl Outcome {
    async fn read(side: &Side, task: &RecurringTask) -> anyhow::Result<Outcome> {
        let row = side
            .query(
                "SELECT first_seen_at, last_at FROM pgbus.schedules WHERE task = $1",
                &[&task.name],
            )
            .await?;
        let row = row
            .first()
            .with_context(|| format!("task {} was never declared", task.name))?;
        let (first_seen, last_at): (SystemTime, Option<SystemTime>) = (row.get(0), row.get(1));
        let jobs = side
            .query(
                "SELECT (headers->>'pgbus-scheduled-at')::timestamptz, count(*)
                 FROM pgbus.messages WHERE queue = $1 AND headers->>'pgbus-task' = $2
                 GROUP BY 1",
                &[&QUEUE, &task.name],
            )
            .await?
            .iter()
            .map(|row| (row.get(0), u64::try_from(row.get::<_, i64>(1)).unwrap_or(0)))
            .collect();
        let runs = side
            .query(
                "SELECT scheduled_at FROM pgbus.schedule_runs WHERE task = $1",
                &[&task.name],
            )
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        Ok(Outcome {
            expected: occurrences(task, first_seen, last_at),
            jobs,
            runs,
            last_at,
        })
    }

    /// Distinct occurrences with a job.
    fn enqueued(&self) -> u64 {
        self.jobs.len() as u64
    }

    /// Jobs beyond the first of their occurrence.
    fn duplicates(&self) -> u64 {
        self.jobs.values().map(|n| n.saturating_sub(1)).sum()
    }

    /// Occurrences due that have no job.
    fn skipped(&self) -> Vec<SystemTime> {
        self.expected
            .iter()
            .filter(|at| !self.jobs.contains_key(at))
            .copied()
            .collect()
    }

    fn check(&self, report: &mut ScenarioReport, task: &RecurringTask, current: Option<bool>) {
        let name = &task.name;
        let skipped = self.skipped();
        let repeated: Vec<SystemTime> = self
            .jobs
            .iter()
            .filter(|(_, n)| **n > 1)
            .map(|(at, _)| *at)
            .collect();
        let example = |times: &[SystemTime]| {
            times
                .first()
                .map_or(String::new(), |at| format!(", e.g. {}", time_of_day(*at)))
        };
        report.check(
            format!("{name}: no occurrence enqueued twice"),
            repeated.is_empty(),
            format!(
                "{} occurrences with more than one job ({} extra){}",
                repeated.len(),
                self.duplicates(),
                example(&repeated)
            ),
        );
        report.check(
            format!("{name}: no occurrence skipped from its first declaration to its last"),
            skipped.is_empty() && !self.expected.is_empty(),
            format!(
                "{} of {} occurrences enqueued ({} .. {} UTC), {} skipped{}",
                self.expected.len() - skipped.len(),
                self.expected.len(),
                self.expected
                    .first()
                    .map_or("-".into(), |at| time_of_day(*at)),
                self.expected
                    .last()
                    .map_or("-".into(), |at| time_of_day(*at)),
                skipped.len(),
                example(&skipped)
            ),
        );
        let stray: Vec<SystemTime> = self
            .jobs
            .keys()
            .filter(|at| !self.expected.contains(at))
            .copied()
            .collect();
        report.check(
            format!("{name}: jobs only for its occurrences"),
            stray.is_empty(),
            format!(
                "{} jobs off the schedule or span{}",
                stray.len(),
                example(&stray)
            ),
        );
        let jobs: BTreeSet<SystemTime> = self.jobs.keys().copied().collect();
        let unmatched = jobs.symmetric_difference(&self.runs).count();
        report.check(
            format!("{name}: each occurrence recorded in pgbus.schedule_runs with its job"),
            unmatched == 0 && self.runs.last() == self.last_at.as_ref(),
            format!(
                "{} records, {} occurrences with jobs, {unmatched} in one but not the other; last_at {} UTC",
                self.runs.len(),
                jobs.len(),
                self.last_at.map_or("-".into(), time_of_day)
            ),
        );
        report.check(
            format!("{name}: scheduled until the end"),
            current == Some(true),
            "the latest occurrence due when the run ended was enqueued".to_owned(),
        );
    }
}

/// The task's occurrences after `first_seen` and up to `last` (none without a `last`).
fn occurrences(
    task: &RecurringTask,
    first_seen: SystemTime,
    last: Option<SystemTime>,
) -> BTreeSet<SystemTime> {
    let mut all = BTreeSet::new();
    let Some(last) = last else {
        return all;
    };
    let mut at = task.schedule.next_after(first_seen);
    while let Some(t) = at.filter(|t| *t <= last) {
        all.insert(t);
        at = task.schedule.next_after(t);
    }
    all
}

/// A time of day in UTC with milliseconds (`08:45:25.500`), for check details.
fn time_of_day(at: SystemTime) -> String {
    let d = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = d.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        secs / 3_600,
        secs / 60 % 60,
        secs % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(ms)
    }

    #[test]
    fn the_config_parses_and_its_occurrences_span_first_declaration_to_last() {
        let tasks = pgbus_core::tasks_from_json(&config()).unwrap();
        assert_eq!(tasks.len(), 2);
        assert_eq!(time_of_day(at(86_400_000 + 3_723_500)), "01:02:03.500");
        let half = &tasks[0];
        assert_eq!(
            occurrences(half, at(1_200), Some(at(3_000))),
            [at(1_500), at(2_000), at(2_500), at(3_000)].into()
        );
        assert!(occurrences(half, at(1_200), None).is_empty());
        let cron = &tasks[1];
        assert_eq!(
            occurrences(cron, at(1_000), Some(at(6_000))),
            [at(2_000), at(4_000), at(6_000)].into()
        );
    }

    #[test]
    fn an_outcome_finds_skipped_repeated_and_stray_occurrences() {
        let tasks = pgbus_core::tasks_from_json(&config()).unwrap();
        let good = Outcome {
            expected: [at(500), at(1_000)].into(),
            jobs: [(at(500), 1), (at(1_000), 1)].into(),
            runs: [at(500), at(1_000)].into(),
            last_at: Some(at(1_000)),
        };
        let mut report = ScenarioReport::new("scheduler", "t");
        good.check(&mut report, &tasks[0], Some(true));
        assert!(report.passed(), "{:?}", report.checks);

        let bad = Outcome {
            expected: [at(500), at(1_000), at(1_500)].into(),
            jobs: [(at(500), 2), (at(1_500), 1), (at(1_700), 1)].into(),
            runs: [at(500), at(1_500)].into(),
            last_at: Some(at(1_500)),
        };
        assert_eq!(bad.duplicates(), 1);
        assert_eq!(bad.skipped(), [at(1_000)]);
        let mut report = ScenarioReport::new("scheduler", "t");
        bad.check(&mut report, &tasks[0], Some(true));
        let failed: Vec<&str> = report
            .checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(
            failed,
            [
                "every_half_second: no occurrence enqueued twice",
                "every_half_second: no occurrence skipped from its first declaration to its last",
                "every_half_second: jobs only for its occurrences",
                "every_half_second: each occurrence recorded in pgbus.schedule_runs with its job",
            ]
        );
    }
}
