//! Routing keys and topic patterns: `RoutingKey::new` and `TopicPattern::new` accept
//! exactly the documented shapes; `TopicPattern::matches` agrees with the regular
//! expression the Postgres backend derives from a pattern (`pgbus.topic_regex`), and
//! stays fast on adversarial patterns such as `#.#.#...`. Event ids and the event envelope
//! read from headers parse or are refused, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgbus_core::{
    envelope, EventId, Headers, RoutingKey, TopicPattern, EVENT_ID_HEADER, MAX_ROUTING_KEY_LEN,
    PUBLISHED_AT_HEADER, ROUTING_KEY_HEADER,
};

fn literal(segment: &str) -> bool {
    !segment.is_empty()
        && segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

fn documented(text: &str, wildcards: bool) -> bool {
    !text.is_empty()
        && text.len() <= MAX_ROUTING_KEY_LEN
        && text
            .split('.')
            .all(|s| literal(s) || (wildcards && (s == "*" || s == "#")))
}

/// The regular expression of migration 0007's `pgbus.topic_regex`, matched against
/// `'.' || key` as the publish function does.
fn sql_regex(pattern: &str) -> regex::Regex {
    let body: String = pattern
        .split('.')
        .map(|s| match s {
            "*" => r"\.[^.]+".to_owned(),
            "#" => r"(\.[^.]+)*".to_owned(),
            literal => format!(r"\.{literal}"),
        })
        .collect();
    regex::Regex::new(&format!("^{body}$")).expect("a valid regex")
}

/// A pattern and a key from small alphabets, as long as the length limit allows: where a
/// backtracking matcher takes exponential time.
fn generated(pattern_ops: &[u8], key_ops: &[u8]) -> (String, String) {
    let pattern: Vec<&str> = pattern_ops
        .iter()
        .take(MAX_ROUTING_KEY_LEN / 2)
        .map(|b| ["#", "*", "a", "b"][usize::from(b % 4)])
        .collect();
    let key: Vec<&str> = key_ops
        .iter()
        .take(MAX_ROUTING_KEY_LEN / 2)
        .map(|b| ["a", "b"][usize::from(b % 2)])
        .collect();
    (pattern.join("."), key.join("."))
}

fuzz_target!(|input: (&str, &str, &str, &str, Vec<u8>, Vec<u8>)| {
    let (key_text, pattern_text, id_text, micros, pattern_ops, key_ops) = input;
    let (pattern, key) = generated(&pattern_ops, &key_ops);
    if let (Ok(pattern), Ok(key)) = (TopicPattern::new(pattern), RoutingKey::new(key)) {
        let expected = sql_regex(pattern.as_str()).is_match(&format!(".{}", key.as_str()));
        assert_eq!(pattern.matches(&key), expected, "{pattern:?} ~ {key:?}");
    }

    let key = RoutingKey::new(key_text);
    assert_eq!(key.is_ok(), documented(key_text, false), "{key_text:?}");
    let pattern = TopicPattern::new(pattern_text);
    assert_eq!(
        pattern.is_ok(),
        documented(pattern_text, true),
        "{pattern_text:?}"
    );
    if let (Ok(key), Ok(pattern)) = (&key, &pattern) {
        let expected = sql_regex(pattern.as_str()).is_match(&format!(".{}", key.as_str()));
        assert_eq!(pattern.matches(key), expected, "{pattern:?} ~ {key:?}");
        // A pattern always matches the key spelled like it.
        if documented(pattern_text, false) {
            assert_eq!(pattern.matches(key), key.as_str() == pattern.as_str());
        }
    }

    let id = id_text.parse::<EventId>();
    if let Ok(id) = id {
        assert_eq!(id.to_string().parse::<EventId>().unwrap(), id);
    }
    let mut headers = Headers::new();
    headers.insert(EVENT_ID_HEADER.into(), id_text.into());
    headers.insert(ROUTING_KEY_HEADER.into(), key_text.into());
    headers.insert(PUBLISHED_AT_HEADER.into(), micros.into());
    match envelope(&headers) {
        Ok((env_id, env_key, _)) => {
            assert_eq!(Some(env_id), id.ok());
            assert_eq!(env_key.as_str(), key_text);
        }
        Err(err) => assert!(matches!(err, pgbus_core::Error::NotAnEvent(_)), "{err:?}"),
    }
});
