//! `pgbus work`: workers whose handler is an external command or an HTTP endpoint, and the
//! `--processes` supervisor.

mod envelope;

use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use pgbus_core::QueueName;
use pgbus_exec::{ExecutionMode, JobContext, Outcome, Worker};
use pgbus_pg::{Maintenance, PgBackend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::database::Database;
use crate::support::signals::stop_on_signals;
use crate::support::time::{duration, positive_duration};
use envelope::Delivery;

/// Exit status of `--until-empty` when a paused queue holds work the run could not do
/// (EX_TEMPFAIL: run it again once the queue is resumed).
pub(crate) const EXIT_PAUSED: u8 = 75;

// No doc comment: the `Command` variant's is the command's about.
#[derive(Debug, Args)]
pub(crate) struct WorkArgs {
    /// Queues to work.
    #[arg(required = true)]
    pub(crate) queues: Vec<String>,
    /// Jobs run at once in this process, plain and grouped messages together.
    ///
    /// One limit for the process: plain and grouped messages share the N slots (a running
    /// group holds one from its first message to its last; while both kinds wait for
    /// slots, each gets half), and `pgbus stats` shows one row, busy/N.
    ///
    /// Connections per process, by application_name: one pgbus:fetch, one
    /// pgbus:listen (none behind --pooler transaction without --listen-url) and at most 3
    /// pgbus:pool, 5 in all whatever N and the execution mode; while grouped messages run,
    /// also one pgbus:recovery and one pgbus:group per running group (at most N): N + 6 in
    /// all. The group connections open when a grouped message is first seen and close
    /// after 30 s unused. At start, a pgbus:check (pgbus:migrate on the embedded database)
    /// comes and goes. With --processes, each worker process has this budget.
    #[arg(long, default_value_t = 10)]
    pub(crate) concurrency: usize,
    /// threads (one OS thread per job) or async (tasks; fiber is an alias). The default is
    /// async, or threads in a build without async.
    #[arg(long, value_parser = execution_mode, default_value_t = ExecutionMode::default())]
    pub(crate) execution_mode: ExecutionMode,
    /// Longest wait between claims when no wake-up arrives.
    #[arg(long, value_parser = positive_duration, default_value = "1s", allow_hyphen_values = true)]
    pub(crate) poll_interval: Duration,
    /// Exit once the queues hold nothing ready, nothing in flight (in any process) and
    /// nothing due within --wait-due, saying what is left. A paused queue's messages are
    /// not waited for; when it holds work the run would have done, the exit status is 75.
    #[arg(long)]
    pub(crate) until_empty: bool,
    /// With --until-empty: wait for retries and delayed messages due within this long;
    /// messages due later are left.
    #[arg(long, value_parser = duration, default_value = "30s", requires = "until_empty", allow_hyphen_values = true)]
    pub(crate) wait_due: Duration,
    /// Plain messages a process may hold claimed ahead of its free slots, so a slot that
    /// frees starts its next job without waiting for a claim; 0 turns it off (strict
    /// priority order, nothing held from other processes). Default: 4 per slot, at most
    /// 512. However set, a process holds only what its slots start within about 50 ms at
    /// its jobs' measured pace, and gives back what waits 1 s for a slot, or when it stops.
    #[arg(long)]
    pub(crate) claim_ahead: Option<usize>,
    /// Run `sh -c CMD` per message, the payload as JSON on stdin. Exit 0: ack; 65:
    /// dead-letter; anything else: retry. The command runs in a process group of its own:
    /// on the job timeout, at shutdown, and for processes it leaves behind when it exits,
    /// the group gets SIGTERM, then SIGKILL 2 s later. Its environment is pgbus's without
    /// DATABASE_URL, PGPASSWORD, the OTLP exporter's headers and every PGBUS_* variable
    /// (see --pass-env), plus
    /// PGBUS_QUEUE, PGBUS_MESSAGE_ID, PGBUS_ATTEMPT and PGBUS_GROUP; for a topic's copy
    /// PGBUS_ROUTING_KEY, PGBUS_EVENT_ID and PGBUS_PUBLISHED_AT; each message header as
    /// `PGBUS_HEADER_<NAME>` (upper case, other characters than A-Z0-9 as _).
    #[arg(long, conflicts_with = "http")]
    pub(crate) exec: Option<String>,
    /// Pass the withheld environment variable NAME (DATABASE_URL, PGPASSWORD or a PGBUS_*
    /// one) through to --exec commands anyway. Repeatable.
    #[arg(long = "pass-env", value_name = "NAME", requires = "exec")]
    pub(crate) pass_env: Vec<String>,
    /// POST the payload as JSON. 2xx: ack; 3xx (redirects are not followed) and 4xx (but
    /// 408, 429): dead-letter; else retry, after Retry-After when the server sends one.
    /// Headers as the --exec variables: Pgbus-Queue, Pgbus-Message-Id, Pgbus-Attempt,
    /// Pgbus-Group, Pgbus-Routing-Key, Pgbus-Event-Id, Pgbus-Published-At and
    /// `Pgbus-Header-<Name>` (other characters than a-z0-9- as -).
    #[arg(long)]
    pub(crate) http: Option<String>,
    /// The longest Retry-After honoured with --http; a longer one is shortened to it.
    #[arg(long, value_parser = duration, default_value = "1h", allow_hyphen_values = true)]
    pub(crate) max_retry_after: Duration,
    /// Per-job timeout; a job past it is killed and retried.
    #[arg(long, value_parser = positive_duration, default_value = "5m", allow_hyphen_values = true)]
    pub(crate) job_timeout: Duration,
    /// Run N worker processes under a supervisor that restarts any that dies.
    #[arg(long)]
    pub(crate) processes: Option<usize>,
    /// How long a graceful stop waits for running jobs.
    #[arg(long, value_parser = duration, default_value = "30s", allow_hyphen_values = true)]
    pub(crate) drain_timeout: Duration,
    /// How long idempotent consumers' dedup records are kept (every worker process
    /// prunes them, the event log, and each queue's archive past its retention).
    #[arg(long, value_parser = duration, default_value = "7days", allow_hyphen_values = true)]
    pub(crate) dedup_retention: Duration,
    /// How long published events stay in the event log (what a binding with
    /// --earliest or --since can replay).
    #[arg(long, value_parser = duration, default_value = "7days", allow_hyphen_values = true)]
    pub(crate) event_retention: Duration,
    /// Serve this process's metrics (jobs started and finished by outcome, durations,
    /// claims, leases, connections; Prometheus text at /metrics) on IP:PORT or
    /// localhost:PORT. Anything but a loopback address needs --metrics-token.
    #[cfg(feature = "metrics")]
    #[arg(long, value_parser = crate::server::listen_addr, conflicts_with = "processes")]
    pub(crate) metrics_listen: Option<std::net::SocketAddr>,
    /// Required from every scraper of --metrics-listen (Authorization: Bearer TOKEN).
    #[cfg(feature = "metrics")]
    #[arg(long, env = "PGBUS_METRICS_TOKEN", hide_env_values = true)]
    pub(crate) metrics_token: Option<String>,
}

impl WorkArgs {
    /// What clap cannot say: one of --exec and --http is needed. The subcommand path and
    /// the message for the usage error.
    pub(crate) fn missing_argument(&self) -> Option<(&'static [&'static str], &'static str)> {
        (self.exec.is_none() && self.http.is_none()).then_some((
            &["work"],
            "give --exec CMD or --http URL: what runs each message",
        ))
    }
}

