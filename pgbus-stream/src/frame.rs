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
}
