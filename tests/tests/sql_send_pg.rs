//! Producers in SQL (`pgbus.send`, `pgbus.send_batch`, migration 16) on PostgreSQL: jobs sent
//! with plain SQL, by a trigger, and by the Python and Node examples reach typed Rust
//! handlers; every option is stored exactly as the Rust send stores it; refusals carry the
//! Rust errors' texts; wake-ups; paused queues; a role given `migrate --grant` may send.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pgbus_core::{
    Consumer, Headers, MessageId, NewMessage, Producer, QueueAdmin, QueueName, QueueOptions,
    Unique, DEFAULT_MAX_PAYLOAD_BYTES, MAX_DELAY,
};
use pgbus_exec::{JobContext, Worker};
use pgbus_pg::{connect, PgBackend, PgListener};
use pgbus_tests::{create, eventually, fresh_backend, queue, stats_of, wait_until_empty};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio_postgres::types::ToSql;
use tokio_postgres::Client;
use tokio_util::sync::CancellationToken;

const DEADLINE: Duration = Duration::from_secs(60);

/// Owned parameters of a statement.
type Params = Vec<Box<dyn ToSql + Sync>>;

/// The payload every example producer sends.
#[derive(Debug, Clone, PartialEq, Deserialize)]
struct Job {
    n: u32,
    producer: String,
}

/// The payload `examples/producers/orders_trigger.sql` sends.
#[derive(Debug, Clone, PartialEq, Deserialize)]
struct Order {
    order_id: i64,
    customer: String,
    total_cents: i64,
}

/// One job as its handler saw it.
#[derive(Debug, Clone)]
struct Handled<T> {
    id: MessageId,
    group: Option<String>,
    headers: Headers,
    payload: T,
}

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/producers")
}

async fn sql(url: &str) -> Client {
    connect(url, "test").await.expect("a test connection")
}

/// Runs a worker for plain and grouped jobs on `q` with a handler typed `T` until `n` jobs
/// were handled and acked; returns them in the order they ran. A payload that does not
/// decode as `T` is dead-lettered, which fails the test.
async fn drain<T>(backend: &PgBackend, q: &QueueName, n: usize) -> Vec<Handled<T>>
where
    T: DeserializeOwned + Clone + Send + 'static,
{
    let seen = Arc::new(Mutex::new(Vec::new()));
    let worker = Worker::builder(backend.clone())
        .concurrency(4)
        .poll_interval(Duration::from_millis(50))
        .handle(q.clone(), {
            let seen = Arc::clone(&seen);
            move |ctx: JobContext<PgBackend>, payload: T| {
                let seen = Arc::clone(&seen);
                async move {
                    seen.lock().expect("seen").push(Handled {
                        id: ctx.message_id(),
                        group: ctx.group_key().map(str::to_owned),
                        headers: ctx.headers().clone(),
                        payload,
                    });
                }
            }
        })
        .build_mixed()
        .expect("a worker");
    let stop = CancellationToken::new();
    let run = tokio::spawn(worker.run(stop.clone()));
    // A job whose payload does not decode as `T` is dead-lettered and never counted here.
    eventually("every job is handled", DEADLINE, || async {
        seen.lock().expect("seen").len() >= n
    })
    .await;
    wait_until_empty(backend, q, DEADLINE).await;
    stop.cancel();
    let report = run.await.expect("the worker task").expect("the worker");
    let stats = stats_of(backend, q).await;
    assert_eq!(
        stats.dead_lettered, 0,
        "a payload did not decode: {stats:?}"
    );
    assert_eq!(report.acked, n as u64, "{report:?}");
    let seen = seen.lock().expect("seen").clone();
    assert_eq!(seen.len(), n);
    seen
}

/// The SQLSTATE and message of a statement that must fail.
async fn refusal(
    client: &Client,
    statement: &str,
    params: &[&(dyn ToSql + Sync)],
) -> (String, String) {
    let err = client.query(statement, params).await.expect_err(statement);
    let db = err
        .as_db_error()
        .unwrap_or_else(|| panic!("{statement}: not a database error: {err}"));
    (db.code().code().to_owned(), db.message().to_owned())
}

/// The ids a statement returns, one per row (a `send_batch`).
async fn ids(client: &Client, statement: &str) -> Vec<i64> {
    client
        .query(statement, &[])
        .await
        .unwrap_or_else(|err| panic!("{statement}: {err}"))
        .iter()
        .map(|row| row.get(0))
        .collect()
}

