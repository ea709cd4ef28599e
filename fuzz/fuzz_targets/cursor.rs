//! SSE cursors: `parse_cursor` and `start_from` (`Last-Event-ID` / `?since=`) accept
//! exactly the decimal numbers from 0 to `i64::MAX` written with ASCII digits and refuse
//! everything else; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgbus_stream::{parse_cursor, start_from, Start};

/// The documented rule, computed independently of the parser.
fn expected(value: &str) -> Option<i64> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let digits = value.trim_start_matches('0');
    if digits.len() > 19 {
        return None;
    }
    let n: u64 = if digits.is_empty() {
        0
    } else {
        digits.parse().ok()?
    };
    i64::try_from(n).ok()
}

fuzz_target!(|input: (&str, Option<&str>)| {
    let (header, since) = input;
    let parsed = parse_cursor(header);
    assert_eq!(
        parsed.as_ref().ok().copied(),
        expected(header),
        "{header:?}"
    );
    if let Err(err) = &parsed {
        assert!(err.value.chars().count() <= 64);
        assert!(err.to_string().contains("invalid cursor"));
    }
    if let Ok(id) = parsed {
        assert_eq!(parse_cursor(&id.to_string()), Ok(id));
    }
    // Last-Event-ID wins unless empty; neither means the latest event.
    let chosen = Some(header).filter(|h| !h.is_empty()).or(since);
    let start = start_from(Some(header), since);
    match chosen {
        None => assert_eq!(start, Ok(Start::Latest)),
        Some(value) => assert_eq!(start.ok(), expected(value).map(Start::After), "{value:?}"),
    }
});