/// The pool of a `pgbus work` process (`pgbus:pool`): acks, retries, lease extension,
/// heartbeats, pruning and the `--until-empty` watch, a statement at a time each.
pub(crate) const POOL_CONNECTIONS: u32 = 3;

/// Exit status of an `--exec` command that asks for a dead letter (EX_DATAERR).
const EXIT_DEAD_LETTER: i32 = 65;
/// How much of a failing command's stderr or response body is kept as the error text. Of a
/// response body no more is read either: a server's error body may be endless.
const ERROR_TAIL: usize = 1000;
/// How much of an `--exec` command's stderr is kept while it runs (its last bytes).
const STDERR_KEPT: usize = 8 * 1024;
/// How long an `--exec` command's process group has between SIGTERM and SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// How much longer than `--job-timeout` the worker gives a job before it drops it. The
/// handlers end a job at `--job-timeout` themselves, so that its error keeps what the
/// command wrote to stderr (or the HTTP error): a command's group takes up to
/// [`KILL_GRACE`] to die and its stderr as long again to close. The worker's own timeout
/// is the backstop.
const TIMEOUT_BACKSTOP: Duration = Duration::from_secs(3 * KILL_GRACE.as_secs());

/// Where each message goes.
#[derive(Clone)]
enum Target {
    Exec {
        cmd: Arc<str>,
        /// Withheld variables passed through anyway (`--pass-env`).
        pass_env: Arc<[String]>,
        /// `--job-timeout`.
        timeout: Duration,
    },
    Http {
        client: reqwest::Client,
        url: Arc<str>,
        /// The longest `Retry-After` honoured; a longer one is shortened to it.
        max_retry_after: Duration,
    },
}

