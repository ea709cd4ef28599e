//! Listings (keyset pages over a bounded scan window) and capped counts.

use std::time::SystemTime;

use pgbus_core::{Error, MessageId, QueueName, Result};
use tokio_postgres::Row;

use super::cursor::{self, Seen};
use super::payload::Stored;
use super::source::{
    by_group, in_queue, past_cursor, row_filters, FilterValues, Source, GROUP_FILTER, HOT,
    ID_FILTER,
};
use super::stmt::Stmt;
use super::types::{
    Count, Cursor, JobFilter, JobState, JobSummary, Order, Page, COUNT_CAP, MAX_PAGE, SCAN_WINDOW,
};
use crate::backend::PgBackend;
use crate::error::db;

/// Payloads up to this size are fetched whole for a page's previews (MessagePack can only
/// be decoded whole); larger ones only their first [`PREVIEW_PART`] bytes.
const PREVIEW_WHOLE: usize = 16 * 1024;
const PREVIEW_PART: usize = 1024;

/// The listing of `state` in `order`: the newest (or oldest) [`SCAN_WINDOW`] rows of the
/// queue after the cursor (`$2`) in the state's table, by its `(queue, id)` index (or
/// `(queue, group_key, id)` with a group filter: see [`in_queue`]); then the state and the
/// other filters on those rows only, up to `$9` of them, with their payloads (whole with a
/// payload filter, `$10`, which Rust applies), each read by its primary key (the scan
/// leaves payloads out so the window it holds stays small). The `edge` row tells how far
/// the scan went, what the listing saw (its bound) and whether the queue exists: its
/// columns are on every row (on one row of NULL `hit` columns when nothing matched).
///
/// Parameters: `$1` queue, `$2` cursor id, `$3` scan window, `$4`-`$8` the filters (see
/// [`FilterValues`]), `$9` most rows, `$10` whole payloads.
pub(super) fn list_sql(state: JobState, order: Order, by_group: bool) -> String {
    let Source {
        table,
        at,
        lease,
        error,
        ..
    } = state.source();
    let (cmp, dir, last) = match order {
        Order::NewestFirst => ("<", "DESC", "min"),
        Order::OldestFirst => (">", "ASC", "max"),
    };
    let (within, key_order) = in_queue(by_group, dir);
    let past = past_cursor(by_group, cmp);
    let hit_group = if by_group { "true" } else { GROUP_FILTER };
    let predicate = state.predicate("at");
    let filters = row_filters("error");
    let seen = seen_sql(state);
    format!(
        "
WITH scan AS (
    SELECT id, priority, group_key, attempts, enqueued_at, {at} AS at,
           {lease} AS lease_until, {error} AS error
    FROM {table}
    WHERE {within} AND {past} AND {ID_FILTER}
    ORDER BY {key_order}
    LIMIT $3
), edge AS (
    SELECT count(*) AS scanned, {last}(id) AS last_scanned FROM scan
), hit AS (
    SELECT * FROM scan
    WHERE {predicate} AND {hit_group}
      AND {filters}
    ORDER BY id {dir}
    LIMIT $9
)
SELECT EXISTS (SELECT 1 FROM pgbus.queues WHERE name = $1) AS queue_exists,
       edge.scanned, edge.last_scanned, seen.bound_id, seen.bound_at,
       hit.id, hit.priority, hit.group_key, hit.attempts, hit.enqueued_at, hit.at,
       hit.lease_until, hit.error, t.content_type, t.payload_bytes, t.payload
FROM edge
LEFT JOIN LATERAL ({seen}) seen ON true
LEFT JOIN hit ON true
LEFT JOIN LATERAL (
    SELECT content_type, octet_length(payload) AS payload_bytes,
           CASE WHEN $10 OR octet_length(payload) <= {PREVIEW_WHOLE} THEN payload
                ELSE substring(payload FROM 1 FOR {PREVIEW_PART}) END AS payload
    FROM {table}
    WHERE id = hit.id
    -- Kept a subquery (not flattened into a join): one primary-key lookup per row.
    LIMIT 1
) t ON true
ORDER BY hit.id {dir}"
    )
}

