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
    let sent = stdin_batches(
        args.batch,
        "messages",
        |line| message(&args, line),
        async |batch, progress| {
            let ids = backend.send_batch(&queue, batch).await?;
            progress.suspend(|| print_ids(&ids, quiet));
            Ok(())
        },
    )
    .await?;
    if quiet {
        println!("{sent}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Reads one JSON document per line of standard input, parses every line of a batch
/// before handing the batch to `flush` (so a bad line sends nothing of its batch), and
/// shows the count on a spinner (drawn only when standard error is a terminal). Returns
/// how many items were flushed.
pub(crate) async fn stdin_batches<T>(
    batch_size: usize,
    noun: &str,
    parse: impl Fn(&str) -> anyhow::Result<T>,
    mut flush: impl AsyncFnMut(Vec<T>, &ProgressBar) -> anyhow::Result<()>,
) -> anyhow::Result<u64> {
    if batch_size == 0 {
        anyhow::bail!("--batch must be at least 1");
    }
    let progress = ProgressBar::new_spinner();
    progress.set_style(ProgressStyle::with_template(&format!(
        "{{spinner}} sent {{pos}} {noun} ({{per_sec}})"
    ))?);
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    let mut batch = Vec::with_capacity(batch_size);
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
            let item = parse(&line).with_context(|| {
                format!("line {line_no} is not valid JSON; {sent} {noun} sent before it, none of its batch")
            })?;
            batch.push(item);
        }
        if batch.len() >= batch_size || (done && !batch.is_empty()) {
            let n = batch.len() as u64;
            flush(std::mem::take(&mut batch), &progress).await?;
            sent += n;
            progress.inc(n);
        }
        if done {
            break;
        }
    }
    progress.finish_and_clear();
    Ok(sent)
}
