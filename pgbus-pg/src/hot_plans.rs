//! The hot path's statements keep plans whose work follows their input (a claim's size, a
//! batch of leases, one group) when the table's statistics say it is empty while it holds
//! a backlog. That is the normal state of a queue's table: autovacuum analyzes it, or
//! vacuums it, while every row is gone (a queue that keeps up), and the pages stay. With
//! those statistics the planner once sorted the whole backlog for each claim, walked the
//! whole table for each group head, and matched a batch of leases to the table in a
//! quadratic loop. The statements run as the worker runs them: generic plans, the values
//! bound at execution.

use serde_json::Value;
use tokio_postgres::{Client, SimpleQueryMessage};

use crate::sql;
use crate::PgBackend;

/// Messages in the table, half of them grouped.
const MESSAGES: i64 = 20_000;
/// Groups the grouped half is spread over (100 messages each).
const GROUPS: i64 = 100;
/// Leases in one ack or heartbeat.
const LEASES: i64 = 200;
/// Other sessions' lease rows in the lease table.
const LEASE_ROWS: i64 = 20_000;
/// The most rows a statement's plan may handle here: a plan that visits the table's rows,
/// or every pair of lease and row, handles many more; the ones above, a few thousand.
const WORK_BOUND: f64 = (MESSAGES / 2) as f64;

#[tokio::test]
async fn hot_statements_keep_their_plans_when_the_statistics_say_empty() {
    let (_db, client) = database_with_queue_q().await;
    client
        .batch_execute(&format!(
            "-- The state is forced here; autovacuum must not repair it under the test.
             ALTER TABLE pgbus.messages SET (autovacuum_enabled = false);
             {fill}
             DELETE FROM pgbus.messages;
             ANALYZE pgbus.messages;
             {fill}
             UPDATE pgbus.messages SET lease_until = now() + interval '1 minute', attempts = 1
             WHERE id IN (SELECT id FROM pgbus.messages WHERE group_key IS NULL
                          ORDER BY id DESC LIMIT {LEASES});
             SET plan_cache_mode = force_generic_plan;",
            fill = format!(
                "INSERT INTO pgbus.messages (queue, visible_at, content_type, payload, group_key)
                 SELECT 'q', now() - interval '1 second', 'application/json', '\\x7b7d',
                        CASE WHEN n % 2 = 0 THEN 'g' || (n / 2 % {GROUPS}) END
                 FROM generate_series(1, {MESSAGES}) n;"
            ),
        ))
        .await
        .expect("setup");
    assert_statistics_say_empty(&client).await;

    let leases: Vec<(i64, i32)> = client
        .query(
            "SELECT id, attempts FROM pgbus.messages WHERE lease_until IS NOT NULL",
            &[],
        )
        .await
        .expect("leases")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(leases.len() as i64, LEASES);
    let ids = array(leases.iter().map(|(id, _)| id));
    let attempts = array(leases.iter().map(|(_, attempt)| attempt));
    let (first_id, first_attempt) = leases[0];

    let statements: [(&str, &str, String); 7] = [
        ("claim", sql::CLAIM, "'q', 100, 30.0, NULL".to_owned()),
        ("ack", sql::ACK, format!("'{ids}', '{attempts}'")),
        (
            "group_step",
            sql::GROUP_STEP,
            format!(
                "'q', 'g7', true, '{ids}', '{attempts}', NULL, NULL, NULL, NULL, '{{}}', '{{}}', \
                 16, 30.0, NULL, true"
            ),
        ),
        (
            "group_step_fenced",
            sql::GROUP_STEP_FENCED,
            format!(
                "'q', 'g7', true, '{ids}', '{attempts}', NULL, NULL, NULL, NULL, '{{}}', '{{}}', \
                 16, 30.0, NULL, true, 'token', 30.0"
            ),
        ),
        (
            "release",
            sql::RELEASE,
            format!("'{ids}', '{attempts}', true"),
        ),
        (
            "extend",
            sql::EXTEND,
            format!("'{ids}', '{attempts}', 30.0"),
        ),
        (
            "nack",
            sql::NACK,
            format!("{first_id}, {first_attempt}, 1.0, 'failed'"),
        ),
    ];
    for (name, statement, values) in statements {
        let plan = run_explained(&client, name, statement, &values).await;
        let work = work(&plan);
        assert!(
            work < WORK_BOUND,
            "{name}: its plan handled {work} rows over a table of {MESSAGES}:\n{plan:#}"
        );
        // The plans of the functions a statement calls (the ack's delete) are not in its
        // own: the rows its scans read, counted by the server, cover them too.
        let read = rows_read(&client, name, &values).await;
        assert!(
            read < WORK_BOUND as i64,
            "{name}: its scans read {read} rows of a table of {MESSAGES}"
        );
        if statement == sql::CLAIM {
            let mut indexes = Vec::new();
            ordered_scans(&plan, &mut indexes);
            assert!(
                indexes.iter().any(|index| index == "messages_claim_idx") && !sorts(&plan),
                "{name}: not read in order from the claim index:\n{plan:#}"
            );
        }
    }
    // Nothing above changed what the planner believes.
    assert_statistics_say_empty(&client).await;
}

