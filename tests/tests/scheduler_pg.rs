//! Recurring jobs on PostgreSQL: four schedulers on a compressed 200 ms schedule (60
//! occurrences: a minute of a 1-second schedule) enqueue every occurrence exactly once,
//! also across the death of the leader; missed occurrences are skipped or caught up per
//! task.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use pgbus_core::{MissedRuns, NewMessage, QueueName, QueueOptions, RecurringTask, Schedule};
use pgbus_pg::{connect, PgBackend, Scheduler, SchedulerMonitor};
use pgbus_tests::{create, eventually, fresh_backend};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(60);
const EVERY: Duration = Duration::from_millis(200);
const LEASE: Duration = Duration::from_secs(1);

fn task(q: &QueueName, missed: MissedRuns) -> RecurringTask {
    RecurringTask::new(
        "heartbeat",
        q.clone(),
        Schedule::every(EVERY).unwrap(),
        NewMessage::json(&"beat").unwrap(),
    )
    .unwrap()
    .missed(missed)
}

struct Running {
    monitor: SchedulerMonitor,
    handle: JoinHandle<pgbus_core::Result<()>>,
    stop: CancellationToken,
}

/// Starts a scheduler with its own pool and connection, as a separate process would.
fn start(url: &str, task: RecurringTask) -> Running {
    let backend = PgBackend::builder(url).max_connections(2).build().unwrap();
    let scheduler = Scheduler::builder(backend)
        .task(task)
        .lease(LEASE)
        .tick(Duration::from_millis(50))
        .build()
        .unwrap();
    let monitor = scheduler.monitor();
    let stop = CancellationToken::new();
    let handle = tokio::spawn(scheduler.run(stop.clone()));
    Running {
        monitor,
        handle,
        stop,
    }
}

/// The occurrences recorded and the `pgbus-scheduled-at` headers of the queue's jobs.
async fn recorded(url: &str) -> (Vec<SystemTime>, Vec<String>) {
    let client = connect(url, "observer").await.unwrap();
    let runs = column(
        &client,
        "SELECT scheduled_at FROM pgbus.schedule_runs ORDER BY scheduled_at",
    )
    .await;
    let headers = column(
        &client,
        "SELECT headers->>'pgbus-scheduled-at' FROM pgbus.messages ORDER BY id",
    )
    .await;
    (runs, headers)
}

/// The occurrences recorded and their jobs' headers, after checking that each occurrence
/// is one `EVERY` after the one before (none missing, none doubled) and has one job.
async fn consecutive_once(url: &str) -> (Vec<SystemTime>, Vec<String>) {
    let (runs, headers) = recorded(url).await;
    for pair in runs.windows(2) {
        assert_eq!(
            pair[1].duration_since(pair[0]).unwrap(),
            EVERY,
            "consecutive occurrences, none missing, none doubled"
        );
    }
    assert_eq!(headers.len(), runs.len(), "one job per occurrence");
    (runs, headers)
}

/// Waits, on the database's clock, until five occurrences have passed since `last`.
async fn five_occurrences_after(observer: &tokio_postgres::Client, last: SystemTime) {
    eventually("five occurrences passed", DEADLINE, || async {
        let now: SystemTime = observer
            .query_one("SELECT now()", &[])
            .await
            .unwrap()
            .get(0);
        now.duration_since(last).unwrap_or_default() > EVERY * 5
    })
    .await;
}

async fn column<T: for<'a> tokio_postgres::types::FromSql<'a>>(
    client: &tokio_postgres::Client,
    sql: &str,
) -> Vec<T> {
    let rows = client.query(sql, &[]).await.unwrap();
    rows.iter().map(|row| row.get(0)).collect()
}

