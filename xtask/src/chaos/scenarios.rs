//! The queue scenarios: worker crashes, database restarts, connection kills, groups under
//! faults, a slow database. Each sends a workload, injects its faults at seeded points of
//! progress, drains, and checks.

use std::time::{Duration, Instant};

use pgbus_pg::ShutdownMode;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

use super::check::Window;
use super::env::{Counting, Env};
use super::record::now_ns;
use super::report::ScenarioReport;
use super::workload::{QueueRun, Workload};
use super::Plan;

/// Kills the worker in a random slot, waits a random moment, starts it again.
async fn kill_and_restart(run: &mut QueueRun, rng: &mut StdRng, label: &str) -> anyhow::Result<()> {
    let slot = rng.random_range(0..run.workers.slots());
    let pause = Duration::from_millis(rng.random_range(0..500));
    let at = run.percent();
    let Some(kill) = run.workers.kill(slot) else {
        run.report
            .notes
            .push(format!("{label}: slot {slot} had no process to kill"));
        return Ok(());
    };
    tokio::time::sleep(pause).await;
    let pid = run.workers.restart(slot)?;
    println!(
        "chaos:   {label}: SIGKILL worker {} (slot {slot}) at {at} done; restarted as {pid} after {} ms",
        kill.worker,
        pause.as_millis()
    );
    run.report.faults += 1;
    Ok(())
}

/// `count` random points of progress in `range`, in order.
fn points(rng: &mut StdRng, count: usize, range: std::ops::Range<f64>) -> Vec<f64> {
    let mut points: Vec<f64> = (0..count)
        .map(|_| rng.random_range(range.clone()))
        .collect();
    points.sort_by(f64::total_cmp);
    points
}

/// Scenario 1, worker crashes: SIGKILL `pgbus work` processes at random moments and restart them.
pub(crate) async fn crashes(
    env: &Env,
    plan: &Plan,
    rng: &mut StdRng,
) -> anyhow::Result<ScenarioReport> {
    let report = ScenarioReport::new("crashes", "Worker crashes (SIGKILL, restart)");
    let mut run = QueueRun::start(env, report, Workload::of(plan, &plan.crashes)).await?;
    for (i, point) in points(rng, plan.crashes.kills, 0.05..0.85)
        .into_iter()
        .enumerate()
    {
        run.wait_progress(point).await?;
        kill_and_restart(&mut run, rng, &format!("kill {}", i + 1)).await?;
    }
    let kills = run.report.faults;
    let (mut report, analysis) = run.finish().await?;
    // A kill loses the acks of the jobs its worker was running (at most the concurrency)
    // and of jobs that had finished while the previous ack statement was in flight.
    let worst = analysis.kill_duplicates.iter().copied().max().unwrap_or(0);
    let per_kill = 2 * plan.concurrency as u64;
    report.check(
        "duplicates bounded by the work in flight at each kill",
        worst <= per_kill,
        format!(
            "per kill {:?}, at most {per_kill} (2 x concurrency {}); total {} vs kills x concurrency = {}",
            analysis.kill_duplicates,
            plan.concurrency,
            analysis.duplicates,
            kills * plan.concurrency as u64
        ),
    );
    report.fault_summary = format!("{kills} SIGKILL");
    Ok(report)
}

/// How long a supervised worker must have run for its death to count as a first failure:
/// `pgbus work --processes` starts its restart backoff over after a run this long.
const STABLE_RUN: Duration = Duration::from_secs(10);
/// The supervisor's first restart delay is 1 s; this leaves room for a busy machine.
const FIRST_RESTART_BOUND: Duration = Duration::from_millis(2_500);

