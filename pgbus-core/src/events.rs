//! The event bus: routing keys, topic patterns, the event envelope, and the contracts for
//! publishing ([`Topics`]) and for idempotent consumers ([`Deduplication`]).
//!
//! A publisher names a fact with a routing key (`order.paid`); a subscription binds a
//! pattern (`order.*`, `order.#`) to a queue, and every publish delivers one copy of the
//! event to each queue with a matching binding, as an ordinary message. The envelope (event
//! id, routing key, publish time) travels in the message's headers, next to the caller's
//! own; the payload is encoded as for jobs.

use std::fmt;
use std::future::Future;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::{ContentType, Error, Headers, Lease, Message, QueueName, Result};

/// The longest routing key or topic pattern accepted, in bytes.
pub const MAX_ROUTING_KEY_LEN: usize = 255;

/// Header carrying the event id of an event delivered to a queue.
pub const EVENT_ID_HEADER: &str = "pgbus-event-id";
/// Header carrying the routing key of an event delivered to a queue.
pub const ROUTING_KEY_HEADER: &str = "pgbus-routing-key";
/// Header carrying the publish time of an event, in microseconds since the Unix epoch.
pub const PUBLISHED_AT_HEADER: &str = "pgbus-published-at";

/// Checks the shape shared by routing keys and patterns: dot-separated, non-empty segments,
/// each accepted by `segment_ok`, at most [`MAX_ROUTING_KEY_LEN`] bytes.
fn check_segments(text: &str, segment_ok: impl Fn(&str) -> bool) -> Option<&'static str> {
    if text.is_empty() {
        Some("must not be empty")
    } else if text.len() > MAX_ROUTING_KEY_LEN {
        Some("must be at most 255 bytes long")
    } else if text.split('.').any(str::is_empty) {
        Some("must not have empty segments (a leading, trailing or doubled '.')")
    } else if !text.split('.').all(segment_ok) {
        Some("may contain only segments of [A-Za-z0-9_-] separated by '.'")
    } else {
        None
    }
}

