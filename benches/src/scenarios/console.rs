//! `console`: the operator's console (`pgbus_pg::console::Console`) on the data set
//! (2,000,000 messages in 20 queues, 100,000 dead letters, 100,000 archived jobs), seeded by
//! `Console::seed_sample` as the `EXPLAIN` test seeds it: p50/p99 of each operation a page
//! makes, over many calls.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use pgbus_core::{MessageId, QueueName};
use pgbus_pg::console::{
    Console, Cursor, JobFilter, JobState, Order, Sample, MAX_PAGE, SAMPLE_QUEUES, SCAN_WINDOW,
};
use pgbus_pg::PgBackend;

use super::on_fresh_database;
use crate::options::Plan;
use crate::report::{thousands, Figure, Report, Scenario, Target, Unit};
use crate::server::Server;
use crate::stats::{ms, percentiles};
use crate::Progress;

/// Jobs per page, as the console's page asks for them.
const PAGE: usize = 50;
/// The goal of the console issue: every page under this p99 on this machine.
const GOAL_P99_MS: f64 = 50.0;
/// Queues whose deep cursors the deep-page operation takes turns with.
const DEEP_QUEUES: usize = 4;
/// A last-error text only a handful of each queue's jobs contain.
const RARE_ERROR: &str = "boom 1234";

/// One console operation, as a page (or the CLI) calls it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// The first page of a state, newest or oldest first.
    FirstPage(JobState, Order),
    /// The first page of one group's jobs in a state (the group index).
    Group(JobState),
    /// One page of a rare error filter on ready jobs: one full scan window of rows that
    /// hardly match, continuing a walk through the queue from cursor to cursor.
    RareError,
    /// A page of ready jobs from a cursor a quarter of the queue deep.
    DeepPage,
    /// Every state's count of a queue.
    Counts,
    /// One job's detail.
    Detail,
    /// The audit log's first page, and a page from the middle of it.
    Audit,
    AuditLater,
}

impl Op {
    fn all() -> Vec<Op> {
        let mut ops = Vec::new();
        for state in JobState::ALL {
            for order in [Order::NewestFirst, Order::OldestFirst] {
                ops.push(Op::FirstPage(state, order));
            }
        }
        ops.extend([
            Op::Group(JobState::Ready),
            Op::Group(JobState::Dead),
            Op::RareError,
            Op::DeepPage,
            Op::Counts,
            Op::Detail,
            Op::Audit,
            Op::AuditLater,
        ]);
        ops
    }

    fn id(self) -> String {
        let order = |order| match order {
            Order::NewestFirst => "newest",
            Order::OldestFirst => "oldest",
        };
        match self {
            Op::FirstPage(state, o) => format!("list_{}_{}", state.as_str(), order(o)),
            Op::Group(state) => format!("list_{}_group", state.as_str()),
            Op::RareError => "list_ready_rare_error_window".to_owned(),
            Op::DeepPage => "list_ready_deep_cursor".to_owned(),
            Op::Counts => "counts".to_owned(),
            Op::Detail => "job_detail".to_owned(),
            Op::Audit => "audit_first_page".to_owned(),
            Op::AuditLater => "audit_later_page".to_owned(),
        }
    }

    fn label(self, deep_jobs: usize) -> String {
        let order = |order| match order {
            Order::NewestFirst => "newest first",
            Order::OldestFirst => "oldest first",
        };
        match self {
            Op::FirstPage(state, o) => {
                format!("`{}` first page of {PAGE}, {}", state.as_str(), order(o))
            }
            Op::Group(state) => format!(
                "`{}` first page of {PAGE} of one group, newest first",
                state.as_str()
            ),
            Op::RareError => format!(
                "`ready` with a rare error text: one page (a full window of {} rows)",
                thousands(SCAN_WINDOW as i64)
            ),
            Op::DeepPage => format!(
                "`ready` page of {PAGE} from a cursor {} jobs deep, oldest first",
                thousands(deep_jobs as i64)
            ),
            Op::Counts => "counts of every state".to_owned(),
            Op::Detail => "one job's detail".to_owned(),
            Op::Audit => format!("audit log, first page of {PAGE}"),
            Op::AuditLater => format!("audit log, a page of {PAGE} from its middle"),
        }
    }
}

fn sample_queue(n: usize) -> QueueName {
    QueueName::new(format!("q{}", n % SAMPLE_QUEUES as usize)).expect("a sample queue's name")
}

/// What the operations take turns with, found before timing.
struct Setup {
    /// Job ids of every state, for the detail.
    ids: Vec<MessageId>,
    /// Ready-job cursors a quarter of a queue deep, and the queues.
    deep: Vec<(JobFilter, Cursor)>,
    /// The audit log's middle id.
    audit_middle: i64,
}

