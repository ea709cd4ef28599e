//! Topics on Postgres: bindings, fan-out publishes, the event log.

use std::time::{Duration, SystemTime};

use pgbus_core::{
    Binding, Bound, Error, Headers, NewEvent, Published, QueueName, Result, RoutingKey, StartAt,
    TopicPattern, TopicStats, Topics,
};
use tokio_postgres::types::{Json, ToSql, Type};
use tokio_postgres::GenericClient;

use crate::error::db;
use crate::query::Typed;
use crate::send::missing_queue;
use crate::{sql, PgBackend};

impl PgBackend {
    /// Publishes events on the caller's connection or transaction, in one statement: with
    /// a transaction, the copies exist (and wake workers) only if it commits. Returns, in
    /// input order, each event's id and number of copies; an event that matched no binding
    /// (zero copies) is logged with a warning and kept in the event log.
    pub async fn publish_batch_in(
        &self,
        client: &(impl GenericClient + Sync),
        events: Vec<NewEvent>,
    ) -> Result<Vec<Published>> {
        for event in &events {
            event.check(self.max_payload_bytes())?;
        }
        if events.is_empty() {
            return Ok(Vec::new());
        }
        let now = SystemTime::now();
        let reports: Vec<_> = events
            .iter()
            .map(|e| (e.id, e.routing_key.clone()))
            .collect();
        let columns = EventColumns::new(events, |e| e.envelope_headers(now));
        let notify = self.notifies();
        let mut params = columns.params();
        params.push((&notify, Type::BOOL));
        let rows = client
            .query_typed(sql::PUBLISH, &params)
            .await
            .map_err(|e| db("publishing events", e))?;
        Ok(rows
            .iter()
            .zip(reports)
            .map(|(row, (id, key))| {
                let copies = row.get::<_, i64>(1) as u64;
                warn_unrouted(&key, copies);
                Published::new(id, copies)
            })
            .collect())
    }

    /// Publishes one event on the caller's connection or transaction; see
    /// [`publish_batch_in`](Self::publish_batch_in).
    pub async fn publish_event_in(
        &self,
        client: &(impl GenericClient + Sync),
        event: NewEvent,
    ) -> Result<Published> {
        let mut published = self.publish_batch_in(client, vec![event]).await?;
        Ok(published.remove(0))
    }
}

/// Events as the column arrays of `unnest`: ids, routing keys, content types, headers
/// (as `headers` makes them), payloads.
pub(crate) struct EventColumns {
    ids: Vec<String>,
    keys: Vec<String>,
    content_types: Vec<&'static str>,
    headers: Vec<Json<Headers>>,
    payloads: Vec<Vec<u8>>,
}

impl EventColumns {
    pub(crate) fn new(events: Vec<NewEvent>, headers: impl Fn(&NewEvent) -> Headers) -> Self {
        let mut columns = Self {
            ids: Vec::with_capacity(events.len()),
            keys: Vec::with_capacity(events.len()),
            content_types: Vec::with_capacity(events.len()),
            headers: Vec::with_capacity(events.len()),
            payloads: Vec::with_capacity(events.len()),
        };
        for event in events {
            columns.ids.push(event.id.to_string());
            columns.keys.push(event.routing_key.to_string());
            columns.content_types.push(event.content_type.mime());
            columns.headers.push(Json(headers(&event)));
            columns.payloads.push(event.payload);
        }
        columns
    }

    /// `$1`..`$5`, typed (bound in the same round trip as the statement).
    pub(crate) fn params(&self) -> Vec<(&(dyn ToSql + Sync), Type)> {
        vec![
            (&self.ids, Type::TEXT_ARRAY),
            (&self.keys, Type::TEXT_ARRAY),
            (&self.content_types, Type::TEXT_ARRAY),
            (&self.headers, Type::JSONB_ARRAY),
            (&self.payloads, Type::BYTEA_ARRAY),
        ]
    }
}

fn warn_unrouted(key: &RoutingKey, copies: u64) {
    if copies == 0 {
        tracing::warn!(target: "pgbus::topics", routing_key = %key, "published event matched no binding: delivered nowhere (kept in the event log)");
    }
}