/// A worker that starts on an empty queue prepares its claim's generic plan while the table
/// has no pages: the planner then priced a scan of the whole table below finding the
/// picked rows by their tuple ids (an empty table costs nothing to scan), and the worker
/// kept that plan until autovacuum next touched the table, reading the whole backlog for
/// each claim. The fetch connection's settings keep the lookup on the picked rows.
#[tokio::test]
async fn the_claim_planned_on_an_empty_table_still_finds_its_rows_by_tuple_id() {
    let (_db, client) = database_with_queue_q().await;
    client
        .batch_execute(crate::fetcher::FETCH_SESSION_SETTINGS)
        .await
        .expect("the fetch connection's settings");
    let values = "'q', 100, 30.0, NULL";
    // The first execution makes the generic plan, on the table as migrated: no page.
    run_explained(&client, "claim", sql::CLAIM, values).await;
    client
        .batch_execute(&format!(
            "INSERT INTO pgbus.messages (queue, visible_at, content_type, payload)
             SELECT 'q', now() - interval '1 second', 'application/json', '\\x7b7d'
             FROM generate_series(1, {MESSAGES});"
        ))
        .await
        .expect("a backlog");
    let plan = explain_prepared(&client, "claim", values).await;
    let work = work(&plan);
    assert!(
        work < WORK_BOUND,
        "its plan handled {work} rows of a backlog of {MESSAGES}:\n{plan:#}"
    );
}

/// Lease mode's group statement keeps the plan its session made first, when the lease
/// table may have been empty; the table then fills with other sessions' leases (and, under
/// churn, with pages of dead rows). The session's own leases, which a step reads for its
/// gate, its fence and its renewal, are still found through the owner index, not by reading
/// the table. (The step that releases the group deletes its row by key, a plan that still
/// follows the estimates: see `sql::GROUP_STEP_FENCED`.)
#[tokio::test]
async fn the_fenced_group_step_finds_its_leases_by_owner_after_the_table_grew() {
    let (_db, client) = database_with_queue_q().await;
    // One at a time: VACUUM refuses to run in the implicit transaction of a batch.
    for setup in [
        "VACUUM ANALYZE pgbus.group_leases",
        "SET plan_cache_mode = force_generic_plan",
    ] {
        client.batch_execute(setup).await.expect("setup");
    }
    let values = "'q', 'g7', false, '{}', '{}', NULL, NULL, NULL, NULL, '{}', '{}', 16, 30.0, \
                  NULL, false, 'token', 30.0";
    run_explained(&client, "fenced", sql::GROUP_STEP_FENCED, values).await;
    client
        .batch_execute(&format!(
            "INSERT INTO pgbus.group_leases (queue, group_key, owner, expires_at)
             SELECT 'q', 'other' || n, 'other', now() + interval '1 minute'
             FROM generate_series(1, {LEASE_ROWS}) n;"
        ))
        .await
        .expect("other sessions' leases");
    let plan = explain_prepared(&client, "fenced", values).await;
    let work = work(&plan);
    assert!(
        work < LEASE_ROWS as f64,
        "its plan handled {work} rows of {LEASE_ROWS} other leases:\n{plan:#}"
    );
}

