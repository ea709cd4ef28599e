//! Signed stream names: a client can follow only a stream whose name the server signed.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use pgbus_core::StreamName;
use sha2::Sha256;
use std::time::{SystemTime, UNIX_EPOCH};

/// The shortest secret accepted, in bytes.
pub const MIN_SECRET_LEN: usize = 16;

/// Signs and verifies stream names with HMAC-SHA256. A signed name is
/// `<stream>.<base64url(mac)>`, or with an expiry `<stream>.<unix seconds>.<base64url(mac)>`
/// (the expiry is signed too), safe in a URL path.
///
/// A signer holds a key ring: the first key signs, every key verifies, so a secret is
/// rotated by putting the new one first and removing the old one once the pages it signed
/// for are gone.
#[derive(Clone)]
pub struct Signer {
    keys: Vec<Hmac<Sha256>>,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer { .. }")
    }
}

/// Why a signed name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SignatureError {
    /// Not `<stream>[.<expiry>].<signature>`, or the stream part is not a valid name.
    #[error("malformed signed stream name")]
    Malformed,
    /// The signature matches none of the keys.
    #[error("stream name signature does not match")]
    Mismatch,
    /// A genuine signature whose expiry has passed.
    #[error("the signed stream name expired")]
    Expired,
}

/// A secret too short to sign with (or no secret at all).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a stream signing secret needs at least {MIN_SECRET_LEN} bytes, got {0}")]
pub struct WeakSecret(pub usize);

impl Signer {
    /// A signer with `secret` (at least [`MIN_SECRET_LEN`] bytes).
    pub fn new(secret: impl AsRef<[u8]>) -> Result<Self, WeakSecret> {
        Self::with_keys([secret])
    }

