//! `cargo xtask chaos [--quick] [--seed N] [--database-url URL] [--only NAME,...]`: proves
//! pgbus's delivery promises under faults.
//!
//! The harness runs the real release `pgbus` binary (`pgbus work`, `pgbus serve`) against
//! a throwaway PostgreSQL cluster it controls (or a server given by URL), one database
//! per scenario, and injects faults while they work:
//!
//! 1. `crashes`: SIGKILL worker processes at random moments and restart them;
//!    `supervisor`: SIGKILL the workers of one `pgbus work --processes N`, which restarts
//!    them itself.
//! 2. `restarts`: `pg_ctl restart -m fast`, later `-m immediate` (own cluster only); after
//!    each, every worker process must `LISTEN` again (`pg_stat_activity`).
//! 3. `terminations`: `pg_terminate_backend` storms on each `pgbus:*` connection role.
//! 4. `groups`: ordered groups while workers are killed and group connections cut.
//! 5. `streams`: an SSE client across `pgbus serve` restarts, `pgbus:stream` kills and
//!    `pg_ctl restart -m fast` (own cluster only).
//! 6. `slow`: an `ACCESS EXCLUSIVE` lock on `pgbus.messages` held for seconds.
//! 7. `relay`: `pgbus relay` processes SIGKILLed while they publish bursts of outbox rows,
//!    and their connections terminated: every row published exactly once ([`relay`]).
//! 8. `scheduler`: `pgbus cron run` processes SIGKILLed (the leader, any, all at once) and
//!    their connections terminated: every occurrence enqueued exactly once, none skipped
//!    ([`scheduler`]).
//!
//! In the queue scenarios every handler run is recorded by the handler itself (see
//! [`record`]), so the checks
//! ([`check`]) see what really ran: every message completed at least once, the
//! dead-letter queue empty, no worker dying by itself, and for ordered groups: each message
//! starts only after its predecessor completed, and no two completed runs of one group
//! overlap (except a run whose worker was SIGKILLed under it). Every duplicate must be
//! matched to a kill or fault window that lost its ack; one that none explains fails the
//! run. At-least-once would allow it, but the chaos queues' lease (10 s, extended every
//! third of it) is too long for a merely busy machine to outlast, so it means a lost ack
//! or a lease given up that the harness cannot account for. Faults happen at points of
//! progress drawn from a seeded RNG: `--seed N` repeats the schedule (timing on a busy
//! machine still varies).
//!
//! The summary table goes to the terminal and to `target/chaos/report.md` and
//! `report.json`; the exit status is non-zero when any check failed.

mod check;
mod env;
mod record;
mod relay;
mod report;
mod scenarios;
mod scheduler;
mod streams;
mod workload;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use pgbus_pg::ShutdownMode;
use rand::rngs::StdRng;
use rand::SeedableRng;

pub(crate) use record::{handler_main, SUBCOMMAND as HANDLER_SUBCOMMAND};

use check::Layout;
use env::Env;
use report::{Report, ScenarioReport};

use crate::deps::workspace_root;

/// The scenarios, in the order they run.
const SCENARIOS: [&str; 9] = [
    "crashes",
    "supervisor",
    "restarts",
    "terminations",
    "groups",
    "streams",
    "slow",
    "relay",
    "scheduler",
];

/// Options of `cargo xtask chaos`.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct ChaosArgs {
    quick: bool,
    seed: Option<u64>,
    database_url: Option<String>,
    only: Option<Vec<String>>,
    out: Option<PathBuf>,
}

