//! `pgbus send`: one JSON document, or one per line of standard input in bulk batches.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use pgbus_core::{
    MessageId, NewMessage, Producer, QueueAdmin, QueueName, DEFAULT_MAX_PAYLOAD_BYTES,
};

use crate::support::database::Database;
use crate::support::stdin::stdin_batches;
use crate::support::time::duration;

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

fn print_ids(ids: &[MessageId]) {
    for id in ids {
        println!("{id}");
    }
}

/// `pgbus send`.
pub(crate) async fn run(args: SendArgs, db: &Database) -> anyhow::Result<ExitCode> {
    let queue = QueueName::new(args.queue.clone())?;
    let backend = db.ready().await?;
    if backend.queue_info(&queue).await?.paused {
        crate::support::output::note(format_args!(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::support::stdin::{read_batches, MAX_LINE_BYTES};
    use indicatif::ProgressBar;
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
