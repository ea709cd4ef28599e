//! Properties of pgbus-core's public entry points for outside input: the payload codec,
//! queue and stream names, routing keys and topic patterns, event ids, and the bounds on
//! delays. (The retry policy's backoff maths has its own properties in `retry.rs`; the
//! fuzz targets in `fuzz/` drive the same entry points with coverage guidance.)

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use pgbus_core::{
    check_delay, ContentType, Error, EventId, NewMessage, QueueName, RoutingKey, StreamName,
    TopicPattern, Visibility, MAX_DELAY, MAX_QUEUE_NAME_LEN, MAX_ROUTING_KEY_LEN,
};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Kind {
    Email,
    Sms { number: String },
    Push(u8),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Job {
    to: String,
    retries: u32,
    priority: i16,
    amount: i64,
    ratio: f64,
    tags: Vec<String>,
    meta: Option<BTreeMap<String, i64>>,
    kind: Kind,
}

fn job() -> impl Strategy<Value = Job> {
    let kind = prop_oneof![
        Just(Kind::Email),
        ".*".prop_map(|number| Kind::Sms { number }),
        any::<u8>().prop_map(Kind::Push),
    ];
    (
        ".*",
        any::<u32>(),
        any::<i16>(),
        any::<i64>(),
        // Finite: JSON has no NaN or infinity.
        -1e300f64..1e300,
        prop::collection::vec(".*", 0..4),
        prop::option::of(prop::collection::btree_map(".*", any::<i64>(), 0..4)),
        kind,
    )
        .prop_map(
            |(to, retries, priority, amount, ratio, tags, meta, kind)| Job {
                to,
                retries,
                priority,
                amount,
                ratio,
                tags,
                meta,
                kind,
            },
        )
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        (-1e300f64..1e300).prop_map(Value::from),
        ".*".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(".*", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// The documented name rule, written out independently of `QueueName::new`.
fn documented_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_QUEUE_NAME_LEN
        && bytes[0].is_ascii_lowercase()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_')
}

fn documented_segments(text: &str, wildcards: bool) -> bool {
    !text.is_empty()
        && text.len() <= MAX_ROUTING_KEY_LEN
        && text.split('.').all(|s| {
            (!s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'))
                || (wildcards && (s == "*" || s == "#"))
        })
}

/// The matching rule as plainly as it can be written (exponential in the worst case, so
/// only for the short patterns generated here): the oracle for `TopicPattern::matches`.
fn oracle(pattern: &[&str], key: &[&str]) -> bool {
    match pattern.split_first() {
        None => key.is_empty(),
        Some((&"#", rest)) => (0..=key.len()).any(|skip| oracle(rest, &key[skip..])),
        Some((&segment, rest)) => match key.split_first() {
            Some((&first, key_rest)) => {
                (segment == "*" || segment == first) && oracle(rest, key_rest)
            }
            None => false,
        },
    }
}

/// Strings biased towards the interesting alphabet: name and key characters, separators,
/// wildcards, SQL metacharacters, and anything else.
fn nameish() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z][a-z0-9_]{0,50}",
        "[a-zA-Z0-9_.*#'; -]{0,60}",
        ".{0,60}",
    ]
}