/// What a listing of `state` saw: the newest id of the queue in the state's table (hot
/// table, archive), or the latest `(failed_at, id)` of its dead letters (by
/// `dead_letters_queue_idx`); the first row of an index either way.
fn seen_sql(state: JobState) -> String {
    let table = state.source().table;
    match state {
        JobState::Dead => format!(
            "SELECT id AS bound_id, failed_at AS bound_at FROM {table}
             WHERE queue = $1 ORDER BY failed_at DESC, id DESC LIMIT 1"
        ),
        _ => {
            let (within, key_order) = in_queue(false, "DESC");
            format!(
                "SELECT id AS bound_id, NULL::timestamptz AS bound_at FROM {table}
                 WHERE {within} ORDER BY {key_order} LIMIT 1"
            )
        }
    }
}

/// The statement of one page: `filter` in `order` after the row `after`, at most `limit`.
pub(super) fn list_stmt(
    filter: &JobFilter,
    order: Order,
    after: i64,
    limit: usize,
) -> Result<Stmt> {
    let by_payload = filter.payload.is_some();
    // With a payload filter every row the SQL filters leave comes back (Rust picks).
    let rows = if by_payload { SCAN_WINDOW } else { limit };
    let by_group = by_group(filter);
    let stmt = Stmt::new(
        format!("list {} {order:?}", filter.state.as_str()),
        list_sql(filter.state, order, by_group),
    )
    .bind(filter.queue.as_str().to_owned())
    .bind(after)
    .bind(SCAN_WINDOW as i64);
    Ok(FilterValues::of(filter)?
        .bind(stmt)
        .bind(rows as i64)
        .bind(by_payload))
}

/// Where a listing in `order` starts.
pub(super) fn start(order: Order) -> i64 {
    match order {
        Order::NewestFirst => i64::MAX,
        Order::OldestFirst => i64::MIN,
    }
}

pub(super) async fn list(
    backend: &PgBackend,
    filter: &JobFilter,
    order: Order,
    cursor: Option<&Cursor>,
    limit: usize,
) -> Result<Page> {
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(Error::InvalidArgument(format!(
            "a page holds 1 to {MAX_PAGE} jobs, not {limit}"
        )));
    }
    let after = match cursor {
        Some(c) => cursor::read_cursor(c, filter, order)?,
        None => start(order),
    };
    let stmt = list_stmt(filter, order, after, limit)?;
    let rows = stmt
        .rows(&**backend.conn().await?)
        .await
        .map_err(|e| db("listing jobs", e))?;
    // `edge` is one row, so the statement returns at least one.
    let Some(head) = rows.first() else {
        return Err(Error::Backend {
            message: "listing jobs: the statement returned no row".into(),
            transient: false,
            source: None,
        });
    };
    if !head.get::<_, bool>("queue_exists") {
        return Err(Error::QueueNotFound(filter.queue.clone()));
    }
    let scanned: i64 = head.get("scanned");
    let last_scanned: Option<i64> = head.get("last_scanned");
    let seen = match head.get::<_, Option<i64>>("bound_id") {
        None => Seen::Nothing,
        Some(id) => Seen::UpTo {
            id,
            at: head.get("bound_at"),
        },
    };
    let mut jobs = Vec::new();
    for row in &rows {
        if jobs.len() == limit {
            break;
        }
        let Some(id) = row.get::<_, Option<i64>>("id") else {
            continue;
        };
        let stored = stored(row);
        if let Some(wanted) = &filter.payload {
            if !stored.matches(wanted) {
                continue;
            }
        }
        jobs.push(summary(
            &filter.queue,
            filter.state,
            MessageId(id),
            row,
            &stored,
        ));
    }
    // The next page starts after the last row this one examined: the last one returned
    // when the page is full, else the end of the scan window when the window was full.
    let window_full = usize::try_from(scanned).is_ok_and(|n| n >= SCAN_WINDOW);
    let next = if jobs.len() == limit {
        let last = jobs.last().map(|j| j.id.0);
        (window_full || last != last_scanned)
            .then_some(last)
            .flatten()
    } else if window_full {
        last_scanned
    } else {
        None
    };
    Ok(Page {
        jobs,
        next: next.map(|id| cursor::cursor(filter, order, id)),
        bound: cursor::bound(filter, seen),
    })
}

