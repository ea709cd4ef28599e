//! `pgbus topic bind|unbind|list`: routing-key patterns bound to queues.

use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::Subcommand;
use pgbus_core::{QueueName, StartAt, TopicPattern, Topics};
use serde_json::{json, Value};

use crate::support::database::Database;
use crate::support::output::{Align, Table};
use crate::support::time::duration;

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

/// `pgbus topic ...`.
pub(crate) async fn run(command: TopicCommand, db: &Database) -> anyhow::Result<ExitCode> {
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
