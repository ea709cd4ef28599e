//! Where a client's stream starts: `Last-Event-ID` or `?since=`.

/// Where a new connection starts reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// After this event id: replay what was stored since (a reconnecting client).
    After(i64),
    /// After the newest event: only what is published from now on.
    Latest,
}

/// A cursor that is not an event id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid cursor {value:?}: an event id is a decimal number from 0 to 9223372036854775807")]
pub struct CursorError {
    /// The refused value (cut to 64 bytes).
    pub value: String,
}

/// Parses an event id as sent in `id:` lines: ASCII digits only, no sign, no spaces.
pub fn parse_cursor(value: &str) -> Result<i64, CursorError> {
    let refuse = || CursorError {
        value: value.chars().take(64).collect(),
    };
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(refuse());
    }
    value.parse().map_err(|_| refuse())
}

/// The start for a request: `Last-Event-ID` (sent by a reconnecting `EventSource`) wins
/// over `?since=`; an empty `Last-Event-ID` counts as absent (an `EventSource` whose last
/// event had no id sends it empty); neither means [`Start::Latest`].
pub fn start_from(last_event_id: Option<&str>, since: Option<&str>) -> Result<Start, CursorError> {
    match last_event_id.filter(|v| !v.is_empty()).or(since) {
        Some(value) => parse_cursor(value).map(Start::After),
        None => Ok(Start::Latest),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn last_event_id_wins_over_since() {
        assert_eq!(start_from(Some("7"), Some("3")), Ok(Start::After(7)));
        assert_eq!(start_from(Some(""), Some("3")), Ok(Start::After(3)));
        assert_eq!(start_from(None, None), Ok(Start::Latest));
        assert_eq!(start_from(None, Some("0")), Ok(Start::After(0)));
    }

    #[test]
    fn malformed_cursors_are_refused() {
        for bad in [
            "",
            "-1",
            "+1",
            " 1",
            "1 ",
            "1.0",
            "0x10",
            "abc",
            "9223372036854775808",
            "١",
        ] {
            assert!(parse_cursor(bad).is_err(), "{bad:?} accepted");
        }
        assert!(
            start_from(Some("x"), Some("1")).is_err(),
            "a bad header is not ignored"
        );
    }

    /// The documented rule, written out independently of the parser.
    fn documented(value: &str) -> Option<i64> {
        if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let digits = value.trim_start_matches('0');
        match digits.len() {
            0 => Some(0),
            1..=19 => digits
                .parse::<u64>()
                .ok()
                .and_then(|n| i64::try_from(n).ok()),
            _ => None,
        }
    }

    proptest! {
        #[test]
        fn any_input_parses_or_is_refused_and_ids_round_trip(input in ".*", id in 0i64..) {
            let _ = parse_cursor(&input);
            prop_assert_eq!(parse_cursor(&id.to_string()), Ok(id));
        }

        /// Exactly the non-negative integers that fit an `i64`, in ASCII digits (leading
        /// zeros allowed), are cursors; signs, spaces, other digits, overflow are refused,
        /// and the refusal quotes at most 64 characters of the input.
        #[test]
        fn accepts_exactly_non_negative_integers(
            input in prop_oneof![
                "[0-9]{1,25}",
                "[-+ ]?[0-9]{1,20}[ .]?",
                "[0-9a-fx٠-٩]{0,22}",
                ".{0,80}",
            ],
            negative in i64::MIN..0,
            big in (i64::MAX as u64 + 1)..,
        ) {
            prop_assert_eq!(parse_cursor(&input).ok(), documented(&input), "{:?}", input);
            if let Err(err) = parse_cursor(&input) {
                prop_assert!(err.value.chars().count() <= 64);
            }
            prop_assert!(parse_cursor(&negative.to_string()).is_err());
            prop_assert!(parse_cursor(&big.to_string()).is_err());
        }

        /// `Last-Event-ID` wins unless empty, then `?since=`, then the latest event; a bad
        /// chosen value is an error, never silently ignored.
        #[test]
        fn the_header_wins_over_the_query(header in prop::option::of("[0-9x]{0,3}"), since in prop::option::of("[0-9x]{0,3}")) {
            let chosen = header.as_deref().filter(|h| !h.is_empty()).or(since.as_deref());
            let start = start_from(header.as_deref(), since.as_deref());
            match chosen {
                None => prop_assert_eq!(start, Ok(Start::Latest)),
                Some(value) => prop_assert_eq!(start.ok(), documented(value).map(Start::After)),
            }
        }
    }
}