fn literal_segment(segment: &str) -> bool {
    segment
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A routing key: segments of `[A-Za-z0-9_-]` separated by `.` (`order.paid`,
/// `eu-west.order.refunded`), at most [`MAX_ROUTING_KEY_LEN`] bytes.
///
/// ```
/// use pgbus_core::RoutingKey;
/// assert!(RoutingKey::new("order.paid").is_ok());
/// assert!(RoutingKey::new("order..paid").is_err());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RoutingKey(String);

impl RoutingKey {
    /// Validates `key`, naming the broken rule in the error.
    pub fn new(key: impl Into<String>) -> Result<Self> {
        let key = key.into();
        match check_segments(&key, literal_segment) {
            Some(rule) => Err(Error::InvalidRoutingKey { key, rule }),
            None => Ok(Self(key)),
        }
    }

    /// The key as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A topic pattern: like a routing key, where a segment may also be `*` (exactly one
/// segment) or `#` (any number of segments, none included). Patterns are anchored: `a.*`
/// matches `a.b` but neither `a` nor `a.b.c`; `a.#` matches `a`, `a.b` and `a.b.c`; `#`
/// matches every key.
///
/// ```
/// use pgbus_core::{RoutingKey, TopicPattern};
/// let pattern = TopicPattern::new("order.#").unwrap();
/// assert!(pattern.matches(&RoutingKey::new("order.paid").unwrap()));
/// assert!(!pattern.matches(&RoutingKey::new("invoice.paid").unwrap()));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TopicPattern(String);

impl TopicPattern {
    /// Validates `pattern`, naming the broken rule in the error.
    pub fn new(pattern: impl Into<String>) -> Result<Self> {
        let pattern = pattern.into();
        let segment_ok = |s: &str| s == "*" || s == "#" || literal_segment(s);
        match check_segments(&pattern, segment_ok) {
            Some(rule) => Err(Error::InvalidTopicPattern { pattern, rule }),
            None => Ok(Self(pattern)),
        }
    }

    /// The pattern as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether `key` matches. The Postgres backend matches with a regular expression
    /// derived from the same rules; both are tested against one table of cases.
    pub fn matches(&self, key: &RoutingKey) -> bool {
        let pattern: Vec<&str> = self.0.split('.').collect();
        let key: Vec<&str> = key.0.split('.').collect();
        matches_from(&pattern, &key)
    }
}

/// Segment matching in time proportional to pattern length times key length, whatever the
/// pattern: `reachable[j]` says whether the pattern so far can consume exactly the first
/// `j` key segments. (Trying every split for each `#` in turn takes exponential time on
/// patterns such as `#.#.#.#...` against a key that does not match.)
fn matches_from(pattern: &[&str], key: &[&str]) -> bool {
    let mut reachable = vec![false; key.len() + 1];
    reachable[0] = true;
    for &segment in pattern {
        let mut next = vec![false; key.len() + 1];
        if segment == "#" {
            let mut any = false;
            for (next, &here) in next.iter_mut().zip(&reachable) {
                any |= here;
                *next = any;
            }
        } else {
            for (j, &first) in key.iter().enumerate() {
                next[j + 1] = reachable[j] && (segment == "*" || segment == first);
            }
        }
        reachable = next;
    }
    reachable[key.len()]
}

macro_rules! display_and_parse {
    ($ty:ident) => {
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl FromStr for $ty {
            type Err = Error;
            fn from_str(s: &str) -> Result<Self> {
                Self::new(s)
            }
        }
    };
}
display_and_parse!(RoutingKey);
display_and_parse!(TopicPattern);

/// An event id: a random (version 4) UUID, written in the usual hyphenated form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventId(u128);

impl EventId {
    /// A new random id.
    pub fn random() -> Self {
        let bits = rand::random::<u128>();
        // Version 4 in the high nibble of byte 6, the RFC 4122 variant in byte 8.
        let bits = (bits & !(0xF << 76)) | (0x4 << 76);
        let bits = (bits & !(0b11 << 62)) | (0b10 << 62);
        Self(bits)
    }

    /// The id as 128 bits.
    pub fn as_u128(self) -> u128 {
        self.0
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hex = format!("{:032x}", self.0);
        write!(
            f,
            "{}-{}-{}-{}-{}",
            &hex[0..8],
            &hex[8..12],
            &hex[12..16],
            &hex[16..20],
            &hex[20..32]
        )
    }
}

impl FromStr for EventId {
    type Err = Error;
    /// Parses a UUID, hyphenated or not, in either case.
    fn from_str(s: &str) -> Result<Self> {
        let hex: String = s.chars().filter(|c| *c != '-').collect();
        if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::InvalidArgument(format!(
                "{s:?} is not a UUID (32 hex digits, optionally hyphenated)"
            )));
        }
        u128::from_str_radix(&hex, 16)
            .map(Self)
            .map_err(|e| Error::InvalidArgument(format!("{s:?} is not a UUID: {e}")))
    }
}

/// An event to publish, built with consuming setters.
///
/// ```
/// use pgbus_core::NewEvent;
/// #[derive(serde::Serialize)]
/// struct OrderPaid { order: u64 }
/// let event = NewEvent::encode("order.paid", &OrderPaid { order: 7 })
///     .unwrap()
///     .header("trace_id", "abc");
/// assert_eq!(event.routing_key.as_str(), "order.paid");
/// ```
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct NewEvent {
    /// The event id, random unless set (an outbox relay keeps the producer's).
    pub id: EventId,
    /// The routing key.
    pub routing_key: RoutingKey,
    /// Encoded payload.
    pub payload: Vec<u8>,
    /// How the payload is encoded.
    pub content_type: ContentType,
    /// The publisher's headers (names starting with `pgbus-` are reserved).
    pub headers: Headers,
}

impl NewEvent {
    /// An event with an already encoded payload; fails on an invalid routing key.
    pub fn raw(
        routing_key: impl Into<String>,
        payload: Vec<u8>,
        content_type: ContentType,
    ) -> Result<Self> {
        Ok(Self {
            id: EventId::random(),
            routing_key: RoutingKey::new(routing_key)?,
            payload,
            content_type,
            headers: Headers::new(),
        })
    }

    /// Encodes `value` as MessagePack (the default codec).
    pub fn encode<T: Serialize + ?Sized>(
        routing_key: impl Into<String>,
        value: &T,
    ) -> Result<Self> {
        Self::encode_as(routing_key, ContentType::MessagePack, value)
    }

    /// Encodes `value` as JSON.
    pub fn json<T: Serialize + ?Sized>(routing_key: impl Into<String>, value: &T) -> Result<Self> {
        Self::encode_as(routing_key, ContentType::Json, value)
    }

    /// Encodes `value` with the given codec.
    pub fn encode_as<T: Serialize + ?Sized>(
        routing_key: impl Into<String>,
        content_type: ContentType,
        value: &T,
    ) -> Result<Self> {
        Self::raw(routing_key, content_type.encode(value)?, content_type)
    }

    /// Sets the event id (for a relay that keeps its producer's ids).
    pub fn id(mut self, id: EventId) -> Self {
        self.id = id;
        self
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Checks the limits every backend enforces before storing anything: payload size, no
    /// NUL in headers and no reserved (`pgbus-`) header names.
    pub fn check(&self, max_payload_bytes: usize) -> Result<()> {
        crate::message::check_payload_size(&self.payload, max_payload_bytes)?;
        crate::message::check_headers(&self.headers)?;
        match self.headers.keys().find(|name| name.starts_with("pgbus-")) {
            Some(name) => Err(Error::InvalidArgument(format!(
                "header {name:?}: names starting with \"pgbus-\" are reserved for the event envelope"
            ))),
            None => Ok(()),
        }
    }

    /// The headers of a delivered copy: the publisher's plus the envelope.
    pub fn envelope_headers(&self, published_at: SystemTime) -> Headers {
        let mut headers = self.headers.clone();
        headers.insert(EVENT_ID_HEADER.into(), self.id.to_string());
        headers.insert(ROUTING_KEY_HEADER.into(), self.routing_key.to_string());
        let micros = published_at
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_micros();
        headers.insert(PUBLISHED_AT_HEADER.into(), micros.to_string());
        headers
    }
}

/// A delivered event, decoded: the envelope and the typed payload.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct Event<T> {
    /// The event id (the same in every subscriber's copy).
    pub id: EventId,
    /// The routing key it was published with.
    pub routing_key: RoutingKey,
    /// When it was published.
    pub published_at: SystemTime,
    /// The publisher's headers (the envelope headers removed).
    pub headers: Headers,
    /// The payload.
    pub payload: T,
}

impl<T: DeserializeOwned> Event<T> {
    /// Reads the envelope from a claimed message's headers and decodes its payload.
    /// A message that is not an event copy is an [`Error::NotAnEvent`].
    pub fn from_message(message: &Message) -> Result<Self> {
        let (id, routing_key, published_at) = envelope(&message.headers)?;
        let headers = message
            .headers
            .iter()
            .filter(|(name, _)| !name.starts_with("pgbus-"))
            .map(|(name, value)| (name.clone(), value.clone()))
            .collect();
        Ok(Self {
            id,
            routing_key,
            published_at,
            headers,
            payload: message.decode()?,
        })
    }
}

/// The envelope of an event copy: id, routing key, publish time.
pub fn envelope(headers: &Headers) -> Result<(EventId, RoutingKey, SystemTime)> {
    let field = |name: &str| {
        headers
            .get(name)
            .ok_or_else(|| Error::NotAnEvent(format!("the {name} header is missing")))
    };
    let not_an_event = |what: &str, err: Error| Error::NotAnEvent(format!("{what}: {err}"));
    let id = field(EVENT_ID_HEADER)?
        .parse()
        .map_err(|e| not_an_event(EVENT_ID_HEADER, e))?;
    let key = RoutingKey::new(field(ROUTING_KEY_HEADER)?.clone())
        .map_err(|e| not_an_event(ROUTING_KEY_HEADER, e))?;
    let micros: u64 = field(PUBLISHED_AT_HEADER)?.parse().map_err(|_| {
        Error::NotAnEvent(format!(
            "{PUBLISHED_AT_HEADER} is not a count of microseconds"
        ))
    })?;
    Ok((id, key, UNIX_EPOCH + Duration::from_micros(micros)))
}

/// What a publish did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Published {
    /// The event id.
    pub id: EventId,
    /// Copies delivered: one per queue with a matching binding. Zero means no subscription
    /// matched; the event is still kept in the event log, for subscriptions created later
    /// with a start position.
    pub copies: u64,
}

