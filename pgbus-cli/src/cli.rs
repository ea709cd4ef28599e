//! Command-line arguments.

use std::process::ExitCode;
use std::time::Duration;

use clap::error::ErrorKind;
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

use crate::database::Database;

/// The help heading of the options every command takes.
const GLOBAL: &str = "Global options";

/// pgbus: a PostgreSQL-native job queue and event bus.
///
/// Without --database-url or DATABASE_URL every command runs on an embedded local
/// PostgreSQL cluster that pgbus creates on first use (in $PGBUS_HOME, else
/// $XDG_DATA_HOME/pgbus, else ~/.local/share/pgbus) and reuses afterwards.
#[derive(Debug, Parser)]
#[command(name = "pgbus", version, propagate_version = true)]
pub(crate) struct Cli {
    /// PostgreSQL connection URL. TLS and passwords as in libpq: sslmode (disable, prefer,
    /// require, verify-ca, verify-full), sslrootcert (a file, or `system`), sslcert and
    /// sslkey in the URL, else PGSSLMODE, PGSSLROOTCERT, PGSSLCERT, PGSSLKEY; a missing
    /// password from PGPASSWORD or ~/.pgpass (PGPASSFILE).
    #[arg(long, env = "DATABASE_URL", global = true, hide_env_values = true, help_heading = GLOBAL)]
    pub(crate) database_url: Option<String>,

    /// What sits between pgbus and PostgreSQL: `session` (a direct connection or a
    /// session-mode pooler) or `transaction` (a transaction-mode pooler such as PgBouncer's
    /// default: no prepared statements or session settings, ordered groups on row leases,
    /// LISTEN only over --listen-url).
    #[arg(long, env = "PGBUS_POOLER", value_enum, default_value_t = PoolerMode::Session, global = true, help_heading = GLOBAL)]
    pub(crate) pooler: PoolerMode,

    /// A direct URL to PostgreSQL (not through the pooler) for the connections that need a
    /// session of their own: LISTEN for wake-ups and streams, and the outbox relay. Only
    /// used with --pooler transaction; without it, workers poll.
    #[arg(long, env = "PGBUS_LISTEN_URL", global = true, hide_env_values = true, help_heading = GLOBAL)]
    pub(crate) listen_url: Option<String>,

    /// Log format on standard error.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true, help_heading = GLOBAL)]
    pub(crate) log_format: LogFormat,

    /// More logging (-v: debug, -vv: trace).
    #[arg(short, long, action = clap::ArgAction::Count, global = true, help_heading = GLOBAL)]
    pub(crate) verbose: u8,

    /// Nothing on standard error but errors (standard output, the data, is unchanged).
    #[arg(short, long, global = true, conflicts_with = "verbose", help_heading = GLOBAL)]
    pub(crate) quiet: bool,

    #[command(subcommand)]
    pub(crate) command: Command,
}

/// What sits between pgbus and PostgreSQL (see `--pooler`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum PoolerMode {
    /// A direct connection, or a pooler in session mode.
    Session,
    /// A pooler in transaction mode.
    Transaction,
}

