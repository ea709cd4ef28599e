//! The top-level command line: the global options and the `Command` enum, whose variants
//! wrap each command's own arguments (in `crate::commands`), and the dispatch to each
//! command's `run`.

use std::process::ExitCode;

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser, Subcommand, ValueEnum};

use crate::commands::{
    cron, db, demo, dlq, job, migrate, publish, queue, relay, send, stats, topic, uninstall, work,
};
use crate::support::database::{self, Database};
use crate::support::output;

/// What must live until the end of `main`: with `--otlp-endpoint`, the exporter, flushed
/// when this is dropped.
pub(crate) struct Telemetry {
    #[cfg(feature = "otel")]
    _exporter: Option<crate::support::telemetry::Telemetry>,
}

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

    /// Export traces (sends and jobs, one trace from `send` to the job that runs it) to
    /// this OTLP collector over HTTP/protobuf: its base URL, such as
    /// http://localhost:4318 (spans go to /v1/traces).
    #[cfg(feature = "otel")]
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", global = true, help_heading = GLOBAL)]
    pub(crate) otlp_endpoint: Option<String>,

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
    Migrate(migrate::MigrateArgs),
    /// Drop the pgbus schema and everything in it (refused while live workers are
    /// registered, unless --force); `pgbus migrate` installs it again.
    Uninstall(uninstall::UninstallArgs),
    /// Create, list and manage queues.
    #[command(subcommand)]
    Queue(queue::QueueCommand),
    /// Send messages: one JSON document as an argument, or one per line on standard input.
    Send(send::SendArgs),
    /// Run workers that hand each message to a command or an HTTP endpoint.
    // Boxed: its options make it by far the largest variant.
    Work(Box<work::WorkArgs>),
    /// Bind routing-key patterns to queues, and list bindings.
    #[command(subcommand)]
    Topic(topic::TopicCommand),
    /// Publish events: one JSON document as an argument, or one per line on standard
    /// input; every queue bound to a matching pattern gets a copy.
    Publish(publish::PublishArgs),
    /// Relay the transactional outbox: publish the rows producers wrote to `pgbus.outbox`
    /// (here or in another database, --outbox-url) until SIGTERM or Ctrl-C.
    Relay(relay::RelayArgs),
    /// Inspect and recover dead-lettered messages.
    #[command(subcommand)]
    Dlq(dlq::DlqCommand),
    /// Find any job (ready, scheduled, in flight, dead-lettered, archived), see its whole
    /// story, and act on it: what `pgbus serve`'s job pages and `/api/jobs` show and do.
    #[command(subcommand)]
    Job(job::JobCommand),
    /// Queue statistics and worker processes.
    Stats(stats::StatsArgs),
    /// Publish to SSE streams, and print their signed URLs.
    #[cfg(feature = "stream")]
    #[command(subcommand)]
    Stream(crate::commands::stream::StreamCommand),
    /// Serve the dashboard, the JSON API, SSE streams, Prometheus metrics and health
    /// checks over HTTP.
    #[cfg(feature = "serve")]
    Serve(crate::commands::serve::ServeArgs),
    /// The embedded database.
    #[command(subcommand)]
    Db(db::DbCommand),
    /// Recurring tasks declared by schedulers.
    #[command(subcommand)]
    Cron(cron::CronCommand),
    /// A demo: a queue with a steady trickle of jobs (some failing, some grouped),
    /// workers and the dashboard, on the embedded database unless a URL is given. Ctrl-C
    /// stops it.
    Demo(demo::DemoArgs),
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

impl Cli {
    /// Parses the command line; on a usage error prints it and exits with status 2, as
    /// clap does, for the rules clap cannot state with a message that names the fix.
    pub(crate) fn parse_checked() -> Self {
        let cli = Self::parse();
        let missing = match &cli.command {
            Command::Work(args) => args.missing_argument(),
            Command::Queue(command) => command.missing_argument(),
            Command::Dlq(command) => command.missing_argument(),
            Command::Uninstall(args) => args.missing_argument(),
            _ => None,
        };
        if let Some((path, message)) = missing {
            usage_error(path, ErrorKind::MissingRequiredArgument, message).exit();
        }
        cli
    }

    /// Installs the tracing subscriber: the only place pgbus installs one.
    /// Installs the tracing subscriber: logs on standard error and, with
    /// `--otlp-endpoint`, the OTLP exporter; keep the guard until the end of `main`, whose
    /// drop flushes the exporter.
    pub(crate) fn install_logging(&self) -> anyhow::Result<Telemetry> {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        use tracing_subscriber::Layer;

        output::init(self.quiet, matches!(self.log_format, LogFormat::Json));
        let default = match (self.quiet, self.verbose) {
            (true, _) => "error",
            (false, 0) => "warn,pgbus=info",
            (false, 1) => "info,pgbus=debug",
            (false, _) => "debug,pgbus=trace",
        };
        let filter = tracing_subscriber::EnvFilter::try_from_env("PGBUS_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
        let fmt = tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(output::colour());
        let fmt = match self.log_format {
            LogFormat::Text => fmt.boxed(),
            LogFormat::Json => fmt.json().boxed(),
        };
        let registry = tracing_subscriber::registry().with(fmt.with_filter(filter));
        #[cfg(feature = "otel")]
        let (registry, telemetry) = {
            let (otlp, telemetry) = match &self.otlp_endpoint {
                Some(endpoint) => {
                    let (layer, guard) = crate::support::telemetry::otlp_layer(endpoint)?;
                    (Some(layer), Some(guard))
                }
                None => (None, None),
            };
            (
                registry.with(otlp),
                Telemetry {
                    _exporter: telemetry,
                },
            )
        };
        #[cfg(not(feature = "otel"))]
        let telemetry = Telemetry {};
        let _ = registry.try_init();
        Ok(telemetry)
    }

    /// Runs the command: connects (every command but `db`) and calls its `run`.
    pub(crate) async fn run(self) -> anyhow::Result<ExitCode> {
        if let Command::Db(command) = &self.command {
            return db::run(command).await;
        }
        // A worker process keeps to the connection budget `work --help` states.
        let pool_size = match &self.command {
            Command::Work(_) => work::POOL_CONNECTIONS,
            _ => database::POOL_SIZE,
        };
        let database = Database::resolve(
            self.database_url.as_deref(),
            self.pooler.into(),
            self.listen_url.as_deref(),
            pool_size,
        )
        .await?;
        let db = &database;
        match self.command {
            Command::Migrate(args) => migrate::run(args, db).await,
            Command::Uninstall(args) => uninstall::run(args, db).await,
            Command::Queue(command) => queue::run(command, db).await,
            Command::Send(args) => send::run(args, db).await,
            Command::Work(args) => work::run(*args, db).await,
            Command::Topic(command) => topic::run(command, db).await,
            Command::Publish(args) => publish::run(args, db).await,
            Command::Relay(args) => relay::run(args, db).await,
            Command::Dlq(command) => dlq::run(command, db).await,
            Command::Job(command) => job::run(command, db).await,
            Command::Stats(args) => stats::run(args, db).await,
            Command::Demo(args) => demo::run(args, db).await,
            #[cfg(feature = "stream")]
            Command::Stream(command) => crate::commands::stream::run(command, db).await,
            #[cfg(feature = "serve")]
            Command::Serve(args) => crate::commands::serve::run(args, db).await,
            Command::Cron(command) => cron::run(command, db).await,
            Command::Db(_) => unreachable!("handled above"),
        }
    }
}
