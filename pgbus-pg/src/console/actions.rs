//! Actions on ids or on a bounded filter, each in one transaction with its audit entry.
//!
//! Every action ends in the same statements over an array of ids, one per table the action
//! applies to; each statement locks its jobs in id order (see `locked!`: no deadlock with
//! a worker's batch ack) and re-checks what the action needs of a row's state (a retry
//! skips jobs in flight), so ids in other states are skipped, not refused. A filter first
//! selects its ids, in batches of [`SELECT_BATCH`] locked with `FOR UPDATE` (claims skip
//! them), by the filter and the bound in SQL, the payload filter in Rust.

use std::collections::BTreeSet;
use std::time::SystemTime;

use pgbus_core::{Error, Result, MAX_DELAY};
use serde_json::json;
use tokio_postgres::{GenericClient, Transaction};

use super::audit;
use super::cursor::{self, Seen};
use super::list::stored;
use super::source::{
    by_group, in_queue, past_cursor, row_filters, FilterValues, Source, GROUP_FILTER, ID_FILTER,
};
use super::stmt::Stmt;
use super::types::{Action, Bound, JobFilter, JobState, Target, MAX_IDS};
use crate::backend::PgBackend;
use crate::error::db;

/// Rows a filter's selection locks and acts on per statement.
pub(super) const SELECT_BATCH: usize = 1000;

/// The tables an action may touch, in the order an action on ids runs through them (the
/// hot table before the dead letters: a retry moves dead letters into the hot table, where
/// its hot-table statement must not find them again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Table {
    Hot,
    Dead,
    Archive,
}

impl Table {
    pub(super) const ALL: [Table; 3] = [Table::Hot, Table::Dead, Table::Archive];

    fn of(state: JobState) -> Self {
        match state {
            JobState::Ready | JobState::Scheduled | JobState::InFlight => Table::Hot,
            JobState::Dead => Table::Dead,
            JobState::Archived => Table::Archive,
        }
    }
}

/// Wakes the workers of each queue that has a job visible now among `$changed` (its
/// `queue` and `visible_at`), and counts them.
macro_rules! wake {
    ($changed:literal) => {
        concat!(
            ", wake AS (
    SELECT pg_notify('pgbus_wakeup', due.queue)
    FROM (SELECT DISTINCT queue FROM ",
            $changed,
            " WHERE visible_at <= now()) due
)
SELECT queue, count(*), (SELECT count(*) FROM wake) FROM ",
            $changed,
            " GROUP BY queue"
        )
    };
}

/// The jobs `$1` of `table` that `condition` allows, locked in id order, as `locked`.
///
/// Every statement that waits for the locks of several jobs takes them in this one order:
/// the actions here, a filter's selection (`select_sql`, by id within the queue or group),
/// and the worker's batch ack (`sql::ACK`). Two of them on overlapping jobs then queue
/// behind each other instead of deadlocking, which they could when each locked in its own
/// plan's order (an index scan's, a join's, the ack's array order) and took a row the
/// other wanted next. A row that changed while waiting is re-checked against `condition`
/// (`FOR UPDATE` reads its latest version); the statement then changes the locked rows by
/// primary key.
macro_rules! locked {
    ($table:literal, $condition:literal) => {
        concat!(
            "
WITH locked AS (
    SELECT id FROM ",
            $table,
            "
    WHERE id = ANY ($1)",
            $condition,
            "
    ORDER BY id
    FOR UPDATE
)"
        )
    };
}

/// Jobs of the hot table that wait (ready or scheduled): a job in flight is its worker's.
macro_rules! locked_waiting {
    () => {
        locked!(
            "pgbus.messages",
            " AND NOT coalesce(lease_until > now(), false)"
        )
    };
}

/// Ready and scheduled jobs `$1` become visible at `$2`, or now (a ready job keeps its
/// earlier time, so a retry never sends it back in the claim order). Jobs in flight are
/// left alone.
const HOT_RETRY: &str = concat!(
    locked_waiting!(),
    ", changed AS (
    UPDATE pgbus.messages
    SET visible_at = coalesce($2, least(visible_at, now()))
    WHERE id = ANY (ARRAY(SELECT id FROM locked))
    RETURNING queue, visible_at
)",
    wake!("changed")
);