impl Published {
    /// A publish report.
    pub fn new(id: EventId, copies: u64) -> Self {
        Self { id, copies }
    }
}

/// Where a new subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StartAt {
    /// With the events published after the binding exists.
    #[default]
    Now,
    /// Also with the matching events still in the event log published at or after this
    /// time.
    Since(SystemTime),
    /// Also with every matching event still in the event log.
    Earliest,
}

/// A binding of a pattern to a queue.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Binding {
    /// The pattern.
    pub pattern: TopicPattern,
    /// The queue receiving the copies.
    pub queue: QueueName,
    /// When it was created.
    pub created_at: SystemTime,
}

impl Binding {
    /// A binding as a backend read it.
    pub fn new(pattern: TopicPattern, queue: QueueName, created_at: SystemTime) -> Self {
        Self {
            pattern,
            queue,
            created_at,
        }
    }
}

/// What [`Topics::bind`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Bound {
    /// Whether the binding is new (`false`: it existed, and nothing was replayed).
    pub created: bool,
    /// Events from the log copied into the queue because of the start position.
    pub replayed: u64,
}

impl Bound {
    /// A bind report.
    pub fn new(created: bool, replayed: u64) -> Self {
        Self { created, replayed }
    }
}

/// Publishing counts for one routing key, over the events still in the log.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct TopicStats {
    /// The routing key.
    pub routing_key: RoutingKey,
    /// Events published.
    pub published: u64,
    /// Of those, events that matched no binding (delivered nowhere).
    pub unrouted: u64,
    /// Copies delivered in all.
    pub copies: u64,
    /// The last publish.
    pub last_published_at: SystemTime,
}

