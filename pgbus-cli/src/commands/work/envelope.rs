//! What an `--exec` command and an `--http` endpoint learn about their message besides the
//! payload: the delivery (queue, message id, attempt, group key), the envelope of a topic's
//! copy (routing key, event id, publish time), and the message's own headers.
//!
//! | | `--exec` environment | `--http` request header |
//! |---|---|---|
//! | queue, message id, attempt | `PGBUS_QUEUE`, `PGBUS_MESSAGE_ID`, `PGBUS_ATTEMPT` | `Pgbus-Queue`, `Pgbus-Message-Id`, `Pgbus-Attempt` |
//! | group key | `PGBUS_GROUP` (empty without one) | `Pgbus-Group` (only with one) |
//! | a topic copy's envelope | `PGBUS_ROUTING_KEY`, `PGBUS_EVENT_ID`, `PGBUS_PUBLISHED_AT` | `Pgbus-Routing-Key`, `Pgbus-Event-Id`, `Pgbus-Published-At` |
//! | header `NAME` | `PGBUS_HEADER_<NAME>` | `Pgbus-Header-<Name>` |
//!
//! A header's name is sanitised: in the variable's, upper case with every character but
//! `A-Z0-9` an `_`; in the request header's, every character but `a-z0-9-` a `-` (header
//! names are case-insensitive). Names that sanitise alike are passed once, with the value
//! of the first in byte order. Only the envelope's three headers are passed under names of
//! their own: a message's header named like one of pgbus's variables (`pgbus-queue`) comes
//! as `PGBUS_HEADER_PGBUS_QUEUE`, never in place of it.

use std::collections::BTreeMap;

use pgbus_core::{Headers, EVENT_ID_HEADER, PUBLISHED_AT_HEADER, ROUTING_KEY_HEADER};
use pgbus_exec::JobContext;
use pgbus_pg::PgBackend;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue};

/// The envelope headers of a topic's copy, with their variable names. The request header
/// is named like the message's header.
const ENVELOPE: [(&str, &str); 3] = [
    (ROUTING_KEY_HEADER, "PGBUS_ROUTING_KEY"),
    (EVENT_ID_HEADER, "PGBUS_EVENT_ID"),
    (PUBLISHED_AT_HEADER, "PGBUS_PUBLISHED_AT"),
];

/// One delivery, as the handlers describe it.
pub(super) struct Delivery<'a> {
    pub(super) queue: &'a str,
    pub(super) message_id: String,
    pub(super) attempt: u32,
    pub(super) group: Option<&'a str>,
    pub(super) headers: &'a Headers,
}

impl<'a> Delivery<'a> {
    pub(super) fn of(ctx: &'a JobContext<PgBackend>) -> Self {
        Delivery {
            queue: ctx.queue().as_str(),
            message_id: ctx.message_id().to_string(),
            attempt: ctx.attempt(),
            group: ctx.group_key(),
            headers: ctx.headers(),
        }
    }

    /// The message's headers, the envelope's apart, each under its sanitised name (the
    /// first in byte order of the names that sanitise alike).
    fn other_headers(&self, rename: impl Fn(&str) -> String) -> BTreeMap<String, &'a str> {
        let mut renamed = BTreeMap::new();
        for (name, value) in self.headers {
            if ENVELOPE.iter().any(|(envelope, _)| envelope == name) {
                continue;
            }
            renamed.entry(rename(name)).or_insert(value.as_str());
        }
        renamed
    }

    /// The variables set for an `--exec` command.
    pub(super) fn env(&self) -> Vec<(String, String)> {
        let mut vars = vec![
            ("PGBUS_QUEUE".to_owned(), self.queue.to_owned()),
            ("PGBUS_MESSAGE_ID".to_owned(), self.message_id.clone()),
            ("PGBUS_ATTEMPT".to_owned(), self.attempt.to_string()),
            (
                "PGBUS_GROUP".to_owned(),
                self.group.unwrap_or("").to_owned(),
            ),
        ];
        for (header, var) in ENVELOPE {
            if let Some(value) = self.headers.get(header) {
                vars.push((var.to_owned(), value.clone()));
            }
        }
        for (name, value) in self.other_headers(env_name) {
            vars.push((name, value.to_owned()));
        }
        vars
    }

    /// The headers of an `--http` request, but its content type. A value that cannot be a
    /// header's (it holds a control character such as a newline) is left out, with a
    /// warning.
    pub(super) fn http_headers(&self) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let mut add = |name: String, value: &str| {
            let Ok(header) = HeaderName::try_from(name.as_str()) else {
                return; // cannot happen: the names are tokens
            };
            match HeaderValue::from_bytes(value.as_bytes()) {
                Ok(value) => {
                    headers.insert(header, value);
                }
                Err(_) => tracing::warn!(
                    target: "pgbus::cli",
                    header = %name.escape_debug(),
                    job.id = %self.message_id,
                    "a header value with a control character cannot go in an HTTP request; left out"
                ),
            }
        };
        add("pgbus-queue".to_owned(), self.queue);
        add("pgbus-message-id".to_owned(), &self.message_id);
        add("pgbus-attempt".to_owned(), &self.attempt.to_string());
        if let Some(group) = self.group {
            add("pgbus-group".to_owned(), group);
        }
        for (header, _) in ENVELOPE {
            if let Some(value) = self.headers.get(header) {
                add(header.to_owned(), value);
            }
        }
        for (name, value) in self.other_headers(http_name) {
            add(name, value);
        }
        headers
    }
}