/// Parses the arguments after `chaos`.
pub(crate) fn parse(args: &[String]) -> Result<ChaosArgs, String> {
    let mut parsed = ChaosArgs::default();
    crate::flags::walk("chaos", args, |flag, arg, inline, value| {
        match flag {
            "--quick" if !inline => parsed.quick = true,
            "--seed" => {
                let seed = value()?;
                parsed.seed = Some(
                    seed.parse()
                        .map_err(|_| format!("`chaos --seed` takes a number, got `{seed}`"))?,
                );
            }
            "--database-url" => parsed.database_url = Some(value()?),
            "--out" => parsed.out = Some(PathBuf::from(value()?)),
            "--only" => {
                let names: Vec<String> = value()?.split(',').map(str::to_owned).collect();
                if let Some(bad) = names.iter().find(|n| !SCENARIOS.contains(&n.as_str())) {
                    return Err(format!(
                        "unknown scenario `{bad}` (scenarios: {})",
                        SCENARIOS.join(", ")
                    ));
                }
                parsed.only = Some(names);
            }
            _ => return Err(format!("`chaos` does not take `{arg}`")),
        }
        Ok(())
    })?;
    Ok(parsed)
}

/// One queue workload's size.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Part {
    pub(crate) layout: Layout,
    pub(crate) sleep_ms: u64,
    /// Worker SIGKILLs (crashes, groups).
    pub(crate) kills: usize,
}

/// How big each scenario is: `--quick` for CI, or the full run.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    pub(crate) processes: usize,
    pub(crate) concurrency: usize,
    /// How long a queue may take to drain after its faults.
    pub(crate) drain: Duration,
    pub(crate) crashes: Part,
    /// SIGKILLs of workers under one `pgbus work --processes` supervisor.
    pub(crate) supervisor: Part,
    /// How long the supervisor scenario's messages trickle in.
    pub(crate) supervisor_over: Duration,
    pub(crate) restarts: Part,
    pub(crate) restart_modes: Vec<ShutdownMode>,
    pub(crate) terminations: Part,
    pub(crate) termination_rounds: usize,
    pub(crate) groups: Part,
    pub(crate) group_terminations: usize,
    pub(crate) stream_events: u64,
    pub(crate) stream_interval: Duration,
    /// Rounds of (SIGTERM restart, SIGKILL restart, listener kill, PostgreSQL restart).
    pub(crate) stream_fault_rounds: usize,
    pub(crate) slow: Part,
    pub(crate) slow_locks: usize,
    pub(crate) slow_hold: Duration,
    /// `pgbus relay` processes.
    pub(crate) relay_processes: usize,
    /// Outbox bursts written, one transaction each, every `relay_every`.
    pub(crate) relay_bursts: u64,
    /// Rows per burst.
    pub(crate) relay_burst: u64,
    pub(crate) relay_every: Duration,
    /// Relay SIGKILLs.
    pub(crate) relay_kills: usize,
    /// `pg_terminate_backend` rounds over the `pgbus:relay` connections.
    pub(crate) relay_terminations: usize,
    /// `pgbus cron run` processes.
    pub(crate) scheduler_processes: usize,
    /// How long the schedulers run.
    pub(crate) scheduler_run: Duration,
    /// Faults: (leader SIGKILLs, SIGKILLs of any scheduler, SIGKILLs of all at once,
    /// `pg_terminate_backend` rounds over `pgbus:scheduler`).
    pub(crate) scheduler_faults: (usize, usize, usize, usize),
}

const fn layout(plain: u64, groups: u64, per_group: u64) -> Layout {
    Layout {
        plain,
        groups,
        per_group,
    }
}

