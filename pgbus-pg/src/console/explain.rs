//! Every console statement, built by the functions the real calls use, explained: what the
//! test that no console query scans `pgbus.messages` or `pgbus.dead_letters` whole reads.

use std::time::SystemTime;

use pgbus_core::{MessageId, QueueName, Result};

use super::actions::{action_stmt, select_stmt, Table};
use super::audit;
use super::cursor::read_cursor;
use super::detail::{job_stmt, payload_stmt};
use super::list::{counts_stmt, list, list_stmt, start};
use super::stmt::Stmt;
use super::types::{Action, JobFilter, JobState, Order, PayloadMatch};
use crate::backend::PgBackend;
use crate::error::db;

/// The filters a page or a selection can combine, one of each kind of statement plan: none,
/// the id (primary key), the group (group index), the row filters, both, the payload.
fn variants(
    queue: &QueueName,
    state: JobState,
    group_key: &str,
    id: MessageId,
) -> Vec<(&'static str, JobFilter)> {
    let all = JobFilter::new(queue.clone(), state);
    let with = |change: &dyn Fn(&mut JobFilter)| {
        let mut filter = all.clone();
        change(&mut filter);
        filter
    };
    let row_filters = |f: &mut JobFilter| {
        f.priority = Some(0);
        f.min_attempts = Some(1);
        f.error_contains = Some("boom".into());
    };
    vec![
        ("all", all.clone()),
        ("id", with(&|f| f.id = Some(id))),
        ("group", with(&|f| f.group_key = Some(group_key.to_owned()))),
        ("filters", with(&row_filters)),
        (
            "group+filters",
            with(&|f| {
                f.group_key = Some(group_key.to_owned());
                row_filters(f);
            }),
        ),
        (
            "payload",
            with(&|f| f.payload = Some(PayloadMatch::parse("n=1").expect("a valid filter"))),
        ),
    ]
}

fn named(mut stmt: Stmt, name: String) -> Stmt {
    stmt.name = name;
    stmt
}

/// Where the first page of `filter` in `order` ends: its cursor's id, or the start when it
/// has none.
async fn first_page_end(backend: &PgBackend, filter: &JobFilter, order: Order) -> Result<i64> {
    let first = list(backend, filter, order, None, 50).await?;
    match &first.next {
        Some(next) => read_cursor(next, filter, order),
        None => Ok(start(order)),
    }
}

pub(super) async fn explain_all(
    backend: &PgBackend,
    queue: &QueueName,
    group_key: &str,
    ids: &[MessageId],
) -> Result<Vec<(String, serde_json::Value)>> {
    let id = ids.first().copied().unwrap_or(MessageId(1));
    let raw_ids: Vec<i64> = ids.iter().map(|id| id.0).collect();
    let mut stmts = Vec::new();
    for state in JobState::ALL {
        for (variant, filter) in variants(queue, state, group_key, id) {
            let state = state.as_str();
            // Each order's first page ends where the second page starts, and, for the other
            // order, a page deep in the queue: its window holds the queue's last rows that
            // way, a small range of ids, where reading the primary key looks cheap.
            let newest_end = first_page_end(backend, &filter, Order::NewestFirst).await?;
            let oldest_end = first_page_end(backend, &filter, Order::OldestFirst).await?;
            for (order, later, deep) in [
                (Order::NewestFirst, newest_end, oldest_end),
                (Order::OldestFirst, oldest_end, newest_end),
            ] {
                let pages = [("first", start(order)), ("later", later), ("deep", deep)];
                for (page, after) in pages {
                    let stmt = list_stmt(&filter, order, after, 50)?;
                    let name = format!("list {state} {order:?} {variant} {page} page");
                    stmts.push(named(stmt, name));
                }
            }
            // A selection's first batch, and one near the queue's end (batches go up by id).
            for (batch, after) in [("first", i64::MIN), ("last", newest_end)] {
                let stmt = select_stmt(&filter, i64::MAX, Some(SystemTime::now()), after)?;
                stmts.push(named(
                    stmt,
                    format!("select {state} {variant} {batch} batch"),
                ));
            }
        }
    }
    stmts.push(counts_stmt(queue));
    stmts.push(job_stmt(id));
    stmts.push(payload_stmt(id));
    let actions = [
        Action::RetryNow,
        Action::Reschedule(SystemTime::now()),
        Action::SetPriority(1),
        Action::Cancel,
        Action::DeadLetter,
        Action::Discard,
    ];
    for action in &actions {
        for table in Table::ALL {
            stmts.extend(action_stmt(action, table, raw_ids.clone(), "explain"));
        }
    }
    stmts.push(audit::insert_stmt(
        "explain",
        "retry",
        Some(queue.as_str().to_owned()),
        1,
        serde_json::json!({}),
    ));
    stmts.push(audit::read_stmt(50, None));
    stmts.push(named(
        audit::read_stmt(50, Some(1000)),
        "audit read later".into(),
    ));
    let conn = backend.conn().await?;
    let mut plans = Vec::with_capacity(stmts.len());
    for stmt in stmts {
        let plan = stmt
            .explain(&**conn)
            .await
            .map_err(|e| db(&format!("explaining {}", stmt.name), e))?;
        plans.push((stmt.name, plan));
    }
    Ok(plans)
}