/// The execution mode, refusing modes this build was compiled without.
fn execution_mode(name: &str) -> Result<ExecutionMode, pgbus_exec::ExecError> {
    name.parse::<ExecutionMode>()?.check_built()
}

/// `pgbus work`.
pub(crate) async fn run(args: WorkArgs, db: &Database) -> anyhow::Result<ExitCode> {
    if let Some(processes) = args.processes {
        return supervise(db, processes).await;
    }
    let backend = db.ready().await?.clone();
    let queues = args
        .queues
        .iter()
        .map(|q| QueueName::new(q.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    let target = match (&args.exec, &args.http) {
        (Some(cmd), None) => Target::Exec {
            cmd: cmd.as_str().into(),
            pass_env: args.pass_env.clone().into(),
            timeout: args.job_timeout,
        },
        (None, Some(url)) => Target::Http {
            client: reqwest::Client::builder()
                .timeout(args.job_timeout)
                // Following a redirect would turn the POST into a GET (301-303) and ack on
                // whatever the final page answers: a 3xx is a failure instead.
                .redirect(reqwest::redirect::Policy::none())
                .build()?,
            url: url.as_str().into(),
            max_retry_after: args.max_retry_after,
        },
        _ => bail!("give exactly one of --exec CMD or --http URL"),
    };
    // Pruning runs in the worker processes, not in a `--processes` supervisor: the
    // supervisor stays a plain process watcher without a pool of its own, and the
    // prunes skip each other's rows, so N workers pruning at once only share the work.
    let maintenance = Maintenance::builder(backend.clone())
        .dedup_retention(args.dedup_retention)
        .event_log_retention(args.event_retention)
        .build()?;
    let wakeups = db.wakeups(args.poll_interval)?;
    let stop = stop_on_signals()?;
    #[cfg(feature = "metrics")]
    let scrape = match args.metrics_listen {
        Some(addr) => Some(
            crate::server::scrape::start(addr, args.metrics_token.clone(), stop.clone()).await?,
        ),
        None => None,
    };

    let build = |builder: pgbus_exec::WorkerBuilder<PgBackend>| {
        let mut builder = builder
            .concurrency(args.concurrency)
            .execution_mode(args.execution_mode)
            .poll_interval(args.poll_interval)
            .job_timeout(args.job_timeout.saturating_add(TIMEOUT_BACKSTOP))
            .drain_timeout(args.drain_timeout);
        if let Some(ahead) = args.claim_ahead {
            builder = builder.claim_ahead(ahead);
        }
        if let Some(wakeups) = &wakeups {
            builder = builder.wakeups(Arc::clone(wakeups));
        }
        for queue in &queues {
            let target = target.clone();
            builder = builder.handle(
                queue.clone(),
                move |ctx: JobContext<PgBackend>, payload: serde_json::Value| {
                    let target = target.clone();
                    async move { deliver(&target, &ctx, payload).await }
                },
            );
        }
        builder
    };
    // Plain and grouped messages on one set of `--concurrency` slots, one process entry.
    let worker = build(Worker::builder(backend.clone())).build_mixed()?;
    let maintenance = tokio::spawn(maintenance.run(stop.clone()));
    // A run-once worker stops itself when its queues are done, and logs what it left.
    let (report, paused) = if args.until_empty {
        let run = tokio::spawn(worker.run_until_empty(args.wait_due, stop.clone())).await??;
        let paused = run.paused();
        (run.worker, paused)
    } else {
        (tokio::spawn(worker.run(stop.clone())).await??, None)
    };
    // Pruning stops with the worker, however it came to stop.
    stop.cancel();
    maintenance.await?;
    #[cfg(feature = "metrics")]
    if let Some(scrape) = scrape {
        scrape.await?;
    }
    tracing::info!(
        target: "pgbus::cli",
        acked = report.acked,
        retried = report.retried,
        dead_lettered = report.dead_lettered,
        "worker stopped"
    );
    if let Some(paused) = paused {
        tracing::error!(target: "pgbus::cli", "{paused}");
        return Ok(ExitCode::from(EXIT_PAUSED));
    }
    Ok(ExitCode::SUCCESS)
}

fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let text = text.trim();
    let start = text
        .char_indices()
        .map(|(i, _)| i)
        .find(|&i| text.len() - i <= ERROR_TAIL)
        .unwrap_or(text.len());
    text[start..].to_owned()
}

async fn deliver(
    target: &Target,
    ctx: &JobContext<PgBackend>,
    payload: serde_json::Value,
) -> Outcome {
    let body = match serde_json::to_vec(&payload) {
        Ok(body) => body,
        Err(err) => {
            return Outcome::dead_letter(format!("payload cannot be written as JSON: {err}"))
        }
    };
    match target {
        Target::Exec {
            cmd,
            pass_env,
            timeout,
        } => run_command(cmd, pass_env, *timeout, ctx, &body).await,
        Target::Http {
            client,
            url,
            max_retry_after,
        } => tokio::select! {
            outcome = post(client, url, *max_retry_after, ctx, body) => outcome,
            // A cancelled job (its lease was lost) stops waiting: the request is dropped.
            () = ctx.cancellation().cancelled() => Outcome::retry("cancelled"),
        },
    }
}

/// Runs `sh -c CMD` with the payload on stdin: exit 0 acks, 65 dead-letters, anything
/// else (a signal, or running past `timeout`) retries. The error text ends with the end of
/// the command's stderr, also when it timed out.
///
/// The command runs in a process group of its own, and the group is what ends with the job:
/// past `timeout`, when the job is cancelled (its lease was lost, e.g. an operator cancelled
/// it), or at shutdown (the job's future is dropped) it gets SIGTERM, then
/// SIGKILL after [`KILL_GRACE`]; so do processes a command left running in the background
/// when it exits. The payload is written while stderr is read (a command that writes to
/// stderr before reading all its input cannot block on a full pipe), and only the last
/// [`STDERR_KEPT`] bytes of stderr are kept. The environment is this process's without
/// pgbus's own secrets ([`is_withheld`]), except names given with `--pass-env`, plus the
/// delivery's variables ([`Delivery::env`]).
async fn run_command(
    cmd: &str,
    pass_env: &[String],
    timeout: Duration,
    ctx: &JobContext<PgBackend>,
    body: &[u8],
) -> Outcome {
    let mut command = tokio::process::Command::new("sh");
    command.arg("-c").arg(cmd);
    for (name, _) in std::env::vars_os() {
        if let Some(name) = name.to_str() {
            if is_withheld(name) && !pass_env.iter().any(|passed| passed == name) {
                command.env_remove(name);
            }
        }
    }
    let spawned = command
        .envs(Delivery::of(ctx).env())
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(err) => return Outcome::retry(format!("could not start `sh -c {cmd}`: {err}")),
    };
    // Signals the group when dropped: on a timeout or shutdown this future is dropped at
    // its next await point, and the group with it.
    let group = child.id().map(ProcessGroup::new);
    let stdin = child.stdin.take();
    let stderr = child.stderr.take();
    let (exited_tx, exited_rx) = tokio::sync::oneshot::channel::<()>();
    let cancelled = ctx.cancellation();
    let run = async {
        let waited = async {
            if let Some(mut stdin) = stdin {
                // One write for the payload and its newline: a command such as `cat >> file`
                // then appends the whole line at once, never interleaved with another job's.
                let mut input = Vec::with_capacity(body.len() + 1);
                input.extend_from_slice(body);
                input.push(b'\n');
                // A command that does not read its input closes the pipe early; that is fine.
                let _ = stdin.write_all(&input).await;
                // Dropped here: the command sees the end of its input.
            }
            child.wait().await
        };
        let finished = tokio::select! {
            finished = tokio::time::timeout(timeout, waited) => finished.map_err(|_| Stopped::TimedOut),
            () = cancelled.cancelled() => Err(Stopped::Cancelled),
        };
        let (status, stopped) = match finished {
            Ok(status) => (status, None),
            // Past the job timeout (also one that never read its input), or the job was
            // cancelled (its lease was lost: an operator cancelled it): the group gets
            // SIGTERM, then SIGKILL, and what the command wrote to stderr until then is kept.
            Err(stopped) => {
                if let Some(group) = &group {
                    group.terminate();
                }
                (child.wait().await, Some(stopped))
            }
        };
        // The command is done; what it left running in its group goes too (and lets go of
        // the stderr pipe).
        if let Some(group) = &group {
            group.terminate();
        }
        let _ = exited_tx.send(());
        (status, stopped)
    };
    let read = async {
        let mut kept = Tail::default();
        let Some(mut stderr) = stderr else {
            return kept;
        };
        // A process that left the group may hold the pipe open: stop reading a moment
        // after the command exited.
        let mut done = std::pin::pin!(async {
            let _ = exited_rx.await;
            tokio::time::sleep(KILL_GRACE).await;
        });
        let mut buf = vec![0; 8192];
        loop {
            tokio::select! {
                read = stderr.read(&mut buf) => match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => kept.push(&buf[..n]),
                },
                () = &mut done => break,
            }
        }
        kept
    };
    let ((status, stopped), stderr) = tokio::join!(run, read);
    let stderr = tail(&stderr.bytes());
    match stopped {
        Some(Stopped::TimedOut) => {
            let after = humantime::format_duration(timeout);
            return Outcome::retry(format!("timed out after {after}: {stderr}"));
        }
        Some(Stopped::Cancelled) => return Outcome::retry(format!("cancelled: {stderr}")),
        None => {}
    }
    let status = match status {
        Ok(status) => status,
        Err(err) => return Outcome::retry(format!("waiting for the command failed: {err}")),
    };
    match status.code() {
        Some(0) => Outcome::Ack,
        Some(EXIT_DEAD_LETTER) => {
            Outcome::dead_letter(format!("exit {EXIT_DEAD_LETTER}: {stderr}"))
        }
        Some(code) => Outcome::retry(format!("exit {code}: {stderr}")),
        None => Outcome::retry(format!("killed by a signal: {stderr}")),
    }
}

