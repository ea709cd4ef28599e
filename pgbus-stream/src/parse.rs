//! A minimal incremental SSE parser, for clients written in Rust (tests, benchmarks,
//! tools). It follows the field rules the endpoint relies on: `id`, `event`, one `data`
//! line per payload line, comments skipped.

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
    /// The id as an event id, if it is one.
    pub fn event_id(&self) -> Option<i64> {
        self.id.as_deref().and_then(|id| id.parse().ok())
    }
}

/// Feeds bytes in whatever chunks they arrive; yields complete frames.
#[derive(Debug, Default)]
pub struct SseParser {
    buffer: String,
}

impl SseParser {
    /// Adds `chunk` and returns the frames it completed. Invalid UTF-8 is replaced.
    pub fn feed(&mut self, chunk: &[u8]) -> Vec<SseFrame> {
        self.buffer.push_str(&String::from_utf8_lossy(chunk));
        let mut frames = Vec::new();
        while let Some(end) = self.buffer.find("\n\n") {
            let block: String = self.buffer.drain(..end + 2).collect();
            if let Some(frame) = parse_block(&block) {
                frames.push(frame);
            }
        }
        frames
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