impl From<PoolerMode> for pgbus_pg::Pooler {
    fn from(mode: PoolerMode) -> Self {
        match mode {
            PoolerMode::Session => pgbus_pg::Pooler::Session,
            PoolerMode::Transaction => pgbus_pg::Pooler::Transaction,
        }
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Apply schema migrations (or, with --check, report whether the schema is current).
    Migrate {
        /// Only check; exit 1 when migrations are pending.
        #[arg(long, conflicts_with = "grant")]
        check: bool,
        /// Also grant ROLE what workers, producers, the dashboard and the relay need at run
        /// time (schema usage, rows of the tables, sequences, functions; no ownership, no
        /// DDL), now and after every later migration. Repeatable.
        #[arg(long, value_name = "ROLE")]
        grant: Vec<String>,
    },
    /// Create, list and manage queues.
    #[command(subcommand)]
    Queue(QueueCommand),
    /// Send messages: one JSON document as an argument, or one per line on standard input.
    Send(SendArgs),
    /// Run workers that hand each message to a command or an HTTP endpoint.
    Work(WorkArgs),
    /// Bind routing-key patterns to queues, and list bindings.
    #[command(subcommand)]
    Topic(crate::topics::TopicCommand),
    /// Publish events: one JSON document as an argument, or one per line on standard
    /// input; every queue bound to a matching pattern gets a copy.
    Publish(crate::topics::PublishArgs),
    /// Relay the transactional outbox: publish the rows producers wrote to `pgbus.outbox`
    /// (here or in another database, --outbox-url) until SIGTERM or Ctrl-C.
    Relay(crate::relay::RelayArgs),
    /// Inspect and recover dead-lettered messages.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Queue statistics and worker processes.
    Stats {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Publish to SSE streams, and print their signed URLs.
    #[cfg(feature = "stream")]
    #[command(subcommand)]
    Stream(crate::stream::StreamCommand),
    /// Serve the dashboard, the JSON API, SSE streams, Prometheus metrics and health
    /// checks over HTTP.
    #[cfg(any(feature = "dashboard", feature = "stream"))]
    Serve(crate::serve::ServeArgs),
    /// The embedded database.
    #[command(subcommand)]
    Db(DbCommand),
    /// Recurring tasks declared by schedulers.
    #[command(subcommand)]
    Cron(crate::cron::CronCommand),
    /// A demo: a queue with a steady trickle of jobs (some failing, some grouped),
    /// workers and the dashboard, on the embedded database unless a URL is given. Ctrl-C
    /// stops it.
    Demo(DemoArgs),
}

#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Stop by itself after this long (e.g. 10s).
    #[arg(long, value_parser = duration, allow_hyphen_values = true)]
    pub(crate) duration: Option<Duration>,
    /// Where to serve the dashboard (a free port is taken if this one is busy).
    #[cfg(any(feature = "dashboard", feature = "stream"))]
    #[arg(long, value_parser = listen_addr, default_value = "127.0.0.1:8080")]
    pub(crate) listen: std::net::SocketAddr,
}

#[derive(Debug, Subcommand)]
pub(crate) enum QueueCommand {
    /// Create a queue. When it exists with the options given, nothing changes; with other
    /// ones, an error names them (change them with `queue alter`).
    Create(CreateArgs),
    /// Change options of a queue; those not given stay as they are. Running workers keep
    /// the retry policy, lease and breaker they read when they started.
    Alter(AlterArgs),
    /// List queues.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop handing out messages.
    Pause {
        /// Queue name.
        name: String,
    },
    /// Hand out messages again.
    Resume {
        /// Queue name.
        name: String,
    },
    /// Delete every message (dead letters stay).
    Purge {
        /// Queue name.
        name: String,
    },
    /// Delete the queue with its messages, dead letters and archive.
    Drop {
        /// Queue name.
        name: String,
    },
}

#[derive(Debug, Args)]
pub(crate) struct CreateArgs {
    /// Queue name: lowercase [a-z0-9_], starting with a letter, at most 48 bytes.
    pub(crate) name: String,
    /// Attempts before a message is dead-lettered [default: 5].
    #[arg(long)]
    pub(crate) max_attempts: Option<u32>,
    /// Lease (visibility timeout) of a claimed message [default: 30s].
    #[arg(long, value_parser = positive_duration, allow_hyphen_values = true)]
    pub(crate) lease: Option<Duration>,
    /// Keep acked messages in the archive.
    #[arg(long)]
    pub(crate) keep_history: bool,
    /// Circuit breaker: pause the queue after this many failed jobs in a row...
    #[arg(long, requires = "breaker_backoff")]
    pub(crate) breaker_failures: Option<u32>,
    /// ... for this long, then resume by itself.
    #[arg(long, value_parser = positive_duration, requires = "breaker_failures", allow_hyphen_values = true)]
    pub(crate) breaker_backoff: Option<Duration>,
}

#[derive(Debug, Args)]
pub(crate) struct AlterArgs {
    /// The queue to change.
    pub(crate) name: String,
    /// Attempts before a message is dead-lettered.
    #[arg(long)]
    pub(crate) max_attempts: Option<u32>,
    /// Lease (visibility timeout) of a claimed message.
    #[arg(long, value_parser = positive_duration, allow_hyphen_values = true)]
    pub(crate) lease: Option<Duration>,
    /// Keep acked messages in the archive from now on.
    #[arg(long, conflicts_with = "no_keep_history")]
    pub(crate) keep_history: bool,
    /// Keep no more acked messages (the archive kept so far is pruned as usual).
    #[arg(long)]
    pub(crate) no_keep_history: bool,
    /// Circuit breaker: failures in a row that pause the queue (a queue without a breaker
    /// needs --breaker-backoff too).
    #[arg(long, conflicts_with = "no_breaker")]
    pub(crate) breaker_failures: Option<u32>,
    /// Circuit breaker: how long it pauses the queue (a queue without a breaker needs
    /// --breaker-failures too).
    #[arg(long, value_parser = positive_duration, conflicts_with = "no_breaker", allow_hyphen_values = true)]
    pub(crate) breaker_backoff: Option<Duration>,
    /// Remove the circuit breaker (an open one closes).
    #[arg(long)]
    pub(crate) no_breaker: bool,
}

impl AlterArgs {
    /// No option to change.
    fn is_empty(&self) -> bool {
        self.max_attempts.is_none()
            && self.lease.is_none()
            && !self.keep_history
            && !self.no_keep_history
            && self.breaker_failures.is_none()
            && self.breaker_backoff.is_none()
            && !self.no_breaker
    }
}

#[derive(Debug, Args)]
pub(crate) struct SendArgs {
    /// Queue name.
    pub(crate) queue: String,
    /// The message as JSON; without it, one JSON document per line is read from stdin.
    pub(crate) json: Option<String>,
    /// Make the messages visible only after this delay (e.g. 10s, 5m).
    #[arg(long, value_parser = duration, allow_hyphen_values = true)]
    pub(crate) delay: Option<Duration>,
    /// Priority: higher runs first.
    #[arg(long, default_value_t = 0, allow_negative_numbers = true)]
    pub(crate) priority: i16,
    /// Group key: messages of one group run one at a time, in order.
    #[arg(long)]
    pub(crate) group: Option<String>,
    /// Messages per statement when reading stdin.
    #[arg(long, default_value_t = 1000)]
    pub(crate) batch: usize,
}

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
    /// threads (one OS thread per job) or async (tasks; fiber is an alias).
    #[arg(long, default_value = "async")]
    pub(crate) execution_mode: String,
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
    /// Run `sh -c CMD` per message, the payload as JSON on stdin. Exit 0: ack; 65:
    /// dead-letter; anything else: retry. The command runs in a process group of its own:
    /// on the job timeout, at shutdown, and for processes it leaves behind when it exits,
    /// the group gets SIGTERM, then SIGKILL 2 s later. Its environment is pgbus's without
    /// DATABASE_URL, PGPASSWORD and every PGBUS_* variable (see --pass-env), plus
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
}

