//! The columns of a send and its errors, shared by the plain send (`backend.rs`) and the
//! keyed one (`unique.rs`).

use std::time::SystemTime;

use pgbus_core::{Error, Headers, NewMessage, QueueName, Visibility};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Json;

use crate::error::db;
use crate::query::Param;

/// The columns of a send, one array per column (parameters `$1` to `$8` of the send
/// statements; `$9` is whether to notify).
pub(crate) struct Columns<'a> {
    queue: &'a str,
    priorities: Vec<i16>,
    ats: Vec<Option<SystemTime>>,
    delays: Vec<f64>,
    content_types: Vec<&'static str>,
    headers: Vec<Json<&'a Headers>>,
    groups: Vec<Option<&'a str>>,
    payloads: Vec<&'a [u8]>,
}

impl<'a> Columns<'a> {
    pub(crate) fn new(
        queue: &'a QueueName,
        messages: impl ExactSizeIterator<Item = &'a NewMessage>,
    ) -> Self {
        let n = messages.len();
        let mut c = Columns {
            queue: queue.as_str(),
            priorities: Vec::with_capacity(n),
            ats: Vec::with_capacity(n),
            delays: Vec::with_capacity(n),
            content_types: Vec::with_capacity(n),
            headers: Vec::with_capacity(n),
            groups: Vec::with_capacity(n),
            payloads: Vec::with_capacity(n),
        };
        for m in messages {
            c.priorities.push(m.priority);
            let (at, delay) = match m.visibility {
                Visibility::Now => (None, 0.0),
                Visibility::After(d) => (None, d.as_secs_f64()),
                Visibility::At(t) => (Some(t), 0.0),
            };
            c.ats.push(at);
            c.delays.push(delay);
            c.content_types.push(m.content_type.mime());
            c.headers.push(Json(&m.headers));
            c.groups.push(m.group_key.as_deref());
            c.payloads.push(&m.payload);
        }
        c
    }

    /// Parameters `$1` to `$9` of the one-message send (`sql::SEND_ONE`): the values of
    /// the only row, not arrays. `None` unless there is exactly one row.
    pub(crate) fn row_params<'p>(&'p self, notify: &'p bool) -> Option<[&'p dyn Param; 9]> {
        if self.payloads.len() != 1 {
            return None;
        }
        Some([
            &self.queue,
            &self.priorities[0],
            &self.ats[0],
            &self.delays[0],
            &self.content_types[0],
            &self.headers[0],
            &self.groups[0],
            &self.payloads[0],
            notify,
        ])
    }

    /// Parameters `$1` to `$9`, for a prepared statement or (through `typed`) an unnamed
    /// one.
    pub(crate) fn params<'p>(&'p self, notify: &'p bool) -> [&'p dyn Param; 9] {
        [
            &self.queue,
            &self.priorities,
            &self.ats,
            &self.delays,
            &self.content_types,
            &self.headers,
            &self.groups,
            &self.payloads,
            notify,
        ]
    }
}

/// A failed send: a missing queue is reported as such.
pub(crate) fn send_error(queue: &QueueName, err: tokio_postgres::Error) -> Error {
    missing_queue(queue, err).unwrap_or_else(|e| db("sending messages", e))
}

/// Sending to a missing queue fails with SQLSTATE 23503, the foreign-key violation (the
/// hot table's queue check, migration 19, raises it as its foreign key did; the other
/// tables' foreign keys still do): report it as the missing queue.
pub(crate) fn missing_queue(
    queue: &QueueName,
    err: tokio_postgres::Error,
) -> std::result::Result<Error, tokio_postgres::Error> {
    match err.code() {
        Some(code) if code == &SqlState::FOREIGN_KEY_VIOLATION => {
            Ok(Error::QueueNotFound(queue.clone()))
        }
        _ => Err(err),
    }
}
