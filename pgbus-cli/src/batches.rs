//! The open batches `stats` shows.

use serde_json::json;

use crate::admin::rfc3339;
use crate::output::{Align, Table};

/// Open batches for `stats --json`.
pub(crate) fn batches_json(batches: &[pgbus_core::BatchInfo]) -> serde_json::Value {
    batches
        .iter()
        .map(|b| {
            json!({
                "id": b.id.0,
                "queue": b.queue.as_str(),
                "total": b.total,
                "pending": b.pending,
                "succeeded": b.succeeded(),
                "dead_lettered": b.dead_lettered,
                "created_at": rfc3339(b.created_at),
            })
        })
        .collect()
}

/// Open batches for the `stats` table.
pub(crate) fn print_batches(batches: &[pgbus_core::BatchInfo]) {
    if batches.is_empty() {
        return;
    }
    println!();
    let mut table = Table::new(&[
        ("BATCH", Align::Right),
        ("QUEUE", Align::Left),
        ("TOTAL", Align::Right),
        ("PENDING", Align::Right),
        ("SUCCEEDED", Align::Right),
        ("DEAD", Align::Right),
    ]);
    for b in batches {
        table.row(vec![
            b.id.0.to_string(),
            b.queue.to_string(),
            b.total.to_string(),
            b.pending.to_string(),
            b.succeeded().to_string(),
            b.dead_lettered.to_string(),
        ]);
    }
    table.print();
}