#[derive(Debug, Subcommand)]
pub(crate) enum DlqCommand {
    /// List dead-lettered messages, oldest failure first.
    List {
        /// Queue name.
        queue: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Most messages listed.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Put dead-lettered messages back in the queue.
    Retry(DlqSelection),
    /// Delete dead-lettered messages for good.
    Discard(DlqSelection),
}

#[derive(Debug, Args)]
pub(crate) struct DlqSelection {
    /// Queue name.
    pub(crate) queue: String,
    /// Every dead-lettered message of the queue.
    #[arg(long, conflicts_with = "ids")]
    pub(crate) all: bool,
    /// Message ids (as `dlq list` shows them).
    pub(crate) ids: Vec<i64>,
}

impl DlqSelection {
    /// Neither ids nor `--all`.
    fn is_empty(&self) -> bool {
        !self.all && self.ids.is_empty()
    }
}

/// A usage error of the subcommand at `path` (`["dlq", "retry"]`), with its usage line.
pub(crate) fn usage_error(path: &[&str], kind: ErrorKind, message: &str) -> clap::Error {
    let mut cli = Cli::command();
    // Names every subcommand `pgbus dlq retry` for its usage line.
    cli.build();
    let mut command = cli;
    for name in path {
        match command.find_subcommand(name) {
            Some(sub) => command = sub.clone(),
            None => break,
        }
    }
    command.error(kind, message)
}

#[derive(Debug, Subcommand)]
pub(crate) enum DbCommand {
    /// Start the embedded database if needed and print its URL.
    Start,
    /// Start the embedded database if needed and print its URL, password included (for
    /// psql and other clients).
    Url,
    /// Stop the embedded database.
    Stop,
}

/// Parses `30s`, `5m`, `500ms`, `1h 30m`; refuses negative ones. (Duration arguments take
/// `allow_hyphen_values`, so that `--delay -5s` reaches this message instead of clap's
/// advice to pass `-5` after `--`.)
pub(crate) fn duration(text: &str) -> Result<Duration, String> {
    if text.trim_start().starts_with('-') {
        return Err("negative durations are not allowed (expected e.g. 500ms, 30s, 5m)".into());
    }
    humantime::parse_duration(text).map_err(|e| format!("{e} (expected e.g. 500ms, 30s, 5m)"))
}

/// [`duration`], and more than zero: for leases, intervals and timeouts, where zero
/// would make no sense.
pub(crate) fn positive_duration(text: &str) -> Result<Duration, String> {
    match duration(text)? {
        zero if zero.is_zero() => Err("must be more than zero (e.g. 500ms, 30s, 5m)".into()),
        positive => Ok(positive),
    }
}

/// Parses a listen address: `IP:PORT` (`[::1]:PORT` for IPv6), or `localhost:PORT` for
/// 127.0.0.1.
#[cfg(any(feature = "dashboard", feature = "stream"))]
pub(crate) fn listen_addr(text: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    if let Some(Ok(port)) = text.strip_prefix("localhost:").map(str::parse::<u16>) {
        return Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    }
    Err(
        "expected IP:PORT or localhost:PORT, e.g. 127.0.0.1:8080 (0.0.0.0:8080: every \
         interface)"
            .into(),
    )
}

impl Cli {
    /// Parses the command line; on a usage error prints it and exits with status 2, as
    /// clap does, for the rules clap cannot state with a message that names the fix.
    pub(crate) fn parse_checked() -> Self {
        let cli = Self::parse();
        let missing = |path: &[&str], message: &str| {
            usage_error(path, ErrorKind::MissingRequiredArgument, message).exit()
        };
        match &cli.command {
            Command::Work(args) if args.exec.is_none() && args.http.is_none() => missing(
                &["work"],
                "give --exec CMD or --http URL: what runs each message",
            ),
            Command::Queue(QueueCommand::Alter(args)) if args.is_empty() => missing(
                &["queue", "alter"],
                "give at least one option to change (see pgbus queue alter --help)",
            ),
            Command::Dlq(DlqCommand::Retry(which)) if which.is_empty() => {
                missing(&["dlq", "retry"], "give message ids or --all")
            }
            Command::Dlq(DlqCommand::Discard(which)) if which.is_empty() => {
                missing(&["dlq", "discard"], "give message ids or --all")
            }
            _ => cli,
        }
    }

