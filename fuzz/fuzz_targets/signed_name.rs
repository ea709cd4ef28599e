//! Signed stream names: `Signer::verify` never accepts a string it did not sign, and a
//! signed name with any byte changed is refused; never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pgbus_core::StreamName;
use pgbus_stream::{SignatureError, Signer};

fuzz_target!(|input: (&str, &str, u16, u8)| {
    let (candidate, name, at, byte) = input;
    let signer = Signer::new("a fuzzing secret of enough length").unwrap();
    // Arbitrary input: refused, or (only if it is the signature of its own name) accepted.
    match signer.verify(candidate) {
        Ok(stream) => assert_eq!(signer.sign(&stream), candidate),
        Err(SignatureError::Malformed | SignatureError::Mismatch) => {}
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
