//! Sends of jobs with keys (unique and limit keys): the keyed send statement and the
//! mapping of its rows back to the caller's messages.

use std::collections::HashMap;

use pgbus_core::{Error, MessageId, NewMessage, OnConflict, QueueName, Result};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;
use tokio_postgres::GenericClient;

use crate::query::typed;
use crate::send::{send_error, Columns};
use crate::sql;

/// Whether the message needs the keyed send.
pub(crate) fn is_keyed(message: &NewMessage) -> bool {
    message.unique.is_some() || message.limit_key.is_some()
}

/// Where each input message's id comes from.
enum Slot {
    /// The `n`th message actually sent.
    Sent(usize),
    /// The same id as an earlier message of the batch with the same key.
    SameAs(usize),
}

/// Sends messages some of which carry keys, in one statement.
pub(crate) async fn send_keyed(
    client: &(impl GenericClient + Sync),
    queue: &QueueName,
    messages: Vec<NewMessage>,
    notify: bool,
) -> Result<Vec<MessageId>> {
    // A statement may update a row once only: a key repeated within the batch is sent
    // once, and the repeats get its id (or refuse the batch).
    let mut first_of: HashMap<&str, usize> = HashMap::new();
    let mut slots = Vec::with_capacity(messages.len());
    let mut sent = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        if let Some((unique, key)) = m
            .unique
            .as_ref()
            .and_then(|u| Some((u, u.until_done_key()?)))
        {
            if let Some(&earlier) = first_of.get(key) {
                if unique.on_conflict == OnConflict::Reject {
                    return Err(Error::DuplicateJob {
                        queue: queue.clone(),
                        key: unique.key.clone(),
                        existing: None,
                    });
                }
                slots.push(Slot::SameAs(earlier));
                continue;
            }
            first_of.insert(key, i);
        }
        slots.push(Slot::Sent(sent.len()));
        sent.push(i);
    }
    let batch: Vec<&NewMessage> = sent.iter().map(|&i| &messages[i]).collect();
    let columns = Columns::new(queue, batch.iter().copied());
    let keys: Vec<Option<&str>> = batch
        .iter()
        .map(|m| m.unique.as_ref().and_then(|u| u.until_done_key()))
        .collect();
    let rejects: Vec<bool> = batch
        .iter()
        .map(|m| {
            m.unique
                .as_ref()
                .is_some_and(|u| u.on_conflict == OnConflict::Reject)
        })
        .collect();
    let limit_keys: Vec<Option<String>> = batch.iter().map(|m| m.limit_key_in(queue)).collect();
    let send_params = columns.params(&notify);
    let mut params = typed(&send_params);
    params.push((&keys, Type::TEXT_ARRAY));
    params.push((&rejects, Type::BOOL_ARRAY));
    params.push((&limit_keys, Type::TEXT_ARRAY));
    let rows = match client.query_typed(sql::SEND_KEYED, &params).await {
        Ok(rows) => rows,
        Err(e) => match duplicate(queue, &e) {
            Some(refused) => {
                // The server reports the refusal before its statement has rolled back, and
                // until then the existing job stays locked (the statement locked it to name
                // it): a worker claiming right after would skip it. An empty statement on
                // the same connection answers only once the rollback is done (in the
                // caller's transaction too: the error aborts it, locks and all, before its
                // ROLLBACK; an empty statement is answered even in an aborted one).
                let _ = client.batch_execute("").await;
                return Err(refused);
            }
            None => return Err(send_error(queue, e)),
        },
    };

    // Keyed rows are matched by key; the unkeyed ones were inserted first, in input order,
    // so their ids (rows come ordered by id) follow it.
    let mut by_key: HashMap<String, MessageId> = HashMap::new();
    let mut unkeyed = Vec::new();
    for row in &rows {
        let id = MessageId(row.get(0));
        match row.get::<_, Option<String>>(1) {
            Some(key) => {
                by_key.insert(key, id);
            }
            None => unkeyed.push(id),
        }
    }
    let mut unkeyed = unkeyed.into_iter();
    let mut sent_ids = Vec::with_capacity(batch.len());
    for m in batch {
        let id = match m.unique.as_ref().and_then(|u| u.until_done_key()) {
            Some(key) => by_key.get(key).copied(),
            None => unkeyed.next(),
        };
        sent_ids.push(id.ok_or_else(|| Error::Backend {
            message: "the keyed send returned fewer rows than it was given".into(),
            transient: false,
            source: None,
        })?);
    }
    let mut ids: Vec<MessageId> = Vec::with_capacity(slots.len());
    for slot in slots {
        let id = match slot {
            Slot::Sent(n) => sent_ids[n],
            Slot::SameAs(i) => ids[i],
        };
        ids.push(id);
    }
    Ok(ids)
}

/// The refusal raised by `pgbus.duplicate_job`, as [`Error::DuplicateJob`].
fn duplicate(queue: &QueueName, err: &tokio_postgres::Error) -> Option<Error> {
    let db = err.as_db_error()?;
    if db.code() != &SqlState::UNIQUE_VIOLATION || db.constraint() != Some("pgbus_duplicate_job") {
        return None;
    }
    Some(Error::DuplicateJob {
        queue: queue.clone(),
        key: db.detail().unwrap_or_default().to_owned(),
        existing: db.hint().and_then(|h| h.parse().ok()).map(MessageId),
    })
}
