//! Text that a job wrote (error texts, dead-letter reasons), shown where it must stay on one
//! line: log lines and the CLI's tables. Such text may hold anything, terminal escape
//! sequences included, so it is never shown raw.

use std::fmt;

/// `text` on one line: newlines, tabs, backslashes and other control characters escaped
/// (`\n`, `\u{1b}`), at most `max_bytes` bytes of it (cut at a character boundary), then
/// how many more there were.
#[derive(Debug, Clone, Copy)]
pub struct OneLine<'a> {
    text: &'a str,
    max_bytes: usize,
}

impl<'a> OneLine<'a> {
    /// `text`, cut after `max_bytes` bytes.
    pub fn new(text: &'a str, max_bytes: usize) -> Self {
        Self { text, max_bytes }
    }
}

impl fmt::Display for OneLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = self.text;
        let mut end = text.len().min(self.max_bytes);
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        for c in text[..end].chars() {
            match c {
                '\n' => f.write_str("\\n")?,
                '\r' => f.write_str("\\r")?,
                '\t' => f.write_str("\\t")?,
                '\\' => f.write_str("\\\\")?,
                c if c.is_control() => write!(f, "\\u{{{:x}}}", u32::from(c))?,
                c => write!(f, "{c}")?,
            }
        }
        if end < text.len() {
            write!(f, "... ({} more bytes)", text.len() - end)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_are_escaped_on_one_line_and_bounded() {
        let line = |text: &str| OneLine::new(text, 1024).to_string();
        assert_eq!(
            line("exit 3: first\nsecond\tthird \\ \u{1b}[31mred\r"),
            "exit 3: first\\nsecond\\tthird \\\\ \\u{1b}[31mred\\r"
        );
        assert_eq!(line("naïve \"quoted\" it's"), "naïve \"quoted\" it's");
        let long = format!("{}é{}", "a".repeat(1023), "b".repeat(100));
        assert_eq!(
            line(&long),
            format!("{}... (102 more bytes)", "a".repeat(1023)),
            "cut at a character boundary"
        );
    }
}