/// The rare-error walk in progress: its queue and next cursor.
struct Walk {
    queue: usize,
    cursor: Option<Cursor>,
    /// Pages of the walk so far, and matches.
    pages: usize,
    matched: usize,
    /// Completed walks: (pages, matches).
    done: Vec<(usize, usize)>,
}

/// The timed calls' figures and what the setup found.
pub(crate) struct Run {
    /// Per operation, its call times in milliseconds.
    times: Vec<(Op, Vec<f64>)>,
    seed: Duration,
    deep_jobs: usize,
    walks: Vec<(usize, usize)>,
}

pub(crate) async fn run_once(server: &Server, sample: Sample, calls: usize) -> anyhow::Result<Run> {
    on_fresh_database(server, |url| async move {
        let backend = PgBackend::builder(&url).build()?;
        backend.migrate().await.context("migrating")?;
        let console = Console::new(backend);
        let seeding = Instant::now();
        console
            .seed_sample(sample, true)
            .await
            .context("seeding the console's sample")?;
        let seed = seeding.elapsed();
        let deep_jobs =
            (sample.messages as usize / SAMPLE_QUEUES as usize / 4) / MAX_PAGE * MAX_PAGE;
        let setup = setup(&console, deep_jobs).await?;
        let mut walk = Walk {
            queue: 0,
            cursor: None,
            pages: 0,
            matched: 0,
            done: Vec::new(),
        };
        let ops = Op::all();
        let mut times: Vec<(Op, Vec<f64>)> = ops.iter().map(|&op| (op, Vec::new())).collect();
        // Round-robin over the operations, so drifting conditions touch them all alike.
        for call in 0..calls {
            for (op, samples) in &mut times {
                let started = Instant::now();
                call_once(&console, *op, call, &setup, &mut walk).await?;
                samples.push(ms(started.elapsed()));
            }
        }
        Ok(Run {
            times,
            seed,
            deep_jobs,
            walks: walk.done,
        })
    })
    .await
}

/// Ids to show, and deep cursors, found by the console itself.
async fn setup(console: &Console, deep_jobs: usize) -> anyhow::Result<Setup> {
    let mut ids = Vec::new();
    for n in 0..SAMPLE_QUEUES as usize {
        for state in JobState::ALL {
            let filter = JobFilter::new(sample_queue(n), state);
            let page = console.list(&filter, Order::NewestFirst, None, 5).await?;
            ids.extend(page.jobs.iter().map(|job| job.id));
        }
    }
    ensure!(!ids.is_empty(), "the sample holds no jobs");
    let mut deep = Vec::new();
    for n in 0..DEEP_QUEUES {
        let filter = JobFilter::new(sample_queue(n), JobState::Ready);
        let mut cursor = None;
        for _ in 0..deep_jobs / MAX_PAGE {
            let page = console
                .list(&filter, Order::OldestFirst, cursor.as_ref(), MAX_PAGE)
                .await?;
            cursor = page.next;
            ensure!(
                cursor.is_some(),
                "the walk to a deep cursor reached the end"
            );
        }
        if let Some(cursor) = cursor {
            deep.push((filter, cursor));
        }
    }
    let newest = console.audit(1, None).await?;
    let audit_middle = newest.first().map_or(1, |entry| entry.id / 2);
    Ok(Setup {
        ids,
        deep,
        audit_middle,
    })
}

async fn call_once(
    console: &Console,
    op: Op,
    call: usize,
    setup: &Setup,
    walk: &mut Walk,
) -> anyhow::Result<()> {
    let queue = sample_queue(call);
    match op {
        Op::FirstPage(state, order) => {
            let page = console
                .list(&JobFilter::new(queue, state), order, None, PAGE)
                .await?;
            ensure!(page.jobs.len() == PAGE, "a first page of {op:?} was short");
        }
        Op::Group(state) => {
            // Group `g<n>` holds jobs of queue `q<n % 20>` only.
            let group = call % SAMPLE_QUEUES as usize + SAMPLE_QUEUES as usize * (call % 25);
            let mut filter = JobFilter::new(sample_queue(group), state);
            filter.group_key = Some(format!("g{group}"));
            console
                .list(&filter, Order::NewestFirst, None, PAGE)
                .await?;
        }
        Op::RareError => {
            let mut filter = JobFilter::new(sample_queue(walk.queue), JobState::Ready);
            filter.error_contains = Some(RARE_ERROR.to_owned());
            let page = console
                .list(&filter, Order::NewestFirst, walk.cursor.as_ref(), PAGE)
                .await?;
            walk.pages += 1;
            walk.matched += page.jobs.len();
            walk.cursor = page.next;
            if walk.cursor.is_none() {
                walk.done.push((walk.pages, walk.matched));
                walk.queue += 1;
                walk.pages = 0;
                walk.matched = 0;
            }
        }
        Op::DeepPage => {
            let (filter, cursor) = &setup.deep[call % setup.deep.len()];
            let page = console
                .list(filter, Order::OldestFirst, Some(cursor), PAGE)
                .await?;
            ensure!(page.jobs.len() == PAGE, "a deep page was short");
        }
        Op::Counts => {
            console.counts(&queue).await?;
        }
        Op::Detail => {
            let id = setup.ids[call % setup.ids.len()];
            console.job(id).await?.context("a listed job is gone")?;
        }
        Op::Audit => {
            console.audit(PAGE, None).await?;
        }
        Op::AuditLater => {
            console.audit(PAGE, Some(setup.audit_middle)).await?;
        }
    }
    Ok(())
}

