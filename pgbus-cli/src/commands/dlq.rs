//! `pgbus dlq list|retry|discard`: inspect and recover dead-lettered messages.

use std::process::ExitCode;

use clap::{Args, Subcommand};
use pgbus_core::{DeadLetters, MessageId, QueueName, Selection};

use crate::support::audit;
use crate::support::database::Database;
use crate::support::json::dead_json;
use crate::support::output::{Align, Table};
use crate::support::time::rfc3339;

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

impl DlqCommand {
    /// What clap cannot say: `retry` and `discard` need ids or `--all`. The subcommand
    /// path and the message for the usage error.
    pub(crate) fn missing_argument(&self) -> Option<(&'static [&'static str], &'static str)> {
        match self {
            DlqCommand::Retry(which) if which.is_empty() => {
                Some((&["dlq", "retry"], "give message ids or --all"))
            }
            DlqCommand::Discard(which) if which.is_empty() => {
                Some((&["dlq", "discard"], "give message ids or --all"))
            }
            _ => None,
        }
    }
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

/// `pgbus dlq ...`.
pub(crate) async fn run(command: DlqCommand, db: &Database) -> anyhow::Result<ExitCode> {
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
            let action = if retry { "retry" } else { "discard" };
            let detail = audit::dead_selection(&ids, selection.all);
            audit::record(backend, &audit::cli_actor(), action, &queue, n, detail).await?;
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
