//! `pgbus send`: one JSON document, or one per line of standard input in bulk batches.

use std::process::ExitCode;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use pgbus_core::{
    MessageId, NewMessage, Producer, QueueAdmin, QueueName, DEFAULT_MAX_PAYLOAD_BYTES,
};
use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};

use crate::cli::SendArgs;
use crate::database::Database;

/// One message from its JSON text, checked against the limits the backend enforces (the
/// default payload limit, group key, delay) so that a refusal can name its line.
fn message(args: &SendArgs, json: &str) -> anyhow::Result<NewMessage> {
    let value: serde_json::Value = serde_json::from_str(json).context("not valid JSON")?;
    let mut message = NewMessage::json(&value)?.priority(args.priority);
    if let Some(delay) = args.delay {
        message = message.delay(delay);
    }
    if let Some(group) = &args.group {
        message = message.group(group.clone());
    }
    message.check(DEFAULT_MAX_PAYLOAD_BYTES)?;
    Ok(message)
}

/// The longest stdin line read, without its line end: twice the payload limit, room for
/// whitespace that the stored encoding drops. A longer line is refused as soon as this
/// much of it has been read, so memory stays bounded whatever the input.
pub(crate) const MAX_LINE_BYTES: usize = 2 * DEFAULT_MAX_PAYLOAD_BYTES;

fn print_ids(ids: &[MessageId]) {
    for id in ids {
        println!("{id}");
    }
}

pub(crate) async fn send(db: &Database, args: SendArgs) -> anyhow::Result<ExitCode> {
    let queue = QueueName::new(args.queue.clone())?;
    let backend = db.ready().await?;
    if backend.queue_info(&queue).await?.paused {
        crate::output::note(format_args!(
            "queue {queue} is paused: its messages wait until `pgbus queue resume {queue}`"
        ));
    }
    if let Some(json) = &args.json {
        let message = message(&args, json).context("the message is refused")?;
        let id = backend.send(&queue, message).await?;
        print_ids(&[id]);
        return Ok(ExitCode::SUCCESS);
    }
    stdin_batches(
        args.batch,
        "messages",
        |line| message(&args, line),
        async |batch, progress| {
            let ids = backend.send_batch(&queue, batch).await?;
            progress.suspend(|| print_ids(&ids));
            Ok(())
        },
    )
    .await?;
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
    flush: impl AsyncFnMut(Vec<T>, &ProgressBar) -> anyhow::Result<()>,
) -> anyhow::Result<u64> {
    if std::io::IsTerminal::is_terminal(&std::io::stdin()) {
        crate::output::note(format_args!(
            "reading {noun} from standard input, one JSON document per line (Ctrl-D ends)"
        ));
    }
    let input = BufReader::new(tokio::io::stdin());
    read_batches(input, batch_size, noun, parse, flush).await
}