async fn stored_count(client: &Client) -> i64 {
    client
        .query_one("SELECT count(*) FROM pgbus.messages", &[])
        .await
        .expect("count")
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sql_sends_reach_a_typed_rust_handler() {
    let (backend, url) = fresh_backend(4).await;
    let q = create(&backend, "jobs", QueueOptions::default()).await;
    let client = sql(&url).await;

    // As from psql: literal arguments.
    let one: i64 = client
        .query_one(
            r#"SELECT pgbus.send('jobs', '{"n": 1, "producer": "psql"}')"#,
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let batch = ids(
        &client,
        "SELECT id FROM pgbus.send_batch('jobs',
                 ARRAY(SELECT jsonb_build_object('n', n, 'producer', 'batch')
                       FROM generate_series(2, 4) AS n ORDER BY n)) AS id",
    )
    .await;
    assert_eq!(batch.len(), 3);
    assert!(
        one < batch[0] && batch.windows(2).all(|w| w[0] < w[1]),
        "ids increase in send order: {one} then {batch:?}"
    );
    let empty = client
        .query("SELECT pgbus.send_batch('jobs', '{}')", &[])
        .await
        .unwrap();
    assert!(empty.is_empty(), "an empty batch sends nothing");

    let handled = drain::<Job>(&backend, &q, 4).await;
    let by_id: BTreeMap<i64, Job> = handled
        .iter()
        .map(|h| (h.id.0, h.payload.clone()))
        .collect();
    let expected: BTreeMap<i64, Job> = [(one, 1, "psql")]
        .into_iter()
        .chain(batch.iter().zip(2..).map(|(&id, n)| (id, n, "batch")))
        .map(|(id, n, producer)| {
            let job = Job {
                n,
                producer: producer.to_owned(),
            };
            (id, job)
        })
        .collect();
    assert_eq!(by_id, expected);
}

/// The same jobs sent with the Rust API to one queue and with SQL to another are stored
/// alike, column by column (the payload as the JSON value it decodes to).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_option_is_stored_as_the_rust_send_stores_it() {
    let (backend, url) = fresh_backend(4).await;
    let rust_q = create(&backend, "from_rust", QueueOptions::default()).await;
    let sql_q = create(&backend, "from_sql", QueueOptions::default()).await;
    let client = sql(&url).await;
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    // A whole second an hour ahead: timestamptz keeps microseconds.
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3_600;
    let run_at = UNIX_EPOCH + Duration::from_secs(secs);

    /// One job: the Rust message and the SQL arguments that should store the same row.
    struct Case {
        rust: NewMessage,
        delay: Option<&'static str>,
        run_at: Option<SystemTime>,
        priority: Option<i32>,
        group: Option<&'static str>,
        unique: Option<&'static str>,
        headers: Option<Value>,
        traceparent: Option<&'static str>,
        limit: Option<&'static str>,
    }
    let job = |n: u32| NewMessage::json(&json!({"n": n, "producer": "test"})).unwrap();
    let plain = |rust: NewMessage| Case {
        rust,
        delay: None,
        run_at: None,
        priority: None,
        group: None,
        unique: None,
        headers: None,
        traceparent: None,
        limit: None,
    };
    let cases = vec![
        plain(job(0)),
        Case {
            delay: Some("90 seconds"),
            ..plain(job(1).delay(Duration::from_secs(90)))
        },
        Case {
            run_at: Some(run_at),
            ..plain(job(2).at(run_at))
        },
        Case {
            priority: Some(7),
            ..plain(job(3).priority(7))
        },
        Case {
            group: Some("customer:42"),
            ..plain(job(4).group("customer:42"))
        },
        Case {
            unique: Some("welcome:42"),
            ..plain(job(5).unique(Unique::new("welcome:42")))
        },
        Case {
            headers: Some(json!({"tenant": "acme", "kind": "welcome"})),
            ..plain(job(6).header("tenant", "acme").header("kind", "welcome"))
        },
        Case {
            traceparent: Some(traceparent),
            ..plain(job(7).header("traceparent", traceparent))
        },
        Case {
            limit: Some("smtp"),
            ..plain(job(8).limit_key("smtp"))
        },
    ];

    const SEND: &str = "SELECT pgbus.send($1, $2, delay => $3::text::interval, run_at => $4,
        priority => $5, group_key => $6, unique_key => $7, headers => $8, traceparent => $9,
        limit_key => $10)";
    let send = |c: &Case| {
        let payload: Value = serde_json::from_slice(&c.rust.payload).unwrap();
        let client = &client;
        let (delay, run_at, priority) = (c.delay, c.run_at, c.priority);
        let (group, unique, headers) = (c.group, c.unique, c.headers.clone());
        let (traceparent, limit) = (c.traceparent, c.limit);
        async move {
            client
                .query_one(
                    SEND,
                    &[
                        &"from_sql",
                        &payload,
                        &delay,
                        &run_at,
                        &priority,
                        &group,
                        &unique,
                        &headers,
                        &traceparent,
                        &limit,
                    ],
                )
                .await
                .unwrap()
                .get::<_, i64>(0)
        }
    };
    let (mut rust_ids, mut sql_ids) = (Vec::new(), Vec::new());
    for c in &cases {
        rust_ids.push(backend.send(&rust_q, c.rust.clone()).await.unwrap());
        sql_ids.push(send(c).await);
    }

    // Every column but the id, the queue and the send time; the scheduled job's offset from
    // its send time depends on when it was sent, so its visible time stands in for it.
    let rows = |q: &'static str| {
        let client = &client;
        async move {
            client
                .query(
                    "SELECT priority, content_type, headers, group_key, unique_key, limit_key,
                            extract(epoch FROM visible_at - enqueued_at)::float8, visible_at,
                            convert_from(payload, 'UTF8')::jsonb, lease_until, attempts
                     FROM pgbus.messages WHERE queue = $1 ORDER BY id",
                    &[&q],
                )
                .await
                .unwrap()
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let when = if i == 2 {
                        format!("{:?}", r.get::<_, SystemTime>(7))
                    } else {
                        format!("+{} s", r.get::<_, f64>(6))
                    };
                    format!(
                        "{:?}",
                        (
                            r.get::<_, i16>(0),
                            r.get::<_, String>(1),
                            r.get::<_, Value>(2),
                            r.get::<_, Option<String>>(3),
                            r.get::<_, Option<String>>(4),
                            r.get::<_, Option<String>>(5),
                            when,
                            r.get::<_, Value>(8),
                            r.get::<_, Option<SystemTime>>(9),
                            r.get::<_, i32>(10),
                        )
                    )
                })
                .collect::<Vec<_>>()
        }
    };
    let (from_rust, from_sql) = (rows("from_rust").await, rows("from_sql").await);
    assert_eq!(from_sql.len(), cases.len());
    assert_eq!(from_sql, from_rust);

    // The scheduled job is visible at the given time, to the microsecond.
    let visible: SystemTime = client
        .query_one(
            "SELECT visible_at FROM pgbus.messages WHERE id = $1",
            &[&sql_ids[2]],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(visible, run_at);

    // A unique key's second send returns the first job's id, from either side.
    assert_eq!(send(&cases[5]).await, sql_ids[5]);
    let again = backend.send(&rust_q, cases[5].rust.clone()).await.unwrap();
    assert_eq!(again, rust_ids[5]);
    let batch = ids(
        &client,
        "SELECT pgbus.send_batch('from_sql', ARRAY['1', '2', '3']::jsonb[],
                                     unique_key => 'welcome:42')",
    )
    .await;
    assert_eq!(batch, vec![sql_ids[5]; 3]);
    let fresh = ids(
        &client,
        "SELECT pgbus.send_batch('from_sql', ARRAY['1', '2', '3']::jsonb[],
                                     unique_key => 'once')",
    )
    .await;
    assert_eq!(fresh.len(), 3);
    assert!(fresh.iter().all(|&id| id == fresh[0]), "{fresh:?}");
    assert_eq!(
        stats_of(&backend, &sql_q).await.depth(),
        cases.len() as u64 + 1
    );

    // Claims see the options: the plain claim hands out the ready, ungrouped, unlimited jobs,
    // the prioritised one first; Rust reads the SQL headers back.
    let claimed = backend
        .claim(&sql_q, 100, Duration::from_secs(60))
        .await
        .unwrap();
    let ids: Vec<i64> = claimed.iter().map(|m| m.id.0).collect();
    assert_eq!(ids[0], sql_ids[3], "priority 7 first: {ids:?}");
    for absent in [sql_ids[1], sql_ids[2], sql_ids[4], sql_ids[8]] {
        assert!(!ids.contains(&absent), "{absent} was claimed: {ids:?}");
    }
    let traced = claimed.iter().find(|m| m.id.0 == sql_ids[7]).unwrap();
    assert_eq!(
        traced.headers.get("traceparent").map(String::as_str),
        Some(traceparent)
    );
    let with_headers = claimed.iter().find(|m| m.id.0 == sql_ids[6]).unwrap();
    assert_eq!(
        with_headers.headers.get("tenant").map(String::as_str),
        Some("acme")
    );
    let decoded: Job = claimed[0].decode().unwrap();
    assert_eq!(decoded.n, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_carry_the_rust_errors_texts_and_store_nothing() {
    let (backend, url) = fresh_backend(4).await;
    let q = create(&backend, "jobs", QueueOptions::default()).await;
    let client = sql(&url).await;
    const INVALID: &str = "22023";

    // Queue names, as QueueName::new words them.
    let long = "a".repeat(49);
    for name in [
        "",
        "Emails",
        "1queue",
        "_queue",
        "emails-x",
        "ünïcode",
        "a\"b\\c\nd\te",
        long.as_str(),
    ] {
        let rust = QueueName::new(name).unwrap_err().to_string();
        for statement in [
            "SELECT pgbus.send($1, '1')",
            "SELECT pgbus.send_batch($1, ARRAY['1']::jsonb[])",
        ] {
            assert_eq!(
                refusal(&client, statement, &[&name]).await,
                (INVALID.to_owned(), rust.clone()),
                "{name:?}"
            );
        }
    }

    // An unknown queue, as the Rust send reports it.
    let nope = queue("nope");
    let rust = backend
        .send(&nope, NewMessage::json(&1).unwrap())
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(
        refusal(&client, "SELECT pgbus.send('nope', '1')", &[]).await,
        ("42704".to_owned(), rust.clone())
    );
    assert_eq!(
        refusal(&client, "SELECT pgbus.send_batch('nope', '{}')", &[]).await,
        ("42704".to_owned(), rust),
        "an empty batch to a missing queue is refused too"
    );

    // Each message check of the Rust send, against the SQL arguments meaning the same.
    let job = || NewMessage::json(&json!({"n": 1})).unwrap();
    let over = MAX_DELAY.as_secs_f64() + 1.0;
    let before_epoch = UNIX_EPOCH - Duration::from_secs(1);
    let cases: Vec<(NewMessage, &str, Params)> = vec![
        (
            job().delay(MAX_DELAY + Duration::from_secs(1)),
            "SELECT pgbus.send('jobs', '1', delay => make_interval(secs => $1))",
            vec![Box::new(over)],
        ),
        (
            job().at(before_epoch),
            "SELECT pgbus.send('jobs', '1', run_at => $1)",
            vec![Box::new(before_epoch)],
        ),
        (
            job().group(""),
            "SELECT pgbus.send('jobs', '1', group_key => '')",
            vec![],
        ),
        (
            job().group("g".repeat(256)),
            "SELECT pgbus.send('jobs', '1', group_key => repeat('g', 256))",
            vec![],
        ),
        (
            job().unique(Unique::new("")),
            "SELECT pgbus.send('jobs', '1', unique_key => '')",
            vec![],
        ),
        (
            job().unique(Unique::new("u".repeat(256))),
            "SELECT pgbus.send('jobs', '1', unique_key => repeat('u', 256))",
            vec![],
        ),
        (
            job().limit_key(""),
            "SELECT pgbus.send('jobs', '1', limit_key => '')",
            vec![],
        ),
        (
            job().group("g").limit_key("k"),
            "SELECT pgbus.send('jobs', '1', group_key => 'g', limit_key => 'k')",
            vec![],
        ),
    ];
    for (message, statement, params) in &cases {
        let rust = backend
            .send(&q, message.clone())
            .await
            .unwrap_err()
            .to_string();
        let params: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref()).collect();
        assert_eq!(
            refusal(&client, statement, &params).await,
            (INVALID.to_owned(), rust),
            "{statement}"
        );
    }

    // A payload over the limit (the default one: the SQL functions do not know a backend's),
    // also as one element of a batch, which then stores nothing.
    let big = "x".repeat(DEFAULT_MAX_PAYLOAD_BYTES);
    let rust = backend
        .send(&q, NewMessage::json(&big).unwrap())
        .await
        .unwrap_err()
        .to_string();
    let length = DEFAULT_MAX_PAYLOAD_BYTES as i32;
    assert_eq!(
        refusal(
            &client,
            "SELECT pgbus.send('jobs', to_jsonb(repeat('x', $1)))",
            &[&length]
        )
        .await,
        ("54000".to_owned(), rust.clone())
    );
    assert_eq!(
        refusal(
            &client,
            "SELECT pgbus.send_batch('jobs', ARRAY['1', to_jsonb(repeat('x', $1))])",
            &[&length]
        )
        .await,
        ("54000".to_owned(), rust)
    );
    assert_eq!(
        stored_count(&client).await,
        0,
        "a refused send stores nothing"
    );
    // The largest payload fits, from either side.
    let fits = "x".repeat(DEFAULT_MAX_PAYLOAD_BYTES - 2);
    backend
        .send(&q, NewMessage::json(&fits).unwrap())
        .await
        .unwrap();
    client
        .query_one(
            "SELECT pgbus.send('jobs', to_jsonb(repeat('x', $1)))",
            &[&(length - 2)],
        )
        .await
        .unwrap();
    client
        .execute("DELETE FROM pgbus.messages", &[])
        .await
        .unwrap();

    // A scheduled time too far ahead: the seconds differ by when each side looked.
    let masked = |text: &str| {
        let (head, rest) = text.split_once("ahead of ").expect(text);
        let (_, tail) = rest.split_once(' ').expect(text);
        format!("{head}ahead of N {tail}")
    };
    let far = SystemTime::now() + MAX_DELAY + Duration::from_secs(86_400);
    let rust = backend
        .send(&q, job().at(far))
        .await
        .unwrap_err()
        .to_string();
    let (code, text) = refusal(
        &client,
        "SELECT pgbus.send('jobs', '1', run_at => $1)",
        &[&far],
    )
    .await;
    assert_eq!((code.as_str(), masked(&text)), (INVALID, masked(&rust)));

    // Refusals with no Rust counterpart (the Rust types cannot express them).
    let sql_only = [
        (
            "SELECT pgbus.send('jobs', NULL)",
            "invalid argument: a payload is NULL (JSON null is 'null'::jsonb)",
        ),
        (
            "SELECT pgbus.send_batch('jobs', ARRAY['1', NULL]::jsonb[])",
            "invalid argument: a payload is NULL (JSON null is 'null'::jsonb)",
        ),
        (
            "SELECT pgbus.send_batch('jobs', NULL)",
            "invalid argument: a payload is NULL (JSON null is 'null'::jsonb)",
        ),
        (
            "SELECT pgbus.send(NULL, '1')",
            "invalid argument: the queue name is NULL",
        ),
        (
            "SELECT pgbus.send('jobs', '1', delay => '-1 second')",
            "invalid argument: a delay must not be negative (got -00:00:01)",
        ),
        (
            "SELECT pgbus.send('jobs', '1', delay => '1 second', run_at => now())",
            "invalid argument: give a delay or a run_at time, not both",
        ),
        (
            "SELECT pgbus.send('jobs', '1', run_at => 'infinity')",
            "invalid argument: a scheduled time of infinity is refused",
        ),
        (
            "SELECT pgbus.send('jobs', '1', priority => 32768)",
            "invalid argument: a priority must be from -32768 to 32767 (got 32768)",
        ),
        (
            "SELECT pgbus.send('jobs', '1', headers => '[\"a\"]')",
            "invalid argument: headers must be a JSON object of string values, not a JSON array",
        ),
        (
            "SELECT pgbus.send('jobs', '1', headers => '{\"a\": \"b\", \"n\": 1}')",
            "invalid argument: header \"n\" must be a JSON string, not a JSON number",
        ),
        (
            "SELECT pgbus.send('jobs', '1', traceparent => '00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01')",
            "invalid argument: traceparent \"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01\" \
             is not a W3C trace context (00-<32 hex>-<16 hex>-<2 hex>, lowercase)",
        ),
        (
            "SELECT pgbus.send('jobs', '1', traceparent => '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7',
                               headers => '{}')",
            "invalid argument: traceparent \"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7\" \
             is not a W3C trace context (00-<32 hex>-<16 hex>-<2 hex>, lowercase)",
        ),
        (
            "SELECT pgbus.send('jobs', '1', headers => '{\"traceparent\": \"x\"}',
                               traceparent => '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01')",
            "invalid argument: the traceparent argument and the traceparent header differ",
        ),
    ];
    for (statement, message) in sql_only {
        assert_eq!(
            refusal(&client, statement, &[]).await,
            (INVALID.to_owned(), message.to_owned()),
            "{statement}"
        );
    }
    assert_eq!(
        stored_count(&client).await,
        0,
        "a refused send stores nothing"
    );

    // The bounds themselves are accepted: 100 years, the smallint range, NULL options.
    for statement in [
        "SELECT pgbus.send('jobs', '1', delay => interval '100 years')",
        "SELECT pgbus.send('jobs', '1', priority => -32768)",
        "SELECT pgbus.send('jobs', '1', priority => 32767)",
        "SELECT pgbus.send('jobs', 'null', delay => NULL, run_at => NULL, priority => NULL,
             group_key => NULL, unique_key => NULL, headers => NULL, traceparent => NULL,
             limit_key => NULL)",
        "SELECT pgbus.send('jobs', '1', run_at => '1970-01-01 00:00:00+00')",
    ] {
        client.query_one(statement, &[]).await.expect(statement);
    }
    assert_eq!(stored_count(&client).await, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_statement_wakes_workers_once_on_commit_when_a_job_is_ready() {
    let (backend, url) = fresh_backend(4).await;
    let q = create(&backend, "wake", QueueOptions::default()).await;
    let marker = create(&backend, "marker", QueueOptions::default()).await;
    let listener = PgListener::start(&url).unwrap();
    assert!(listener.wait_live(DEADLINE).await, "the listener is live");
    let mut client = sql(&url).await;

    // Heard: a batch of 100 (one notification), a fresh unique key.
    client
        .query(
            "SELECT pgbus.send_batch('wake', ARRAY(SELECT to_jsonb(n) FROM generate_series(1, 100) n))",
            &[],
        )
        .await
        .unwrap();
    client
        .query("SELECT pgbus.send('wake', '1', unique_key => 'k')", &[])
        .await
        .unwrap();
    // Not heard: the key's duplicate, a delayed job, a rolled back send.
    client
        .query("SELECT pgbus.send('wake', '2', unique_key => 'k')", &[])
        .await
        .unwrap();
    client
        .query("SELECT pgbus.send('wake', '3', delay => '1 hour')", &[])
        .await
        .unwrap();
    let tx = client.transaction().await.unwrap();
    tx.query("SELECT pgbus.send('wake', '4')", &[])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    // Notifications arrive in commit order: once the marker's (from the Rust send) is
    // heard, every earlier one has been.
    backend
        .send(&marker, NewMessage::json(&1).unwrap())
        .await
        .unwrap();
    eventually("the marker is heard", DEADLINE, || async {
        listener.notifications_heard_for(&marker) == 1
    })
    .await;
    assert_eq!(listener.notifications_heard_for(&q), 2);
    assert_eq!(stats_of(&backend, &q).await.depth(), 102);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_orders_trigger_example_enqueues_each_order_on_commit() {
    let (backend, url) = fresh_backend(4).await;
    let q = create(&backend, "orders", QueueOptions::default()).await;
    let mut client = sql(&url).await;
    let script = std::fs::read_to_string(examples().join("orders_trigger.sql")).unwrap();
    client.batch_execute(&script).await.unwrap();
    // Running it again changes nothing.
    client.batch_execute(&script).await.unwrap();

    // A rolled back order leaves no job.
    let tx = client.transaction().await.unwrap();
    tx.execute(
        "INSERT INTO orders (customer, total_cents) VALUES ('ghost', 1)",
        &[],
    )
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(stats_of(&backend, &q).await.depth(), 0);

    let tx = client.transaction().await.unwrap();
    tx.execute(
        "INSERT INTO orders (customer, total_cents)
         SELECT CASE WHEN n % 2 = 0 THEN 'ada' ELSE 'bob' END, n * 100
         FROM generate_series(1, 20) AS n",
        &[],
    )
    .await
    .unwrap();
    tx.execute(
        "INSERT INTO orders (customer, total_cents) VALUES ('cy', 4200)",
        &[],
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();

    let handled = drain::<Order>(&backend, &q, 21).await;
    let orders: Vec<(i64, String, i64)> = client
        .query(
            "SELECT id, customer, total_cents FROM orders ORDER BY id",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect();
    let mut got: Vec<(i64, String, i64)> = handled
        .iter()
        .map(|h| {
            let o = &h.payload;
            (o.order_id, o.customer.clone(), o.total_cents)
        })
        .collect();
    got.sort();
    assert_eq!(got, orders);
    for h in &handled {
        assert_eq!(
            h.group.as_deref(),
            Some(format!("customer:{}", h.payload.customer).as_str())
        );
        assert_eq!(
            h.headers.get("source").map(String::as_str),
            Some("orders_trigger")
        );
    }
    // A customer's orders ran one at a time, in order.
    for customer in ["ada", "bob"] {
        let ran: Vec<i64> = handled
            .iter()
            .filter(|h| h.payload.customer == customer)
            .map(|h| h.payload.order_id)
            .collect();
        assert_eq!(ran.len(), 10);
        assert!(ran.windows(2).all(|w| w[0] < w[1]), "{customer}: {ran:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_queue_takes_sql_sends_and_hands_them_out_when_resumed() {
    let (backend, url) = fresh_backend(4).await;
    let q = create(&backend, "paused", QueueOptions::default()).await;
    backend.set_paused(&q, true).await.unwrap();
    let client = sql(&url).await;
    let id: i64 = client
        .query_one("SELECT pgbus.send('paused', '{\"n\": 1}')", &[])
        .await
        .unwrap()
        .get(0);
    let lease = Duration::from_secs(60);
    assert!(backend.claim(&q, 10, lease).await.unwrap().is_empty());
    let stats = stats_of(&backend, &q).await;
    assert!(stats.paused && stats.ready == 1, "{stats:?}");
    backend.set_paused(&q, false).await.unwrap();
    let claimed = backend.claim(&q, 10, lease).await.unwrap();
    assert_eq!(claimed.iter().map(|m| m.id.0).collect::<Vec<_>>(), vec![id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_given_migrate_grant_may_send_and_others_may_not() {
    let (backend, url) = fresh_backend(4).await;
    create(&backend, "jobs", QueueOptions::default()).await;
    let client = sql(&url).await;
    // Roles belong to the cluster, which other test processes (and earlier runs, on a
    // server given by PGBUS_TEST_DATABASE_URL) may share: the names are unique.
    let unique = format!(
        "{}_{}",
        std::process::id(),
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_micros()
    );
    let granted = format!("pgbus_sql_granted_{unique}");
    let other = format!("pgbus_sql_other_{unique}");
    for role in [&granted, &other] {
        client
            .batch_execute(&format!("CREATE ROLE {role} NOLOGIN NOSUPERUSER"))
            .await
            .unwrap();
    }
    backend.migrate_and_grant(&[&granted]).await.unwrap();

    client
        .batch_execute(&format!("SET ROLE {granted}"))
        .await
        .unwrap();
    let superuser: bool = client
        .query_one(
            "SELECT rolsuper FROM pg_roles WHERE rolname = current_user",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(!superuser);
    for statement in [
        "SELECT pgbus.send('jobs', '1')",
        "SELECT pgbus.send('jobs', '2', unique_key => 'k', priority => 1, group_key => 'g')",
        "SELECT pgbus.send('jobs', '3', unique_key => 'k')",
        "SELECT pgbus.send_batch('jobs', ARRAY['4', '5']::jsonb[], limit_key => 'l')",
    ] {
        client.query(statement, &[]).await.expect(statement);
    }
    assert_eq!(stats_of(&backend, &queue("jobs")).await.depth(), 4);

    client
        .batch_execute(&format!("RESET ROLE; SET ROLE {other}"))
        .await
        .unwrap();
    let (code, message) = refusal(&client, "SELECT pgbus.send('jobs', '1')", &[]).await;
    assert_eq!(code, "42501", "{message}");
    client.batch_execute("RESET ROLE").await.unwrap();
}

/// Fails the test, saying what to install, when `program args` does not run.
fn require(program: &str, args: &[&str], install: &str) {
    let ran = Command::new(program).args(args).output();
    match ran {
        Ok(out) if out.status.success() => {}
        Ok(out) => panic!(
            "`{program} {}` failed ({}): {install}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(err) => panic!("cannot run {program} ({err}): {install}"),
    }
}

/// How an example producer is run for a queue and a job count: the connection (with its
/// password) goes in the environment, never in the arguments.
type Runner = fn(url: &str, queue: &str, count: &str) -> Command;

fn python(url: &str, queue: &str, count: &str) -> Command {
    let mut command = Command::new("python3");
    command
        .arg(examples().join("enqueue.py"))
        .args([queue, count])
        .env("DATABASE_URL", url);
    command
}

fn node(url: &str, queue: &str, count: &str) -> Command {
    let mut command = Command::new("node");
    command
        .arg(examples().join("enqueue.mjs"))
        .args([queue, count])
        .env("DATABASE_URL", url);
    command
}

/// psql takes the connection from libpq's variables.
fn psql(url: &str, queue: &str, count: &str) -> Command {
    let config: tokio_postgres::Config = url.parse().expect("a test database URL");
    let mut command = Command::new(psql_binary());
    command
        .args(["-X", "-At", "-v"])
        .arg(format!("queue={queue}"))
        .arg("-v")
        .arg(format!("count={count}"))
        .arg("-f")
        .arg(examples().join("enqueue.sql"));
    if let Some(host) = config.get_hosts().first() {
        match host {
            tokio_postgres::config::Host::Tcp(name) => command.env("PGHOST", name),
            tokio_postgres::config::Host::Unix(dir) => command.env("PGHOST", dir),
        };
    }
    if let Some(port) = config.get_ports().first() {
        command.env("PGPORT", port.to_string());
    }
    if let Some(user) = config.get_user() {
        command.env("PGUSER", user);
    }
    if let Some(db) = config.get_dbname() {
        command.env("PGDATABASE", db);
    }
    if let Some(password) = config.get_password() {
        command.env("PGPASSWORD", String::from_utf8_lossy(password).into_owned());
    }
    command
}

/// The `psql` of the PostgreSQL the tests run (`PGBUS_PG_BIN`, `PATH`, then
/// `/usr/lib/postgresql/*/bin`, newest first).
fn psql_binary() -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PGBUS_PG_BIN")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    if let Some(path) = std::env::var_os("PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    let mut installed: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| entries.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    installed.sort();
    dirs.extend(installed.into_iter().rev());
    dirs.into_iter()
        .map(|dir| dir.join("psql"))
        .find(|psql| psql.is_file())
        .unwrap_or_else(|| {
            panic!(
                "this test runs examples/producers/enqueue.sql with psql: install the PostgreSQL \
                 client (Debian: apt-get install postgresql-client) or set PGBUS_PG_BIN"
            )
        })
}

/// Runs an example producer; returns its exit success, standard output and standard error.
async fn run_example(run: Runner, url: &str, queue: &str, count: &str) -> (bool, String, String) {
    let mut command = run(url, queue, count);
    command.current_dir(examples());
    // The program only: the environment holds the password.
    let program = command.get_program().to_string_lossy().into_owned();
    let out = tokio::task::spawn_blocking(move || command.output())
        .await
        .unwrap()
        .unwrap_or_else(|err| panic!("running {program}: {err}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Sends 25 jobs with an example producer; a Rust worker decodes each one.
async fn example_producer(script: &str, run: Runner, producer: &str) {
    let (backend, url) = fresh_backend(4).await;
    let q = create(&backend, "from_example", QueueOptions::default()).await;
    let (ok, stdout, stderr) = run_example(run, &url, "from_example", "25").await;
    assert!(ok, "{script} failed: {stderr}");
    let ids: Vec<i64> = stdout
        .lines()
        .map(|l| {
            l.parse()
                .unwrap_or_else(|_| panic!("{script} printed {l:?}"))
        })
        .collect();
    assert_eq!(ids.len(), 25, "{stdout}");
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "ids in send order: {ids:?}"
    );

    let handled = drain::<Job>(&backend, &q, 25).await;
    let mut got: Vec<(i64, u32)> = handled
        .iter()
        .map(|h| {
            assert_eq!(h.payload.producer, producer);
            assert_eq!(
                h.headers.get("producer").map(String::as_str),
                Some(producer)
            );
            (h.id.0, h.payload.n)
        })
        .collect();
    got.sort();
    let expected: Vec<(i64, u32)> = ids.iter().copied().zip(1..).collect();
    assert_eq!(got, expected);

    // A refusal fails the run with pgbus's message (psql adds its own prefix and context;
    // the Python and Node examples print that one line alone).
    let (ok, stdout, stderr) = run_example(run, &url, "nope", "1").await;
    assert!(!ok && stdout.is_empty(), "{stdout}");
    if script.ends_with(".sql") {
        assert!(
            stderr
                .lines()
                .any(|l| l.ends_with("ERROR:  queue nope does not exist")),
            "{stderr}"
        );
    } else {
        assert_eq!(
            stderr.trim(),
            format!("{script}: queue nope does not exist")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_psql_example_enqueues_jobs_a_rust_worker_decodes() {
    example_producer("enqueue.sql", psql, "psql").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_python_example_enqueues_jobs_a_rust_worker_decodes() {
    require(
        "python3",
        &["-c", "import psycopg"],
        "this test runs examples/producers/enqueue.py: install python3 and psycopg 3 \
         (pip install 'psycopg[binary]')",
    );
    example_producer("enqueue.py", python, "python").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_node_example_enqueues_jobs_a_rust_worker_decodes() {
    require(
        "node",
        &["--version"],
        "this test runs examples/producers/enqueue.mjs: install Node.js (apt-get install nodejs npm)",
    );
    let pg = examples().join("node_modules/pg/package.json");
    assert!(
        pg.exists(),
        "this test runs examples/producers/enqueue.mjs, which needs its packages: \
         npm ci --prefix examples/producers ({} is missing)",
        pg.display()
    );
    example_producer("enqueue.mjs", node, "node").await;
}
