//! The harness's command line, and the counts each mode runs with.

use std::path::PathBuf;
use std::time::Duration;

/// Usage text of `pgbus-bench` (and of `cargo xtask bench`, which passes its arguments on).
pub const USAGE: &str = "\
Usage: pgbus-bench [--quick] [--only SCENARIO,...] [--database-url URL] [--out DIR]

Runs the pgbus benchmark scenarios and writes report.md, report.json and chart.svg.

Options:
  --quick               Fewer jobs and runs: a smoke run that finishes in about a minute
  --only SCENARIOS      Run only these scenarios (comma-separated): raw_sql, drain,
                        peer_pgmq, enqueue, publish_fanout, io_bound, groups,
                        latency, stream_fanout, stream_publish, backlog,
                        xmin_pinned, console; raw_sql and drain run together;
                        peer_pgmq needs PGBUS_PEER_BENCH, the peer binary of
                        benches/peer/ (the full `cargo xtask bench` builds it)
  --database-url URL    Use this server instead of a throwaway local cluster; the bench
                        creates (and drops) one database per scenario run, so the URL's
                        user needs the CREATEDB privilege
  --out DIR             Where the reports go (default: target/bench in the workspace)
  -h, --help            Print this help
";

/// The scenarios' names, for `--only`.
pub(crate) const SCENARIOS: &[&str] = &[
    "raw_sql",
    "drain",
    "peer_pgmq",
    "enqueue",
    "publish_fanout",
    "io_bound",
    "groups",
    "latency",
    "stream_fanout",
    "stream_publish",
    "backlog",
    "xmin_pinned",
    "console",
];

/// What to run and where to put the results.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Options {
    /// Smaller counts and fewer runs.
    pub quick: bool,
    /// A server to use instead of a throwaway local cluster.
    pub database_url: Option<String>,
    /// Directory of `report.md`, `report.json` and `chart.svg`.
    pub out: PathBuf,
    /// The scenarios to run; empty: all.
    pub only: Vec<String>,
}

impl Options {
    /// Whether the scenario called `name` runs.
    pub fn runs(&self, name: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|n| n == name)
    }
}

/// A parsed command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Run the benchmarks.
    Run(Options),
    /// Print [`USAGE`].
    Help,
    /// Internal (`--streamer`, not in [`USAGE`]): be the streamer of `stream_fanout`, in
    /// the child process the harness starts; see [`streamer`].
    ///
    /// [`streamer`]: crate::streamer
    Streamer,
}

impl Options {
    /// Parses the arguments after the program name; `Err` carries a usage error.
    pub fn parse<I, S>(args: I) -> Result<Command, String>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut options = Options {
            quick: false,
            database_url: None,
            out: default_out_dir(),
            only: Vec::new(),
        };
        let mut args = args.into_iter().map(Into::into);
        while let Some(arg) = args.next() {
            let (flag, inline) = match arg.split_once('=') {
                Some((flag, value)) if flag.starts_with("--") => (flag.to_owned(), Some(value)),
                _ => (arg.clone(), None),
            };
            let mut value = |name: &str| -> Result<String, String> {
                match inline.map(str::to_owned).or_else(|| args.next()) {
                    Some(value) if !value.is_empty() => Ok(value),
                    _ => Err(format!("`{name}` needs a value")),
                }
            };
            match flag.as_str() {
                "--quick" if inline.is_none() => options.quick = true,
                "--database-url" => options.database_url = Some(value("--database-url")?),
                "--out" => options.out = PathBuf::from(value("--out")?),
                "--only" => {
                    options.only = value("--only")?
                        .split(',')
                        .map(|name| name.trim().to_owned())
                        .collect();
                    if let Some(unknown) = options
                        .only
                        .iter()
                        .find(|name| !SCENARIOS.contains(&name.as_str()))
                    {
                        return Err(format!("no scenario is called `{unknown}`"));
                    }
                }
                "-h" | "--help" | "help" => return Ok(Command::Help),
                "--streamer" if inline.is_none() => return Ok(Command::Streamer),
                _ => return Err(format!("unexpected argument `{arg}`")),
            }
        }
        Ok(Command::Run(options))
    }
}

