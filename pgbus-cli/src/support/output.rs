//! The command's own lines on standard error (notes for people, warnings, the final
//! error), kept to one discipline with the logs: `-q` silences everything but errors,
//! `--log-format json` makes every line a JSON object of the shape tracing's JSON lines
//! have, and colour is used only on a terminal without `NO_COLOR`. Standard output is
//! always the data, whatever `-q` says.

use std::fmt::Display;
use std::io::IsTerminal;
use std::sync::OnceLock;

#[derive(Debug, Clone, Copy)]
struct Output {
    quiet: bool,
    json: bool,
}

static OUTPUT: OnceLock<Output> = OnceLock::new();

/// Sets the discipline once, from the global options.
pub(crate) fn init(quiet: bool, json: bool) {
    let _ = OUTPUT.set(Output { quiet, json });
}

fn output() -> Output {
    OUTPUT.get().copied().unwrap_or(Output {
        quiet: false,
        json: false,
    })
}

/// Whether standard error gets ANSI colour: a terminal, and `NO_COLOR` unset or empty
/// (<https://no-color.org>).
pub(crate) fn colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

fn line(level: &str, message: &dyn Display) {
    if output().json {
        let line = serde_json::json!({
            "timestamp": humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
            "level": level,
            "fields": { "message": message.to_string() },
            "target": "pgbus::cli",
        });
        eprintln!("{line}");
    } else if level == "WARN" {
        eprintln!("pgbus: warning: {message}");
    } else {
        eprintln!("pgbus: {message}");
    }
}

/// A note for people (what the command is doing, where); nothing with `-q`.
pub(crate) fn note(message: impl Display) {
    if !output().quiet {
        line("INFO", &message);
    }
}

/// Something the user should look at; nothing with `-q`.
pub(crate) fn warn(message: impl Display) {
    if !output().quiet {
        line("WARN", &message);
    }
}

/// Why the command failed; always written.
pub(crate) fn error(message: impl Display) {
    line("ERROR", &message);
}

/// How a table column lines up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Align {
    Left,
    /// Numbers.
    Right,
}

/// A table for people on standard output: each column as wide as its widest cell, the
/// last one unpadded.
pub(crate) struct Table {
    columns: Vec<(&'static str, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub(crate) fn new(columns: &[(&'static str, Align)]) -> Self {
        Self {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as text, one line per row after the header.
    pub(crate) fn render(&self) -> String {
        let header: Vec<String> = self.columns.iter().map(|(h, _)| (*h).to_owned()).collect();
        let lines: Vec<&Vec<String>> = std::iter::once(&header).chain(&self.rows).collect();
        let widths: Vec<usize> = (0..self.columns.len())
            .map(|i| {
                lines
                    .iter()
                    .map(|cells| cells.get(i).map_or(0, |c| c.chars().count()))
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        let mut out = String::new();
        for cells in lines {
            let mut line = String::new();
            for (i, (_, align)) in self.columns.iter().enumerate() {
                let cell = cells.get(i).map_or("", String::as_str);
                let last = i + 1 == self.columns.len();
                if i > 0 {
                    line.push_str("  ");
                }
                match (align, last) {
                    (Align::Left, true) => line.push_str(cell),
                    (Align::Left, false) => line.push_str(&format!("{cell:<w$}", w = widths[i])),
                    (Align::Right, _) => line.push_str(&format!("{cell:>w$}", w = widths[i])),
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }

    pub(crate) fn print(&self) {
        print!("{}", self.render());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_as_wide_as_their_content() {
        let mut table = Table::new(&[
            ("QUEUE", Align::Left),
            ("READY", Align::Right),
            ("NOTE", Align::Left),
        ]);
        table.row(vec!["a_long_queue_name".into(), "7".into(), "x".into()]);
        table.row(vec!["q".into(), "12345678".into(), String::new()]);
        assert_eq!(
            table.render(),
            "QUEUE                 READY  NOTE\n\
             a_long_queue_name         7  x\n\
             q                  12345678\n"
        );
    }
}