/// Scenario 1b, the supervisor: one `pgbus work --processes N`; the harness SIGKILLs its
/// worker processes (each after it ran long enough to count as healthy, the same
/// supervisor slot again and again) and checks that the supervisor restarts each after its
/// first backoff step, while messages keep trickling in.
pub(crate) async fn supervisor(
    env: &Env,
    plan: &Plan,
    rng: &mut StdRng,
) -> anyhow::Result<ScenarioReport> {
    let report = ScenarioReport::new(
        "supervisor",
        "pgbus work --processes: SIGKILLed workers restarted by the supervisor",
    );
    let workload = Workload {
        supervised: true,
        send_over: plan.supervisor_over,
        ..Workload::of(plan, &plan.supervisor)
    };
    let mut run = QueueRun::start(env, report, workload).await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while run.workers.children().len() < plan.processes {
        if Instant::now() >= deadline {
            anyhow::bail!(
                "the supervisor did not start {} workers within 30 s",
                plan.processes
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut next: Option<u32> = None;
    for i in 0..plan.supervisor.kills {
        let target = match next {
            Some(pid) => pid,
            None => {
                let children = run.workers.children();
                children[rng.random_range(0..children.len())].0
            }
        };
        // Healthy first: up for longer than the supervisor's stable-run threshold.
        loop {
            let up = run
                .workers
                .children()
                .iter()
                .find(|(pid, _)| *pid == target)
                .map(|c| c.1);
            match up {
                Some(up) if up >= STABLE_RUN + Duration::from_millis(500) => break,
                Some(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                None => anyhow::bail!("supervised worker {target} vanished before its kill"),
            }
        }
        run.progress()?;
        let at = run.percent();
        let before: Vec<u32> = run.workers.children().iter().map(|c| c.0).collect();
        let kill = run.workers.kill_child(target);
        let killed = Instant::now();
        run.report.faults += 1;
        let replacement = loop {
            let fresh = run
                .workers
                .children()
                .into_iter()
                .find(|(pid, _)| !before.contains(pid));
            if let Some((pid, _)) = fresh {
                break Some(pid);
            }
            if killed.elapsed() > Duration::from_secs(60) {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let took = killed.elapsed();
        let label = format!(
            "SIGKILL #{} (pid {}, up over {} s)",
            i + 1,
            kill.worker,
            STABLE_RUN.as_secs()
        );
        match replacement {
            Some(pid) => {
                println!(
                    "chaos:   kill {}: SIGKILL supervised worker {} at {at} done; the supervisor started {pid} {} ms later",
                    i + 1,
                    kill.worker,
                    took.as_millis()
                );
                run.report.check(
                    format!("{label}: restarted after the first backoff step"),
                    took <= FIRST_RESTART_BOUND,
                    format!(
                        "new worker {pid} after {} ms (first step 1 s, allowed {} ms)",
                        took.as_millis(),
                        FIRST_RESTART_BOUND.as_millis()
                    ),
                );
                run.report.recovered(
                    format!("{label}: the supervisor started a new worker"),
                    took,
                );
                next = Some(pid);
            }
            None => {
                run.report.check(
                    format!("{label}: restarted by the supervisor"),
                    false,
                    "no new worker within 60 s",
                );
                next = None;
            }
        }
    }
    let kills = run.report.faults;
    let (mut report, _) = run.finish().await?;
    report.fault_summary = format!("{kills} SIGKILL of supervised workers");
    Ok(report)
}

/// How long a standing connection may take to come back (and a listener to LISTEN
/// again) after it was lost.
const RECONNECT_WITHIN: Duration = Duration::from_secs(30);

/// Scenario 2, database restarts: `pg_ctl restart -m fast`, later `-m immediate`, during a
/// run; after each, processing resumes and every worker process LISTENs again.
pub(crate) async fn restarts(
    env: &Env,
    plan: &Plan,
    rng: &mut StdRng,
) -> anyhow::Result<ScenarioReport> {
    let report = ScenarioReport::new(
        "restarts",
        "Database restarts (pg_ctl restart -m fast / immediate)",
    );
    if !env.owns_server() {
        return Ok(ScenarioReport::skipped(
            report.name,
            report.title,
            "needs the harness's own cluster (run without --database-url)".into(),
        ));
    }
    let workload = Workload::of(plan, &plan.restarts);
    let modes = &plan.restart_modes;
    let mut run = QueueRun::start(env, report, workload).await?;
    for (i, mode) in modes.iter().enumerate() {
        let point = (i as f64 + 1.0) / (modes.len() as f64 + 1.0) + rng.random_range(-0.05..0.05);
        run.wait_progress(point).await?;
        let at = run.percent();
        let from = now_ns();
        env.restart(*mode)?;
        let to = now_ns();
        run.windows.push(Window { from, to });
        run.report.faults += 1;
        let label = format!("restart -m {} #{}", mode.as_pg_ctl(), i + 1);
        println!(
            "chaos:   {label} at {at} done: server back after {} ms",
            (to - from) / 1_000_000
        );
        // Every worker's listener reconnects with backoff and LISTENs again (first: this
        // is timed by polling, the resumption below by the record's own timestamps).
        let workers = run.workers.pids().len();
        let listening = run
            .db
            .side
            .wait_for_role("listen", Counting::Listening, workers, RECONNECT_WITHIN)
            .await?;
        let took = Duration::from_nanos(now_ns() - to);
        run.report.check(
            format!("{label}: every worker LISTENs again"),
            listening >= workers,
            format!(
                "{listening} of {workers} pgbus:listen connections listening {} ms after the server was back",
                took.as_millis()
            ),
        );
        if listening >= workers {
            println!(
                "chaos:     {listening} pgbus:listen connections listening again {} ms after the server was back",
                took.as_millis()
            );
            run.report.recovered(
                format!("{label}: every worker LISTENing again"),
                Duration::from_nanos(to - from) + took,
            );
        }
        // Time from the start of the restart to the first job a worker takes afterwards.
        if let Some(took) = run.wait_resumed_after(to, Duration::from_secs(60)).await? {
            println!(
                "chaos:     processing resumed {} ms after the server was back",
                took.as_millis()
            );
            run.report.recovered(
                format!("{label} (server down {} ms)", (to - from) / 1_000_000),
                Duration::from_nanos(to - from) + took,
            );
        } else {
            run.report.check(
                format!("processing resumes after {label}"),
                false,
                "no job started within 60 s of the server being back",
            );
        }
    }
    let (mut report, _) = run.finish().await?;
    let fast = modes.iter().filter(|m| **m == ShutdownMode::Fast).count();
    report.fault_summary = format!("{fast} fast + {} immediate restarts", modes.len() - fast);
    Ok(report)
}

/// The connection roles a worker process has, in the order they are stormed (group
/// sessions first: they exist only while groups are in flight).
const ROLES: [&str; 5] = ["group", "fetch", "listen", "pool", "recovery"];
/// Roles whose connections a worker holds all the time (they must come back).
const STANDING: [&str; 3] = ["fetch", "listen", "recovery"];

/// Scenario 3, connection kills: `pg_terminate_backend` storms on each `pgbus:*` role in turn.
pub(crate) async fn terminations(
    env: &Env,
    plan: &Plan,
    rng: &mut StdRng,
) -> anyhow::Result<ScenarioReport> {
    let report = ScenarioReport::new(
        "terminations",
        "Connection kills (pg_terminate_backend per pgbus:* role)",
    );
    let mut run = QueueRun::start(env, report, Workload::of(plan, &plan.terminations)).await?;
    let mut per_role = Vec::new();
    for (i, role) in ROLES.iter().enumerate() {
        run.wait_progress((i as f64 + 1.0) / (ROLES.len() as f64 + 2.0))
            .await?;
        let at = run.percent();
        let before = run.db.side.role_pids(role).await?.len();
        let from = now_ns();
        let mut terminated = 0;
        for round in 0..plan.termination_rounds {
            // Group connections come and go with the groups in flight: wait for some.
            let deadline = Instant::now() + Duration::from_secs(5);
            let mut pids = run.db.side.role_pids(role).await?;
            while pids.is_empty() && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
                pids = run.db.side.role_pids(role).await?;
            }
            terminated += run.db.side.terminate(&pids).await?;
            if round + 1 < plan.termination_rounds {
                tokio::time::sleep(Duration::from_millis(rng.random_range(200..600))).await;
            }
        }
        let to = now_ns();
        run.windows.push(Window { from, to });
        run.report.faults += terminated;
        println!(
            "chaos:   pgbus:{role} at {at} done: {terminated} backends terminated in {} rounds ({before} before)",
            plan.termination_rounds
        );
        run.report.check(
            format!("pgbus:{role} connections found to terminate"),
            terminated > 0,
            format!("{terminated} terminated"),
        );
        per_role.push(format!("{terminated} {role}"));
        run.expect_resumed(&format!("pgbus:{role} storm"), to)
            .await?;
        if STANDING.contains(role) {
            // The connection is reopened (a listener's listening), not only the work resumed.
            let counting = if *role == "listen" {
                Counting::Listening
            } else {
                Counting::Connected
            };
            let now = run
                .db
                .side
                .wait_for_role(role, counting, before, RECONNECT_WITHIN)
                .await?;
            let took = Duration::from_nanos(now_ns() - to);
            run.report.check(
                format!("pgbus:{role} connections reopened"),
                now >= before,
                format!("{now} of {before} back after {} ms", took.as_millis()),
            );
            if now >= before {
                println!(
                    "chaos:     {now} pgbus:{role} connections back {} ms later",
                    took.as_millis()
                );
                run.report
                    .recovered(format!("pgbus:{role} storm: connections reopened"), took);
            }
        }
    }
    let (mut report, _) = run.finish().await?;
    report.fault_summary = format!("backends: {}", per_role.join(", "));
    Ok(report)
}

/// Scenario 4, groups under faults: worker kills and terminated `pgbus:group` connections while
/// ordered groups run; checks order and one-at-a-time.
pub(crate) async fn groups(
    env: &Env,
    plan: &Plan,
    rng: &mut StdRng,
) -> anyhow::Result<ScenarioReport> {
    let report = ScenarioReport::new(
        "groups",
        "Ordered groups under kills and terminated group connections",
    );
    let workload = Workload::of(plan, &plan.groups);
    let mut faults: Vec<bool> = std::iter::repeat_n(true, plan.groups.kills)
        .chain(std::iter::repeat_n(false, plan.group_terminations))
        .collect();
    faults.shuffle(rng);
    let mut run = QueueRun::start(env, report, workload).await?;
    let mut terminated_total = 0;
    let at = points(rng, faults.len(), 0.05..0.85);
    for (i, (kill, point)) in faults.into_iter().zip(at).enumerate() {
        run.wait_progress(point).await?;
        if kill {
            kill_and_restart(&mut run, rng, &format!("fault {}", i + 1)).await?;
        } else {
            let at = run.percent();
            let from = now_ns();
            let pids = run.db.side.role_pids("group").await?;
            let terminated = run.db.side.terminate(&pids).await?;
            let to = now_ns();
            run.windows.push(Window { from, to });
            run.report.faults += terminated;
            terminated_total += terminated;
            println!(
                "chaos:   fault {}: terminated {terminated} pgbus:group connections at {at} done",
                i + 1
            );
            run.expect_resumed(&format!("fault {}: pgbus:group terminations", i + 1), to)
                .await?;
        }
    }
    let kills = run.workers.kills().len();
    let (mut report, _) = run.finish().await?;
    report.notes.push(
        "A killed worker's groups come back when their leases run out, then wait their \
         turn: candidates are taken oldest head first, and a group interrupted part-way has \
         a newer head than groups not started yet, so the SIGKILL recovery times here \
         include that queueing."
            .to_owned(),
    );
    report.fault_summary = format!("{kills} SIGKILL + {terminated_total} pgbus:group terminated");
    Ok(report)
}

/// Scenario 6, a slow database: `LOCK TABLE pgbus.messages IN ACCESS EXCLUSIVE MODE` held for a few
/// seconds from a side connection. Workers must wait without crashing or piling up
/// connections.
pub(crate) async fn slow(
    env: &Env,
    plan: &Plan,
    rng: &mut StdRng,
) -> anyhow::Result<ScenarioReport> {
    let report = ScenarioReport::new(
        "slow",
        "Slow database (ACCESS EXCLUSIVE lock on pgbus.messages)",
    );
    let workload = Workload::of(plan, &plan.slow);
    // Per `pgbus work` process: its pool (8), the plain worker's fetch connection, the
    // listener, the group worker's fetch and recovery connections, one session per
    // in-flight group (up to the concurrency).
    let per_process = 8 + 4 + plan.concurrency as u64;
    let bound = plan.processes as u64 * per_process;
    let mut run = QueueRun::start(env, report, workload).await?;
    let mut peak = 0;
    let mut baseline = None;
    for i in 0..plan.slow_locks {
        let point =
            (i as f64 + 1.0) / (plan.slow_locks as f64 + 1.0) + rng.random_range(-0.05..0.05);
        run.wait_progress(point).await?;
        baseline.get_or_insert(run.db.side.pgbus_connections().await?);
        let pids_before = run.workers.pids();
        let at = run.percent();
        let locker = run.db.side.dedicated().await?;
        locker
            .batch_execute("BEGIN; LOCK TABLE pgbus.messages IN ACCESS EXCLUSIVE MODE")
            .await?;
        let from = now_ns();
        let mut lock_peak = 0;
        let held = Instant::now();
        while held.elapsed() < plan.slow_hold {
            lock_peak = lock_peak.max(run.db.side.pgbus_connections().await?);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        locker.batch_execute("COMMIT").await?;
        let to = now_ns();
        drop(locker);
        run.windows.push(Window { from, to });
        run.report.faults += 1;
        println!(
            "chaos:   lock {} at {at} done: held {} ms, up to {lock_peak} pgbus connections meanwhile",
            i + 1,
            (to - from) / 1_000_000
        );
        run.expect_resumed(&format!("lock {} released", i + 1), to)
            .await?;
        // The backlog of waiting statements runs now: keep counting for a while.
        let after = Instant::now();
        while after.elapsed() < Duration::from_secs(2) {
            lock_peak = lock_peak.max(run.db.side.pgbus_connections().await?);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        peak = peak.max(lock_peak);
        let pids_after = run.workers.pids();
        run.report.check(
            format!("lock {}: worker processes stable", i + 1),
            pids_before == pids_after,
            format!("pids {pids_before:?} before, {pids_after:?} after"),
        );
    }
    let (mut report, _) = run.finish().await?;
    report.check(
        "pgbus connections stay within the bound",
        peak <= bound,
        format!(
            "peak {peak} during and after the locks (before: {}), bound {bound} = {} processes x (pool 8 + fetch, listen, group fetch, recovery + {} group sessions)",
            baseline.unwrap_or(0),
            plan.processes,
            plan.concurrency
        ),
    );
    report.fault_summary = format!(
        "{} locks of {} s",
        plan.slow_locks,
        plan.slow_hold.as_secs()
    );
    Ok(report)
}
