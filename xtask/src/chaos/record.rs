//! What the chaos workers' handler writes, and reading it back.
//!
//! Every message is handled by `xtask chaos-handler FILE SLEEP_MS "$PPID"`, which `pgbus
//! work` starts as `sh -c 'exec XTASK chaos-handler ...'`: `$PPID` is the worker process. The handler appends a start line, sleeps, and appends an end line:
//!
//! ```text
//! S <worker pid> <CLOCK_MONOTONIC ns> <message number> <attempt>
//! E <worker pid> <CLOCK_MONOTONIC ns> <message number> <attempt>
//! ```
//!
//! Each line is one `write(2)` on a file opened with `O_APPEND`, so lines of concurrent
//! handlers never interleave. The worker pid is read once, before the start line: a handler
//! whose worker was SIGKILLed is re-parented, and its end line must still name the worker
//! that started it. A handler started just as its worker died names the orphan reaper
//! instead (pid 1): the checks treat runs of unknown workers as orphans of a kill. The harness stamps its own faults with the same clock ([`now_ns`]).

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// The hidden `xtask` subcommand that runs the handler.
pub(crate) const SUBCOMMAND: &str = "chaos-handler";

/// Exit status asking `pgbus work` for a retry (anything but 0 and 65).
const EXIT_RETRY: u8 = 2;

/// `CLOCK_MONOTONIC` in nanoseconds: the one clock of the harness and its handlers.
pub(crate) fn now_ns() -> u64 {
    let now = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(now.tv_nsec).unwrap_or(0)
}

/// A start or an end of one handler run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Start,
    End,
}

/// One line of the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Line {
    pub(crate) kind: Kind,
    /// The `pgbus work` process that ran the handler.
    pub(crate) worker: u32,
    /// When, on [`now_ns`]'s clock.
    pub(crate) at: u64,
    /// The message number (the payload's `n`).
    pub(crate) n: u64,
    /// `PGBUS_ATTEMPT`.
    pub(crate) attempt: u32,
}

impl Line {
    pub(crate) fn render(&self) -> String {
        let kind = match self.kind {
            Kind::Start => 'S',
            Kind::End => 'E',
        };
        format!(
            "{kind} {} {} {} {}\n",
            self.worker, self.at, self.n, self.attempt
        )
    }

    pub(crate) fn parse(text: &str) -> Option<Line> {
        let mut fields = text.split(' ');
        let kind = match fields.next()? {
            "S" => Kind::Start,
            "E" => Kind::End,
            _ => return None,
        };
        let line = Line {
            kind,
            worker: fields.next()?.parse().ok()?,
            at: fields.next()?.parse().ok()?,
            n: fields.next()?.parse().ok()?,
            attempt: fields.next()?.parse().ok()?,
        };
        fields.next().is_none().then_some(line)
    }
}

/// `xtask chaos-handler FILE SLEEP_MS [WORKER_PID]`: reads the payload (`{"n": N}`) from
/// stdin, appends a start line, sleeps, appends an end line, exits 0. Any problem exits 2
/// (a retry).
pub(crate) fn handler_main(args: &[String]) -> ExitCode {
    match handle(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("chaos-handler: {err:#}");
            ExitCode::from(EXIT_RETRY)
        }
    }
}

fn handle(args: &[String]) -> anyhow::Result<()> {
    let (file, sleep_ms, worker) = match args {
        [file, sleep_ms] => (file, sleep_ms, None),
        [file, sleep_ms, worker] => (file, sleep_ms, Some(worker.parse()?)),
        _ => anyhow::bail!("usage: xtask {SUBCOMMAND} FILE SLEEP_MS [WORKER_PID]"),
    };
    let sleep = Duration::from_millis(sleep_ms.parse()?);
    // The shell's `$PPID`, taken when `pgbus work` started it, else our parent now. Either
    // is the orphan reaper's pid when the worker died first: such runs name no worker.
    let worker = worker.unwrap_or_else(std::os::unix::process::parent_id);
    let mut input = String::new();
    io::stdin().read_to_string(&mut input)?;
    let payload: serde_json::Value = serde_json::from_str(&input)?;
    let n = payload["n"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("payload without a number `n`: {input}"))?;
    let attempt = std::env::var("PGBUS_ATTEMPT")
        .ok()
        .and_then(|a| a.parse().ok())
        .unwrap_or(0);
    let mut line = Line {
        kind: Kind::Start,
        worker,
        at: now_ns(),
        n,
        attempt,
    };
    append(Path::new(file), &line)?;
    std::thread::sleep(sleep);
    line.kind = Kind::End;
    line.at = now_ns();
    append(Path::new(file), &line)?;
    Ok(())
}