impl Plan {
    pub(crate) fn new(quick: bool) -> Plan {
        use ShutdownMode::{Fast, Immediate};
        // `size!(quick run, full run)`.
        macro_rules! size {
            ($quick:expr, $full:expr) => {
                if quick {
                    $quick
                } else {
                    $full
                }
            };
        }
        let part = |layout, sleep_ms, kills| Part {
            layout,
            sleep_ms,
            kills,
        };
        Plan {
            processes: 3,
            concurrency: 8,
            drain: Duration::from_secs(size!(120, 300)),
            crashes: part(layout(size!(5_000, 50_000), 0, 0), 5, size!(3, 10)),
            supervisor: part(layout(size!(4_000, 10_000), 0, 0), 5, size!(3, 6)),
            supervisor_over: Duration::from_secs(size!(40, 80)),
            restarts: part(size!(layout(2_000, 100, 20), layout(10_000, 200, 50)), 5, 0),
            restart_modes: [Fast, Immediate].repeat(size!(1, 2)),
            terminations: part(size!(layout(5_000, 100, 50), layout(15_000, 300, 50)), 5, 0),
            termination_rounds: size!(2, 4),
            groups: part(
                size!(layout(0, 100, 20), layout(0, 300, 30)),
                10,
                size!(3, 10),
            ),
            group_terminations: size!(2, 5),
            stream_events: size!(600, 2_400),
            stream_interval: Duration::from_millis(25),
            stream_fault_rounds: size!(1, 3),
            slow: part(size!(layout(2_000, 100, 20), layout(8_000, 200, 40)), 5, 0),
            slow_locks: size!(2, 4),
            slow_hold: Duration::from_secs(size!(3, 5)),
            relay_processes: 3,
            relay_bursts: size!(40, 120),
            relay_burst: 250,
            relay_every: Duration::from_millis(500),
            relay_kills: size!(5, 15),
            relay_terminations: size!(1, 3),
            scheduler_processes: 3,
            scheduler_run: Duration::from_secs(size!(40, 150)),
            scheduler_faults: size!((2, 1, 1, 1), (6, 3, 2, 3)),
        }
    }
}

/// Runs the scenarios and writes the report; exits 1 when a check failed.
pub(crate) fn run(args: &ChaosArgs) -> anyhow::Result<ExitCode> {
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64 % 1_000_000_000)
    });
    println!(
        "chaos: seed {seed} (repeat this fault schedule with --seed {seed}), {} run",
        if args.quick { "quick" } else { "full" }
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let report = runtime.block_on(run_scenarios(args, seed))?;
    println!("\n{}", report.table());
    let out = out_dir(args);
    report.write(&out)?;
    println!(
        "chaos: wrote {} and {}",
        out.join("report.md").display(),
        out.join("report.json").display()
    );
    if report.passed() {
        println!("chaos: every check passed ({:.0} s)", report.seconds);
        Ok(ExitCode::SUCCESS)
    } else {
        for scenario in &report.scenarios {
            for check in scenario.checks.iter().filter(|c| !c.ok) {
                eprintln!(
                    "chaos: FAILED {}: {} ({})",
                    scenario.name, check.name, check.detail
                );
            }
        }
        eprintln!("error: chaos checks failed (seed {seed})");
        Ok(ExitCode::FAILURE)
    }
}

fn out_dir(args: &ChaosArgs) -> PathBuf {
    match &args.out {
        Some(dir) => std::env::current_dir().map_or(dir.clone(), |cwd| cwd.join(dir)),
        None => workspace_root().join("target/chaos"),
    }
}

