//! Queue and stream names: `QueueName::new` and `StreamName::new` accept exactly the
//! documented alphabet (`[a-z][a-z0-9_]*`, at most 48 bytes) and refuse anything else with
//! an error naming the rule; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgbus_core::{Error, QueueName, StreamName, MAX_QUEUE_NAME_LEN, MAX_STREAM_NAME_LEN};

fn documented(name: &str, max: usize) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= max
        && bytes[0].is_ascii_lowercase()
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_')
}

fuzz_target!(|name: &str| {
    match QueueName::new(name) {
        Ok(queue) => {
            assert!(documented(name, MAX_QUEUE_NAME_LEN), "{name:?} accepted");
            assert_eq!(queue.as_str(), name);
            assert_eq!(name.parse::<QueueName>().unwrap(), queue);
        }
        Err(Error::InvalidQueueName {
            name: refused,
            rule,
        }) => {
            assert!(
                !documented(name, MAX_QUEUE_NAME_LEN),
                "{name:?} refused: {rule}"
            );
            assert_eq!(refused, name);
        }
        Err(other) => panic!("{name:?}: unexpected error {other:?}"),
    }
    match StreamName::new(name) {
        Ok(stream) => {
            assert!(documented(name, MAX_STREAM_NAME_LEN), "{name:?} accepted");
            assert_eq!(stream.as_str(), name);
        }
        Err(Error::InvalidStreamName { name: refused, .. }) => {
            assert!(!documented(name, MAX_STREAM_NAME_LEN), "{name:?} refused");
            assert_eq!(refused, name);
        }
        Err(other) => panic!("{name:?}: unexpected error {other:?}"),
    }
});