/// Runs the scenario: one run (seeding the sample is most of its time), every operation
/// `calls` times.
pub(crate) async fn scenario(
    server: &Server,
    plan: &Plan,
    progress: &Progress,
) -> anyhow::Result<Scenario> {
    let sample = Sample::scaled_down(plan.console_divisor);
    let rows = |n: i64| thousands(n);
    let mut scenario = Scenario::new(
        "console",
        format!(
            "The operator's console (`pgbus_pg::console::Console`, the calls behind `pgbus \
             serve`'s job pages, its JSON API and `pgbus job`) on the data set of its \
             `EXPLAIN` test, seeded by the same function (`Console::seed_sample`): {} messages \
             in {SAMPLE_QUEUES} queues (each 60% ready, 30% scheduled, 10% in flight, a \
             seventh in 500 groups, one in 13 with an error), {} dead letters, {} archived \
             jobs, {} audit entries, then `VACUUM ANALYZE` (the state autovacuum leaves). Each \
             operation is called {} times, one call at a time, round-robin over the \
             operations and over the queues, on a pool of the library's default size; the \
             time is the library call's (statement, rows, decoding), without HTTP and JSON. \
             p50/p99 are over the calls of the one run.",
            rows(sample.messages),
            rows(sample.dead_letters),
            rows(sample.archived),
            rows(sample.audit),
            plan.console_calls
        ),
    );
    scenario.setting("runs", 1);
    scenario.setting("calls per operation", plan.console_calls);
    let run = run_once(server, sample, plan.console_calls).await?;
    progress.say(format_args!(
        "console: seeded in {:.1} s, {} operations × {} calls",
        run.seed.as_secs_f64(),
        run.times.len(),
        plan.console_calls
    ));
    for (op, samples) in &run.times {
        let Some([p50, p99, max]) = percentiles(samples, [50.0, 99.0, 100.0]) else {
            continue;
        };
        progress.say(format_args!(
            "console: {}: p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms",
            op.id()
        ));
        for (stat, value) in [("p50", p50), ("p99", p99)] {
            scenario.figures.push(Figure::new(
                format!("{}_{stat}_ms", op.id()),
                format!("{}: {stat}", op.label(run.deep_jobs)),
                Unit::Millis,
                vec![value],
            ));
        }
    }
    scenario.notes.push(format!(
        "seeding took {:.1} s (not timed)",
        run.seed.as_secs_f64()
    ));
    let walks: Vec<String> = run
        .walks
        .iter()
        .map(|(pages, matched)| format!("{pages} pages, {matched} found"))
        .collect();
    scenario.notes.push(format!(
        "the rare error filter (`{RARE_ERROR}`) walked whole queues from cursor to cursor: {}",
        if walks.is_empty() {
            "no walk completed".to_owned()
        } else {
            walks.join("; ")
        }
    ));
    Ok(scenario)
}

/// The console issue's goal, checked against the report: every operation under 50 ms p99.
pub(crate) fn target(report: &Report) -> Option<Target> {
    let console = report.scenario("console")?;
    let worst = console
        .figures
        .iter()
        .filter(|figure| figure.id.ends_with("_p99_ms"))
        .filter_map(|figure| Some((figure.median()?, figure)))
        .max_by(|a, b| a.0.total_cmp(&b.0))?;
    Some(Target {
        target: format!("`console`: every operation under {GOAL_P99_MS:.0} ms p99"),
        measured: format!("worst {:.1} ms ({})", worst.0, worst.1.label),
        met: worst.0 < GOAL_P99_MS,
    })
}
