//! Where each state's jobs live, and the filters as SQL parameters: shared by the listings,
//! the counts and the selections of bulk actions, so all three read a state and a filter
//! alike.

use pgbus_core::{Error, Result};

use super::stmt::Stmt;
use super::types::{JobFilter, JobState};

/// The table a state's jobs live in and how its columns read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Source {
    /// The table.
    pub(super) table: &'static str,
    /// [`JobSummary::at`](super::JobSummary::at): visible, failed or acked.
    pub(super) at: &'static str,
    /// The lease's end (hot table only).
    pub(super) lease: &'static str,
    /// The last error's text.
    pub(super) error: &'static str,
    /// Whether an index leads with `(queue, group_key, id)`, so a group filter narrows the
    /// scan itself (otherwise it filters the scan window's rows).
    pub(super) group_indexed: bool,
}

pub(super) const HOT: Source = Source {
    table: "pgbus.messages",
    at: "visible_at",
    lease: "lease_until",
    error: "last_error",
    group_indexed: true,
};

pub(super) const DEAD: Source = Source {
    table: "pgbus.dead_letters",
    at: "failed_at",
    lease: "NULL::timestamptz",
    error: "error",
    group_indexed: true,
};

/// The archive keeps no `last_error`: its last error is the history's last entry. It has
/// no group index either (acks of history-keeping queues would pay for one).
pub(super) const ARCHIVE: Source = Source {
    table: "pgbus.archive",
    at: "acked_at",
    lease: "NULL::timestamptz",
    error: "(errors -> -1 ->> 'error')",
    group_indexed: false,
};

impl JobState {
    pub(super) fn source(self) -> Source {
        match self {
            JobState::Ready | JobState::Scheduled | JobState::InFlight => HOT,
            JobState::Dead => DEAD,
            JobState::Archived => ARCHIVE,
        }
    }

    /// The state's condition on a row whose visibility time is the column `visible` (and
    /// whose lease end is `lease_until`): the same conditions as the queue stats.
    pub(super) fn predicate(self, visible: &str) -> String {
        const NOT_LEASED: &str = "(lease_until IS NULL OR lease_until <= now())";
        match self {
            JobState::Ready => format!("{visible} <= now() AND {NOT_LEASED}"),
            JobState::Scheduled => format!("{visible} > now() AND {NOT_LEASED}"),
            JobState::InFlight => "lease_until > now()".to_owned(),
            JobState::Dead | JobState::Archived => "true".to_owned(),
        }
    }
}

/// A filter's values as the parameters `$4` to `$8` of a listing or a selection: id,
/// group key, priority, least attempts, and the error text as an `ILIKE` pattern. The
/// payload filter is applied in Rust, on the rows these leave.
pub(super) struct FilterValues {
    id: Option<i64>,
    group_key: Option<String>,
    priority: Option<i16>,
    min_attempts: Option<i32>,
    error_pattern: Option<String>,
}

/// The SQL of the parameters [`FilterValues`] binds, except the id (`$4`) and the group key
/// (`$5`), whose places depend on the index; `error` is the last error's column or alias.
pub(super) fn row_filters(error: &str) -> String {
    format!(
        "($6::smallint IS NULL OR priority = $6)
      AND ($7::int IS NULL OR attempts >= $7)
      AND ($8::text IS NULL OR {error} ILIKE $8)"
    )
}

/// The group key filter (`$5`) on rows already read.
pub(super) const GROUP_FILTER: &str = "($5::text IS NULL OR group_key = $5)";

/// Whether `filter`'s rows are read by group (a group filter where the table has a group
/// index); otherwise its group filter applies to the rows read.
pub(super) fn by_group(filter: &JobFilter) -> bool {
    filter.group_key.is_some() && filter.state.source().group_indexed
}

/// How a statement reads one queue's rows (`$1`; with `by_group`, one group's, `$5`) in id
/// order, `dir`: its conditions and its `ORDER BY`, which only the table's
/// `(queue, id)` index (`(queue, group_key, id)` by group) provides.
///
/// The queue is matched as a range of one value, not with `=`: with `queue = $1` the
/// planner drops the queue from the order and may read the primary key instead, filtering
/// on the queue (it did on 2,000,000 rows in 20 queues, since ids follow the rows' physical
/// order), which reads every other queue's rows on the way: unbounded when the queue's
/// rows are far apart. Here the scan starts at the cursor's id within the queue and stops
/// at the queue's end.
pub(super) fn in_queue(by_group: bool, dir: &str) -> (&'static str, String) {
    if by_group {
        (
            "queue >= $1 AND queue <= $1 AND group_key >= $5 AND group_key <= $5",
            format!("queue {dir}, group_key {dir}, id {dir}"),
        )
    } else {
        (
            // `id > 0` (every id) is the predicate of the `(queue, id)` indexes, which only
            // statements that state it can use (migration 17 says why).
            "queue >= $1 AND queue <= $1 AND id > 0",
            format!("queue {dir}, id {dir}"),
        )
    }
}

/// The rows of [`in_queue`] past the cursor `$2` in direction `cmp` (`<` or `>`).
///
/// Written as a row comparison over the index's own columns, not as `id < $2`: with a
/// plain id condition the planner read the primary key for cursors deep in a queue (ids
/// past them are few, so a range of the primary key, sorted, looked cheaper), filtering out
/// every other queue's rows of that range: 300,000 rows for a 5,000-row window, 100 ms on
/// the console's sample. No plan can take a row comparison as a bound of the primary key,
/// so only the queue's index serves the scan, and it starts at the cursor.
pub(super) fn past_cursor(by_group: bool, cmp: &str) -> String {
    if by_group {
        format!("(queue, group_key, id) {cmp} ($1, $5, $2)")
    } else {
        format!("(queue, id) {cmp} ($1, $2)")
    }
}

/// The id filter (`$4`).
pub(super) const ID_FILTER: &str = "($4::bigint IS NULL OR id = $4)";

impl FilterValues {
    pub(super) fn of(filter: &JobFilter) -> Result<Self> {
        for (what, text) in [
            ("group key", &filter.group_key),
            ("error text", &filter.error_contains),
        ] {
            if text.as_deref().is_some_and(|t| t.contains('\0')) {
                return Err(Error::InvalidArgument(format!(
                    "the {what} filter contains a NUL character"
                )));
            }
        }
        Ok(Self {
            id: filter.id.map(|id| id.0),
            group_key: filter.group_key.clone(),
            priority: filter.priority,
            min_attempts: filter
                .min_attempts
                .map(|n| i32::try_from(n).unwrap_or(i32::MAX)),
            error_pattern: filter.error_contains.as_deref().map(contains_pattern),
        })
    }

    /// Binds `$4` to `$8`.
    pub(super) fn bind(self, stmt: Stmt) -> Stmt {
        stmt.bind(self.id)
            .bind(self.group_key)
            .bind(self.priority)
            .bind(self.min_attempts)
            .bind(self.error_pattern)
    }
}

/// An `ILIKE` pattern matching text that contains `text` (its `%`, `_` and `\` taken
/// literally).
fn contains_pattern(text: &str) -> String {
    let mut pattern = String::with_capacity(text.len() + 2);
    pattern.push('%');
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            pattern.push('\\');
        }
        pattern.push(c);
    }
    pattern.push('%');
    pattern
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_text_is_matched_literally() {
        assert_eq!(contains_pattern("50%_a\\b"), "%50\\%\\_a\\\\b%");
    }
}
