//! SSE frames, rendered once per event and shared by every connection that gets it.

use bytes::Bytes;

/// An event frame: `id:` (durable events only), `event:`, then one `data:` line per
/// payload line, so a payload can never forge a field or end the event early.
pub(crate) fn event(id: Option<i64>, event: &str, data: &str) -> Bytes {
    let mut frame = String::with_capacity(data.len() + event.len() + 32);
    if let Some(id) = id {
        frame.push_str(&format!("id: {id}\n"));
    }
    // An event type is one line; a line break in it would start a new field.
    let event = event.replace(['\r', '\n'], " ");
    frame.push_str(&format!("event: {event}\n"));
    for line in lines(data) {
        frame.push_str("data: ");
        frame.push_str(line);
        frame.push('\n');
    }
    frame.push('\n');
    Bytes::from(frame)
}

/// SSE splits lines on CRLF, LF and CR alike.
fn lines(data: &str) -> impl Iterator<Item = &str> {
    data.split("\r\n").flat_map(|l| l.split(['\n', '\r']))
}

/// The keep-alive comment the heartbeat sends.
pub(crate) fn comment() -> Bytes {
    Bytes::from_static(b": keep-alive\n\n")
}

/// Tells the browser how soon to reconnect after the connection drops.
pub(crate) fn retry(after: std::time::Duration) -> Bytes {
    Bytes::from(format!("retry: {}\n\n", after.as_millis()))
}

/// The last frame a client gets when the server shuts down; no `id:`, so it does not move
/// the client's cursor.
pub(crate) fn shutdown() -> Bytes {
    event(None, "shutdown", "")
}

/// Sent before a replay whose cursor is older than what is retained.
pub(crate) fn gap_detected(cursor: i64) -> Bytes {
    event(None, "gap-detected", &format!("{{\"cursor\":{cursor}}}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::{SseFrame, SseParser};
    use proptest::prelude::*;

    fn text(b: Bytes) -> String {
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[test]
    fn payload_lines_cannot_forge_fields() {
        assert_eq!(
            text(event(Some(7), "order", "a\nid: 99\r\nevent: x\rdone")),
            "id: 7\nevent: order\ndata: a\ndata: id: 99\ndata: event: x\ndata: done\n\n"
        );
        assert_eq!(
            text(event(None, "a\nid: 1", "")),
            "event: a id: 1\ndata: \n\n"
        );
        assert!(!text(shutdown()).contains("id:"));
        assert!(!text(gap_detected(3)).contains("id:"));
    }

    /// What a client reads back: line breaks (CRLF, LF, CR) become `\n` in the data; CR
    /// and LF become spaces in the event type.
    fn read_back(id: Option<i64>, event: &str, data: &str) -> SseFrame {
        SseFrame {
            id: id.map(|id| id.to_string()),
            event: Some(event.replace(['\r', '\n'], " ")),
            data: data.replace("\r\n", "\n").replace('\r', "\n"),
        }
    }

    /// Text heavy in what could break framing: line breaks, field names, colons.
    fn tricky() -> impl Strategy<Value = String> {
        prop::collection::vec(
            prop_oneof![
                Just("\n".to_owned()),
                Just("\r".to_owned()),
                Just("\r\n".to_owned()),
                Just("\n\n".to_owned()),
                Just("id: 99".to_owned()),
                Just("event: x".to_owned()),
                Just("data:".to_owned()),
                Just("retry: 1".to_owned()),
                Just(":".to_owned()),
                Just(" ".to_owned()),
                ".{0,8}",
            ],
            0..12,
        )
        .prop_map(|parts| parts.concat())
    }

    proptest! {
        /// Whatever the payload and event type, the parser gets back exactly one frame
        /// with the rendered id (none for control frames: a payload cannot forge one),
        /// the event type and the payload, however the bytes are chunked.
        #[test]
        fn rendered_frames_parse_back_and_cannot_be_forged(
            id in prop::option::of(0i64..),
            name in tricky(),
            data in tricky(),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut wire = text(retry(std::time::Duration::from_secs(3)));
            wire.push_str(&text(comment()));
            wire.push_str(&text(event(id, &name, &data)));
            wire.push_str(&text(comment()));
            let bytes = wire.as_bytes();
            let at = cut.index(bytes.len() + 1);
            let mut parser = SseParser::default();
            let mut frames = parser.feed(&bytes[..at]);
            frames.extend(parser.feed(&bytes[at..]));
            prop_assert_eq!(frames.len(), 1, "{:?}", wire);
            prop_assert_eq!(&frames[0], &read_back(id, &name, &data));
            prop_assert_eq!(frames[0].event_id(), id);
        }

        /// A stream of frames (durable, control, comments) parses back frame by frame.
        #[test]
        fn frame_sequences_parse_back_in_order(
            events in prop::collection::vec((prop::option::of(0i64..), tricky(), tricky()), 0..8),
        ) {
            let mut wire = Vec::new();
            for (id, name, data) in &events {
                wire.extend_from_slice(&event(*id, name, data));
                wire.extend_from_slice(&comment());
            }
            wire.extend_from_slice(&shutdown());
            let frames = SseParser::default().feed(&wire);
            let mut expected: Vec<SseFrame> = events
                .iter()
                .map(|(id, name, data)| read_back(*id, name, data))
                .collect();
            expected.push(read_back(None, "shutdown", ""));
            prop_assert_eq!(frames, expected);
        }
    }
}