/// [`stdin_batches`] on any input. Blank lines are skipped; a line that is not UTF-8, that
/// is longer than [`MAX_LINE_BYTES`], or that `parse` refuses ends the run with an error
/// naming the line, before anything of its batch is flushed.
pub(crate) async fn read_batches<T>(
    mut input: impl AsyncBufRead + Unpin,
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
    let mut batch = Vec::with_capacity(batch_size);
    let mut raw = Vec::new();
    let mut line_no = 0u64;
    let mut sent = 0u64;
    loop {
        raw.clear();
        let read = read_line(&mut input, &mut raw, MAX_LINE_BYTES)
            .await
            .context("reading standard input")?;
        let done = read == Line::End;
        if !done {
            line_no += 1;
            let refused = || {
                format!("line {line_no} refused ({sent} {noun} sent before it, none of its batch)")
            };
            if read == Line::TooLong {
                return Err(anyhow::anyhow!(
                    "longer than {MAX_LINE_BYTES} bytes (the payload limit is \
                     {DEFAULT_MAX_PAYLOAD_BYTES} bytes)"
                ))
                .with_context(refused);
            }
            let line = std::str::from_utf8(&raw)
                .context("not valid UTF-8")
                .with_context(refused)?;
            if !line.trim().is_empty() {
                let line = line.strip_suffix('\n').unwrap_or(line);
                let line = line.strip_suffix('\r').unwrap_or(line);
                batch.push(parse(line).with_context(refused)?);
            }
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

/// What [`read_line`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// A line (with its `\n`, unless the input ended without one) is in the buffer.
    Read,
    /// The input ended before any byte of a new line.
    End,
    /// The line is longer than the limit; what was read of it is in the buffer, the rest
    /// is left unread.
    TooLong,
}

/// Appends one line of `input` to `raw`, through its `\n`, but never more than `max` bytes
/// before the line end: unlike `read_until`, a line without end cannot grow the buffer
/// without bound.
async fn read_line(
    input: &mut (impl AsyncBufRead + Unpin),
    raw: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Line> {
    loop {
        let available = input.fill_buf().await?;
        if available.is_empty() {
            return Ok(if raw.is_empty() {
                Line::End
            } else {
                Line::Read
            });
        }
        let (take, ended) = match available.iter().position(|&b| b == b'\n') {
            Some(end) => (end + 1, true),
            None => (available.len(), false),
        };
        let content = take - usize::from(ended);
        if raw.len() + content > max {
            return Ok(Line::TooLong);
        }
        raw.extend_from_slice(&available[..take]);
        input.consume(take);
        if ended {
            return Ok(Line::Read);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::{json, Value};

    fn args() -> SendArgs {
        SendArgs {
            queue: "q".into(),
            json: None,
            delay: None,
            priority: 0,
            group: None,
            batch: 1000,
        }
    }

    /// Reads `input` as `pgbus send` reads standard input; returns the outcome (errors
    /// as their one-line text) and the batches flushed.
    fn read(input: &[u8], batch: usize) -> (Result<u64, String>, Vec<Vec<Value>>) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        let args = args();
        let mut flushed = Vec::new();
        let result = runtime.block_on(read_batches(
            input,
            batch,
            "messages",
            |line| message(&args, line),
            async |messages: Vec<NewMessage>, _: &ProgressBar| {
                let values = messages.iter().map(|m| m.content_type.decode(&m.payload));
                flushed.push(values.collect::<Result<_, _>>()?);
                Ok(())
            },
        ));
        (result.map_err(|e| format!("{e:#}")), flushed)
    }

    fn json_value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            ".*".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                prop::collection::btree_map(".*", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    #[test]
    fn invalid_utf8_names_its_line_and_sends_nothing_of_its_batch() {
        let input = b"{\"n\":1}\n{\"n\":2}\n{\"n\":3}\n\"caf\xe9\"\n{\"n\":5}\n";
        let (result, flushed) = read(input, 2);
        let err = result.unwrap_err();
        assert!(err.contains("line 4 refused"), "{err}");
        assert!(err.contains("not valid UTF-8"), "{err}");
        assert!(err.contains("2 messages sent before it"), "{err}");
        assert_eq!(flushed, vec![vec![json!({"n": 1}), json!({"n": 2})]]);
    }

    #[test]
    fn an_oversized_line_names_its_line() {
        let big = format!("\"{}\"\n", "x".repeat(DEFAULT_MAX_PAYLOAD_BYTES));
        let input = format!("1\n{big}");
        let (result, flushed) = read(input.as_bytes(), 10);
        let err = result.unwrap_err();
        assert!(err.contains("line 2 refused"), "{err}");
        assert!(err.contains("exceeds the limit of 1048576 bytes"), "{err}");
        assert!(flushed.is_empty());
    }

    /// An endless line is refused once the limit is read, not read to the end (or until
    /// memory runs out); the error names its line.
    #[test]
    fn an_endless_line_is_refused_after_the_limit_is_read() {
        const INPUT: u64 = 64 * 1024 * 1024;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a runtime");
        let mut input = tokio::io::BufReader::new(tokio::io::AsyncReadExt::chain(
            &b"{\"n\":1}\n"[..],
            tokio::io::AsyncReadExt::take(tokio::io::repeat(b' '), INPUT),
        ));
        let args = args();
        let result = runtime.block_on(read_batches(
            &mut input,
            10,
            "messages",
            |line| message(&args, line),
            async |_: Vec<NewMessage>, _: &ProgressBar| Ok(()),
        ));
        let err = format!("{:#}", result.unwrap_err());
        assert!(err.starts_with("line 2 refused"), "{err}");
        assert!(err.contains("longer than 2097152 bytes"), "{err}");
        let left = input.get_ref().get_ref().1.limit();
        assert!(
            INPUT - left <= 2 * MAX_LINE_BYTES as u64,
            "read {} bytes of the line",
            INPUT - left
        );
    }

    proptest! {
        /// Valid documents, with blank lines and CRLF endings mixed in, arrive in order,
        /// in batches of at most the batch size.
        #[test]
        fn documents_arrive_in_order_in_bounded_batches(
            lines in prop::collection::vec((json_value(), 0..3usize, any::<bool>()), 0..40),
            batch in 1..8usize,
        ) {
            let mut input = String::new();
            for (value, blanks, crlf) in &lines {
                input.push_str(&"  \n".repeat(*blanks));
                input.push_str(&value.to_string());
                input.push_str(if *crlf { "\r\n" } else { "\n" });
            }
            let (result, flushed) = read(input.as_bytes(), batch);
            prop_assert_eq!(result, Ok(lines.len() as u64));
            prop_assert!(flushed.iter().all(|b| !b.is_empty() && b.len() <= batch));
            let values: Vec<Value> = flushed.into_iter().flatten().collect();
            let expected: Vec<Value> = lines.into_iter().map(|(v, _, _)| v).collect();
            prop_assert_eq!(values, expected);
        }

        /// Any bytes at all: a count of what was sent, or an error naming a line; either
        /// way every flushed batch holds only lines before the bad one, and never a panic.
        #[test]
        fn arbitrary_input_is_sent_or_refused_by_line(
            input in prop::collection::vec(
                prop_oneof![any::<u8>(), Just(b'\n'), Just(b'1'), Just(b'"')], 0..200),
            batch in 1..5usize,
        ) {
            let (result, flushed) = read(&input, batch);
            let sent: usize = flushed.iter().map(Vec::len).sum();
            match result {
                Ok(n) => prop_assert_eq!(n as usize, sent),
                Err(err) => {
                    let line: usize = err
                        .strip_prefix("line ")
                        .and_then(|rest| rest.split(' ').next())
                        .and_then(|n| n.parse().ok())
                        .ok_or_else(|| TestCaseError::fail(format!("no line named: {err}")))?;
                    prop_assert!(line <= input.split(|b| *b == b'\n').count());
                    prop_assert!(err.contains(&format!("{sent} messages sent before it")), "{}", err);
                    // Only full batches went out before the refusal.
                    prop_assert!(flushed.iter().all(|b| b.len() == batch));
                }
            }
        }
    }
}