proptest! {
    #[test]
    fn typed_payloads_round_trip_in_both_formats(job in job()) {
        for ct in [ContentType::MessagePack, ContentType::Json] {
            let bytes = ct.encode(&job).unwrap();
            let back: Job = ct.decode(&bytes).unwrap();
            if ct == ContentType::Json {
                // serde_json's default float parser may move the last digit.
                prop_assert!((back.ratio - job.ratio).abs() <= job.ratio.abs() * 1e-15);
                prop_assert_eq!(Job { ratio: job.ratio, ..back }, job.clone());
            } else {
                prop_assert_eq!(back, job.clone());
            }
            let message = NewMessage::encode_as(ct, &job).unwrap();
            prop_assert_eq!(message.content_type, ct);
            prop_assert_eq!(ContentType::from_mime(ct.mime()).unwrap(), ct);
        }
    }

    #[test]
    fn json_values_round_trip_exactly_through_messagepack(value in json_value()) {
        let bytes = ContentType::MessagePack.encode(&value).unwrap();
        prop_assert_eq!(ContentType::MessagePack.decode::<serde_json::Value>(&bytes).unwrap(), value.clone());
        let bytes = ContentType::Json.encode(&value).unwrap();
        prop_assert!(ContentType::Json.decode::<serde_json::Value>(&bytes).is_ok());
    }

    #[test]
    fn arbitrary_bytes_decode_or_give_a_decode_error(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        for ct in [ContentType::MessagePack, ContentType::Json] {
            for result in [
                ct.decode::<serde_json::Value>(&bytes).map(|_| ()),
                ct.decode::<Job>(&bytes).map(|_| ()),
            ] {
                if let Err(err) = result {
                    prop_assert!(matches!(err, Error::Decode { .. }), "{:?}", err);
                    prop_assert!(!err.is_transient());
                }
            }
        }
    }

    #[test]
    fn names_accept_exactly_the_documented_alphabet(name in nameish()) {
        let queue = QueueName::new(name.clone());
        prop_assert_eq!(queue.is_ok(), documented_name(&name), "{:?}", name);
        match queue {
            Ok(queue) => prop_assert_eq!(queue.as_str(), name.as_str()),
            Err(Error::InvalidQueueName { name: refused, .. }) => prop_assert_eq!(refused, name.clone()),
            Err(other) => prop_assert!(false, "unexpected {:?}", other),
        }
        let stream = StreamName::new(name.clone());
        prop_assert_eq!(stream.is_ok(), documented_name(&name));
        if let Err(err) = stream {
            prop_assert!(matches!(err, Error::InvalidStreamName { .. }), "{:?}", err);
        }
    }

    #[test]
    fn every_documented_name_is_accepted(name in "[a-z][a-z0-9_]{0,47}") {
        let queue = QueueName::new(name.clone()).unwrap();
        prop_assert_eq!(queue.as_str(), name.as_str());
        let stream = StreamName::new(name.clone()).unwrap();
        prop_assert_eq!(stream.as_str(), name.as_str());
    }

    #[test]
    fn keys_and_patterns_accept_exactly_the_documented_shape(text in nameish()) {
        prop_assert_eq!(RoutingKey::new(text.clone()).is_ok(), documented_segments(&text, false), "{:?}", text);
        prop_assert_eq!(TopicPattern::new(text.clone()).is_ok(), documented_segments(&text, true), "{:?}", text);
        if let Err(err) = RoutingKey::new(text.clone()) {
            prop_assert!(matches!(err, Error::InvalidRoutingKey { .. }), "{:?}", err);
        }
        if let Err(err) = TopicPattern::new(text.clone()) {
            prop_assert!(matches!(err, Error::InvalidTopicPattern { .. }), "{:?}", err);
        }
    }

    #[test]
    fn matching_agrees_with_the_plain_rule(
        pattern in prop::collection::vec(prop_oneof![Just("*"), Just("#"), Just("a"), Just("b")], 1..7),
        key in prop::collection::vec(prop_oneof![Just("a"), Just("b"), Just("c")], 1..7),
    ) {
        let p = TopicPattern::new(pattern.join(".")).unwrap();
        let k = RoutingKey::new(key.join(".")).unwrap();
        prop_assert_eq!(p.matches(&k), oracle(&pattern, &key), "{} ~ {}", p, k);
        // A key matches itself as a pattern, and `#` matches everything.
        prop_assert!(TopicPattern::new(k.as_str()).unwrap().matches(&k));
        prop_assert!(TopicPattern::new("#").unwrap().matches(&k));
    }

    #[test]
    fn event_ids_round_trip_in_every_spelling(bits in any::<u128>()) {
        let id: EventId = format!("{bits:032x}").parse().unwrap();
        prop_assert_eq!(id.as_u128(), bits);
        prop_assert_eq!(id.to_string().parse::<EventId>().unwrap(), id);
        prop_assert_eq!(id.to_string().to_uppercase().parse::<EventId>().unwrap(), id);
    }

    #[test]
    fn arbitrary_event_ids_parse_or_are_refused(text in ".{0,40}") {
        if let Ok(id) = text.parse::<EventId>() {
            prop_assert_eq!(text.replace('-', "").to_lowercase(), format!("{:032x}", id.as_u128()));
        }
    }

    #[test]
    fn delays_up_to_the_limit_are_accepted_and_beyond_refused(
        secs in prop_oneof![0..=MAX_DELAY.as_secs() + 1, MAX_DELAY.as_secs() - 1..=MAX_DELAY.as_secs() + 1, any::<u64>()],
        nanos in prop_oneof![Just(0u32), 0u32..1_000_000_000],
    ) {
        let delay = Duration::new(secs, nanos);
        let accepted = delay <= MAX_DELAY;
        prop_assert_eq!(check_delay("a delay", delay).is_ok(), accepted);
        prop_assert_eq!(Visibility::After(delay).check().is_ok(), accepted);
        prop_assert_eq!(NewMessage::encode(&1).unwrap().delay(delay).check(usize::MAX).is_ok(), accepted);
        if let Err(err) = check_delay("a delay", delay) {
            prop_assert!(matches!(err, Error::InvalidArgument(_)), "{:?}", err);
        }
    }

    #[test]
    fn scheduled_times_within_the_horizon_are_accepted(ahead in 0u64..MAX_DELAY.as_secs() - 60, behind in 0u32..1_000_000_000) {
        let now = SystemTime::now();
        prop_assert!(Visibility::At(now + Duration::from_secs(ahead)).check().is_ok());
        prop_assert!(Visibility::At(now - Duration::from_secs(u64::from(behind))).check().is_ok());
        prop_assert!(Visibility::At(now + MAX_DELAY + Duration::from_secs(ahead + 60)).check().is_err());
    }
}