/// Why a command was stopped before it exited.
enum Stopped {
    /// It ran past the job timeout.
    TimedOut,
    /// The job's cancellation token was cancelled.
    Cancelled,
}

/// Whether an inherited environment variable is withheld from `--exec` commands: the
/// database URL and password, the OTLP exporter's headers (which carry the collector's API
/// key) and every `PGBUS_*` setting (tokens, secrets, URLs), which a job has no business
/// seeing. `--pass-env NAME` passes one through anyway.
fn is_withheld(name: &str) -> bool {
    matches!(
        name,
        "DATABASE_URL"
            | "PGPASSWORD"
            | "OTEL_EXPORTER_OTLP_HEADERS"
            | "OTEL_EXPORTER_OTLP_TRACES_HEADERS"
    ) || name.starts_with("PGBUS_")
}

/// The last [`STDERR_KEPT`] bytes of a command's stderr.
#[derive(Default)]
struct Tail(std::collections::VecDeque<u8>);

impl Tail {
    fn push(&mut self, bytes: &[u8]) {
        let bytes = &bytes[bytes.len().saturating_sub(STDERR_KEPT)..];
        let over = (self.0.len() + bytes.len()).saturating_sub(STDERR_KEPT);
        self.0.drain(..over);
        self.0.extend(bytes);
    }

