//! Batches on PostgreSQL: jobs sent together with callbacks, counted by a trigger as they
//! leave the hot table (see migration 12).

use pgbus_core::{
    BatchCallbacks, BatchId, BatchInfo, Error, MessageId, NewMessage, QueueName, Result,
};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::{Json, Type};
use tokio_postgres::Transaction;

use crate::error::db;
use crate::query::Typed;
use crate::{sql, PgBackend};

impl PgBackend {
    /// Sends `messages` to `queue` as one batch whose completion enqueues `callbacks`
    /// (see [`BatchCallbacks`]), all in one transaction. Batch jobs cannot carry unique
    /// keys (a duplicate would join the batch), and callbacks no keys at all. A batch job
    /// retried from the dead-letter queue comes back outside its batch.
    pub async fn start_batch(
        &self,
        queue: &QueueName,
        messages: Vec<NewMessage>,
        callbacks: BatchCallbacks,
    ) -> Result<(BatchId, Vec<MessageId>)> {
        let mut conn = self.conn().await?;
        let tx = conn
            .transaction()
            .await
            .map_err(|e| db("starting a batch transaction", e))?;
        let started = self.start_batch_in(&tx, queue, messages, callbacks).await?;
        tx.commit().await.map_err(|e| db("committing a batch", e))?;
        Ok(started)
    }

    /// [`start_batch`](Self::start_batch) inside the caller's transaction.
    pub async fn start_batch_in(
        &self,
        tx: &Transaction<'_>,
        queue: &QueueName,
        messages: Vec<NewMessage>,
        callbacks: BatchCallbacks,
    ) -> Result<(BatchId, Vec<MessageId>)> {
        let total = i32::try_from(messages.len())
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| Error::InvalidArgument("a batch needs 1 to 2^31 - 1 jobs".into()))?;
        if messages.iter().any(|m| m.unique.is_some()) {
            return Err(Error::InvalidArgument(
                "batch jobs cannot have unique keys".into(),
            ));
        }
        let kinds = [
            ("finished", callbacks.finished),
            ("succeeded", callbacks.succeeded),
            ("dead_lettered", callbacks.dead_lettered),
        ];
        let mut columns = CallbackColumns::default();
        for (kind, callback) in kinds {
            if let Some((queue, message)) = callback {
                message.check(self.max_payload_bytes())?;
                if message.unique.is_some()
                    || message.limit_key.is_some()
                    || message.group_key.is_some()
                {
                    return Err(Error::InvalidArgument(
                        "batch callbacks cannot have unique, limit or group keys".into(),
                    ));
                }
                columns.push(kind, queue, message);
            }
        }
        let id: i64 = tx
            .q_one(sql::CREATE_BATCH, &[&queue.as_str(), &total])
            .await
            .map_err(|e| db("creating a batch", e))?
            .get(0);
        if !columns.kinds.is_empty() {
            tx.query_typed(
                sql::ADD_BATCH_CALLBACKS,
                &[
                    (&id, Type::INT8),
                    (&columns.kinds, Type::TEXT_ARRAY),
                    (&columns.queues, Type::TEXT_ARRAY),
                    (&columns.priorities, Type::INT2_ARRAY),
                    (&columns.content_types, Type::TEXT_ARRAY),
                    (&columns.headers, Type::JSONB_ARRAY),
                    (&columns.payloads, Type::BYTEA_ARRAY),
                ],
            )
            .await
            .map_err(|e| match e.code() {
                Some(code) if code == &SqlState::FOREIGN_KEY_VIOLATION => Error::InvalidArgument(
                    "a batch callback names a queue that does not exist".into(),
                ),
                _ => db("adding batch callbacks", e),
            })?;
        }
        let ids = self.send_batch_in(tx, queue, messages).await?;
        let raw: Vec<i64> = ids.iter().map(|id| id.0).collect();
        tx.exec(sql::JOIN_BATCH, &[&id, &raw])
            .await
            .map_err(|e| db("joining jobs to their batch", e))?;
        Ok((BatchId(id), ids))
    }

    /// A batch's progress, `None` when there is no such batch.
    pub async fn batch(&self, id: BatchId) -> Result<Option<BatchInfo>> {
        let conn = self.conn().await?;
        let row = (*conn)
            .q_opt(sql::BATCH_INFO, &[&id.0])
            .await
            .map_err(|e| db("reading a batch", e))?;
        row.as_ref().map(batch_from).transpose()
    }

    /// The batches not finished yet, oldest first.
    pub async fn open_batches(&self) -> Result<Vec<BatchInfo>> {
        let conn = self.conn().await?;
        let rows = (*conn)
            .q(sql::OPEN_BATCHES, &[])
            .await
            .map_err(|e| db("listing open batches", e))?;
        rows.iter().map(batch_from).collect()
    }
}

fn batch_from(row: &tokio_postgres::Row) -> Result<BatchInfo> {
    let count = |n: i32| u32::try_from(n).unwrap_or(0);
    let mut info = BatchInfo::new(
        BatchId(row.get(0)),
        QueueName::new(row.get::<_, String>(1))?,
        count(row.get(2)),
        row.get(5),
    );
    info.pending = count(row.get(3)).min(info.total);
    info.dead_lettered = count(row.get(4));
    info.finished_at = row.get(6);
    Ok(info)
}

/// The callbacks' columns, one array each.
#[derive(Default)]
struct CallbackColumns {
    kinds: Vec<&'static str>,
    queues: Vec<String>,
    priorities: Vec<i16>,
    content_types: Vec<&'static str>,
    headers: Vec<Json<pgbus_core::Headers>>,
    payloads: Vec<Vec<u8>>,
}

impl CallbackColumns {
    fn push(&mut self, kind: &'static str, queue: QueueName, message: NewMessage) {
        self.kinds.push(kind);
        self.queues.push(queue.as_str().to_owned());
        self.priorities.push(message.priority);
        self.content_types.push(message.content_type.mime());
        self.headers.push(Json(message.headers));
        self.payloads.push(message.payload);
    }
}
