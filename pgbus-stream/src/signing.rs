//! Signed stream names: a client can follow only a stream whose name the server signed.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use pgbus_core::StreamName;
use sha2::Sha256;

/// The shortest secret accepted, in bytes.
pub const MIN_SECRET_LEN: usize = 16;

/// Signs and verifies stream names with HMAC-SHA256. A signed name is
/// `<stream>.<base64url(mac)>`, safe in a URL path.
#[derive(Clone)]
pub struct Signer {
    key: Hmac<Sha256>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer { .. }")
    }
}

/// Why a signed name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// Not `<stream>.<signature>`, or the stream part is not a valid name.
    #[error("malformed signed stream name")]
    Malformed,
    /// The signature does not match the name.
    #[error("stream name signature does not match")]
    Mismatch,
}

/// A secret too short to sign with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a stream signing secret needs at least {MIN_SECRET_LEN} bytes, got {0}")]
pub struct WeakSecret(pub usize);

impl Signer {
    /// A signer with `secret` (at least [`MIN_SECRET_LEN`] bytes).
    pub fn new(secret: impl AsRef<[u8]>) -> Result<Self, WeakSecret> {
        let secret = secret.as_ref();
        if secret.len() < MIN_SECRET_LEN {
            return Err(WeakSecret(secret.len()));
        }
        let key = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| WeakSecret(secret.len()))?;
        Ok(Self { key })
    }

    fn mac(&self, stream: &str) -> Hmac<Sha256> {
        let mut mac = self.key.clone();
        mac.update(stream.as_bytes());
        mac
    }

    /// The signed form of `stream`.
    pub fn sign(&self, stream: &StreamName) -> String {
        let tag = self.mac(stream.as_str()).finalize().into_bytes();
        format!("{stream}.{}", URL_SAFE_NO_PAD.encode(tag))
    }

    /// The URL path that follows `stream` over SSE.
    pub fn url_path(&self, stream: &StreamName) -> String {
        format!("/streams/{}", self.sign(stream))
    }

    /// The stream a signed name stands for, if the signature is this signer's (compared
    /// in constant time).
    pub fn verify(&self, signed: &str) -> Result<StreamName, SignatureError> {
        let (name, tag) = signed.split_once('.').ok_or(SignatureError::Malformed)?;
        let stream = StreamName::new(name).map_err(|_| SignatureError::Malformed)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| SignatureError::Malformed)?;
        self.mac(name)
            .verify_slice(&tag)
            .map_err(|_| SignatureError::Mismatch)?;
        Ok(stream)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn signer() -> Signer {
        Signer::new("a test secret of enough length").unwrap()
    }

    #[test]
    fn signed_names_verify_and_tampering_is_refused() {
        let stream = StreamName::new("orders").unwrap();
        let signed = signer().sign(&stream);
        assert_eq!(signer().verify(&signed), Ok(stream.clone()));
        assert_eq!(signer().url_path(&stream), format!("/streams/{signed}"));
        let other = signed.replacen("orders", "orderz", 1);
        assert_eq!(signer().verify(&other), Err(SignatureError::Mismatch));
        let mut flipped = signed.clone().into_bytes();
        let last = flipped.len() - 1;
        flipped[last] = if flipped[last] == b'A' { b'B' } else { b'A' };
        assert!(signer()
            .verify(std::str::from_utf8(&flipped).unwrap())
            .is_err());
        let foreign = Signer::new("another secret of enough length").unwrap();
        assert_eq!(foreign.verify(&signed), Err(SignatureError::Mismatch));
        for malformed in ["orders", "", ".", "Orders.abc", "orders.!!!"] {
            assert_eq!(
                signer().verify(malformed),
                Err(SignatureError::Malformed),
                "{malformed:?}"
            );
        }
        assert_eq!(Signer::new("short").unwrap_err(), WeakSecret(5));
    }

    proptest! {
        #[test]
        fn arbitrary_input_never_verifies_or_panics(input in ".*") {
            prop_assert!(signer().verify(&input).is_err());
        }

        /// A signed name verifies to its stream; any single byte changed (to any other
        /// byte, at any position) is refused, as is the signature of another secret.
        #[test]
        fn signed_names_verify_only_untampered(
            name in "[a-z][a-z0-9_]{0,47}",
            at in any::<prop::sample::Index>(),
            byte in any::<u8>(),
        ) {
            let stream = StreamName::new(name).unwrap();
            let signed = signer().sign(&stream);
            prop_assert_eq!(signer().verify(&signed), Ok(stream.clone()));
            let foreign = Signer::new("another secret of enough length").unwrap();
            prop_assert_eq!(foreign.verify(&signed), Err(SignatureError::Mismatch));
            let mut tampered = signed.clone().into_bytes();
            let at = at.index(tampered.len());
            prop_assume!(tampered[at] != byte);
            tampered[at] = byte;
            let tampered = String::from_utf8_lossy(&tampered);
            prop_assert!(signer().verify(&tampered).is_err(), "{} accepted", tampered);
        }
    }
}
