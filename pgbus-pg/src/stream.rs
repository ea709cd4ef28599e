//! Durable streams and ephemeral broadcasts on Postgres.

use std::time::Duration;

use pgbus_core::{
    check_stream_texts, Error, Horizon, Result, StreamEvent, StreamName, StreamStore,
    MAX_EPHEMERAL_BYTES,
};
use tokio_postgres::GenericClient;

use crate::error::db;
use crate::query::Typed;
use crate::{sql, PgBackend};

impl PgBackend {
    /// Publishes a durable event on the caller's connection or transaction: with a
    /// transaction, it exists (and wakes followers) only if that commits. Other publishers
    /// to the same stream wait for the transaction to end.
    pub async fn publish_in(
        &self,
        client: &(impl GenericClient + Sync),
        stream: &StreamName,
        event: &str,
        data: &str,
    ) -> Result<i64> {
        check_stream_texts(event, data, self.max_payload_bytes())?;
        let row = client
            .q_one(sql::PUBLISH_EVENT, &[&stream.as_str(), &event, &data])
            .await
            .map_err(|e| db("publishing a stream event", e))?;
        Ok(row.get(0))
    }
}

/// The notification payload of an ephemeral broadcast (durable ones notify with an
/// empty payload).
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct BroadcastPayload<'a> {
    #[serde(borrow)]
    pub(crate) event: std::borrow::Cow<'a, str>,
    #[serde(borrow)]
    pub(crate) data: std::borrow::Cow<'a, str>,
}

fn ephemeral_payload(event: &str, data: &str) -> Result<String> {
    let payload = BroadcastPayload {
        event: event.into(),
        data: data.into(),
    };
    serde_json::to_string(&payload).map_err(|e| Error::Encode {
        format: "JSON",
        source: e.into(),
    })
}

impl StreamStore for PgBackend {
    async fn publish(&self, stream: &StreamName, event: &str, data: &str) -> Result<i64> {
        self.publish_in(&**self.conn().await?, stream, event, data)
            .await
    }

    async fn broadcast(&self, stream: &StreamName, event: &str, data: &str) -> Result<Option<i64>> {
        check_stream_texts(event, data, self.max_payload_bytes())?;
        let payload = ephemeral_payload(event, data)?;
        if payload.len() > MAX_EPHEMERAL_BYTES {
            return self.publish(stream, event, data).await.map(Some);
        }
        self.conn()
            .await?
            .exec(sql::BROADCAST_EVENT, &[&stream.as_str(), &payload])
            .await
            .map_err(|e| db("broadcasting a stream event", e))?;
        Ok(None)
    }

    async fn read_after(
        &self,
        stream: &StreamName,
        after: i64,
        limit: usize,
    ) -> Result<Vec<StreamEvent>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = self
            .conn()
            .await?
            .q(sql::READ_EVENTS, &[&stream.as_str(), &after, &limit])
            .await
            .map_err(|e| db("reading stream events", e))?;
        Ok(rows
            .iter()
            .map(|row| {
                StreamEvent::new(
                    row.get("id"),
                    stream.clone(),
                    row.get("event"),
                    row.get("data"),
                    row.get("published_at"),
                )
            })
            .collect())
    }

    async fn latest(&self, stream: &StreamName) -> Result<i64> {
        Ok(self
            .conn()
            .await?
            .q_one(sql::LATEST_EVENT, &[&stream.as_str()])
            .await
            .map_err(|e| db("reading a stream's latest id", e))?
            .get(0))
    }

    async fn horizon(&self, stream: &StreamName, cursor: i64) -> Result<Horizon> {
        let pruned: i64 = self
            .conn()
            .await?
            .q_one(sql::PRUNED_THROUGH, &[&stream.as_str()])
            .await
            .map_err(|e| db("reading a stream's horizon", e))?
            .get(0);
        Ok(if cursor < pruned {
            Horizon::Gap
        } else {
            Horizon::Complete
        })
    }

    async fn prune(&self, retention: Duration, batch: usize) -> Result<u64> {
        let batch = i64::try_from(batch.max(1)).unwrap_or(i64::MAX);
        let conn = self.conn().await?;
        let mut total = 0;
        loop {
            let deleted: i64 = conn
                .q_one(sql::PRUNE_EVENTS, &[&retention.as_secs_f64(), &batch])
                .await
                .map_err(|e| db("pruning stream events", e))?
                .get(0);
            total += deleted as u64;
            if deleted < batch {
                return Ok(total);
            }
        }
    }
}
