//! What a worker counts: its [`WorkerReport`], and the counters behind it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use pgbus_core::{QueueName, QueueThroughput};

/// Counts of what a worker did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerReport {
    /// Messages claimed and handed to the pool.
    pub started: u64,
    /// Acked (including those acked in the handler's transaction).
    pub acked: u64,
    /// Given back for a retry.
    pub retried: u64,
    /// Moved to the dead-letter queue.
    pub dead_lettered: u64,
    /// Dropped on the handler's word.
    pub discarded: u64,
}

#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) started: AtomicU64,
    pub(crate) acked: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) discarded: AtomicU64,
    /// Per queue, for the registry's throughput buckets.
    pub(crate) throughput: Tallies,
}

impl Counters {
    pub(crate) fn snapshot(&self) -> WorkerReport {
        WorkerReport {
            started: self.started.load(Ordering::Relaxed),
            acked: self.acked.load(Ordering::Relaxed),
            retried: self.retried.load(Ordering::Relaxed),
            dead_lettered: self.dead_lettered.load(Ordering::Relaxed),
            discarded: self.discarded.load(Ordering::Relaxed),
        }
    }
}

/// What one queue settled since the counts were last taken.
#[derive(Debug, Default, Clone, Copy)]
struct Tally {
    processed: u64,
    failed: u64,
}

/// Outcomes per queue since the last heartbeat took them: acks, commits in the handler's
/// transaction and discards are processed; retries and dead letters are failed attempts.
#[derive(Debug, Default)]
pub(crate) struct Tallies(Mutex<HashMap<QueueName, Tally>>);

impl Tallies {
    pub(crate) fn processed(&self, queue: &QueueName, n: u64) {
        self.add(queue, n, 0);
    }

    pub(crate) fn failed(&self, queue: &QueueName) {
        self.add(queue, 0, 1);
    }

    fn add(&self, queue: &QueueName, processed: u64, failed: u64) {
        let mut tallies = self.0.lock().expect("throughput tallies");
        let tally = match tallies.get_mut(queue) {
            Some(tally) => tally,
            None => tallies.entry(queue.clone()).or_default(),
        };
        tally.processed = tally.processed.saturating_add(processed);
        tally.failed = tally.failed.saturating_add(failed);
    }

    /// Takes every count, leaving none.
    pub(crate) fn drain(&self) -> Vec<QueueThroughput> {
        self.0
            .lock()
            .expect("throughput tallies")
            .drain()
            .map(|(queue, t)| QueueThroughput::new(queue, t.processed, t.failed))
            .collect()
    }

    /// Puts back counts that could not be written, to go with the next report.
    pub(crate) fn restore(&self, counts: &[QueueThroughput]) {
        for c in counts {
            self.add(&c.queue, c.processed, c.failed);
        }
    }
}
