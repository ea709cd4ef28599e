//! Where each state's jobs live, and the filters as SQL parameters: shared by the listings,
//! the counts and the selections of bulk actions, so all three read a state and a filter
//! alike.

use pgbus_core::{Error, Result};

use super::stmt::Stmt;
use super::types::{JobFilter, JobState, Order};

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

/// How a statement reads a whole queue (`$1`) in id order, `dir`, from its newest or oldest
/// row (what a listing saw, the counts): its conditions and its `ORDER BY`, which only the
/// table's `(queue, id)` index provides.
///
/// The queue is matched as a range of one value, not with `=`: with `queue = $1` the
/// planner drops the queue from the order and may read the primary key instead, filtering
/// on the queue (it did on 2,000,000 rows in 20 queues, since ids follow the rows' physical
/// order), which reads every other queue's rows on the way: unbounded when the queue's
/// rows are far apart.
pub(super) fn whole_queue(dir: &str) -> (&'static str, String) {
    (
        // `id > 0` (every id) is the predicate of the `(queue, id)` indexes, which only
        // statements that state it can use (migration 17 says why).
        "queue >= $1 AND queue <= $1 AND id > 0",
        format!("queue {dir}, id {dir}"),
    )
}

/// How a statement reads one queue's rows (`$1`; with `by_group`, one group's, `$5`) in
/// `order` by id, from the id `from` on (inclusive; `to`, inclusive, is where the reading
/// ends, otherwise the queue's or group's end): its conditions and its `ORDER BY`, which
/// only the table's `(queue, id)` index (`(queue, group_key, id)` by group) provides. A
/// listing's window starts at its cursor; a selection's batch runs from the last one's
/// end up to what the listing saw.
///
/// The ids are bounded by row comparisons over the index's columns, and the queue's other
/// end by an inclusive comparison of the queue alone:
///
/// - No plan can bound the primary key with a row comparison. Compared as `id < $2`, a
///   cursor deep in a queue made the ids past it look few, and the planner read that range
///   of the primary key and sorted it, filtering out every other queue's rows (300,000
///   rows for a 5,000-row window on the console's sample, 100 ms).
/// - The planner estimates a row comparison from its first column alone. Both comparisons
///   of the queue are inclusive (`queue <= $1`, `queue >= $1`), so the product of their
///   estimates is never below the queue's share of the table: the planner may think a
///   queue larger than it is, never smaller. With a strict comparison, or an equality
///   beside it, a queue named first or last looked nearly empty, and was read whole by a
///   bitmap scan and sorted (100,000 rows, 600 ms); thought large, it is read through its
///   index from the cursor, stopping at the window's end.
pub(super) fn in_queue(
    by_group: bool,
    order: Order,
    from: &str,
    to: Option<&str>,
) -> (String, String) {
    // Each index's predicate, which the statement must state to use it: the row
    // comparisons imply neither a group key (a row is compared column by column) nor the
    // `(queue, id)` indexes' `id > 0` (see [`whole_queue`]).
    let (keys, prefix, values, predicate) = if by_group {
        (
            "queue, group_key, id",
            "queue, group_key",
            "$1, $5",
            "group_key IS NOT NULL",
        )
    } else {
        ("queue, id", "queue", "$1", "id > 0")
    };
    let (start, end, dir) = match order {
        Order::NewestFirst => ("<=", ">=", "DESC"),
        Order::OldestFirst => (">=", "<=", "ASC"),
    };
    let end = match to {
        Some(to) => format!("({keys}) {end} ({values}, {to})"),
        None => format!("({prefix}) {end} ({values})"),
    };
    (
        format!("({keys}) {start} ({values}, {from}) AND {end} AND {predicate}"),
        keys.split(", ")
            .map(|key| format!("{key} {dir}"))
            .collect::<Vec<_>>()
            .join(", "),
    )
}

/// The first id a page or batch reads after the row `after` in `order` (the bound of
/// [`in_queue`] is inclusive).
pub(super) fn first_after(after: i64, order: Order) -> i64 {
    match order {
        Order::NewestFirst => after.saturating_sub(1),
        Order::OldestFirst => after.saturating_add(1),
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
