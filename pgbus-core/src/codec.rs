//! Payload encoding: MessagePack by default, JSON accepted.

use serde::{de::DeserializeOwned, Serialize};

use crate::{Error, Result};

/// How a payload is encoded. Stored with every message, so a queue may hold both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub enum ContentType {
    /// MessagePack, via `rmp-serde` (struct fields by name). The default.
    #[default]
    MessagePack,
    /// JSON, via `serde_json`.
    Json,
}

impl ContentType {
    /// The MIME type stored with the message.
    pub fn mime(self) -> &'static str {
        match self {
            ContentType::MessagePack => "application/msgpack",
            ContentType::Json => "application/json",
        }
    }

    /// Parses a stored MIME type.
    pub fn from_mime(mime: &str) -> Result<Self> {
        match mime {
            "application/msgpack" => Ok(ContentType::MessagePack),
            "application/json" => Ok(ContentType::Json),
            other => Err(Error::UnknownContentType(other.to_owned())),
        }
    }

    fn format(self) -> &'static str {
        match self {
            ContentType::MessagePack => "MessagePack",
            ContentType::Json => "JSON",
        }
    }

    /// Encodes `value` in this format.
    pub fn encode<T: Serialize + ?Sized>(self, value: &T) -> Result<Vec<u8>> {
        let encoded = match self {
            ContentType::MessagePack => rmp_serde::to_vec_named(value).map_err(|e| e.into()),
            ContentType::Json => serde_json::to_vec(value).map_err(|e| e.into()),
        };
        encoded.map_err(|source| Error::Encode {
            format: self.format(),
            source,
        })
    }

    /// Decodes `bytes` in this format. Malformed input is an [`Error::Decode`], never a
    /// panic.
    pub fn decode<T: DeserializeOwned>(self, bytes: &[u8]) -> Result<T> {
        let decoded = match self {
            ContentType::MessagePack => rmp_serde::from_slice(bytes).map_err(|e| e.into()),
            ContentType::Json => serde_json::from_slice(bytes).map_err(|e| e.into()),
        };
        decoded.map_err(|source| Error::Decode {
            format: self.format(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Email {
        to: String,
        retries: u32,
    }

    #[test]
    fn round_trips_both_formats() {
        let email = Email {
            to: "a@example.com".into(),
            retries: 3,
        };
        for ct in [ContentType::MessagePack, ContentType::Json] {
            let bytes = ct.encode(&email).unwrap();
            assert_eq!(ct.decode::<Email>(&bytes).unwrap(), email);
            assert_eq!(ContentType::from_mime(ct.mime()).unwrap(), ct);
        }
    }

    #[test]
    fn malformed_payload_is_a_typed_error() {
        for ct in [ContentType::MessagePack, ContentType::Json] {
            let err = ct.decode::<Email>(b"\xc1not a payload").unwrap_err();
            assert!(matches!(err, Error::Decode { .. }), "{err}");
            assert!(!err.is_transient());
        }
        assert!(matches!(
            ContentType::from_mime("text/plain"),
            Err(Error::UnknownContentType(_))
        ));
    }
}
