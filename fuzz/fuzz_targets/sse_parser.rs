//! The SSE frame parser (`pgbus_stream::parse::SseParser`): arbitrary bytes, cut into
//! arbitrary chunks, yield the same frames as when fed at once, and never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgbus_stream::parse::SseParser;
use pgbus_stream::parse_cursor;

fuzz_target!(|input: (&[u8], Vec<u8>)| {
    let (data, cuts) = input;
    let whole = SseParser::default().feed(data);
    let mut parser = SseParser::default();
    let mut chunked = Vec::new();
    let mut rest = data;
    for cut in cuts {
        if rest.is_empty() {
            break;
        }
        let (chunk, tail) = rest.split_at(usize::from(cut).min(rest.len()));
        chunked.extend(parser.feed(chunk));
        rest = tail;
    }
    chunked.extend(parser.feed(rest));
    assert_eq!(chunked, whole);
    for frame in &whole {
        // An id is an event id exactly when it is a cursor the endpoint would accept.
        let id = frame.id.as_deref().and_then(|id| parse_cursor(id).ok());
        assert_eq!(frame.event_id(), id);
        for field in [frame.id.as_deref(), frame.event.as_deref()]
            .into_iter()
            .flatten()
        {
            assert!(!field.contains(['\n', '\r']), "{field:?}");
        }
    }
});
