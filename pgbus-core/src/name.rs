//! Validated queue names.

use std::fmt;

use crate::Error;

/// The longest queue name accepted, in bytes.
pub const MAX_QUEUE_NAME_LEN: usize = 48;

/// A queue name: lowercase ASCII letters, digits and `_`, starting with a letter, at most
/// [`MAX_QUEUE_NAME_LEN`] bytes.
///
/// The rule is checked once, here; every backend can rely on a `QueueName` being safe to
/// use anywhere (it is still bound as a parameter, never spliced into SQL).
///
/// ```
/// use pgbus_core::QueueName;
/// assert!(QueueName::new("emails").is_ok());
/// let err = QueueName::new("a;drop table x").unwrap_err();
/// assert!(err.to_string().contains("[a-z0-9_]"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueName(String);

impl QueueName {
    /// Validates `name`, naming the broken rule in the error.
    pub fn new(name: impl Into<String>) -> Result<Self, Error> {
        let name = name.into();
        let rule = if name.is_empty() {
            Some("must not be empty")
        } else if name.len() > MAX_QUEUE_NAME_LEN {
            Some("must be at most 48 bytes long")
        } else if !name.as_bytes()[0].is_ascii_lowercase() {
            Some("must start with a lowercase letter a-z")
        } else if !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            Some("may contain only [a-z0-9_]")
        } else {
            None
        };
        match rule {
            Some(rule) => Err(Error::InvalidQueueName { name, rule }),
            None => Ok(Self(name)),
        }
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for QueueName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::new(s)
    }
}

impl AsRef<str> for QueueName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_names() {
        for name in [
            "a",
            "emails",
            "q_1",
            "a23456789012345678901234567890123456789012345678",
        ] {
            assert_eq!(QueueName::new(name).unwrap().as_str(), name);
        }
    }

    #[test]
    fn refuses_invalid_names_naming_the_rule() {
        let long = "a".repeat(200);
        let cases = [
            ("a;drop table x", "[a-z0-9_]"),
            ("", "empty"),
            (long.as_str(), "48 bytes"),
            ("Ünïcode", "start with a lowercase letter"),
            ("ünïcode", "start with a lowercase letter"),
            ("emails-x", "[a-z0-9_]"),
            ("Emails", "start with a lowercase letter"),
            ("1queue", "start with a lowercase letter"),
            ("_queue", "start with a lowercase letter"),
        ];
        for (name, rule) in cases {
            let err = QueueName::new(name).unwrap_err();
            let text = err.to_string();
            assert!(text.contains(rule), "{name:?}: {text}");
            assert!(matches!(err, Error::InvalidQueueName { .. }));
        }
    }
}