impl TopicStats {
    /// Counts as a backend read them.
    pub fn new(routing_key: RoutingKey, last_published_at: SystemTime) -> Self {
        Self {
            routing_key,
            published: 0,
            unrouted: 0,
            copies: 0,
            last_published_at,
        }
    }
}

/// Topics and subscriptions: binding patterns to queues and publishing events to them.
pub trait Topics: Send + Sync {
    /// Binds `pattern` to `queue` (idempotent: an existing binding is left alone and
    /// nothing is replayed). A new binding with a start position also copies the matching
    /// events still in the event log into the queue, in publish order; publishes are
    /// ordered against the bind, so none falls between the replay and the binding.
    fn bind(
        &self,
        pattern: &TopicPattern,
        queue: &QueueName,
        start: StartAt,
    ) -> impl Future<Output = Result<Bound>> + Send;

    /// Removes a binding; `false` when it did not exist.
    fn unbind(
        &self,
        pattern: &TopicPattern,
        queue: &QueueName,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Every binding, by pattern then queue.
    fn bindings(&self) -> impl Future<Output = Result<Vec<Binding>>> + Send;

    /// Publishes one event: one copy to each queue with a matching binding (a queue
    /// bound by several matching patterns gets one copy), and an entry in the event log.
    fn publish(&self, event: NewEvent) -> impl Future<Output = Result<Published>> + Send {
        async move {
            let mut published = self.publish_batch(vec![event]).await?;
            Ok(published.remove(0))
        }
    }

    /// Publishes many events in one statement; reports in input order. All or none.
    fn publish_batch(
        &self,
        events: Vec<NewEvent>,
    ) -> impl Future<Output = Result<Vec<Published>>> + Send;

    /// Counts per routing key over the event log, by key.
    fn topic_stats(&self) -> impl Future<Output = Result<Vec<TopicStats>>> + Send;

    /// Deletes logged events older than `retention`, at most `batch` per statement;
    /// returns how many.
    fn prune_event_log(
        &self,
        retention: Duration,
        batch: usize,
    ) -> impl Future<Output = Result<u64>> + Send;
}

/// What an idempotent consumer should do with a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DedupClaim {
    /// Run the handler: the event was never claimed by this subscriber, or its claim was
    /// left by a delivery that died (or by this same message's previous attempt).
    Run,
    /// The event was handled to completion already: ack without running.
    Done,
    /// Another live delivery of the same event is running now: try again later.
    Busy,
}

