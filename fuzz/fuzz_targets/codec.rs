//! Payload decoding: arbitrary bytes through `ContentType::decode` (MessagePack and JSON)
//! into `serde_json::Value` and into a typed struct. Either a `Decode` error or a value;
//! a decoded value encodes again and decodes to itself.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use pgbus_core::{ContentType, Error};
use serde::{Deserialize, Serialize};

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum Kind {
    Email,
    Sms { number: String },
    Push(u8),
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Job {
    to: String,
    retries: u32,
    priority: i16,
    tags: Vec<String>,
    meta: Option<BTreeMap<String, i64>>,
    kind: Kind,
    body: Option<Vec<u8>>,
}

fn refused_cleanly<T>(result: &Result<T, Error>) {
    if let Err(err) = result {
        assert!(matches!(err, Error::Decode { .. }), "{err:?}");
        assert!(!err.is_transient());
        let _ = err.report();
    }
}

fuzz_target!(|data: &[u8]| {
    for ct in [ContentType::MessagePack, ContentType::Json] {
        let value = ct.decode::<serde_json::Value>(data);
        refused_cleanly(&value);
        if let Ok(value) = value {
            let again = ct.encode(&value).expect("a decoded value encodes");
            let back: serde_json::Value = ct.decode(&again).expect("an encoded value decodes");
            // JSON floats may move by one ulp through serde_json's default parser;
            // MessagePack keeps every number exactly.
            if ct == ContentType::MessagePack {
                assert_eq!(back, value);
            }
        }
        let job = ct.decode::<Job>(data);
        refused_cleanly(&job);
        if let Ok(job) = job {
            let again = ct.encode(&job).expect("a decoded job encodes");
            assert_eq!(
                ct.decode::<Job>(&again).expect("an encoded job decodes"),
                job
            );
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        match ContentType::from_mime(text) {
            Ok(ct) => assert_eq!(ct.mime(), text),
            Err(err) => assert!(matches!(err, Error::UnknownContentType(_)), "{err:?}"),
        }
    }
});
