//! `pgbus queue create|alter|list|pause|resume|purge|drop`.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use pgbus_core::{CircuitBreaker, Error, QueueAdmin, QueueName, QueueOptions, RetryPolicy};
use pgbus_pg::PgBackend;
use serde_json::json;

use crate::support::audit;
use crate::support::database::Database;
use crate::support::output::{Align, Table};
use crate::support::time::{millis, positive_duration};

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

impl QueueCommand {
    /// What clap cannot say: `alter` needs at least one option. The subcommand path and
    /// the message for the usage error.
    pub(crate) fn missing_argument(&self) -> Option<(&'static [&'static str], &'static str)> {
        match self {
            QueueCommand::Alter(args) if args.is_empty() => Some((
                &["queue", "alter"],
                "give at least one option to change (see pgbus queue alter --help)",
            )),
            _ => None,
        }
    }
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

/// `pgbus queue ...`.
pub(crate) async fn run(command: QueueCommand, db: &Database) -> anyhow::Result<ExitCode> {
    let backend = db.ready().await?;
    let say = |text: String| println!("{text}");
    match command {
        QueueCommand::Create(args) => create_queue(backend, args, say).await?,
        QueueCommand::Alter(args) => {
            let name = QueueName::new(args.name.clone())?;
            let options = altered(&name, backend.queue_info(&name).await?.options, &args)?;
            backend.alter_queue(&name, &options).await?;
            say(format!("altered queue {name}"));
        }
        QueueCommand::List { json } => {
            let queues = backend.list_queues().await?;
            if json {
                let list: Vec<_> = queues
                    .iter()
                    .map(|q| {
                        json!({
                            "name": q.name.as_str(),
                            "paused": q.paused,
                            "max_attempts": q.options.retry.max_attempts(),
                            "lease_ms": millis(q.options.lease),
                            "keep_history": q.options.keep_history,
                            "breaker": q.options.circuit_breaker.map(|b| json!({
                                "failures": b.failures,
                                "backoff_ms": millis(b.backoff),
                            })),
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                let mut table = Table::new(&[
                    ("QUEUE", Align::Left),
                    ("PAUSED", Align::Left),
                    ("MAX_ATTEMPTS", Align::Right),
                    ("LEASE", Align::Right),
                    ("HISTORY", Align::Left),
                ]);
                for q in queues {
                    table.row(vec![
                        q.name.to_string(),
                        q.paused.to_string(),
                        q.options.retry.max_attempts().to_string(),
                        humantime::format_duration(q.options.lease).to_string(),
                        q.options.keep_history.to_string(),
                    ]);
                }
                table.print();
            }
        }
        QueueCommand::Pause { name } => pause(backend, &name, true).await?,
        QueueCommand::Resume { name } => pause(backend, &name, false).await?,
        QueueCommand::Purge { name } => {
            let purged = backend.purge_queue(&QueueName::new(name.clone())?).await?;
            say(format!("purged {purged} messages from queue {name}"));
        }
        QueueCommand::Drop { name } => {
            let name = QueueName::new(name)?;
            if !backend.drop_queue(&name).await? {
                return Err(Error::QueueNotFound(name).into());
            }
            say(format!("dropped queue {name}"));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `queue create`: creates the queue, or, when it exists, checks that the options given
/// are its own.
async fn create_queue(
    backend: &PgBackend,
    args: CreateArgs,
    say: impl Fn(String),
) -> anyhow::Result<()> {
    let name = QueueName::new(args.name)?;
    // The library's defaults (5 attempts, a 30 s lease) for the options not given.
    let mut options = QueueOptions::default().keep_history(args.keep_history);
    if let Some(max_attempts) = args.max_attempts {
        options = options.retry(RetryPolicy::builder().max_attempts(max_attempts).build()?);
    }
    if let Some(lease) = args.lease {
        options = options.lease(lease);
    }
    let breaker = match (args.breaker_failures, args.breaker_backoff) {
        (Some(failures), Some(backoff)) => Some(CircuitBreaker::new(failures, backoff)?),
        _ => None,
    };
    if let Some(breaker) = breaker {
        options = options.circuit_breaker(breaker);
    }
    if backend.create_queue(&name, &options).await? {
        say(format!("created queue {name}"));
        return Ok(());
    }
    // It exists: only the options given on this command line are compared.
    let existing = backend.queue_info(&name).await?.options;
    let mut differs = Vec::new();
    if let Some(asked) = args.max_attempts {
        let has = existing.retry.max_attempts();
        if has != asked {
            differs.push(format!("--max-attempts {has} (not {asked})"));
        }
    }
    if let Some(asked) = args.lease {
        if existing.lease != asked {
            differs.push(format!(
                "--lease {} (not {})",
                humantime::format_duration(existing.lease),
                humantime::format_duration(asked)
            ));
        }
    }
    if args.keep_history && !existing.keep_history {
        differs.push("--keep-history false (not true)".into());
    }
    if breaker.is_some() && existing.circuit_breaker != breaker {
        differs.push(format!(
            "{} (not {})",
            breaker_text(existing.circuit_breaker),
            breaker_text(breaker)
        ));
    }
    if !differs.is_empty() {
        anyhow::bail!(
            "queue {name} already exists with other options: {}; change them with \
             `pgbus queue alter {name} ...`",
            differs.join(", ")
        );
    }
    say(format!("queue {name} already exists (unchanged)"));
    Ok(())
}

fn breaker_text(breaker: Option<CircuitBreaker>) -> String {
    match breaker {
        Some(b) => format!(
            "--breaker-failures {} --breaker-backoff {}",
            b.failures,
            humantime::format_duration(b.backoff)
        ),
        None => "no circuit breaker".into(),
    }
}

/// `options` with the changes `queue alter` asks for.
fn altered(
    name: &QueueName,
    mut options: QueueOptions,
    args: &AlterArgs,
) -> anyhow::Result<QueueOptions> {
    if let Some(max_attempts) = args.max_attempts {
        let r = &options.retry;
        options.retry = RetryPolicy::builder()
            .base(r.base())
            .cap(r.cap())
            .jitter(r.jitter())
            .max_attempts(max_attempts)
            .build()?;
    }
    if let Some(lease) = args.lease {
        options.lease = lease;
    }
    if args.keep_history || args.no_keep_history {
        options.keep_history = args.keep_history;
    }
    options.circuit_breaker = match (
        args.no_breaker,
        args.breaker_failures,
        args.breaker_backoff,
        options.circuit_breaker,
    ) {
        (true, ..) => None,
        (false, None, None, current) => current,
        (false, failures, backoff, Some(current)) => Some(CircuitBreaker::new(
            failures.unwrap_or(current.failures),
            backoff.unwrap_or(current.backoff),
        )?),
        (false, Some(failures), Some(backoff), None) => {
            Some(CircuitBreaker::new(failures, backoff)?)
        }
        (false, ..) => anyhow::bail!(
            "queue {name} has no circuit breaker: give both --breaker-failures and \
             --breaker-backoff"
        ),
    };
    Ok(options)
}

/// `queue pause` / `queue resume`, written to the audit log as the console's are.
async fn pause(backend: &PgBackend, name: &str, paused: bool) -> anyhow::Result<()> {
    let queue = QueueName::new(name.to_owned())?;
    backend.set_paused(&queue, paused).await?;
    let action = if paused { "pause" } else { "resume" };
    audit::record(backend, &audit::cli_actor(), action, &queue, 0, json!({})).await?;
    println!("{action}d queue {name}");
    Ok(())
}
