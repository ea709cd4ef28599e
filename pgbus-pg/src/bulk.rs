//! Large plain batches by binary `COPY`: the pooled `send_batch` of at least [`BULK_MIN`]
//! messages without keys.
//!
//! The one-statement send (`sql::SEND`) passes every column as an array parameter and
//! unnests it on the server: a per-row cost in parsing the arrays, evaluating the
//! expressions and returning the ids in order. `COPY ... FROM STDIN (FORMAT binary)` is
//! PostgreSQL's bulk load path: rows stream in its binary format and are inserted with no
//! per-row evaluation. `COPY` returns no ids, so they are drawn from the table's identity
//! sequence first, in one statement, and written with the rows.
//!
//! Only on a server session of its own (`Pooler::Session`): `COPY` is sent as a prepared
//! statement (tokio-postgres has no unnamed form of it), which a transaction-mode pooler
//! cannot carry (PgBouncer 1.18 hangs on it); behind one, large batches take the
//! one-statement send.
//!
//! Three statements, not one transaction: the ids (gaps if the copy fails, as any failed
//! insert leaves), the copy (atomic on its own: every row or none), then the wake-up.
//! A process that stops between the copy and the wake-up leaves jobs that the workers'
//! poll finds, the same as a skipped notification.

use std::time::SystemTime;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::{pin_mut, SinkExt};
use pgbus_core::{MessageId, NewMessage, QueueName, Result, Visibility};
use tokio_postgres::types::{IsNull, Json, ToSql, Type};

use crate::error::db;
use crate::pool::PooledClient;
use crate::query::{Reused, Typed};
use crate::send::send_error;
use crate::sql;

/// Batches at least this large go by `COPY` (below it the one-statement send is as fast:
/// the copy's extra round trips outweigh its per-row saving).
pub(crate) const BULK_MIN: usize = 1_000;

/// Draws `$1` ids from the hot table's identity sequence, with the server's clock. The
/// sequence is named by a literal, resolved once when the statement is parsed:
/// `pg_get_serial_sequence` in its place ran once per id, a catalog lookup that cost ten
/// times the ids themselves.
const DRAW_IDS: &str = "
SELECT now(), ARRAY(SELECT nextval('pgbus.messages_id_seq') FROM generate_series(1, $1::int))";

const COPY: &str = "
COPY pgbus.messages (id, queue, priority, visible_at, content_type, headers, group_key,
                     payload)
FROM STDIN (FORMAT binary)";

/// Rows go to the connection in chunks of about this many bytes. tokio-postgres's
/// `BinaryCopyInWriter` hands over every 4 KiB, and its channel to the connection task
/// holds one chunk: 200,000 messages were some 5,000 hand-overs between two tasks, each a
/// wake-up that may wait for a core on a busy machine; in 1 MiB chunks they are about 20.
/// (The bench could not tell the difference in its noise; the server's work dominates.)
const CHUNK_BYTES: usize = 1 << 20;

/// The binary `COPY` format's header: its signature, no flags, no header extension.
const COPY_HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";

/// The binary `COPY` format's end: a field count of -1.
const COPY_TRAILER: i16 = -1;

const COLUMN_TYPES: [Type; 8] = [
    Type::INT8,
    Type::TEXT,
    Type::INT2,
    Type::TIMESTAMPTZ,
    Type::TEXT,
    Type::JSONB,
    Type::TEXT,
    Type::BYTEA,
];

/// Sends `messages` (checked, plain, at least [`BULK_MIN`]) by `COPY`; the ids in input
/// order. Wakes the queue's workers when `notify` and a message is visible now.
pub(crate) async fn send(
    client: &PooledClient,
    queue: &QueueName,
    messages: &[NewMessage],
    notify: bool,
) -> Result<Vec<MessageId>> {
    let count = i32::try_from(messages.len()).map_err(|_| {
        pgbus_core::Error::InvalidArgument(format!(
            "a batch of {} messages is more than one send takes",
            messages.len()
        ))
    })?;
    let row = client
        .q_one(DRAW_IDS, &[&count])
        .await
        .map_err(|e| db("drawing message ids", e))?;
    // The server's time, so delays count from its clock, as the one-statement send does.
    let now: SystemTime = row.get(0);
    let mut ids: Vec<i64> = row.get(1);
    // `nextval` calls of one session return increasing values: sorted, they follow the
    // order in which the rows were numbered.
    ids.sort_unstable();

    // Prepared once per connection, like the hot statements.
    let copy = match &*client
        .reused(COPY)
        .await
        .map_err(|e| send_error(queue, e))?
    {
        Reused::Prepared(statement) => statement.clone(),
        Reused::Unnamed(_) => {
            return Err(pgbus_core::Error::InvalidArgument(
                "a bulk send needs a session of its own, not a transaction pooler".into(),
            ))
        }
    };
    let sink = client
        .copy_in::<_, Bytes>(&copy)
        .await
        .map_err(|e| send_error(queue, e))?;
    pin_mut!(sink);
    let mut buf = BytesMut::with_capacity(CHUNK_BYTES + CHUNK_BYTES / 8);
    buf.put_slice(COPY_HEADER);
    let mut visible_now = false;
    for (message, id) in messages.iter().zip(&ids) {
        let visible_at = match message.visibility {
            Visibility::Now => now,
            // `check` bounded delays and times to MAX_DELAY, so the sum cannot overflow a
            // timestamp; saturate anyway rather than panic.
            Visibility::After(delay) => now.checked_add(delay).unwrap_or(now),
            Visibility::At(at) => at,
        };
        visible_now |= visible_at <= now;
        write_row(
            &mut buf,
            &[
                id,
                &queue.as_str(),
                &message.priority,
                &visible_at,
                &message.content_type.mime(),
                &Json(&message.headers),
                &message.group_key.as_deref(),
                &message.payload.as_slice(),
            ],
        )?;
        if buf.len() >= CHUNK_BYTES {
            sink.send(buf.split().freeze())
                .await
                .map_err(|e| send_error(queue, e))?;
        }
    }
    buf.put_i16(COPY_TRAILER);
    sink.send(buf.freeze())
        .await
        .map_err(|e| send_error(queue, e))?;
    sink.finish().await.map_err(|e| send_error(queue, e))?;

    if notify && visible_now {
        client
            .exec(sql::NOTIFY_WAKEUP, &[&queue.as_str()])
            .await
            .map_err(|e| db("waking the queue's workers", e))?;
    }
    Ok(ids.into_iter().map(MessageId).collect())
}

/// Appends one row in the binary `COPY` format: the field count, then each field's length
/// (-1 for NULL) and value in the column's binary form.
fn write_row(buf: &mut BytesMut, values: &[&(dyn ToSql + Sync); 8]) -> Result<()> {
    buf.put_i16(values.len() as i16);
    for (value, ty) in values.iter().zip(&COLUMN_TYPES) {
        let at = buf.len();
        buf.put_i32(0);
        let length = match value.to_sql_checked(ty, buf).map_err(unencodable)? {
            IsNull::Yes => -1,
            IsNull::No => i32::try_from(buf.len() - at - 4).map_err(unencodable)?,
        };
        buf[at..at + 4].copy_from_slice(&length.to_be_bytes());
    }
    Ok(())
}

/// A value that the binary format cannot carry (none that `check` lets through).
fn unencodable(err: impl std::fmt::Display) -> pgbus_core::Error {
    pgbus_core::Error::InvalidArgument(format!("a message cannot be sent by COPY: {err}"))
}
