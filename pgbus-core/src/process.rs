//! The registry of running worker processes, kept alive by heartbeats.

use std::future::Future;
use std::time::{Duration, SystemTime};

use crate::{QueueName, Result};

/// Identifies a registered process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ProcessId(pub i64);

/// What a worker process says about itself when it registers.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProcessInfo {
    /// Host name.
    pub hostname: String,
    /// OS process id.
    pub pid: u32,
    /// Queues it works.
    pub queues: Vec<QueueName>,
    /// Execution mode (`threads` or `async`).
    pub mode: String,
    /// Jobs it can run at once.
    pub capacity: u32,
}

impl ProcessInfo {
    /// Describes the current OS process.
    pub fn current(queues: Vec<QueueName>, mode: impl Into<String>, capacity: u32) -> Self {
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|| "unknown".to_owned());
        Self {
            hostname,
            pid: std::process::id(),
            queues,
            mode: mode.into(),
            capacity,
        }
    }
}

/// A registered process as the registry last heard of it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ProcessRecord {
    /// Registry id.
    pub id: ProcessId,
    /// What it registered with.
    pub info: ProcessInfo,
    /// Jobs running at its last heartbeat.
    pub busy: u32,
    /// When it registered.
    pub started_at: SystemTime,
    /// Its last heartbeat.
    pub heartbeat_at: SystemTime,
}

impl ProcessRecord {
    /// A record registered and heard from now, with no job running.
    pub fn new(id: ProcessId, info: ProcessInfo) -> Self {
        let now = SystemTime::now();
        Self {
            id,
            info,
            busy: 0,
            started_at: now,
            heartbeat_at: now,
        }
    }
}

/// The width of a throughput bucket: counts are kept per queue per 10 seconds (buckets
/// start at multiples of this since the Unix epoch).
pub const THROUGHPUT_BUCKET: Duration = Duration::from_secs(10);

/// How long throughput buckets are kept.
pub const THROUGHPUT_RETENTION: Duration = Duration::from_secs(3600);

/// What a worker process settled on one queue since it last reported: the throughput
/// behind [`QueueStats::processed_per_minute`](crate::QueueStats::processed_per_minute)
/// and [`QueueStats::failed_per_minute`](crate::QueueStats::failed_per_minute).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct QueueThroughput {
    /// The queue.
    pub queue: QueueName,
    /// Messages finished: acked (also in the handler's own transaction) or discarded.
    pub processed: u64,
    /// Failed attempts: given back for a retry or dead-lettered.
    pub failed: u64,
}

impl QueueThroughput {
    /// Counts for one queue.
    pub fn new(queue: QueueName, processed: u64, failed: u64) -> Self {
        Self {
            queue,
            processed,
            failed,
        }
    }
}

/// Where worker processes register and heartbeat. Work held by a process that stops
/// heartbeating is not released here: its leases simply run out.
pub trait ProcessRegistry: Send + Sync {
    /// Registers a process; returns its id.
    fn register(&self, info: &ProcessInfo) -> impl Future<Output = Result<ProcessId>> + Send;

    /// Records a heartbeat with the number of running jobs; `false` when the entry is gone
    /// (pruned as stale), in which case the caller registers again.
    fn heartbeat(&self, id: ProcessId, busy: u32) -> impl Future<Output = Result<bool>> + Send;

    /// Removes the entry of a process that stops cleanly.
    fn deregister(&self, id: ProcessId) -> impl Future<Output = Result<()>> + Send;

    /// Removes entries whose last heartbeat is older than `stale_after`; returns how many.
    fn prune_stale(&self, stale_after: Duration) -> impl Future<Output = Result<u64>> + Send;

    /// Every registered process, oldest first.
    fn processes(&self) -> impl Future<Output = Result<Vec<ProcessRecord>>> + Send;

    /// Adds a worker's counts to the current 10-second throughput bucket of each queue
    /// (counts of queues that no longer exist are dropped) and forgets buckets older than
    /// an hour. Workers call it with each heartbeat; on an error nothing was recorded, so
    /// the caller may report the same counts again.
    fn record_throughput(
        &self,
        counts: &[QueueThroughput],
    ) -> impl Future<Output = Result<()>> + Send;
}