async fn run_scenarios(args: &ChaosArgs, seed: u64) -> anyhow::Result<Report> {
    let started = Instant::now();
    let out = out_dir(args);
    let env = Env::prepare(&out, args.database_url.as_deref())?;
    let plan = Plan::new(args.quick);
    let mut scenarios = Vec::new();
    for name in SCENARIOS {
        if args
            .only
            .as_ref()
            .is_some_and(|only| !only.iter().any(|o| o == name))
        {
            continue;
        }
        // Each scenario draws from its own stream, so --only keeps the others' schedules.
        let mut rng = StdRng::seed_from_u64(seed ^ fnv1a(name));
        println!("\nchaos: scenario {name}");
        let scenario_started = Instant::now();
        let result = match name {
            "crashes" => scenarios::crashes(&env, &plan, &mut rng).await,
            "supervisor" => scenarios::supervisor(&env, &plan, &mut rng).await,
            "restarts" => scenarios::restarts(&env, &plan, &mut rng).await,
            "terminations" => scenarios::terminations(&env, &plan, &mut rng).await,
            "groups" => scenarios::groups(&env, &plan, &mut rng).await,
            "streams" => streams::streams(&env, &plan, &mut rng).await,
            "slow" => scenarios::slow(&env, &plan, &mut rng).await,
            "relay" => relay::relay(&env, &plan, &mut rng).await,
            "scheduler" => scheduler::scheduler(&env, &plan, &mut rng).await,
            _ => unreachable!("SCENARIOS lists every scenario"),
        };
        let report = result.unwrap_or_else(|err| {
            let mut report = ScenarioReport::new(name, "did not complete");
            report.check("scenario ran to the end", false, format!("{err:#}"));
            report.seconds = scenario_started.elapsed().as_secs_f64();
            report
        });
        let verdict = if report.skipped.is_some() {
            "skipped"
        } else if !report.passed() {
            "FAILED"
        } else {
            "passed"
        };
        println!(
            "chaos: {name} {verdict} in {:.0} s: {} sent, {} processed, {} duplicates, {} lost, {} faults",
            report.seconds, report.sent, report.processed, report.duplicates, report.lost, report.faults
        );
        scenarios.push(report);
    }
    let mut command = String::from("cargo xtask chaos");
    if args.quick {
        command.push_str(" --quick");
    }
    command.push_str(&format!(" --seed {seed}"));
    if let Some(only) = &args.only {
        command.push_str(&format!(" --only {}", only.join(",")));
    }
    Ok(Report {
        seed,
        quick: args.quick,
        command,
        postgres: env.postgres_version().await?,
        seconds: started.elapsed().as_secs_f64(),
        scenarios,
    })
}

/// FNV-1a of a scenario name: a stable per-scenario offset of the seed.
fn fnv1a(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|arg| (*arg).to_owned()).collect()
    }

    #[test]
    fn parses_chaos_options() {
        assert_eq!(parse(&[]), Ok(ChaosArgs::default()));
        assert_eq!(
            parse(&args(&[
                "--quick",
                "--seed",
                "42",
                "--database-url=postgres://h/db",
                "--only",
                "crashes,groups"
            ])),
            Ok(ChaosArgs {
                quick: true,
                seed: Some(42),
                database_url: Some("postgres://h/db".to_owned()),
                only: Some(vec!["crashes".to_owned(), "groups".to_owned()]),
                out: None,
            })
        );
        assert!(parse(&args(&["--seed", "x"])).is_err());
        assert!(parse(&args(&["--seed"])).is_err());
        assert!(parse(&args(&["--only", "crashes,nope"])).is_err());
        assert!(parse(&args(&["--quick=1"])).is_err());
        assert!(parse(&args(&["--slow"])).is_err());
    }

    #[test]
    fn per_scenario_seeds_differ_and_are_stable() {
        assert_eq!(fnv1a(""), 0xcbf2_9ce4_8422_2325);
        let seeds: std::collections::BTreeSet<u64> = SCENARIOS.iter().map(|s| fnv1a(s)).collect();
        assert_eq!(seeds.len(), SCENARIOS.len());
    }

    #[test]
    fn the_quick_plan_is_smaller_than_the_full_one() {
        let (quick, full) = (Plan::new(true), Plan::new(false));
        assert_eq!(quick.crashes.layout.total(), 5_000);
        assert_eq!(full.crashes.layout.total(), 50_000);
        assert!(quick.crashes.kills < full.crashes.kills);
        assert_eq!(quick.groups.layout.total(), 2_000);
        assert!(quick.stream_events < full.stream_events);
        use ShutdownMode::{Fast, Immediate};
        assert_eq!(quick.restart_modes, [Fast, Immediate]);
        assert_eq!(full.restart_modes, [Fast, Immediate, Fast, Immediate]);
        assert_eq!((quick.slow_locks, quick.slow_hold.as_secs()), (2, 3));
        assert_eq!((full.slow_locks, full.slow_hold.as_secs()), (4, 5));
        assert!(quick.relay_bursts * quick.relay_burst < full.relay_bursts * full.relay_burst);
        assert!(quick.relay_kills < full.relay_kills);
        assert!(quick.scheduler_run < full.scheduler_run);
        assert!(quick.scheduler_faults.0 < full.scheduler_faults.0);
    }
}
