//! Signed stream names (with and without an expiry): `Signer::verify` never accepts a
//! string it did not sign, and a signed name with any byte changed is refused; never a
//! panic.
#![no_main]

use std::time::{Duration, UNIX_EPOCH};

use libfuzzer_sys::fuzz_target;
use pgbus_core::StreamName;
use pgbus_stream::Signer;

fuzz_target!(|input: (&str, &str, u16, u8)| {
    let (candidate, name, at, byte) = input;
    let signer = Signer::new("a fuzzing secret of enough length").unwrap();
    // Arbitrary input: refused, or (only if it is the signature of its own name) accepted.
    match signer.verify(candidate) {
        Ok(stream) => {
            let expiry = candidate
                .split('.')
                .nth(2)
                .and(candidate.split('.').nth(1))
                .map(|secs| secs.parse::<u64>().expect("a verified expiry is a number"));
            let expected = match expiry {
                None => signer.sign(&stream),
                Some(secs) => signer.sign_until(&stream, UNIX_EPOCH + Duration::from_secs(secs)),
            };
            assert_eq!(expected, candidate);
        }
        Err(_) => {}
    }
    // A genuine signature with one byte changed is refused.
    let Ok(stream) = StreamName::new(name) else {
        return;
    };
    let signed = signer.sign(&stream);
    assert_eq!(signer.verify(&signed), Ok(stream));
    let mut tampered = signed.clone().into_bytes();
    let at = usize::from(at) % tampered.len();
    if tampered[at] == byte {
        return;
    }
    tampered[at] = byte;
    if let Ok(tampered) = std::str::from_utf8(&tampered) {
        assert!(
            signer.verify(tampered).is_err(),
            "{signed:?} -> {tampered:?}"
        );
    }
});