#[tokio::test]
async fn group_candidates_read_a_window_of_groups_and_go_round() {
    const MANY_GROUPS: i64 = 2_000;
    const WINDOW: i64 = 64;
    let (_db, client) = database_with_queue_q().await;
    client
        .batch_execute(&format!(
            "INSERT INTO pgbus.messages (queue, visible_at, content_type, payload, group_key)
             SELECT 'q', now() - interval '1 second', 'application/json', '\\x7b7d',
                    'g' || lpad((n % {MANY_GROUPS})::text, 5, '0')
             FROM generate_series(1, 2 * {MANY_GROUPS}) n;
             ANALYZE pgbus.messages;
             SET plan_cache_mode = force_generic_plan;"
        ))
        .await
        .expect("setup");
    let plan = run_explained(
        &client,
        "candidates",
        sql::GROUP_CANDIDATES,
        &format!("'q', 8, '{{}}', '', {WINDOW}"),
    )
    .await;
    let work = work(&plan);
    assert!(
        work < (MANY_GROUPS / 2) as f64,
        "one call handled {work} rows for a window of {WINDOW} of {MANY_GROUPS} groups:\n{plan:#}"
    );
    // Call after call, the windows go round the groups: in less than a round (31 windows
    // of 64 make 2,000), each call finds 8 groups no earlier call found.
    let mut start = String::new();
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..30 {
        let row = client
            .query_one(
                sql::GROUP_CANDIDATES,
                &[&"q", &8i64, &Vec::<String>::new(), &start, &WINDOW],
            )
            .await
            .expect("candidates");
        let candidates: Vec<String> = row.get(0);
        assert_eq!(candidates.len(), 8);
        seen.extend(candidates);
        start = row
            .get::<_, Option<String>>(1)
            .expect("a window's last group");
    }
    assert_eq!(
        seen.len(),
        30 * 8,
        "every call found groups no call had found"
    );
}

/// A migrated test database with queue `q`, and a connection to it.
async fn database_with_queue_q() -> (crate::TestDatabase, Client) {
    let db = crate::test_database().await;
    let backend = PgBackend::connect(db.url()).expect("backend");
    backend.migrate().await.expect("migrate");
    let client = crate::connect(db.url(), "test").await.expect("connect");
    client
        .batch_execute(
            "INSERT INTO pgbus.queues (name, max_attempts, retry_base_ms, retry_cap_ms,
                 retry_jitter, lease_ms, keep_history, archive_retention_ms)
             VALUES ('q', 5, 1000, 60000, 0.1, 30000, false, 0)",
        )
        .await
        .expect("queue q");
    (db, client)
}

/// The table has pages and, by its statistics, no row.
async fn assert_statistics_say_empty(client: &Client) {
    let row = client
        .query_one(
            "SELECT relpages, reltuples FROM pg_class WHERE oid = 'pgbus.messages'::regclass",
            &[],
        )
        .await
        .expect("pg_class");
    let (pages, tuples): (i32, f32) = (row.get(0), row.get(1));
    assert!(
        pages > 0 && tuples == 0.0,
        "relpages {pages}, reltuples {tuples}"
    );
}

/// A Postgres array literal.
fn array<T: ToString>(items: impl Iterator<Item = T>) -> String {
    let items: Vec<String> = items.map(|item| item.to_string()).collect();
    format!("{{{}}}", items.join(","))
}