/// Dead letters `$1` back in the hot table, visible at `$2` or now, with their attempts
/// reset and their history kept (as `RETRY_DEAD` moves them).
const DEAD_RETRY: &str = concat!(
    locked!("pgbus.dead_letters", ""),
    ", back AS (
    DELETE FROM pgbus.dead_letters WHERE id = ANY (ARRAY(SELECT id FROM locked)) RETURNING *
), changed AS (
    INSERT INTO pgbus.messages (id, queue, priority, visible_at, attempts, enqueued_at,
                                content_type, headers, group_key, last_error, payload,
                                limit_key, errors)
    SELECT id, queue, priority, coalesce($2, now()), 0, enqueued_at, content_type, headers,
           group_key, error, payload, limit_key, errors
    FROM back
    RETURNING queue, visible_at
)",
    wake!("changed")
);

/// Ready and scheduled jobs `$1` get priority `$2`.
const HOT_PRIORITY: &str = concat!(
    locked_waiting!(),
    ", changed AS (
    UPDATE pgbus.messages SET priority = $2
    WHERE id = ANY (ARRAY(SELECT id FROM locked))
    RETURNING queue
)
SELECT queue, count(*) FROM changed GROUP BY queue"
);

const DEAD_PRIORITY: &str = concat!(
    locked!("pgbus.dead_letters", ""),
    ", changed AS (
    UPDATE pgbus.dead_letters SET priority = $2
    WHERE id = ANY (ARRAY(SELECT id FROM locked))
    RETURNING queue
)
SELECT queue, count(*) FROM changed GROUP BY queue"
);

/// Jobs `$1` leave the hot table in any state: what purge does (a batch counts them as
/// done); a running one's worker finds its lease gone at its next extension.
const HOT_CANCEL: &str = concat!(
    locked!("pgbus.messages", ""),
    ", changed AS (
    DELETE FROM pgbus.messages WHERE id = ANY (ARRAY(SELECT id FROM locked)) RETURNING queue
)
SELECT queue, count(*) FROM changed GROUP BY queue"
);

/// Jobs `$1` move to the dead letters with the reason `$2` appended to their attempt
/// history, their columns copied as the worker's dead-letter statement copies them.
const HOT_DEAD_LETTER: &str = concat!(
    locked!("pgbus.messages", ""),
    ", gone AS (
    DELETE FROM pgbus.messages WHERE id = ANY (ARRAY(SELECT id FROM locked)) RETURNING *
), changed AS (
    INSERT INTO pgbus.dead_letters (id, queue, priority, enqueued_at, attempts, content_type,
                                    headers, group_key, payload, error, limit_key, errors)
    SELECT id, queue, priority, enqueued_at, attempts, content_type, headers, group_key,
           payload, $2, limit_key, pgbus.append_error(errors, attempts, $2)
    FROM gone
    RETURNING queue
)
SELECT queue, count(*) FROM changed GROUP BY queue"
);

const DEAD_DISCARD: &str = concat!(
    locked!("pgbus.dead_letters", ""),
    ", changed AS (
    DELETE FROM pgbus.dead_letters WHERE id = ANY (ARRAY(SELECT id FROM locked))
    RETURNING queue
)
SELECT queue, count(*) FROM changed GROUP BY queue"
);

const ARCHIVE_DISCARD: &str = concat!(
    locked!("pgbus.archive", ""),
    ", changed AS (
    DELETE FROM pgbus.archive WHERE id = ANY (ARRAY(SELECT id FROM locked)) RETURNING queue
)
SELECT queue, count(*) FROM changed GROUP BY queue"
);

