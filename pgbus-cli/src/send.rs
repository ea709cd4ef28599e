//! `pgbus send`: one JSON document, or one per line of standard input in bulk batches.

use std::process::ExitCode;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use pgbus_core::{MessageId, NewMessage, Producer, QueueName};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::cli::SendArgs;
use crate::database::Database;

fn message(args: &SendArgs, json: &str) -> anyhow::Result<NewMessage> {
    let value: serde_json::Value = serde_json::from_str(json)?;
    let mut message = NewMessage::json(&value)?.priority(args.priority);
    if let Some(delay) = args.delay {
        message = message.delay(delay);
    }
    if let Some(group) = &args.group {
        message = message.group(group.clone());
    }
    Ok(message)
}

fn print_ids(ids: &[MessageId], quiet: bool) {
    if !quiet {
        for id in ids {
            println!("{id}");
        }
    }
}

pub(crate) async fn send(db: &Database, args: SendArgs, quiet: bool) -> anyhow::Result<ExitCode> {
    let queue = QueueName::new(args.queue.clone())?;
    let backend = db.ready().await?;
    if let Some(json) = &args.json {
        let message = message(&args, json).context("the message is not valid JSON")?;
        let id = backend.send(&queue, message).await?;
        print_ids(&[id], quiet);
        if quiet {
            println!("1");
        }
        return Ok(ExitCode::SUCCESS);
    }
    if args.batch == 0 {
        anyhow::bail!("--batch must be at least 1");
    }

    // A spinner with the count, drawn only when standard error is a terminal.
    let progress = ProgressBar::new_spinner();
    progress.set_style(ProgressStyle::with_template(
        "{spinner} sent {pos} messages ({per_sec})",
    )?);
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut batch = Vec::with_capacity(args.batch);
    let mut line_no = 0u64;
    let mut sent = 0u64;
    loop {
        let line = lines.next_line().await.context("reading standard input")?;
        let done = line.is_none();
        if let Some(line) = line {
            line_no += 1;
            if line.trim().is_empty() {
                continue;
            }
            // Every line of a batch is checked before any of it is sent.
            let message = message(&args, &line).with_context(|| {
                format!("line {line_no} is not valid JSON; {sent} messages sent before it, none of its batch")
            })?;
            batch.push(message);
        }
        if batch.len() >= args.batch || (done && !batch.is_empty()) {
            let ids = backend
                .send_batch(&queue, std::mem::take(&mut batch))
                .await?;
            sent += ids.len() as u64;
            progress.inc(ids.len() as u64);
            progress.suspend(|| print_ids(&ids, quiet));
        }
        if done {
            break;
        }
    }
    progress.finish_and_clear();
    if quiet {
        println!("{sent}");
    }
    Ok(ExitCode::SUCCESS)
}