/// `target/bench` under the workspace root. `cargo run` names this crate's directory at run
/// time; the compile-time path is only the fallback (a binary built in another checkout
/// that shared the target directory would write into that checkout, or fail if it is gone).
fn default_out_dir() -> PathBuf {
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")));
    manifest
        .parent()
        .unwrap_or(&manifest)
        .join("target")
        .join("bench")
}

/// The counts of one run of the harness.
#[derive(Debug, Clone)]
pub(crate) struct Plan {
    /// `quick` or `full`.
    pub(crate) name: &'static str,
    /// Runs of `raw_sql` and `drain`, and of `enqueue`.
    pub(crate) runs: usize,
    pub(crate) enqueue_runs: usize,
    /// Jobs pre-inserted and drained by `raw_sql` and `drain`.
    pub(crate) drain_jobs: usize,
    /// Workers of `drain`, and the concurrency of each: like for like with `raw_sql`'s
    /// loops and claim size, then wider (larger claims).
    pub(crate) drain_workers: usize,
    pub(crate) drain_concurrency: usize,
    pub(crate) drain_wide_concurrency: usize,
    /// The concurrency of `drain`'s single worker: the setting a user picks.
    pub(crate) drain_single_concurrency: usize,
    /// Single sends (or raw rows) per `enqueue` measurement, split between its senders.
    pub(crate) enqueue_sends: usize,
    /// Concurrent senders, and single sends each of them makes.
    pub(crate) senders: usize,
    pub(crate) sends_per_sender: usize,
    /// `send_batch` calls per `enqueue` run, and messages per batch.
    pub(crate) bulk_batches: usize,
    pub(crate) batch_size: usize,
    /// Jobs of `io_bound`, the concurrency levels, and runs per level and mode.
    pub(crate) io_jobs: usize,
    pub(crate) io_levels: Vec<usize>,
    pub(crate) io_runs: usize,
    /// Groups of `groups`, messages per group, the group worker's concurrency, and runs.
    pub(crate) groups: u32,
    pub(crate) per_group: u32,
    pub(crate) groups_concurrency: usize,
    pub(crate) groups_runs: usize,
    /// Messages per `latency` run, their spacing, and runs per variant.
    pub(crate) latency_messages: usize,
    pub(crate) latency_spacing_ms: u64,
    pub(crate) latency_runs: usize,
    /// Queues bound to every event of `publish_fanout`, and `publish_batch` calls (of
    /// `batch_size` events) per run.
    pub(crate) fanout_queues: usize,
    pub(crate) fanout_batches: usize,
    /// SSE clients of `stream_fanout` (fewer when the open-files limit does not fit them),
    /// events published to their stream per run, their spacing (both modes deliver 100,000
    /// frames/s to the clients), and runs.
    pub(crate) stream_clients: usize,
    pub(crate) stream_events: usize,
    pub(crate) stream_spacing_ms: u64,
    pub(crate) stream_runs: usize,
    /// Runs of `stream_publish` per variant (its publishers and publishes are `senders`
    /// and `sends_per_sender`, as for `enqueue`).
    pub(crate) stream_publish_runs: usize,
    /// The backlogs `backlog` starts from, in chart order.
    pub(crate) backlogs: Vec<BacklogSize>,
    /// `xmin_pinned`: the load alone, then with the snapshot held, then alone again.
    pub(crate) xmin_phases: [Duration; 3],
    /// `console`: the data set divided by this (1: 2,000,000 messages), and calls
    /// per operation.
    pub(crate) console_divisor: i64,
    pub(crate) console_calls: usize,
}

/// One backlog of `backlog`, and how many runs (each building it anew) it gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct BacklogSize {
    pub(crate) ready: usize,
    /// Archived messages beside the ready ones (0: none).
    pub(crate) archived: usize,
    pub(crate) runs: usize,
}

const fn backlog(ready: usize, archived: usize, runs: usize) -> BacklogSize {
    BacklogSize {
        ready,
        archived,
        runs,
    }
}

