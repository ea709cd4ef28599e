//! `drain`: as many no-op jobs as `raw_sql` drains, pre-inserted, drained by pgbus
//! workers ([`worker_run`](super::worker_run) does the work).

use pgbus_exec::ExecutionMode;

use super::{Work, WorkerSettings};
use crate::options::Plan;

/// `workers` async workers of `concurrency` slots running no-op jobs, with the worker's
/// default claim-ahead buffer.
pub(crate) fn settings(workers: usize, concurrency: usize) -> WorkerSettings {
    WorkerSettings {
        workers,
        concurrency,
        claim_ahead: None,
        mode: ExecutionMode::Async,
        work: Work::Noop,
    }
}

/// One row of `drain`: its workers, and what its figure ids end with.
#[derive(Debug, Clone)]
pub(crate) struct Variant {
    pub(crate) settings: WorkerSettings,
    /// Empty for the like-for-like row, whose ids (`jobs_per_s`, ...) the ratios and the
    /// targets read.
    pub(crate) suffix: String,
}

impl Variant {
    /// "2 workers × 100".
    pub(crate) fn label(&self) -> String {
        let workers = self.settings.workers;
        format!(
            "{workers} worker{} × {}",
            if workers == 1 { "" } else { "s" },
            self.settings.concurrency
        )
    }
}

/// Like for like with `raw_sql` (its loops and claim size), wider workers (larger claims
/// and ack batches), and one worker at a moderate concurrency.
pub(crate) fn variants(plan: &Plan) -> Vec<Variant> {
    vec![
        // Claims of at most `drain_concurrency`, as `raw_sql`'s: nothing claimed ahead.
        Variant {
            settings: WorkerSettings {
                claim_ahead: Some(0),
                ..settings(plan.drain_workers, plan.drain_concurrency)
            },
            suffix: String::new(),
        },
        Variant {
            settings: settings(plan.drain_workers, plan.drain_wide_concurrency),
            suffix: format!("_c{}", plan.drain_wide_concurrency),
        },
        Variant {
            settings: settings(1, plan.drain_single_concurrency),
            suffix: format!("_1x{}", plan.drain_single_concurrency),
        },
    ]
}
