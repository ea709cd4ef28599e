//! `io_bound`: jobs that each wait 50 ms, in `threads` and `async` mode, at several
//! concurrency levels ([`worker_run`](super::worker_run) does the work, counting the
//! connections).

use std::time::Duration;

use pgbus_exec::ExecutionMode;

use super::{Work, WorkerSettings};

/// How long every job waits.
pub(crate) const JOB_WAIT: Duration = Duration::from_millis(50);

/// One worker with `concurrency` slots: the async pool's jobs `tokio::time::sleep`, the
/// thread pool's `std::thread::sleep`, so each blocks its OS thread.
pub(crate) fn settings(mode: ExecutionMode, concurrency: usize) -> WorkerSettings {
    WorkerSettings {
        workers: 1,
        concurrency,
        claim_ahead: None,
        mode,
        work: match mode {
            ExecutionMode::Threads => Work::BlockingSleep(JOB_WAIT),
            _ => Work::AsyncSleep(JOB_WAIT),
        },
    }
}

/// Jobs per second at best: every slot always busy.
pub(crate) fn ideal(concurrency: usize) -> f64 {
    concurrency as f64 / JOB_WAIT.as_secs_f64()
}