fn leaders(schedulers: &[Running]) -> Vec<usize> {
    (0..schedulers.len())
        .filter(|&i| !schedulers[i].handle.is_finished() && schedulers[i].monitor.is_leader())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn four_schedulers_enqueue_each_occurrence_once_across_a_leader_kill() {
    let (backend, url) = fresh_backend(4).await;
    let q = create(&backend, "ticks", QueueOptions::default()).await;
    let mut schedulers: Vec<Running> = (0..4)
        .map(|_| start(&url, task(&q, MissedRuns::CatchUp(100))))
        .collect();

    eventually("30 occurrences enqueued", DEADLINE, || async {
        recorded(&url).await.0.len() >= 30
    })
    .await;
    let lead = leaders(&schedulers);
    assert_eq!(lead.len(), 1, "exactly one leader");
    let killed = lead[0];
    schedulers[killed].handle.abort();
    let at_kill = recorded(&url).await.0.len();

    // On the database's clock: the dead leader's lease runs out at most one lease after
    // its last renewal; a follower takes over after that, never before (the property
    // that matters), and soon after (followers try every 50 ms tick; the bound is
    // generous so that a busy machine's late ticks do not fail it).
    let observer = connect(&url, "observer").await.unwrap();
    let lease_row = "SELECT owner, extract(epoch FROM expires_at)::float8
                     FROM pgbus.scheduler_lease WHERE name = 'pgbus:scheduler'";
    let old = observer.query_one(lease_row, &[]).await.unwrap();
    let (old_owner, old_expiry): (String, f64) = (old.get(0), old.get(1));
    let new_expiry = std::cell::Cell::new(None);
    eventually("another scheduler took over", DEADLINE, || async {
        let row = observer.query_one(lease_row, &[]).await.unwrap();
        if row.get::<_, String>(0) != old_owner {
            new_expiry.set(Some(row.get::<_, f64>(1)));
        }
        new_expiry.get().is_some()
    })
    .await;
    // The new owner's first expiry, or a renewal of it at most one poll later.
    let taken_at = new_expiry.get().unwrap() - LEASE.as_secs_f64();
    assert!(
        taken_at >= old_expiry,
        "taken over {:.3} s before the dead leader's lease ran out",
        old_expiry - taken_at
    );
    assert!(
        taken_at <= old_expiry + 10.0 * LEASE.as_secs_f64(),
        "taken over {:.3} s after the dead leader's lease ran out (more than ten leases)",
        taken_at - old_expiry
    );
    eventually(
        "the new owner is one of the live schedulers",
        DEADLINE,
        || async { leaders(&schedulers).iter().any(|&i| i != killed) },
    )
    .await;
    eventually("30 more occurrences enqueued", DEADLINE, || async {
        recorded(&url).await.0.len() >= at_kill + 30
    })
    .await;
    for s in &schedulers {
        s.stop.cancel();
    }
    for (i, s) in schedulers.drain(..).enumerate() {
        if i != killed {
            s.handle.await.unwrap().unwrap();
        }
    }

    let (runs, headers) = consecutive_once(&url).await;
    let distinct: BTreeSet<&String> = headers.iter().collect();
    assert_eq!(
        distinct.len(),
        headers.len(),
        "no occurrence enqueued twice"
    );

    let schedules = backend.schedules().await.unwrap();
    assert_eq!(schedules.len(), 1);
    assert_eq!(schedules[0].task, "heartbeat");
    assert_eq!(schedules[0].schedule, "every 200ms");
    assert_eq!(schedules[0].missed, "catch-up 100");
    assert_eq!(schedules[0].last_at, runs.last().copied());
    assert!(schedules[0].next_at > schedules[0].last_at);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn skip_enqueues_only_the_latest_missed_occurrence() {
    let (backend, url) = fresh_backend(4).await;
    let q = create(&backend, "skipping", QueueOptions::default()).await;
    let first = start(&url, task(&q, MissedRuns::Skip));
    eventually("3 occurrences enqueued", DEADLINE, || async {
        recorded(&url).await.0.len() >= 3
    })
    .await;
    first.stop.cancel();
    first.handle.await.unwrap().unwrap();
    let before = recorded(&url).await.0;
    let last = *before.last().unwrap();

    // Downtime: wait (on the database's clock) until 5 occurrences have passed.
    let observer = connect(&url, "observer").await.unwrap();
    five_occurrences_after(&observer, last).await;
    let second = start(&url, task(&q, MissedRuns::Skip));
    eventually("2 more occurrences enqueued", DEADLINE, || async {
        recorded(&url).await.0.len() >= before.len() + 2
    })
    .await;
    second.stop.cancel();
    second.handle.await.unwrap().unwrap();
    let after = recorded(&url).await.0;
    let resumed = after[before.len()];
    assert!(
        resumed.duration_since(last).unwrap() >= EVERY * 5,
        "the missed occurrences were skipped"
    );
    assert_eq!(
        after[before.len() + 1].duration_since(resumed).unwrap(),
        EVERY,
        "then on schedule again"
    );
}

/// A task more frequent than the scheduler's tick: every occurrence is enqueued, also
/// under `MissedRuns::Skip` (which is for occurrences missed while no scheduler ran, not
/// for those between two ticks of a running one: it once enqueued one in five here).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn occurrences_between_ticks_are_all_enqueued_whatever_the_missed_policy() {
    let (backend, url) = fresh_backend(4).await;
    let q = create(&backend, "frequent", QueueOptions::default()).await;
    let scheduler =
        Scheduler::builder(PgBackend::builder(&url).max_connections(2).build().unwrap())
            .task(task(&q, MissedRuns::Skip))
            .lease(LEASE)
            .tick(EVERY * 5)
            .build()
            .unwrap();
    let stop = CancellationToken::new();
    let handle = tokio::spawn(scheduler.run(stop.clone()));
    eventually("20 occurrences enqueued", DEADLINE, || async {
        recorded(&url).await.0.len() >= 20
    })
    .await;
    stop.cancel();
    handle.await.unwrap().unwrap();
    consecutive_once(&url).await;
}

/// A tick whose transaction fails after the send (here a trigger refuses the cursor's
/// update, as a cancelled statement would) enqueues nothing, and the next ticks enqueue
/// those occurrences: the scheduler's cursor once moved before the commit, and they were
/// lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tick_that_fails_to_commit_loses_no_occurrence() {
    let (backend, url) = fresh_backend(4).await;
    let q = create(&backend, "failing", QueueOptions::default()).await;
    let observer = connect(&url, "observer").await.unwrap();
    observer
        .batch_execute(
            "CREATE TABLE public.refuse_advance (refuse boolean);
             CREATE FUNCTION public.refuse_advance() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN
                 IF EXISTS (SELECT 1 FROM public.refuse_advance) THEN
                     RAISE EXCEPTION 'refused by the test';
                 END IF;
                 RETURN NEW;
             END $$;
             CREATE TRIGGER refuse_advance BEFORE UPDATE ON pgbus.schedules
                 FOR EACH ROW EXECUTE FUNCTION public.refuse_advance();",
        )
        .await
        .unwrap();
    let running = start(&url, task(&q, MissedRuns::CatchUp(100)));
    eventually("3 occurrences enqueued", DEADLINE, || async {
        recorded(&url).await.0.len() >= 3
    })
    .await;
    observer
        .batch_execute("INSERT INTO public.refuse_advance VALUES (true)")
        .await
        .unwrap();
    let before = recorded(&url).await.0.len();
    // Five occurrences pass (on the database's clock) while every tick fails.
    let last = *recorded(&url).await.0.last().unwrap();
    five_occurrences_after(&observer, last).await;
    assert!(
        recorded(&url).await.0.len() <= before + 1,
        "ticks failed meanwhile"
    );
    observer
        .batch_execute("DELETE FROM public.refuse_advance")
        .await
        .unwrap();
    eventually("10 more occurrences enqueued", DEADLINE, || async {
        recorded(&url).await.0.len() >= before + 10
    })
    .await;
    running.stop.cancel();
    running.handle.await.unwrap().unwrap();
    consecutive_once(&url).await;
}