/// The payload columns of a listing or selection row.
pub(super) fn stored(row: &Row) -> Stored<'_> {
    let bytes: &[u8] = row.get("payload");
    Stored {
        mime: row.get("content_type"),
        bytes,
        total: row
            .try_get::<_, i32>("payload_bytes")
            .ok()
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(bytes.len()),
    }
}

fn summary(
    queue: &QueueName,
    state: JobState,
    id: MessageId,
    row: &Row,
    stored: &Stored<'_>,
) -> JobSummary {
    JobSummary {
        id,
        queue: queue.clone(),
        state,
        priority: row.get("priority"),
        group_key: row.get("group_key"),
        attempts: u32::try_from(row.get::<_, i32>("attempts")).unwrap_or(0),
        enqueued_at: row.get("enqueued_at"),
        at: row.get::<_, SystemTime>("at"),
        lease_until: row.get("lease_until"),
        last_error: row.get("error"),
        payload_preview: stored.preview(),
    }
}

/// The states' counts, each stopping at [`COUNT_CAP`] + 1 rows by its queue's `(queue, id)`
/// index. The hot table's three states share one scan of the queue's oldest
/// [`COUNT_CAP`] + 1 rows: counted one by one, a rare state (three jobs in flight among a
/// million ready ones) would read the whole queue to prove it has no more (1.6 s for a
/// queue of 100,000 jobs on the test machine, against 80 ms for the shared scan). So
/// while a queue holds at most [`COUNT_CAP`] unfinished jobs each state's count is exact,
/// and beyond that each is what the oldest rows hold: at least that many (the oldest
/// rows are where claims take jobs from, so running jobs are among them).
pub(super) fn counts_stmt(queue: &QueueName) -> Stmt {
    let hot: Vec<String> = [JobState::Ready, JobState::Scheduled, JobState::InFlight]
        .into_iter()
        .map(|state| format!("count(*) FILTER (WHERE {})", state.predicate("visible_at")))
        .collect();
    let (within, key_order) = in_queue(false, "ASC");
    let capped = |state: JobState| {
        format!(
            "(SELECT count(*) FROM (SELECT 1 FROM {} WHERE {within} ORDER BY {key_order}
              LIMIT $2) c)",
            state.source().table
        )
    };
    let sql = format!(
        "
SELECT EXISTS (SELECT 1 FROM pgbus.queues WHERE name = $1), hot.*, {}, {}
FROM (
    SELECT count(*) AS scanned, {}
    FROM (
        SELECT visible_at, lease_until FROM pgbus.messages
        WHERE {within} ORDER BY {key_order} LIMIT $2
    ) oldest
) hot",
        capped(JobState::Dead),
        capped(JobState::Archived),
        hot.join(", ")
    );
    Stmt::new("counts", sql)
        .bind(queue.as_str().to_owned())
        .bind(COUNT_CAP as i64 + 1)
}

pub(super) async fn counts(
    backend: &PgBackend,
    queue: &QueueName,
) -> Result<Vec<(JobState, Count)>> {
    let row = counts_stmt(queue)
        .one(&**backend.conn().await?)
        .await
        .map_err(|e| db("counting jobs", e))?;
    if !row.get::<_, bool>(0) {
        return Err(Error::QueueNotFound(queue.clone()));
    }
    let count = |column: usize| u64::try_from(row.get::<_, i64>(column)).unwrap_or(0);
    // Columns: exists, hot rows scanned, ready, scheduled, in flight, dead, archived.
    let hot_exact = count(1) <= COUNT_CAP;
    Ok(JobState::ALL
        .into_iter()
        .zip(2..)
        .map(|(state, column)| {
            let n = count(column);
            let exact = n <= COUNT_CAP && (hot_exact || state.source() != HOT);
            (
                state,
                Count {
                    n: n.min(COUNT_CAP),
                    exact,
                },
            )
        })
        .collect())
}