/// The two-phase dedup record of idempotent consumers: one per (subscriber, event),
/// claimed before the handler runs and completed after it returns, before the ack. A crash
/// in between leaves it claimed, so the redelivery runs again; once completed, no delivery
/// of the event runs for that subscriber again.
pub trait Deduplication: Send + Sync {
    /// Claims `event` for `subscriber` on behalf of the delivery `lease`.
    fn claim_event(
        &self,
        subscriber: &QueueName,
        event: EventId,
        lease: &Lease,
    ) -> impl Future<Output = Result<DedupClaim>> + Send;

    /// Marks the event completed; `false` when the claim had passed to another delivery.
    fn complete_event(
        &self,
        subscriber: &QueueName,
        event: EventId,
        lease: &Lease,
    ) -> impl Future<Output = Result<bool>> + Send;

    /// Deletes dedup records untouched for `retention`, at most `batch` per statement;
    /// returns how many.
    fn prune_dedup(
        &self,
        retention: Duration,
        batch: usize,
    ) -> impl Future<Output = Result<u64>> + Send;
}

/// The routing table every backend is tested against: `(pattern, key, matches)`.
pub const ROUTING_CASES: &[(&str, &str, bool)] = &[
    ("a.b.c", "a.b.c", true),
    ("a.b.c", "a.b", false),
    ("a.b.c", "a.b.c.d", false),
    ("a.*", "a.b", true),
    ("a.*", "a", false),
    ("a.*", "a.b.c", false),
    ("a.*", "b.a", false),
    ("*.b", "a.b", true),
    ("a.*.c", "a.x.c", true),
    ("a.*.c", "a.c", false),
    ("a.#", "a", true),
    ("a.#", "a.b", true),
    ("a.#", "a.b.c", true),
    ("a.#", "ab", false),
    ("a.#", "b.a", false),
    ("#", "a", true),
    ("#", "a.b.c", true),
    ("#.c", "c", true),
    ("#.c", "a.b.c", true),
    ("#.c", "a.c.d", false),
    ("a.#.c", "a.c", true),
    ("a.#.c", "a.b.b.c", true),
    ("a.#.c", "a.b.d", false),
    ("#.b.#", "a.b.c", true),
    ("#.b.#", "b", true),
    ("#.b.#", "a.c", false),
    ("*.#", "a", true),
    ("*.*", "a", false),
    ("a-1.b_2", "a-1.b_2", true),
    ("A.b", "a.b", false),
    ("#.#", "a.b", true),
    ("a.#.#.b", "a.b", true),
    ("#.*.#.*", "a", false),
    ("#.*.#.*", "a.b", true),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_table() {
        for &(pattern, key, expected) in ROUTING_CASES {
            let p = TopicPattern::new(pattern).unwrap();
            let k = RoutingKey::new(key).unwrap();
            assert_eq!(p.matches(&k), expected, "{pattern} ~ {key}");
        }
    }

    #[test]
    fn adversarial_patterns_match_in_polynomial_time() {
        // 127 `#` then a literal that the key lacks: trying every split of the key for
        // every `#` would not finish in the lifetime of the machine.
        let pattern = TopicPattern::new(format!("{}x", "#.".repeat(126))).unwrap();
        let key = RoutingKey::new(format!("{}b", "a.".repeat(127))).unwrap();
        assert!(pattern.as_str().len() <= MAX_ROUTING_KEY_LEN);
        let started = std::time::Instant::now();
        assert!(!pattern.matches(&key));
        let key = RoutingKey::new(format!("{}x", "a.".repeat(127))).unwrap();
        assert!(pattern.matches(&key));
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn refuses_bad_keys_and_patterns_naming_the_rule() {
        let long = "a".repeat(256);
        for (key, rule) in [
            ("", "empty"),
            ("a..b", "empty segments"),
            (".a", "empty segments"),
            ("a.", "empty segments"),
            ("a.*", "[A-Za-z0-9_-]"),
            ("a.#", "[A-Za-z0-9_-]"),
            ("a b", "[A-Za-z0-9_-]"),
            ("é", "[A-Za-z0-9_-]"),
            (long.as_str(), "255 bytes"),
        ] {
            let err = RoutingKey::new(key).unwrap_err();
            assert!(matches!(err, Error::InvalidRoutingKey { .. }), "{key}");
            assert!(err.to_string().contains(rule), "{key:?}: {err}");
        }
        for (pattern, rule) in [
            ("", "empty"),
            ("a..b", "empty segments"),
            ("a.", "empty segments"),
            (".#", "empty segments"),
            ("a.b*", "[A-Za-z0-9_-]"),
            ("a.##", "[A-Za-z0-9_-]"),
            ("a.%", "[A-Za-z0-9_-]"),
        ] {
            let err = TopicPattern::new(pattern).unwrap_err();
            assert!(
                matches!(err, Error::InvalidTopicPattern { .. }),
                "{pattern}"
            );
            assert!(err.to_string().contains(rule), "{pattern:?}: {err}");
        }
    }

    #[test]
    fn event_ids_are_v4_uuids_and_round_trip() {
        let id = EventId::random();
        let text = id.to_string();
        assert_eq!(text.len(), 36);
        assert_eq!(&text[14..15], "4", "{text}");
        assert!("89ab".contains(&text[19..20]), "{text}");
        assert_eq!(text.parse::<EventId>().unwrap(), id);
        assert_eq!(text.to_uppercase().parse::<EventId>().unwrap(), id);
        assert_ne!(EventId::random(), id);
        assert!("not-a-uuid".parse::<EventId>().is_err());
    }

    #[test]
    fn envelope_round_trips_through_message_headers() {
        #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
        struct Paid {
            order: u64,
        }
        let event = NewEvent::encode("order.paid", &Paid { order: 7 })
            .unwrap()
            .header("trace", "t1");
        let at = UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        let mut message = Message::new(
            crate::MessageId(1),
            QueueName::new("billing").unwrap(),
            event.payload.clone(),
            event.content_type,
        );
        message.headers = event.envelope_headers(at);
        let decoded: Event<Paid> = Event::from_message(&message).unwrap();
        assert_eq!(decoded.id, event.id);
        assert_eq!(decoded.routing_key.as_str(), "order.paid");
        assert_eq!(decoded.published_at, at);
        assert_eq!(decoded.payload, Paid { order: 7 });
        assert_eq!(decoded.headers.len(), 1);

        message.headers.remove(EVENT_ID_HEADER);
        let err = Event::<Paid>::from_message(&message).unwrap_err();
        assert!(matches!(err, Error::NotAnEvent(_)), "{err}");
        assert!(event
            .clone()
            .header("pgbus-x", "y")
            .check(1024)
            .unwrap_err()
            .to_string()
            .contains("reserved"));
    }
}