impl Topics for PgBackend {
    async fn bind(
        &self,
        pattern: &TopicPattern,
        queue: &QueueName,
        start: StartAt,
    ) -> Result<Bound> {
        let mut conn = self.conn().await?;
        let tx = conn
            .transaction()
            .await
            .map_err(|e| db("starting a bind", e))?;
        // Waits for in-flight publishes to commit and holds new ones back until this
        // commits: the replay below then sees every event that missed the binding.
        tx.exec(sql::LOCK_TOPICS, &[&sql::TOPICS_LOCK_KEY])
            .await
            .map_err(|e| db("locking topics for a bind", e))?;
        let created = tx
            .exec(sql::INSERT_BINDING, &[&pattern.as_str(), &queue.as_str()])
            .await
            .map_err(|e| missing_queue(queue, e).unwrap_or_else(|e| db("binding a topic", e)))?
            == 1;
        let since = match start {
            StartAt::Now => None,
            StartAt::Since(at) => Some(Some(at)),
            StartAt::Earliest => Some(None),
        };
        let mut replayed = 0;
        if let (true, Some(since)) = (created, since) {
            replayed = tx
                .q_one(
                    sql::REPLAY_EVENTS,
                    &[&pattern.as_str(), &queue.as_str(), &since],
                )
                .await
                .map_err(|e| db("replaying the event log into a new binding", e))?
                .get::<_, i64>(0) as u64;
        }
        tx.commit().await.map_err(|e| db("committing a bind", e))?;
        Ok(Bound::new(created, replayed))
    }

    async fn unbind(&self, pattern: &TopicPattern, queue: &QueueName) -> Result<bool> {
        let deleted = self
            .conn()
            .await?
            .exec(sql::DELETE_BINDING, &[&pattern.as_str(), &queue.as_str()])
            .await
            .map_err(|e| db("unbinding a topic", e))?;
        Ok(deleted == 1)
    }

    async fn bindings(&self) -> Result<Vec<Binding>> {
        let rows = self
            .conn()
            .await?
            .q(sql::LIST_BINDINGS, &[])
            .await
            .map_err(|e| db("listing bindings", e))?;
        rows.iter()
            .map(|row| {
                Ok(Binding::new(
                    TopicPattern::new(row.get::<_, String>(0))?,
                    QueueName::new(row.get::<_, String>(1))?,
                    row.get(2),
                ))
            })
            .collect()
    }

    async fn publish_batch(&self, events: Vec<NewEvent>) -> Result<Vec<Published>> {
        self.publish_batch_in(&**self.conn().await?, events).await
    }

    async fn topic_stats(&self) -> Result<Vec<TopicStats>> {
        let rows = self
            .conn()
            .await?
            .q(sql::TOPIC_STATS, &[])
            .await
            .map_err(|e| db("reading topic stats", e))?;
        rows.iter()
            .map(|row| {
                let mut stats =
                    TopicStats::new(RoutingKey::new(row.get::<_, String>(0))?, row.get(4));
                stats.published = row.get::<_, i64>(1) as u64;
                stats.unrouted = row.get::<_, i64>(2) as u64;
                stats.copies = row.get::<_, i64>(3) as u64;
                Ok(stats)
            })
            .collect()
    }

    async fn prune_event_log(&self, retention: Duration, batch: usize) -> Result<u64> {
        let conn = self.conn().await?;
        prune_in_batches(
            &**conn,
            sql::PRUNE_EVENT_LOG,
            retention,
            batch,
            "pruning the event log",
        )
        .await
    }
}

/// Runs a pruning `statement` (parameters: retention in seconds, batch size; deletes at
/// most one batch) until a batch comes back short, so no statement holds many locks.
pub(crate) async fn prune_in_batches(
    client: &(impl GenericClient + Sync),
    statement: &str,
    retention: Duration,
    batch: usize,
    what: &str,
) -> Result<u64> {
    let batch = i64::try_from(batch)
        .ok()
        .filter(|b| *b > 0)
        .ok_or_else(|| Error::InvalidArgument("batch must be at least 1".into()))?;
    let mut total = 0;
    loop {
        let deleted = client
            .exec(statement, &[&retention.as_secs_f64(), &batch])
            .await
            .map_err(|e| db(what, e))?;
        total += deleted;
        if deleted < batch as u64 {
            return Ok(total);
        }
    }
}
