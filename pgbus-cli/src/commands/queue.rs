//! `migrate`, `queue`, `dlq` and `stats`.

use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use pgbus_core::{
    CircuitBreaker, DeadLetters, DeadMessage, Error, MessageId, ProcessRecord, ProcessRegistry,
    QueueAdmin, QueueName, QueueOptions, QueueStats, RetryPolicy, Selection, Stats, Topics,
};
use pgbus_pg::PgBackend;
use serde_json::{json, Value};

use crate::cli::{AlterArgs, CreateArgs, DlqCommand, QueueCommand};
use crate::database::Database;
use crate::output::{Align, Table};

pub(crate) async fn migrate(
    db: &Database,
    check: bool,
    grant: &[String],
) -> anyhow::Result<ExitCode> {
    if check {
        return Ok(match db.backend.check_schema().await {
            Ok(()) => {
                println!("schema is current (version {})", pgbus_pg::SCHEMA_VERSION);
                ExitCode::SUCCESS
            }
            Err(err @ Error::SchemaMismatch { .. }) => {
                crate::output::error(err);
                ExitCode::FAILURE
            }
            Err(err) => return Err(err.into()),
        });
    }
    let roles: Vec<&str> = grant.iter().map(String::as_str).collect();
    let applied = db.backend.migrate_and_grant(&roles).await?;
    match applied.as_slice() {
        [] => println!("schema is current (version {})", pgbus_pg::SCHEMA_VERSION),
        versions => println!("applied migrations {versions:?}"),
    }
    for role in &roles {
        println!("granted {role} what pgbus needs at run time");
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

pub(crate) async fn queue(db: &Database, command: QueueCommand) -> anyhow::Result<ExitCode> {
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
        QueueCommand::Pause { name } => {
            backend
                .set_paused(&QueueName::new(name.clone())?, true)
                .await?;
            say(format!("paused queue {name}"));
        }
        QueueCommand::Resume { name } => {
            backend
                .set_paused(&QueueName::new(name.clone())?, false)
                .await?;
            say(format!("resumed queue {name}"));
        }
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

pub(crate) fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Dead-lettered messages as `dlq list --json` and the dashboard API show them. A payload
/// that does not decode in its codec is shown as text, never dropped.
pub(crate) fn dead_json(dead: &[DeadMessage]) -> Value {
    dead.iter()
        .map(|d| {
            let payload = d
                .content_type
                .decode::<Value>(&d.payload)
                .unwrap_or_else(|_| String::from_utf8_lossy(&d.payload).into_owned().into());
            json!({
                "id": d.id.0,
                "attempts": d.attempts,
                "failed_at": rfc3339(d.failed_at),
                "enqueued_at": rfc3339(d.enqueued_at),
                "error": d.error,
                "group": d.group_key,
                "payload": payload,
            })
        })
        .collect()
}

pub(crate) async fn dlq(db: &Database, command: DlqCommand) -> anyhow::Result<ExitCode> {
    let backend = db.ready().await?;
    let retry = matches!(command, DlqCommand::Retry(_));
    match command {
        DlqCommand::List { queue, json, limit } => {
            let dead = backend.list_dead(&QueueName::new(queue)?, limit).await?;
            if json {
                let list = dead_json(&dead);
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                let mut table = Table::new(&[
                    ("ID", Align::Right),
                    ("ATTEMPTS", Align::Right),
                    ("FAILED_AT", Align::Left),
                    ("ERROR", Align::Left),
                ]);
                for d in dead {
                    table.row(vec![
                        d.id.0.to_string(),
                        d.attempts.to_string(),
                        rfc3339(d.failed_at),
                        d.error,
                    ]);
                }
                table.print();
            }
        }
        DlqCommand::Retry(selection) | DlqCommand::Discard(selection) => {
            let queue = QueueName::new(selection.queue.clone())?;
            let verb = if retry { "retried" } else { "discarded" };
            let mut ids: Vec<MessageId> = Vec::new();
            for id in selection.ids.iter().copied().map(MessageId) {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
            // Ids that are not dead letters of the queue (a typo, another queue's, retried
            // already) fail the command before anything of it is done.
            if !selection.all {
                let found = backend.dead_letter_ids(&queue, &ids).await?;
                let missing: Vec<String> = ids
                    .iter()
                    .filter(|id| !found.contains(id))
                    .map(ToString::to_string)
                    .collect();
                if !missing.is_empty() {
                    anyhow::bail!(
                        "not dead-lettered in queue {queue}: {} (nothing {verb})",
                        missing.join(", ")
                    );
                }
            }
            let which = if selection.all {
                Selection::All
            } else {
                Selection::Ids(&ids)
            };
            let n = if retry {
                backend.retry_dead(&queue, which).await?
            } else {
                backend.discard_dead(&queue, which).await?
            };
            println!("{verb} {n} dead-lettered messages of queue {queue}");
            if !selection.all && n < ids.len() as u64 {
                anyhow::bail!(
                    "{verb} {n} of {} messages: the others left the dead-letter queue \
                     meanwhile",
                    ids.len()
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Queue statistics as `stats --json` and the dashboard API show them.
pub(crate) fn queues_json(queues: &[QueueStats]) -> Value {
    queues
        .iter()
        .map(|s| {
            json!({
                "queue": s.queue.as_str(),
                "paused": s.paused,
                "depth": s.depth(),
                "ready": s.ready,
                "in_flight": s.in_flight,
                "scheduled": s.scheduled,
                "dead_lettered": s.dead_lettered,
                "oldest_ready_age_ms": s.oldest_ready_age.map(millis),
                "breaker_open_for_ms": s.breaker_open_for.map(millis),
                "processed_per_minute": s.processed_per_minute,
                "failed_per_minute": s.failed_per_minute,
            })
        })
        .collect()
}

/// Worker processes as `stats --json` and the dashboard API show them.
pub(crate) fn processes_json(processes: &[ProcessRecord], now: SystemTime) -> Value {
    processes
        .iter()
        .map(|p| {
            json!({
                "id": p.id.0,
                "hostname": p.info.hostname,
                "pid": p.info.pid,
                "queues": p.info.queues.iter().map(QueueName::as_str).collect::<Vec<_>>(),
                "mode": p.info.mode,
                "capacity": p.info.capacity,
                "busy": p.busy,
                "started_at": rfc3339(p.started_at),
                "heartbeat_age_ms": millis(now.duration_since(p.heartbeat_at).unwrap_or_default()),
            })
        })
        .collect()
}

pub(crate) async fn stats(db: &Database, json: bool) -> anyhow::Result<ExitCode> {
    let backend = db.ready().await?;
    let stats = backend.stats().await?;
    let processes = backend.processes().await?;
    let batches = backend.open_batches().await?;
    let now = SystemTime::now();
    let age = |t: SystemTime| now.duration_since(t).unwrap_or_default();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "queues": queues_json(&stats),
                "processes": processes_json(&processes, now),
                "batches": crate::batches::batches_json(&batches),
                "topics": crate::topics::topics_json(&backend.topic_stats().await?),
            }))?
        );
    } else {
        let mut table = Table::new(&[
            ("QUEUE", Align::Left),
            ("DEPTH", Align::Right),
            ("READY", Align::Right),
            ("IN_FLIGHT", Align::Right),
            ("SCHEDULED", Align::Right),
            ("DEAD", Align::Right),
            ("OLDEST", Align::Right),
            ("DONE/MIN", Align::Right),
            ("FAILED/MIN", Align::Right),
        ]);
        for s in &stats {
            let oldest = s
                .oldest_ready_age
                .map(|a| humantime::format_duration(Duration::from_secs(a.as_secs())).to_string())
                .unwrap_or_else(|| "-".into());
            let name = match (s.paused, s.breaker_open_for) {
                (true, _) => format!("{} (paused)", s.queue),
                (false, Some(open)) => format!("{} (breaker {}s)", s.queue, open.as_secs() + 1),
                (false, None) => s.queue.to_string(),
            };
            table.row(vec![
                name,
                s.depth().to_string(),
                s.ready.to_string(),
                s.in_flight.to_string(),
                s.scheduled.to_string(),
                s.dead_lettered.to_string(),
                oldest,
                s.processed_per_minute.to_string(),
                s.failed_per_minute.to_string(),
            ]);
        }
        table.print();
        if !processes.is_empty() {
            println!();
            let mut table = Table::new(&[
                ("ID", Align::Right),
                ("HOST", Align::Left),
                ("PID", Align::Right),
                ("MODE", Align::Left),
                ("BUSY", Align::Right),
                ("HEARTBEAT", Align::Right),
                ("QUEUES", Align::Left),
            ]);
            for p in &processes {
                table.row(vec![
                    p.id.0.to_string(),
                    p.info.hostname.clone(),
                    p.info.pid.to_string(),
                    p.info.mode.clone(),
                    format!("{}/{}", p.busy, p.info.capacity),
                    format!("{}s ago", age(p.heartbeat_at).as_secs()),
                    p.info
                        .queues
                        .iter()
                        .map(QueueName::as_str)
                        .collect::<Vec<_>>()
                        .join(","),
                ]);
            }
            table.print();
        }
        crate::batches::print_batches(&batches);
        crate::topics::print_stats(backend).await?;
    }
    Ok(ExitCode::SUCCESS)
}