/// Runs `statement` as a prepared statement (a generic plan, as on the fetch connection)
/// with `values`, in a transaction rolled back afterwards, and returns its executed plan.
async fn run_explained(client: &Client, name: &str, statement: &str, values: &str) -> Value {
    client
        .batch_execute(&format!("PREPARE {name} AS {statement}"))
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    explain_prepared(client, name, values).await
}

/// Runs the prepared statement `name` with `values` in a transaction rolled back
/// afterwards, and returns its executed plan.
async fn explain_prepared(client: &Client, name: &str, values: &str) -> Value {
    let mut out = Vec::new();
    for message in client
        .simple_query(&format!(
            "BEGIN;
             EXPLAIN (ANALYZE, FORMAT JSON) EXECUTE {name}({values});
             ROLLBACK;"
        ))
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"))
    {
        if let SimpleQueryMessage::Row(row) = message {
            out.push(row.get(0).unwrap_or_default().to_owned());
        }
    }
    serde_json::from_str(&out.concat()).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// The rows of pgbus's tables that the prepared statement `name`'s scans read, functions
/// it calls included, run with `values` in a transaction rolled back afterwards: what the
/// server's statistics count (rows a sequential scan read, live rows an index scan
/// fetched), before and after it. (The backend's counts reach the shared statistics
/// between transactions at most once a second: until then the transaction's view holds
/// earlier statements' counts too, hence the difference within one transaction.)
async fn rows_read(client: &Client, name: &str, values: &str) -> i64 {
    const READ: &str = "SELECT sum(seq_tup_read + coalesce(idx_tup_fetch, 0)) AS read
                        FROM pg_stat_xact_user_tables WHERE schemaname = 'pgbus'";
    let mut counts = Vec::new();
    for message in client
        .simple_query(&format!(
            "BEGIN; {READ}; EXECUTE {name}({values}); {READ}; ROLLBACK;"
        ))
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"))
    {
        if let SimpleQueryMessage::Row(row) = message {
            if row.columns().first().map(|c| c.name()) == Some("read") {
                counts.push(row.get(0).and_then(|n| n.parse::<i64>().ok()).unwrap_or(0));
            }
        }
    }
    match counts[..] {
        [before, after] => after - before,
        _ => panic!("{name}: no statistics of the transaction: {counts:?}"),
    }
}

/// The rows every node of an executed plan produced or filtered out, over all its loops.
fn work(plan: &Value) -> f64 {
    match plan {
        Value::Object(node) => {
            let number = |key: &str| node.get(key).and_then(Value::as_f64).unwrap_or(0.0);
            let own = (number("Actual Rows")
                + number("Rows Removed by Filter")
                + number("Rows Removed by Join Filter"))
                * number("Actual Loops").max(1.0);
            own + node.values().map(work).sum::<f64>()
        }
        Value::Array(items) => items.iter().map(work).sum(),
        _ => 0.0,
    }
}

/// The indexes a plan reads in index order (not through a bitmap).
fn ordered_scans(plan: &Value, indexes: &mut Vec<String>) {
    match plan {
        Value::Object(node) => {
            let ordered = matches!(
                node.get("Node Type").and_then(Value::as_str),
                Some("Index Scan" | "Index Only Scan")
            );
            if let (true, Some(index)) = (ordered, node.get("Index Name").and_then(Value::as_str)) {
                indexes.push(index.to_owned());
            }
            node.values().for_each(|v| ordered_scans(v, indexes));
        }
        Value::Array(items) => items.iter().for_each(|v| ordered_scans(v, indexes)),
        _ => {}
    }
}

/// Whether a plan sorts anywhere.
fn sorts(plan: &Value) -> bool {
    match plan {
        Value::Object(node) => {
            node.get("Node Type").and_then(Value::as_str) == Some("Sort")
                || node.values().any(sorts)
        }
        Value::Array(items) => items.iter().any(sorts),
        _ => false,
    }
}
