//! A minimal incremental SSE parser, for clients written in Rust (tests, benchmarks,
//! tools). It follows the field rules the endpoint relies on: `id`, `event`, one `data`
//! line per payload line, comments skipped; lines end with CRLF, LF or CR, as the SSE
//! specification has it.

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseFrame {
    /// The `id:` field, if the frame had one.
    pub id: Option<String>,
    /// The `event:` field, if the frame had one.
    pub event: Option<String>,
    /// The `data:` lines joined with `\n`.
    pub data: String,
}

impl SseFrame {
    /// The id as an event id, if it is one (by the rule the endpoint applies to
    /// `Last-Event-ID`: ASCII digits, no sign).
    pub fn event_id(&self) -> Option<i64> {
        self.id
            .as_deref()
            .and_then(|id| crate::parse_cursor(id).ok())
    }
}

/// Feeds bytes in whatever chunks they arrive; yields complete frames.
#[derive(Debug, Default)]
pub struct SseParser {
    /// Text not yet dispatched, line breaks already made `\n`.
    buffer: String,
    /// The start of a UTF-8 character that the last chunk cut (at most 3 bytes).
    partial: Vec<u8>,
    /// The last character was a CR: a LF right after it ends the same line.
    after_cr: bool,
    /// Where to look for the end of the next frame: the buffer before it has none.
    scanned: usize,
}

impl SseParser {
    /// Adds `chunk` and returns the frames it completed. Lines end with CRLF, LF or CR;
    /// invalid UTF-8 is replaced. A character or a CRLF cut between two chunks is kept
    /// whole, so the frames never depend on how the bytes were chunked.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<SseFrame> {
        self.partial.extend_from_slice(chunk);
        let bytes = std::mem::take(&mut self.partial);
        let mut rest = &bytes[..];
        loop {
            match std::str::from_utf8(rest) {
                Ok(text) => {
                    self.push_text(text);
                    break;
                }
                Err(err) => {
                    let (valid, after) = rest.split_at(err.valid_up_to());
                    // Checked by from_utf8 up to here.
                    self.push_text(std::str::from_utf8(valid).unwrap_or_default());
                    match err.error_len() {
                        Some(len) => {
                            self.push_text("\u{fffd}");
                            rest = &after[len..];
                        }
                        // A character the next chunk completes.
                        None => {
                            self.partial = after.to_vec();
                            break;
                        }
                    }
                }
            }
        }
        let mut frames = Vec::new();
        while let Some(end) = self.buffer.as_bytes()[self.scanned..]
            .windows(2)
            .position(|pair| pair == b"\n\n")
        {
            let end = self.scanned + end;
            let block: String = self.buffer.drain(..end + 2).collect();
            self.scanned = 0;
            if let Some(frame) = parse_block(&block) {
                frames.push(frame);
            }
        }
        // A frame end may straddle this chunk and the next: look again from the last byte.
        self.scanned = self.buffer.len().saturating_sub(1);
        frames
    }

    /// Appends decoded text with every line break (CRLF, LF, CR) made `\n`.
    fn push_text(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        if !self.after_cr && !text.contains('\r') {
            self.buffer.push_str(text);
            return;
        }
        for c in text.chars() {
            match c {
                '\n' if self.after_cr => {}
                '\r' => self.buffer.push('\n'),
                c => self.buffer.push(c),
            }
            self.after_cr = c == '\r';
        }
    }
}

fn parse_block(block: &str) -> Option<SseFrame> {
    let mut frame = SseFrame {
        id: None,
        event: None,
        data: String::new(),
    };
    let mut data: Vec<&str> = Vec::new();
    let mut fields = 0;
    for line in block
        .lines()
        .filter(|l| !l.starts_with(':') && !l.is_empty())
    {
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        fields += 1;
        match field {
            "id" => frame.id = Some(value.to_owned()),
            "event" => frame.event = Some(value.to_owned()),
            "data" => data.push(value),
            _ => fields -= 1,
        }
    }
    frame.data = data.join("\n");
    (fields > 0).then_some(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Feeds `bytes` cut at `cuts` (offsets, in any order).
    fn chunked(bytes: &[u8], cuts: &[prop::sample::Index]) -> Vec<SseFrame> {
        let mut at: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
        at.push(0);
        at.push(bytes.len());
        at.sort_unstable();
        let mut parser = SseParser::default();
        at.windows(2)
            .flat_map(|w| parser.feed(&bytes[w[0]..w[1]]))
            .collect()
    }

    #[test]
    fn a_character_cut_between_chunks_is_kept_whole() {
        let wire = "event: caf\u{e9}\ndata: \u{1f600}\n\n".as_bytes();
        let whole = SseParser::default().feed(wire);
        assert_eq!(whole[0].data, "\u{1f600}");
        for at in 0..=wire.len() {
            let mut parser = SseParser::default();
            let mut frames = parser.feed(&wire[..at]);
            frames.extend(parser.feed(&wire[at..]));
            assert_eq!(frames, whole, "cut at {at}");
        }
        let mut parser = SseParser::default();
        let frames: Vec<SseFrame> = wire.iter().flat_map(|b| parser.feed(&[*b])).collect();
        assert_eq!(frames, whole, "one byte at a time");
    }

    #[test]
    fn only_cursor_ids_are_event_ids() {
        for (id, expected) in [("7", Some(7)), ("-1", None), ("+7", None), (" 7", None)] {
            let frame = SseFrame {
                id: Some(id.into()),
                event: None,
                data: String::new(),
            };
            assert_eq!(frame.event_id(), expected, "{id:?}");
        }
    }

    proptest! {
        /// The frames of any bytes do not depend on how they were chunked; no field holds
        /// a line break.
        #[test]
        fn frames_do_not_depend_on_chunking(
            bytes in prop::collection::vec(
                prop_oneof![
                    any::<u8>(),
                    Just(b'\n'),
                    Just(b'\r'),
                    Just(b':'),
                    Just(0xe9),
                    Just(0xf0),
                    Just(0x9f),
                ],
                0..300,
            ),
            cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let whole = SseParser::default().feed(&bytes);
            prop_assert_eq!(chunked(&bytes, &cuts), whole.clone());
            for frame in &whole {
                for field in [frame.id.as_deref(), frame.event.as_deref()].into_iter().flatten() {
                    prop_assert!(!field.contains(['\n', '\r']), "{:?}", field);
                }
            }
        }
    }

    #[test]
    fn frames_split_across_chunks_and_comments_are_skipped() {
        let mut parser = SseParser::default();
        assert!(parser
            .feed(b": keep-alive\n\nid: 4\nevent: e\nda")
            .is_empty());
        let frames = parser.feed(b"ta: a\ndata: b\n\nevent: shutdown\ndata: \n\n");
        assert_eq!(
            frames,
            vec![
                SseFrame {
                    id: Some("4".into()),
                    event: Some("e".into()),
                    data: "a\nb".into()
                },
                SseFrame {
                    id: None,
                    event: Some("shutdown".into()),
                    data: String::new()
                }
            ]
        );
        assert_eq!(frames[0].event_id(), Some(4));
    }
}