impl Plan {
    pub(crate) fn new(quick: bool) -> Self {
        if quick {
            Plan {
                name: "quick",
                runs: 3,
                enqueue_runs: 3,
                drain_jobs: 20_000,
                drain_workers: 2,
                drain_concurrency: 100,
                drain_wide_concurrency: 500,
                drain_single_concurrency: 64,
                enqueue_sends: 1_280,
                senders: 8,
                sends_per_sender: 100,
                bulk_batches: 20,
                batch_size: 1_000,
                io_jobs: 2_000,
                io_levels: vec![64, 1_024],
                io_runs: 3,
                groups: 200,
                per_group: 20,
                groups_concurrency: 32,
                groups_runs: 3,
                latency_messages: 200,
                latency_spacing_ms: 10,
                latency_runs: 3,
                fanout_queues: 10,
                fanout_batches: 5,
                stream_clients: 1_000,
                stream_events: 100,
                stream_spacing_ms: 10,
                stream_runs: 3,
                stream_publish_runs: 3,
                backlogs: vec![backlog(10_000, 0, 2), backlog(100_000, 0, 2)],
                xmin_phases: [
                    Duration::from_millis(7_500),
                    Duration::from_secs(5),
                    Duration::from_millis(7_500),
                ],
                console_divisor: 10,
                console_calls: 30,
            }
        } else {
            Plan {
                name: "full",
                runs: 5,
                enqueue_runs: 3,
                drain_jobs: 200_000,
                drain_workers: 2,
                drain_concurrency: 100,
                drain_wide_concurrency: 500,
                drain_single_concurrency: 64,
                enqueue_sends: 6_400,
                senders: 8,
                sends_per_sender: 300,
                bulk_batches: 100,
                batch_size: 1_000,
                io_jobs: 10_000,
                io_levels: vec![16, 64, 256, 1_024],
                io_runs: 3,
                groups: 1_000,
                per_group: 20,
                groups_concurrency: 32,
                groups_runs: 3,
                latency_messages: 1_000,
                latency_spacing_ms: 10,
                latency_runs: 3,
                fanout_queues: 10,
                fanout_batches: 20,
                stream_clients: 10_000,
                stream_events: 200,
                stream_spacing_ms: 100,
                stream_runs: 3,
                stream_publish_runs: 5,
                // Building 5 million rows takes minutes: one run each.
                backlogs: vec![
                    backlog(10_000, 0, 3),
                    backlog(100_000, 0, 3),
                    backlog(1_000_000, 0, 3),
                    backlog(5_000_000, 0, 1),
                    backlog(100_000, 5_000_000, 1),
                ],
                xmin_phases: [Duration::from_secs(60); 3],
                console_divisor: 1,
                console_calls: 200,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(args: &[&str]) -> Options {
        match Options::parse(args.iter().copied()) {
            Ok(Command::Run(options)) => options,
            other => panic!("expected options, got {other:?}"),
        }
    }

    #[test]
    fn parses_flags() {
        let defaults = run(&[]);
        assert!(!defaults.quick);
        assert_eq!(defaults.database_url, None);
        assert!(defaults.out.ends_with("target/bench"));

        let options = run(&["--quick", "--database-url", "postgres://h/db", "--out=x"]);
        assert!(options.quick);
        assert_eq!(options.database_url.as_deref(), Some("postgres://h/db"));
        assert_eq!(options.out, PathBuf::from("x"));
        assert!(options.runs("enqueue"), "every scenario by default");
        let only = run(&["--only", "publish_fanout,latency"]);
        assert!(only.runs("publish_fanout") && only.runs("latency") && !only.runs("drain"));
        assert_eq!(
            run(&["--database-url=postgres://h/db?a=b"])
                .database_url
                .as_deref(),
            Some("postgres://h/db?a=b")
        );
    }

    #[test]
    fn rejects_bad_arguments() {
        assert_eq!(Options::parse(["--help"]), Ok(Command::Help));
        assert!(Options::parse(["--out"]).is_err());
        assert!(Options::parse(["--quick=yes"]).is_err());
        assert!(Options::parse(["--fast"]).is_err());
        assert!(Options::parse(["--only", "latency,stream_fanot"]).is_err());
        assert!(Options::parse(["extra"]).is_err());
        assert_eq!(Options::parse(["--streamer"]), Ok(Command::Streamer));
    }
}