/// The statement of `action` on `table`, if it applies there.
fn statement(action: &Action, table: Table) -> Option<&'static str> {
    match (action, table) {
        (Action::RetryNow | Action::Reschedule(_), Table::Hot) => Some(HOT_RETRY),
        (Action::RetryNow | Action::Reschedule(_), Table::Dead) => Some(DEAD_RETRY),
        (Action::SetPriority(_), Table::Hot) => Some(HOT_PRIORITY),
        (Action::SetPriority(_), Table::Dead) => Some(DEAD_PRIORITY),
        (Action::Cancel, Table::Hot) => Some(HOT_CANCEL),
        (Action::DeadLetter, Table::Hot) => Some(HOT_DEAD_LETTER),
        (Action::Discard, Table::Dead) => Some(DEAD_DISCARD),
        (Action::Discard, Table::Archive) => Some(ARCHIVE_DISCARD),
        _ => None,
    }
}

/// Whether `action` applies to jobs in `state` (a filter on any other state is refused).
fn applies(action: &Action, state: JobState) -> bool {
    let moves_waiting_jobs = matches!(
        action,
        Action::RetryNow | Action::Reschedule(_) | Action::SetPriority(_)
    );
    statement(action, Table::of(state)).is_some()
        && !(moves_waiting_jobs && state == JobState::InFlight)
}

/// `action` on the jobs `ids` of `table`, as `actor`; `None` when it does not apply there.
pub(super) fn action_stmt(
    action: &Action,
    table: Table,
    ids: Vec<i64>,
    actor: &str,
) -> Option<Stmt> {
    let sql = statement(action, table)?;
    let stmt = Stmt::new(format!("{} {table:?}", action.name()), sql).bind(ids);
    Some(match action {
        Action::RetryNow => stmt.bind(None::<SystemTime>),
        Action::Reschedule(at) => stmt.bind(Some(*at)),
        Action::SetPriority(priority) => stmt.bind(*priority),
        Action::DeadLetter => stmt.bind(format!("dead-lettered by {actor}")),
        Action::Cancel | Action::Discard => stmt,
    })
}

/// The next [`SELECT_BATCH`] jobs of a filter's selection after the id `$2` (in the order
/// of [`in_queue`]), up to what the listing saw (`$3`, and for dead letters `($11, $3)` as
/// `(failed_at, id)`), locked in id order (the queue's, or its group's: the order of
/// `locked!`), batch after batch.
///
/// Parameters: `$1` queue, `$2` after, `$3` bound id, `$4`-`$8` the filters (see
/// [`FilterValues`]), `$9` with payloads, `$10` batch size, `$11` bound time.
pub(super) fn select_sql(state: JobState, by_group: bool) -> String {
    let Source { table, error, .. } = state.source();
    let (within, key_order) = in_queue(by_group, "ASC");
    let past = past_cursor(by_group, ">");
    let group = if by_group { "true" } else { GROUP_FILTER };
    let bound = match state {
        JobState::Dead => "(failed_at, id) <= ($11, $3)",
        _ => "id <= $3",
    };
    let predicate = state.predicate("visible_at");
    let filters = row_filters(error);
    format!(
        "
SELECT id, content_type, CASE WHEN $9 THEN payload ELSE ''::bytea END AS payload
FROM {table}
WHERE {within} AND {past} AND {bound}
  AND {predicate} AND {ID_FILTER} AND {group}
  AND {filters}
ORDER BY {key_order}
LIMIT $10
FOR UPDATE"
    )
}

/// The selection statement of `filter` up to `bound` (id, and time for dead letters).
pub(super) fn select_stmt(
    filter: &JobFilter,
    bound_id: i64,
    bound_at: Option<SystemTime>,
    after: i64,
) -> Result<Stmt> {
    let by_group = by_group(filter);
    let stmt = Stmt::new(
        format!("select {}", filter.state.as_str()),
        select_sql(filter.state, by_group),
    )
    .bind(filter.queue.as_str().to_owned())
    .bind(after)
    .bind(bound_id);
    Ok(FilterValues::of(filter)?
        .bind(stmt)
        .bind(filter.payload.is_some())
        .bind(SELECT_BATCH as i64)
        .bind(bound_at))
}

/// What an action changed: how many jobs, in which queues.
#[derive(Default)]
struct Changed {
    count: u64,
    queues: BTreeSet<String>,
}

