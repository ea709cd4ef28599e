//! Payloads as an operator reads them: JSON (MessagePack decoded to JSON), previews,
//! pretty text cut on a character boundary, and the JSON path filter.

use pgbus_core::ContentType;
use serde_json::Value;

use super::types::PayloadMatch;

/// Most characters of a listing's preview.
const PREVIEW_CHARS: usize = 200;

/// A stored payload's bytes and what they claim to be (the raw MIME type: rows written
/// by hand may carry one pgbus does not know).
pub(super) struct Stored<'a> {
    pub(super) mime: &'a str,
    pub(super) bytes: &'a [u8],
    /// The whole payload's size (`bytes` may be only its start).
    pub(super) total: usize,
}

impl Stored<'_> {
    fn complete(&self) -> bool {
        self.bytes.len() == self.total
    }

    /// The payload as JSON, when it is whole and decodes.
    pub(super) fn value(&self) -> Option<Value> {
        if !self.complete() {
            return None;
        }
        ContentType::from_mime(self.mime)
            .ok()?
            .decode::<Value>(self.bytes)
            .ok()
    }

    /// Whether the payload holds `filter.value` at `filter.path`.
    pub(super) fn matches(&self, filter: &PayloadMatch) -> bool {
        self.value()
            .is_some_and(|v| at_path(&v, &filter.path).is_some_and(|v| same(v, &filter.value)))
    }

    /// At most [`PREVIEW_CHARS`] characters: compact JSON, or for a JSON payload too large
    /// to fetch whole, its first bytes as text; a note when it cannot be shown.
    pub(super) fn preview(&self) -> String {
        let text = match self.value() {
            Some(value) => value.to_string(),
            None if self.mime == ContentType::Json.mime() && !self.complete() => {
                String::from_utf8_lossy(self.bytes).into_owned()
            }
            None => self.note(),
        };
        shorten(&text, PREVIEW_CHARS)
    }

    /// Pretty JSON, or a note when the payload does not decode.
    pub(super) fn pretty(&self) -> String {
        match self.value() {
            Some(value) => serde_json::to_string_pretty(&value).unwrap_or_else(|_| self.note()),
            None => self.note(),
        }
    }

    fn note(&self) -> String {
        let what = match ContentType::from_mime(self.mime) {
            Ok(ContentType::Json) => "JSON".to_owned(),
            Ok(ContentType::MessagePack) => "MessagePack".to_owned(),
            _ => format!("content of type {:?}", self.mime),
        };
        if self.complete() {
            format!("({} bytes of undecodable {what})", self.total)
        } else {
            format!("({} bytes of {what})", self.total)
        }
    }
}

/// The value at `path` (object keys, array indexes).
fn at_path<'v>(value: &'v Value, path: &[String]) -> Option<&'v Value> {
    path.iter().try_fold(value, |v, part| match v {
        Value::Object(map) => map.get(part),
        Value::Array(items) => items.get(part.parse::<usize>().ok()?),
        _ => None,
    })
}

/// JSON equality with numbers compared by value (`1` equals `1.0`, and a MessagePack
/// unsigned integer equals the same JSON number).
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => {
            match (x.as_i64(), y.as_i64(), x.as_u64(), y.as_u64()) {
                (Some(x), Some(y), _, _) => x == y,
                (_, _, Some(x), Some(y)) => x == y,
                _ => x.as_f64() == y.as_f64(),
            }
        }
        _ => a == b,
    }
}

/// `text` cut to at most `max` characters, the cut marked with an ellipsis.
fn shorten(text: &str, max: usize) -> String {
    match text.char_indices().nth(max) {
        None => text.to_owned(),
        Some(_) => {
            let keep = text.char_indices().nth(max - 1).map_or(0, |(i, _)| i);
            format!("{}…", &text[..keep])
        }
    }
}

/// `text` cut to at most `max` bytes on a character boundary; whether it was cut.
pub(super) fn truncate(mut text: String, max: usize) -> (String, bool) {
    if text.len() <= max {
        return (text, false);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text.truncate(end);
    (text, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored<'a>(mime: &'a str, bytes: &'a [u8]) -> Stored<'a> {
        Stored {
            mime,
            bytes,
            total: bytes.len(),
        }
    }

    #[test]
    fn paths_match_both_encodings() {
        let doc = serde_json::json!({"customer": {"id": 42, "tags": ["a", "b"]}});
        let json = serde_json::to_vec(&doc).unwrap();
        let msgpack = ContentType::MessagePack.encode(&doc).unwrap();
        for s in [
            stored(ContentType::Json.mime(), &json),
            stored(ContentType::MessagePack.mime(), &msgpack),
        ] {
            let m = |t: &str| s.matches(&PayloadMatch::parse(t).unwrap());
            assert!(m("customer.id=42"));
            assert!(m("customer.id=42.0"));
            assert!(!m("customer.id=43"));
            assert!(m("customer.tags.1=b"));
            assert!(!m("customer.tags.x=b"));
            assert!(!m("customer.nope=1"));
        }
        assert!(!stored(ContentType::Json.mime(), b"{not json")
            .matches(&PayloadMatch::parse("a=1").unwrap()));
    }

    #[test]
    fn previews_and_notes() {
        let long = serde_json::to_vec(&"x".repeat(500)).unwrap();
        let preview = stored(ContentType::Json.mime(), &long).preview();
        assert_eq!(preview.chars().count(), PREVIEW_CHARS);
        assert!(preview.ends_with('…'));
        assert_eq!(
            stored(ContentType::MessagePack.mime(), b"\xc1").preview(),
            "(1 bytes of undecodable MessagePack)"
        );
        let part = Stored {
            mime: ContentType::MessagePack.mime(),
            bytes: b"\x81",
            total: 9000,
        };
        assert_eq!(part.preview(), "(9000 bytes of MessagePack)");
        let part = Stored {
            mime: ContentType::Json.mime(),
            bytes: b"{\"a\": 1",
            total: 9000,
        };
        assert_eq!(part.preview(), "{\"a\": 1");
    }

    #[test]
    fn truncation_keeps_characters_whole() {
        assert_eq!(truncate("héllo".into(), 2), ("h".into(), true));
        assert_eq!(truncate("hello".into(), 5), ("hello".into(), false));
    }
}