    fn bytes(self) -> Vec<u8> {
        self.0.into()
    }
}

/// An `--exec` command's process group (its id is the `sh` process's pid).
struct ProcessGroup {
    id: u32,
    /// Set by the first [`ProcessGroup::terminate`]: the command's exit and the job's end
    /// both ask, and the group is signalled once.
    signalled: std::sync::atomic::AtomicBool,
}

impl ProcessGroup {
    fn new(id: u32) -> Self {
        ProcessGroup {
            id,
            signalled: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// SIGTERM to the group now, SIGKILL after [`KILL_GRACE`] to whatever is left. Nothing
    /// when the group is already empty or was signalled before.
    fn terminate(&self) {
        if self
            .signalled
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        let Some(pgid) = i32::try_from(self.id)
            .ok()
            .and_then(rustix::process::Pid::from_raw)
        else {
            return;
        };
        if rustix::process::kill_process_group(pgid, rustix::process::Signal::TERM).is_err() {
            return; // no process left in the group
        }
        // A plain thread: this runs in `Drop` too, where nothing can be awaited, and the
        // runtime may be shutting down.
        let _ = std::thread::Builder::new()
            .name("pgbus-kill-group".into())
            .spawn(move || {
                std::thread::sleep(KILL_GRACE);
                let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
            });
    }
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        self.terminate();
    }
}

/// POSTs the payload: 2xx acks; 3xx (redirects are not followed) and 4xx but 408 and 429
/// dead-letter; 408, 429, 5xx and transport errors retry, after `Retry-After` (at most
/// `max_retry_after`) when the server says so.
async fn post(
    client: &reqwest::Client,
    url: &str,
    max_retry_after: Duration,
    ctx: &JobContext<PgBackend>,
    body: Vec<u8>,
) -> Outcome {
    let response = client
        .post(url)
        .headers(Delivery::of(ctx).http_headers())
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await;
    let response = match response {
        Ok(response) => response,
        Err(err) => return Outcome::retry(format!("POST {url} failed: {err}")),
    };
    let status = response.status();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| retry_after(v, std::time::SystemTime::now()))
        .map(|after| after.min(max_retry_after));
    if status.is_success() {
        return Outcome::Ack;
    }
    if status.is_redirection() {
        // Retrying will not fix a URL that points elsewhere: a configuration error.
        let location = response
            .headers()
            .get("location")
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        let to = location.map_or_else(|| "no Location".to_owned(), |l| format!("Location {l}"));
        return Outcome::dead_letter(format!(
            "HTTP {}: redirect to {to} not followed (give --http the final URL)",
            status.as_u16()
        ));
    }
    let text = body_head(response).await;
    let error = format!("HTTP {}: {text}", status.as_u16());
    match status.as_u16() {
        408 | 429 => retry(error, retry_after),
        400..=499 => Outcome::dead_letter(error),
        _ => retry(error, retry_after),
    }
}

