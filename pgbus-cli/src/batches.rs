//! The open batches `stats` shows.

use serde_json::json;

use crate::admin::rfc3339;

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
    println!(
        "{:>8} {:<24} {:>8} {:>8} {:>10} {:>6}",
        "BATCH", "QUEUE", "TOTAL", "PENDING", "SUCCEEDED", "DEAD"
    );
    for b in batches {
        println!(
            "{:>8} {:<24} {:>8} {:>8} {:>10} {:>6}",
            b.id.0,
            b.queue,
            b.total,
            b.pending,
            b.succeeded(),
            b.dead_lettered
        );
    }
}
