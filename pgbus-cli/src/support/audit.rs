//! The audit log from the command line: the actor (`cli:<user>`) and the entry written
//! after a change made outside the console's actions (queue pause and resume, `dlq`
//! retry and discard), as the server writes it for the same changes.

use pgbus_core::{MessageId, QueueName};
use pgbus_pg::console::Console;
use pgbus_pg::PgBackend;

/// The audit log's actor for the command line: `cli:` and the user, as `$USER` says.
pub(crate) fn cli_actor() -> String {
    let user = std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "unknown".to_owned());
    format!("cli:{user}")
}

/// The audit detail of a dead-letter retry or discard: `{"all": true}` or `{"ids": [..]}`.
pub(crate) fn dead_selection(ids: &[MessageId], all: bool) -> serde_json::Value {
    if all {
        serde_json::json!({ "all": true })
    } else {
        serde_json::json!({ "ids": ids.iter().map(|id| id.0).collect::<Vec<_>>() })
    }
}

/// Records `action` on `queue`, done already; a failure says the change stands.
pub(crate) async fn record(
    backend: &PgBackend,
    actor: &str,
    action: &str,
    queue: &QueueName,
    count: u64,
    detail: serde_json::Value,
) -> anyhow::Result<()> {
    Console::new(backend.clone())
        .record(actor, action, queue, count, detail)
        .await
        .map_err(|err| {
            anyhow::anyhow!(
                "{action} on queue {} was done, but its audit log entry was not written: {}",
                queue.as_str(),
                err.report()
            )
        })
}