/// Appends `line` in one write.
fn append(path: &Path, line: &Line) -> io::Result<()> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?
        .write_all(line.render().as_bytes())
}

/// The record file as far as it has been read, with the completed messages counted.
#[derive(Debug)]
pub(crate) struct Record {
    path: PathBuf,
    offset: u64,
    partial: Vec<u8>,
    lines: Vec<Line>,
    done: Vec<bool>,
    done_count: usize,
    malformed: Vec<String>,
}

impl Record {
    /// A record of messages `0..total`, written to `path` (which need not exist yet).
    pub(crate) fn new(path: PathBuf, total: u64) -> Self {
        Self {
            path,
            offset: 0,
            partial: Vec::new(),
            lines: Vec::new(),
            done: vec![false; usize::try_from(total).unwrap_or(0)],
            done_count: 0,
            malformed: Vec::new(),
        }
    }

    /// Reads whatever was appended since the last call.
    pub(crate) fn refresh(&mut self) -> io::Result<()> {
        let mut file = match File::open(&self.path) {
            Ok(file) => file,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(err) => return Err(err),
        };
        file.seek(SeekFrom::Start(self.offset))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        self.offset += bytes.len() as u64;
        self.partial.extend_from_slice(&bytes);
        let Some(last_newline) = self.partial.iter().rposition(|b| *b == b'\n') else {
            return Ok(());
        };
        let complete: Vec<u8> = self.partial.drain(..=last_newline).collect();
        for text in String::from_utf8_lossy(&complete).lines() {
            match Line::parse(text) {
                Some(line) => self.push(line),
                None => self.malformed.push(text.to_owned()),
            }
        }
        Ok(())
    }

    fn push(&mut self, line: Line) {
        if line.kind == Kind::End {
            match self
                .done
                .get_mut(usize::try_from(line.n).unwrap_or(usize::MAX))
            {
                Some(done) if !*done => {
                    *done = true;
                    self.done_count += 1;
                }
                Some(_) => {}
                None => self
                    .malformed
                    .push(format!("message {} out of range", line.n)),
            }
        }
        self.lines.push(line);
    }

    /// Messages with at least one completed run.
    pub(crate) fn done_count(&self) -> usize {
        self.done_count
    }

    pub(crate) fn lines(&self) -> &[Line] {
        &self.lines
    }

    /// Lines that are not record lines (torn writes would show up here).
    pub(crate) fn malformed(&self) -> &[String] {
        &self.malformed
    }

    /// The earliest handler start after `at`: the first job a worker took after a fault.
    pub(crate) fn first_start_after(&self, at: u64) -> Option<u64> {
        self.lines
            .iter()
            .filter(|l| l.kind == Kind::Start && l.at > at)
            .map(|l| l.at)
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_and_garbage_is_refused() {
        let line = Line {
            kind: Kind::End,
            worker: 42,
            at: 1_234_567_890_123,
            n: 7,
            attempt: 2,
        };
        assert_eq!(line.render(), "E 42 1234567890123 7 2\n");
        assert_eq!(Line::parse(line.render().trim_end()), Some(line));
        for bad in ["", "X 1 2 3 4", "S 1 2 3", "S 1 2 3 4 5", "S a 2 3 4"] {
            assert_eq!(Line::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_record_is_read_incrementally_and_counts_completed_messages() {
        let dir = tempfile_dir();
        let path = dir.join("record");
        let mut record = Record::new(path.clone(), 3);
        record.refresh().unwrap();
        assert_eq!(record.done_count(), 0);
        let line = |kind, n, at| Line {
            kind,
            worker: 1,
            at,
            n,
            attempt: 1,
        };
        append(&path, &line(Kind::Start, 0, 10)).unwrap();
        append(&path, &line(Kind::End, 0, 20)).unwrap();
        // A torn tail is kept until its newline arrives.
        OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"S 1 30 1")
            .unwrap();
        record.refresh().unwrap();
        assert_eq!(record.done_count(), 1);
        assert_eq!(record.lines().len(), 2);
        OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b" 1\nE 1 40 1 1\nE 1 50 0 2\nnonsense\n")
            .unwrap();
        record.refresh().unwrap();
        assert_eq!(record.done_count(), 2);
        assert_eq!(record.lines().len(), 5);
        assert_eq!(record.malformed(), ["nonsense"]);
        assert_eq!(record.first_start_after(10), Some(30));
        assert_eq!(record.first_start_after(30), None);
        std::fs::remove_dir_all(dir).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "xtask-chaos-record-{}-{}",
            std::process::id(),
            now_ns()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
