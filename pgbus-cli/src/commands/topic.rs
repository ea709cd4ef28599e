//! `pgbus topic bind|unbind|list`, `pgbus publish`, and the topics part of `pgbus stats`.

use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::{Args, Subcommand};
use pgbus_core::{NewEvent, Published, QueueName, StartAt, TopicPattern, TopicStats, Topics};
use pgbus_pg::PgBackend;
use serde_json::{json, Value};

use crate::cli::duration;
use crate::database::Database;
use crate::output::{Align, Table};
use crate::send::stdin_batches;

#[derive(Debug, Subcommand)]
pub(crate) enum TopicCommand {
    /// Bind a routing-key pattern to a queue (nothing changes if the binding exists).
    /// `*` matches one dot-separated segment, `#` any number.
    Bind {
        /// The pattern, e.g. `order.*` or `order.#`.
        pattern: String,
        /// The queue receiving a copy of every matching event.
        queue: String,
        /// Also deliver the matching events of the event log published this long ago or
        /// later (e.g. 1h).
        #[arg(long, value_parser = duration, conflicts_with = "earliest", allow_hyphen_values = true)]
        since: Option<Duration>,
        /// Also deliver every matching event still in the event log.
        #[arg(long)]
        earliest: bool,
    },
    /// Remove a binding.
    Unbind {
        /// The pattern, as it was bound.
        pattern: String,
        /// The queue it was bound to.
        queue: String,
    },
    /// List bindings.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args)]
pub(crate) struct PublishArgs {
    /// Routing key: dot-separated segments of [A-Za-z0-9_-], e.g. `order.paid`.
    pub(crate) routing_key: String,
    /// The event payload as JSON; without it, one JSON document per line is read from
    /// stdin.
    pub(crate) json: Option<String>,
    /// Events per statement when reading stdin.
    #[arg(long, default_value_t = 1000)]
    pub(crate) batch: usize,
}

pub(crate) async fn topic(db: &Database, command: TopicCommand) -> anyhow::Result<ExitCode> {
    match command {
        TopicCommand::Bind {
            pattern,
            queue,
            since,
            earliest,
        } => {
            let (pattern, queue) = (TopicPattern::new(pattern)?, QueueName::new(queue)?);
            let start = match (since, earliest) {
                (_, true) => StartAt::Earliest,
                (Some(ago), false) => StartAt::Since(SystemTime::now() - ago),
                (None, false) => StartAt::Now,
            };
            let bound = db.ready().await?.bind(&pattern, &queue, start).await?;
            match (bound.created, bound.replayed) {
                (false, _) => println!("{pattern} is already bound to {queue}"),
                (true, 0) => println!("bound {pattern} to {queue}"),
                (true, n) => {
                    println!("bound {pattern} to {queue}; {n} events replayed from the log")
                }
            }
        }
        TopicCommand::Unbind { pattern, queue } => {
            let (pattern, queue) = (TopicPattern::new(pattern)?, QueueName::new(queue)?);
            if !db.ready().await?.unbind(&pattern, &queue).await? {
                anyhow::bail!("{pattern} is not bound to {queue}");
            }
            println!("unbound {pattern} from {queue}");
        }
        TopicCommand::List { json } => {
            let bindings = db.ready().await?.bindings().await?;
            if json {
                let list: Vec<Value> = bindings
                    .iter()
                    .map(|b| json!({ "pattern": b.pattern.as_str(), "queue": b.queue.as_str() }))
                    .collect();
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                let mut table = Table::new(&[("PATTERN", Align::Left), ("QUEUE", Align::Left)]);
                for b in &bindings {
                    table.row(vec![b.pattern.to_string(), b.queue.to_string()]);
                }
                table.print();
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One event from its JSON text, checked against the limits the backend enforces (the
/// default payload limit) so that a refusal can name its line.
fn event(routing_key: &str, json: &str) -> anyhow::Result<NewEvent> {
    let value: Value = serde_json::from_str(json).context("not valid JSON")?;
    let event = NewEvent::json(routing_key, &value)?;
    event.check(pgbus_core::DEFAULT_MAX_PAYLOAD_BYTES)?;
    Ok(event)
}

/// Prints `EVENT_ID COPIES` per event, and warns about events that matched no binding.
fn report(published: &[Published], routing_key: &str) {
    for p in published {
        println!("{} {}", p.id, p.copies);
    }
    let unrouted = published.iter().filter(|p| p.copies == 0).count();
    if unrouted > 0 {
        crate::output::warn(format_args!(
            "{unrouted} event(s) with routing key {routing_key} matched no binding: delivered nowhere (kept in the event log)"
        ));
    }
}

pub(crate) async fn publish(db: &Database, args: PublishArgs) -> anyhow::Result<ExitCode> {
    // The key is checked before the database is touched.
    pgbus_core::RoutingKey::new(args.routing_key.clone())?;
    let backend = db.ready().await?;
    if let Some(json) = &args.json {
        let event = event(&args.routing_key, json).context("the event is refused")?;
        let published = backend.publish(event).await?;
        report(&[published], &args.routing_key);
        return Ok(ExitCode::SUCCESS);
    }
    let key = args.routing_key.as_str();
    stdin_batches(
        args.batch,
        "events",
        |line| event(key, line),
        async |batch, progress| {
            let published = backend.publish_batch(batch).await?;
            progress.suspend(|| report(&published, key));
            Ok(())
        },
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}

/// Per routing key counts over the event log, for `stats --json` and the dashboard.
pub(crate) fn topics_json(topics: &[TopicStats]) -> Value {
    topics
        .iter()
        .map(|t| {
            json!({
                "routing_key": t.routing_key.as_str(),
                "published": t.published,
                "unrouted": t.unrouted,
                "copies": t.copies,
                "last_published_at": crate::admin::rfc3339(t.last_published_at),
            })
        })
        .collect()
}

/// The topics table of `stats`.
pub(crate) async fn print_stats(backend: &PgBackend) -> anyhow::Result<()> {
    let topics: Vec<TopicStats> = backend.topic_stats().await?;
    if topics.is_empty() {
        return Ok(());
    }
    println!();
    let mut table = Table::new(&[
        ("TOPIC", Align::Left),
        ("PUBLISHED", Align::Right),
        ("COPIES", Align::Right),
        ("UNROUTED", Align::Right),
    ]);
    for t in &topics {
        table.row(vec![
            t.routing_key.to_string(),
            t.published.to_string(),
            t.copies.to_string(),
            t.unrouted.to_string(),
        ]);
    }
    table.print();
    Ok(())
}