/// The start of a response body, at most [`ERROR_TAIL`] bytes read: an error page may be
/// large or never end, and only that much goes in the error text.
async fn body_head(mut response: reqwest::Response) -> String {
    let mut head = Vec::new();
    while head.len() < ERROR_TAIL {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = ERROR_TAIL - head.len();
                head.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    tail(&head)
}

/// A `Retry-After` value: delay seconds, or an HTTP date (a date already past is no
/// wait). `None` for anything else, which leaves the queue's backoff in charge.
fn retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

fn retry(error: String, after: Option<Duration>) -> Outcome {
    match after {
        Some(after) => Outcome::retry_after(error, after),
        None => Outcome::retry(error),
    }
}

/// A worker that ran this long before it died was healthy: its restart starts the backoff
/// over, so a crash now and then is restarted after a second, not after the delay that
/// all of its slot's earlier crashes added up to.
const STABLE_RUN: Duration = Duration::from_secs(10);

/// Deaths in a row of a slot after one whose worker ran for `ran_for`.
fn failures_after(failures: u32, ran_for: Duration) -> u32 {
    if ran_for >= STABLE_RUN {
        1
    } else {
        failures.saturating_add(1)
    }
}

/// The wait before restarting after `failures` deaths in a row: 1 s, doubling, at most 32 s.
fn restart_delay(failures: u32) -> Duration {
    Duration::from_millis(500 * 2u64.pow(failures.clamp(1, 6)))
}

/// Runs `processes` copies of this command (without `--processes`), restarting any that
/// dies with exponential backoff (started over after a healthy run of [`STABLE_RUN`]);
/// forwards SIGINT/SIGTERM; ends when all exited 0, or with [`EXIT_PAUSED`] when one of
/// them ended an `--until-empty` run with it (not restarted: it did what it could).
async fn supervise(db: &Database, processes: usize) -> anyhow::Result<ExitCode> {
    if processes == 0 {
        bail!("--processes must be at least 1");
    }
    db.ready().await?;
    let exe = std::env::current_exe().context("finding this executable")?;
    let mut args: Vec<String> = Vec::new();
    let mut skip_next = false;
    for arg in std::env::args().skip(1) {
        if skip_next {
            skip_next = false;
        } else if arg == "--processes" {
            skip_next = true;
        } else if !arg.starts_with("--processes=") {
            args.push(arg);
        }
    }
    let stop = stop_on_signals()?;
    let mut tasks = Vec::new();
    for slot in 0..processes {
        let (exe, args, url, stop) = (exe.clone(), args.clone(), db.url.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut failures = 0u32;
            loop {
                let started = std::time::Instant::now();
                let mut child = tokio::process::Command::new(&exe)
                    .args(&args)
                    .env("DATABASE_URL", &url)
                    .stdin(Stdio::null())
                    .spawn()
                    .context("starting a worker process")?;
                let pid = child.id();
                tracing::info!(target: "pgbus::supervisor", slot, pid, "worker process started");
                let status = tokio::select! {
                    status = child.wait() => status?,
                    _ = stop.cancelled() => {
                        if let Some(pid) = pid {
                            let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
                        }
                        child.wait().await?
                    }
                };
                if status.code() == Some(i32::from(EXIT_PAUSED)) {
                    return anyhow::Ok(true);
                }
                if status.success() || stop.is_cancelled() {
                    return Ok(false);
                }
                failures = failures_after(failures, started.elapsed());
                let delay = restart_delay(failures);
                tracing::warn!(target: "pgbus::supervisor", slot, %status, restart_in = ?delay, "worker process died; restarting");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => return Ok(false),
                }
            }
        }));
    }
    let mut paused = false;
    for task in tasks {
        paused |= task.await??;
    }
    Ok(if paused {
        ExitCode::from(EXIT_PAUSED)
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_or_an_http_date() {
        let now = httpdate::parse_http_date("Wed, 02 Dec 2026 06:00:00 GMT").unwrap();
        assert_eq!(retry_after("120", now), Some(Duration::from_secs(120)));
        assert_eq!(retry_after(" 0 ", now), Some(Duration::ZERO));
        assert_eq!(
            retry_after("Wed, 02 Dec 2026 06:01:30 GMT", now),
            Some(Duration::from_secs(90))
        );
        assert_eq!(
            retry_after("Wed, 02 Dec 2026 05:00:00 GMT", now),
            Some(Duration::ZERO),
            "a date already past"
        );
        for bad in ["", "-5", "1.5", "soon", "Wed, 32 Dec 2026 06:00:00 GMT"] {
            assert_eq!(retry_after(bad, now), None, "{bad:?}");
        }
    }

    #[test]
    fn restart_backoff_doubles_in_a_crash_loop_and_starts_over_after_a_healthy_run() {
        let quick = Duration::from_millis(200);
        let mut failures = 0;
        let mut delays = Vec::new();
        for _ in 0..8 {
            failures = failures_after(failures, quick);
            delays.push(restart_delay(failures).as_secs());
        }
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 32, 32]);
        // Found by `cargo xtask chaos` (scenario `supervisor`): a worker killed after
        // running for minutes waited out the delay of every earlier crash of its slot.
        assert_eq!(failures_after(failures, STABLE_RUN), 1);
        assert_eq!(
            restart_delay(failures_after(failures, STABLE_RUN)).as_secs(),
            1
        );
    }
}
