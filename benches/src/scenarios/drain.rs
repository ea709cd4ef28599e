//! `drain`: as many no-op jobs as `raw_sql` drains, pre-inserted, drained by pgbus
//! workers ([`worker_run`](super::worker_run) does the work).

use pgbus_exec::ExecutionMode;

use super::{Work, WorkerSettings};

/// `workers` async workers of `concurrency` slots running no-op jobs.
pub(crate) fn settings(workers: usize, concurrency: usize) -> WorkerSettings {
    WorkerSettings {
        workers,
        concurrency,
        mode: ExecutionMode::Async,
        work: Work::Noop,
    }
}
