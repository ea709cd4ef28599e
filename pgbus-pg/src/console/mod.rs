//! The operator's console: find any job, see its whole story, act on it.
//!
//! What `pgbus serve`'s job pages, its JSON API and `pgbus job` share. PostgreSQL only (not a
//! core trait): its promise is that every query is served by an index on tables of millions
//! of rows, which only this backend can keep.
//!
//! - [`Console::list`]: one queue's jobs in one [`JobState`], newest or oldest first, with
//!   filters, in keyset pages ([`Cursor`]; never `OFFSET`). A page scans at most
//!   [`SCAN_WINDOW`] rows of the state's index; a filter that matches rarely can return a
//!   short (even empty) page with a cursor to go on.
//! - [`Console::counts`]: how many jobs each state holds, exact up to [`COUNT_CAP`] and
//!   "at least" beyond it (never an unbounded `COUNT(*)`).
//! - [`Console::job`]: one job wherever it is (hot table, dead letters, archive), with its
//!   attempt history ([`AttemptError`], the last 10) and the process holding its lease.
//! - [`Console::act`]: retry now, reschedule, change priority, cancel, dead-letter, discard,
//!   on ids or on a filter bounded by what the operator saw ([`Bound`]), written to
//!   `pgbus.audit_log` in the same transaction ([`Console::audit`] reads it back).
//!
//! The console's SQL lives in this directory rather than in `sql.rs`: its listings are
//! generated per state and order from one template (`list.rs`), and every statement is
//! built by one function that both the query and [`Console::explain_all`] (the test that
//! no plan scans a table whole) call.

mod actions;
mod audit;
mod cursor;
mod detail;
mod explain;
mod list;
mod payload;
mod sample;
mod source;
mod stmt;
mod types;

#[doc(hidden)]
pub use sample::{Sample, SAMPLE_QUEUES};
pub use types::{
    Action, AttemptError, AuditEntry, Bound, Count, Cursor, EventOrigin, Holder, JobDetail,
    JobFilter, JobState, JobSummary, Order, Page, PayloadMatch, Target, COUNT_CAP, ERRORS_KEPT,
    MAX_IDS, MAX_PAGE, PAYLOAD_SHOWN_MAX, SCAN_WINDOW,
};

use pgbus_core::{ContentType, MessageId, QueueName, Result};

use crate::PgBackend;

/// The console's queries and actions on a backend's pool.
#[derive(Clone)]
pub struct Console {
    backend: PgBackend,
}

impl Console {
    /// The console over `backend`'s pool.
    pub fn new(backend: PgBackend) -> Self {
        Self { backend }
    }

    /// One page of `filter`, in `order`, at most `limit` ([`MAX_PAGE`]) jobs, from `cursor`.
    pub async fn list(
        &self,
        filter: &JobFilter,
        order: Order,
        cursor: Option<&Cursor>,
        limit: usize,
    ) -> Result<Page> {
        list::list(&self.backend, filter, order, cursor, limit).await
    }

    /// How many jobs of `queue` each state holds (capped at [`COUNT_CAP`]).
    pub async fn counts(&self, queue: &QueueName) -> Result<Vec<(JobState, Count)>> {
        list::counts(&self.backend, queue).await
    }

    /// Job `id` wherever it is, or `None`.
    pub async fn job(&self, id: MessageId) -> Result<Option<JobDetail>> {
        detail::job(&self.backend, id).await
    }

    /// Job `id`'s whole payload, or `None`.
    pub async fn payload(&self, id: MessageId) -> Result<Option<(ContentType, Vec<u8>)>> {
        detail::payload(&self.backend, id).await
    }

    /// Does `action` to `target` as `actor`, writes the audit entry in the same
    /// transaction; returns how many jobs changed.
    pub async fn act(&self, actor: &str, action: &Action, target: &Target) -> Result<u64> {
        actions::act(&self.backend, actor, action, target).await
    }

    /// Records an action done elsewhere, after it was done: a queue's `pause` or `resume`
    /// (count 0), or the `retry` or `discard` of its dead letters through
    /// [`DeadLetters`](pgbus_core::DeadLetters) (`count` changed, `detail` the selection).
    pub async fn record(
        &self,
        actor: &str,
        action: &str,
        queue: &QueueName,
        count: u64,
        detail: serde_json::Value,
    ) -> Result<()> {
        audit::record(&self.backend, actor, action, queue, count, detail).await
    }

    /// The audit log, newest first, at most `limit` entries, with ids below `before`.
    pub async fn audit(&self, limit: usize, before: Option<i64>) -> Result<Vec<AuditEntry>> {
        audit::audit(&self.backend, limit, before).await
    }

    /// Writes the console's sample data set into the (fresh, migrated) database: queues
    /// `q0` to `q19` with `sample`'s messages in every state, dead letters, archived jobs
    /// and audit entries, then `VACUUM ANALYZE`. What the
    /// `EXPLAIN` test and the `console` bench scenario run on; not part of the stable API.
    #[doc(hidden)]
    pub async fn seed_sample(&self, sample: Sample) -> Result<()> {
        sample::seed(&self.backend, sample).await
    }

    /// `EXPLAIN (FORMAT JSON)` of every statement the console runs, built by the same
    /// functions as the real calls, for `queue` with a sample group key and sample job ids
    /// (writes are explained, never executed). For the test that no console query scans
    /// a table whole; not part of the stable API.
    #[doc(hidden)]
    pub async fn explain_all(
        &self,
        queue: &QueueName,
        group_key: &str,
        ids: &[MessageId],
    ) -> Result<Vec<(String, serde_json::Value)>> {
        explain::explain_all(&self.backend, queue, group_key, ids).await
    }
}