/// `PGBUS_HEADER_` and the header's name in upper case, every character but `A-Z0-9` an
/// `_`.
fn env_name(header: &str) -> String {
    let name: String = header
        .chars()
        .map(|c| match c.to_ascii_uppercase() {
            c @ ('A'..='Z' | '0'..='9') => c,
            _ => '_',
        })
        .collect();
    format!("PGBUS_HEADER_{name}")
}

/// `pgbus-header-` and the header's name in lower case, every character but `a-z0-9-` a
/// `-`.
fn http_name(header: &str) -> String {
    let name: String = header
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9' | '-') => c,
            _ => '-',
        })
        .collect();
    format!("pgbus-header-{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery<'a>(headers: &'a Headers, group: Option<&'a str>) -> Delivery<'a> {
        Delivery {
            queue: "billing",
            message_id: "42".into(),
            attempt: 2,
            group,
            headers,
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> Headers {
        pairs
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn a_plain_message_gets_its_delivery_and_its_headers_under_sanitised_names() {
        let headers = headers(&[
            ("Trace-Id", "t-1"),
            ("x.y z", "v"),
            ("x_y_z", "shadowed"),
            ("pgbus-queue", "forged"),
            ("héllo", "wörld"),
        ]);
        let env: BTreeMap<String, String> = delivery(&headers, None).env().into_iter().collect();
        let expected: BTreeMap<String, String> = [
            ("PGBUS_QUEUE", "billing"),
            ("PGBUS_MESSAGE_ID", "42"),
            ("PGBUS_ATTEMPT", "2"),
            ("PGBUS_GROUP", ""),
            ("PGBUS_HEADER_TRACE_ID", "t-1"),
            ("PGBUS_HEADER_X_Y_Z", "v"),
            ("PGBUS_HEADER_PGBUS_QUEUE", "forged"),
            ("PGBUS_HEADER_H_LLO", "wörld"),
        ]
        .into_iter()
        .map(|(n, v)| (n.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(env, expected);

        let http = delivery(&headers, Some("customer_7")).http_headers();
        let sent: BTreeMap<&str, &[u8]> = http
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_bytes()))
            .collect();
        let expected: BTreeMap<&str, &[u8]> = [
            ("pgbus-queue", "billing".as_bytes()),
            ("pgbus-message-id", b"42"),
            ("pgbus-attempt", b"2"),
            ("pgbus-group", b"customer_7"),
            ("pgbus-header-trace-id", b"t-1"),
            ("pgbus-header-x-y-z", b"v"),
            ("pgbus-header-pgbus-queue", b"forged"),
            ("pgbus-header-h-llo", "wörld".as_bytes()),
        ]
        .into_iter()
        .collect();
        assert_eq!(sent, expected);
        assert_eq!(http.len(), expected.len(), "one value per name");
    }

    #[test]
    fn a_topic_copy_gets_its_envelope_under_names_of_its_own() {
        let headers = headers(&[
            (ROUTING_KEY_HEADER, "order.paid"),
            (EVENT_ID_HEADER, "0190a0e6-0000-7000-8000-000000000001"),
            (PUBLISHED_AT_HEADER, "1700000000000000"),
            ("tenant", "acme"),
        ]);
        let env: BTreeMap<String, String> = delivery(&headers, None).env().into_iter().collect();
        assert_eq!(env["PGBUS_ROUTING_KEY"], "order.paid");
        assert_eq!(
            env["PGBUS_EVENT_ID"],
            "0190a0e6-0000-7000-8000-000000000001"
        );
        assert_eq!(env["PGBUS_PUBLISHED_AT"], "1700000000000000");
        assert_eq!(env["PGBUS_HEADER_TENANT"], "acme");
        assert!(
            !env.keys().any(|k| k.starts_with("PGBUS_HEADER_PGBUS_")),
            "the envelope is not repeated: {env:#?}"
        );
        let http = delivery(&headers, None).http_headers();
        assert_eq!(http["pgbus-routing-key"], "order.paid");
        assert_eq!(
            http["pgbus-event-id"],
            "0190a0e6-0000-7000-8000-000000000001"
        );
        assert_eq!(http["pgbus-published-at"], "1700000000000000");
        assert_eq!(http["pgbus-header-tenant"], "acme");
        assert!(!http.contains_key("pgbus-group"));
    }

    #[test]
    fn a_header_value_an_http_request_cannot_carry_is_left_out_of_it_only() {
        let headers = headers(&[("note", "two\nlines"), ("ok", "fine")]);
        let http = delivery(&headers, None).http_headers();
        assert!(!http.contains_key("pgbus-header-note"));
        assert_eq!(http["pgbus-header-ok"], "fine");
        let env: BTreeMap<String, String> = delivery(&headers, None).env().into_iter().collect();
        assert_eq!(env["PGBUS_HEADER_NOTE"], "two\nlines");
    }
}