    /// A signer whose first secret signs and whose every secret verifies (each at least
    /// [`MIN_SECRET_LEN`] bytes; at least one).
    pub fn with_keys<K: AsRef<[u8]>>(
        secrets: impl IntoIterator<Item = K>,
    ) -> Result<Self, WeakSecret> {
        let keys = secrets
            .into_iter()
            .map(|secret| {
                let secret = secret.as_ref();
                if secret.len() < MIN_SECRET_LEN {
                    return Err(WeakSecret(secret.len()));
                }
                Hmac::<Sha256>::new_from_slice(secret).map_err(|_| WeakSecret(secret.len()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        if keys.is_empty() {
            return Err(WeakSecret(0));
        }
        Ok(Self { keys })
    }

    fn mac(key: &Hmac<Sha256>, signed_part: &str) -> Hmac<Sha256> {
        let mut mac = key.clone();
        mac.update(signed_part.as_bytes());
        mac
    }

    fn signed(&self, signed_part: String) -> String {
        let tag = Self::mac(&self.keys[0], &signed_part)
            .finalize()
            .into_bytes();
        format!("{signed_part}.{}", URL_SAFE_NO_PAD.encode(tag))
    }

    /// The signed form of `stream`, valid until a key that verifies it is removed.
    pub fn sign(&self, stream: &StreamName) -> String {
        self.signed(stream.to_string())
    }

    /// The signed form of `stream`, refused ([`SignatureError::Expired`]) from
    /// `expires_at` on (whole seconds; a time before 1970 is already expired).
    pub fn sign_until(&self, stream: &StreamName, expires_at: SystemTime) -> String {
        let secs = expires_at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        self.signed(format!("{stream}.{secs}"))
    }

    /// The URL path that follows `stream` over SSE.
    pub fn url_path(&self, stream: &StreamName) -> String {
        format!("/streams/{}", self.sign(stream))
    }

    /// The URL path that follows `stream` over SSE until `expires_at`.
    pub fn url_path_until(&self, stream: &StreamName, expires_at: SystemTime) -> String {
        format!("/streams/{}", self.sign_until(stream, expires_at))
    }

    /// The stream a signed name stands for, if one of the keys signed it (compared in
    /// constant time) and it has not expired.
    pub fn verify(&self, signed: &str) -> Result<StreamName, SignatureError> {
        self.verify_at(signed, SystemTime::now())
    }

    /// As [`verify`](Self::verify), as of `now`.
    pub fn verify_at(&self, signed: &str, now: SystemTime) -> Result<StreamName, SignatureError> {
        let (signed_part, tag) = signed.rsplit_once('.').ok_or(SignatureError::Malformed)?;
        let (name, expiry) = match signed_part.split_once('.') {
            None => (signed_part, None),
            Some((name, secs)) => {
                let canonical = !secs.is_empty()
                    && secs.bytes().all(|b| b.is_ascii_digit())
                    && (secs == "0" || !secs.starts_with('0'));
                let secs: u64 = secs
                    .parse()
                    .ok()
                    .filter(|_| canonical)
                    .ok_or(SignatureError::Malformed)?;
                (name, Some(secs))
            }
        };
        let stream = StreamName::new(name).map_err(|_| SignatureError::Malformed)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| SignatureError::Malformed)?;
        if !self
            .keys
            .iter()
            .any(|key| Self::mac(key, signed_part).verify_slice(&tag).is_ok())
        {
            return Err(SignatureError::Mismatch);
        }
        if let Some(secs) = expiry {
            let now = now
                .duration_since(UNIX_EPOCH)
                .map_or(0, |since| since.as_secs());
            if now >= secs {
                return Err(SignatureError::Expired);
            }
        }
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

    #[test]
    fn expiring_names_verify_until_their_expiry_and_are_refused_from_then_on() {
        let stream = StreamName::new("orders").unwrap();
        let at = |secs| UNIX_EPOCH + std::time::Duration::from_secs(secs);
        let signed = signer().sign_until(&stream, at(1_000));
        assert_eq!(signed.split('.').nth(1), Some("1000"));
        assert_eq!(signer().verify_at(&signed, at(999)), Ok(stream.clone()));
        assert_eq!(
            signer().verify_at(&signed, at(1_000)),
            Err(SignatureError::Expired)
        );
        // The expiry is signed: moving it is a forgery, not a longer life.
        let moved = signed.replacen("1000", "2000", 1);
        assert_eq!(
            signer().verify_at(&moved, at(999)),
            Err(SignatureError::Mismatch)
        );
        let no_expiry = format!("orders.{}", signed.rsplit_once('.').unwrap().1);
        assert_eq!(
            signer().verify_at(&no_expiry, at(0)),
            Err(SignatureError::Mismatch)
        );
        for malformed in [
            "orders.01000.abc",
            "orders.+1.abc",
            "orders..abc",
            "orders.1e3.abc",
        ] {
            assert_eq!(
                signer().verify(malformed),
                Err(SignatureError::Malformed),
                "{malformed}"
            );
        }
    }

    #[test]
    fn a_key_ring_signs_with_its_first_key_and_verifies_with_all() {
        let stream = StreamName::new("orders").unwrap();
        let old = Signer::new("the old secret of enough length").unwrap();
        let signed_before = old.sign(&stream);
        let rotated = Signer::with_keys([
            "the new secret of enough length",
            "the old secret of enough length",
        ])
        .unwrap();
        assert_eq!(rotated.verify(&signed_before), Ok(stream.clone()));
        let signed_after = rotated.sign(&stream);
        assert_ne!(signed_after, signed_before);
        assert_eq!(old.verify(&signed_after), Err(SignatureError::Mismatch));
        let retired = Signer::new("the new secret of enough length").unwrap();
        assert_eq!(retired.verify(&signed_after), Ok(stream));
        assert_eq!(
            retired.verify(&signed_before),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            Signer::with_keys(Vec::<&str>::new()).unwrap_err(),
            WeakSecret(0)
        );
        assert_eq!(
            Signer::with_keys(["a long enough first secret", "short"]).unwrap_err(),
            WeakSecret(5)
        );
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
