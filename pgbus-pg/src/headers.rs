//! Message and event headers read back from a row.
//!
//! pgbus writes headers as a JSON object of string values, and checks those that come
//! through its API and SQL functions. Plain SQL (an outbox row, a hand-written insert) can
//! store any JSON in the column, and such a row must not panic the process that reads it
//! nor fail the claim it comes with (the claim's other messages would stay leased unrun).
//! So a value that is not a string is kept as its JSON text (`{"n": 1}` reads as
//! `n = "1"`), and a column that is not an object reads as no headers.

use pgbus_core::Headers;
use serde_json::Value;
use tokio_postgres::types::Json;
use tokio_postgres::Row;

/// The row's `headers` column, leniently (see the module's doc).
pub(crate) fn headers_from(row: &Row) -> Headers {
    if let Ok(Json(headers)) = row.try_get::<_, Json<Headers>>("headers") {
        return headers;
    }
    match row.try_get::<_, Json<Value>>("headers") {
        Ok(Json(Value::Object(object))) => object
            .into_iter()
            .map(|(name, value)| {
                let text = match value {
                    Value::String(text) => text,
                    other => other.to_string(),
                };
                (name, text)
            })
            .collect(),
        // Not logged: headers may carry credentials.
        Ok(Json(_)) => {
            tracing::warn!(target: "pgbus", "headers that are not a JSON object are read as none");
            Headers::new()
        }
        Err(err) => {
            tracing::warn!(target: "pgbus", error = %err, "unreadable headers are read as none");
            Headers::new()
        }
    }
}