impl Changed {
    async fn run(&mut self, client: &(impl GenericClient + Sync), stmt: Stmt) -> Result<()> {
        let rows = stmt
            .rows(client)
            .await
            .map_err(|e| db(&format!("{}: changing jobs", stmt.name), e))?;
        for row in rows {
            self.count += u64::try_from(row.get::<_, i64>(1)).unwrap_or(0);
            self.queues.insert(row.get(0));
        }
        Ok(())
    }
}

pub(super) async fn act(
    backend: &PgBackend,
    actor: &str,
    action: &Action,
    target: &Target,
) -> Result<u64> {
    let actor = audit::actor(actor)?;
    let mut detail = arguments(action)?;
    let mut conn = backend.conn().await?;
    let tx = conn
        .transaction()
        .await
        .map_err(|e| db("starting a console action", e))?;
    let mut changed = Changed::default();
    let queue = match target {
        Target::Ids(ids) => {
            if ids.is_empty() || ids.len() > MAX_IDS {
                return Err(Error::InvalidArgument(format!(
                    "an action takes 1 to {MAX_IDS} job ids, not {}",
                    ids.len()
                )));
            }
            let ids: Vec<i64> = ids.iter().map(|id| id.0).collect();
            for table in Table::ALL {
                if let Some(stmt) = action_stmt(action, table, ids.clone(), &actor) {
                    changed.run(&tx, stmt).await?;
                }
            }
            detail["ids"] = json!(ids);
            // The queue when all the changed jobs were in one.
            match changed.queues.len() {
                1 => changed.queues.first().cloned(),
                _ => None,
            }
        }
        Target::Filter(filter, bound) => {
            on_filter(&tx, action, &actor, filter, bound, &mut changed).await?;
            detail["filter"] = cursor::filter_json(filter);
            detail["bound"] = json!(bound.0);
            Some(filter.queue.as_str().to_owned())
        }
    };
    let entry = audit::insert_stmt(&actor, action.name(), queue, changed.count, detail);
    audit::insert(&tx, entry).await?;
    tx.commit()
        .await
        .map_err(|e| db("committing a console action", e))?;
    Ok(changed.count)
}

/// The filter's jobs that the bound covers, batch by batch in id order.
async fn on_filter(
    tx: &Transaction<'_>,
    action: &Action,
    actor: &str,
    filter: &JobFilter,
    bound: &Bound,
    changed: &mut Changed,
) -> Result<()> {
    let seen = cursor::read_bound(bound, filter)?;
    if !applies(action, filter.state) {
        return Err(Error::InvalidArgument(format!(
            "{} does not apply to {} jobs",
            action.name(),
            filter.state.as_str()
        )));
    }
    let Seen::UpTo {
        id: bound_id,
        at: bound_at,
    } = seen
    else {
        return Ok(());
    };
    let table = Table::of(filter.state);
    let mut after = i64::MIN;
    loop {
        let rows = select_stmt(filter, bound_id, bound_at, after)?
            .rows(tx)
            .await
            .map_err(|e| db("selecting jobs", e))?;
        let Some(last) = rows.last() else {
            return Ok(());
        };
        after = last.get("id");
        let ids: Vec<i64> = rows
            .iter()
            .filter(|row| {
                filter
                    .payload
                    .as_ref()
                    .is_none_or(|wanted| stored(row).matches(wanted))
            })
            .map(|row| row.get("id"))
            .collect();
        if !ids.is_empty() {
            if let Some(stmt) = action_stmt(action, table, ids, actor) {
                changed.run(tx, stmt).await?;
            }
        }
        if rows.len() < SELECT_BATCH {
            return Ok(());
        }
    }
}

/// The audit detail's arguments of `action`, checked.
fn arguments(action: &Action) -> Result<serde_json::Value> {
    Ok(match action {
        Action::Reschedule(at) => {
            if at
                .duration_since(SystemTime::now())
                .is_ok_and(|ahead| ahead > MAX_DELAY)
            {
                return Err(Error::InvalidArgument(
                    "a job cannot be rescheduled more than 100 years ahead".into(),
                ));
            }
            json!({ "at": chrono::DateTime::<chrono::Utc>::from(*at).to_rfc3339() })
        }
        Action::SetPriority(priority) => json!({ "priority": priority }),
        _ => json!({}),
    })
}
