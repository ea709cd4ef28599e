//! The audit log: who did what to how many jobs, written in the transaction of the action.

use pgbus_core::{Error, QueueName, Result};
use tokio_postgres::types::Json;
use tokio_postgres::GenericClient;

use super::stmt::Stmt;
use super::types::{AuditEntry, MAX_PAGE};
use crate::backend::PgBackend;
use crate::error::{db, storable};

const INSERT: &str = "
INSERT INTO pgbus.audit_log (actor, action, queue, count, detail) VALUES ($1, $2, $3, $4, $5)";

/// Newest first from below `$1`, by the primary key.
const READ: &str = "
SELECT id, at, actor, action, queue, count, detail FROM pgbus.audit_log
WHERE id < $1
ORDER BY id DESC
LIMIT $2";

/// The actor as stored: refused when empty, a NUL replaced (PostgreSQL text cannot hold
/// one).
pub(super) fn actor(actor: &str) -> Result<String> {
    if actor.trim().is_empty() {
        return Err(Error::InvalidArgument(
            "an action needs an actor (a token name, loopback, or cli:<user>)".into(),
        ));
    }
    Ok(storable(actor).into_owned())
}

pub(super) fn insert_stmt(
    actor: &str,
    action: &str,
    queue: Option<String>,
    count: u64,
    detail: serde_json::Value,
) -> Stmt {
    Stmt::new("audit insert", INSERT)
        .bind(actor.to_owned())
        .bind(action.to_owned())
        .bind(queue)
        .bind(i64::try_from(count).unwrap_or(i64::MAX))
        .bind(detail)
}

/// Writes an entry on `client` (the action's transaction).
pub(super) async fn insert(client: &(impl GenericClient + Sync), stmt: Stmt) -> Result<()> {
    stmt.rows(client)
        .await
        .map_err(|e| db("writing the audit log", e))?;
    Ok(())
}

pub(super) fn read_stmt(limit: usize, before: Option<i64>) -> Stmt {
    Stmt::new("audit read", READ)
        .bind(before.unwrap_or(i64::MAX))
        .bind(limit as i64)
}

/// Actions done outside [`Console::act`](super::Console::act) that the log records too:
/// queue pause and resume, and the dead-letter retry and discard of `pgbus dlq` and the
/// dead-letter routes of the API.
pub(super) const RECORDED_ELSEWHERE: [&str; 4] = ["pause", "resume", "retry", "discard"];

pub(super) async fn record(
    backend: &PgBackend,
    actor_name: &str,
    action: &str,
    queue: &QueueName,
    count: u64,
    detail: serde_json::Value,
) -> Result<()> {
    if !RECORDED_ELSEWHERE.contains(&action) {
        return Err(Error::InvalidArgument(format!(
            "only {} are recorded this way, not {action:?}",
            RECORDED_ELSEWHERE.join(", ")
        )));
    }
    let stmt = insert_stmt(
        &actor(actor_name)?,
        action,
        Some(queue.as_str().to_owned()),
        count,
        detail,
    );
    insert(&**backend.conn().await?, stmt).await
}

pub(super) async fn audit(
    backend: &PgBackend,
    limit: usize,
    before: Option<i64>,
) -> Result<Vec<AuditEntry>> {
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(Error::InvalidArgument(format!(
            "an audit page holds 1 to {MAX_PAGE} entries, not {limit}"
        )));
    }
    let rows = read_stmt(limit, before)
        .rows(&**backend.conn().await?)
        .await
        .map_err(|e| db("reading the audit log", e))?;
    Ok(rows
        .iter()
        .map(|row| {
            let Json(detail) = row.get::<_, Json<serde_json::Value>>("detail");
            AuditEntry {
                id: row.get("id"),
                at: row.get("at"),
                actor: row.get("actor"),
                action: row.get("action"),
                queue: row.get("queue"),
                count: u64::try_from(row.get::<_, i64>("count")).unwrap_or(0),
                detail,
            }
        })
        .collect())
}