    /// Installs the tracing subscriber: the only place pgbus installs one.
    pub(crate) fn install_logging(&self) {
        crate::output::init(self.quiet, matches!(self.log_format, LogFormat::Json));
        let default = match (self.quiet, self.verbose) {
            (true, _) => "error",
            (false, 0) => "warn,pgbus=info",
            (false, 1) => "info,pgbus=debug",
            (false, _) => "debug,pgbus=trace",
        };
        let filter = tracing_subscriber::EnvFilter::try_from_env("PGBUS_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
        let builder = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(crate::output::colour());
        let _ = match self.log_format {
            LogFormat::Text => builder.try_init(),
            LogFormat::Json => builder.json().try_init(),
        };
    }

    pub(crate) async fn run(self) -> anyhow::Result<ExitCode> {
        if let Command::Db(db) = &self.command {
            return crate::database::db_command(db).await;
        }
        // A worker process keeps to the connection budget `work --help` states.
        let pool_size = match &self.command {
            Command::Work(_) => crate::work::POOL_CONNECTIONS,
            _ => crate::database::POOL_SIZE,
        };
        let database = Database::resolve(
            self.database_url.as_deref(),
            self.pooler.into(),
            self.listen_url.as_deref(),
            pool_size,
        )
        .await?;
        match self.command {
            Command::Migrate { check, grant } => {
                crate::admin::migrate(&database, check, &grant).await
            }
            Command::Queue(command) => crate::admin::queue(&database, command).await,
            Command::Send(args) => crate::send::send(&database, args).await,
            Command::Work(args) => crate::work::work(&database, args).await,
            Command::Topic(command) => crate::topics::topic(&database, command).await,
            Command::Publish(args) => crate::topics::publish(&database, args).await,
            Command::Relay(args) => crate::relay::relay(&database, args).await,
            Command::Dlq(command) => crate::admin::dlq(&database, command).await,
            Command::Stats { json } => crate::admin::stats(&database, json).await,
            Command::Demo(args) => crate::demo::demo(&database, args).await,
            #[cfg(feature = "stream")]
            Command::Stream(command) => crate::stream::stream(&database, command).await,
            #[cfg(any(feature = "dashboard", feature = "stream"))]
            Command::Serve(args) => crate::serve::serve(&database, args).await,
            Command::Cron(command) => crate::cron::cron(&database, command).await,
            Command::Db(_) => unreachable!("handled above"),
        }
    }
}
