//! Reading many JSON documents from standard input, one per line, in batches: what
//! `send` and `publish` share.

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use pgbus_core::DEFAULT_MAX_PAYLOAD_BYTES;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, BufReader};

/// The longest stdin line read, without its line end: twice the payload limit, room for
/// whitespace that the stored encoding drops. A longer line is refused as soon as this
/// much of it has been read, so memory stays bounded whatever the input.
pub(crate) const MAX_LINE_BYTES: usize = 2 * DEFAULT_MAX_PAYLOAD_BYTES;

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
        crate::support::output::note(format_args!(
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
