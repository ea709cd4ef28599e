//! The operator's console on PostgreSQL: listings per state and order with every filter,
//! keyset pages that cover a queue exactly once, rare filters that reach their rows through
//! cursors beyond the scan window, capped counts, a job's whole story, actions on ids and
//! on a bounded filter (which never touch what arrived after the list was drawn), the audit
//! log, and `EXPLAIN` of every console statement on 2,000,000 messages and 100,000 dead
//! letters: no sequential scan of either table.
//!
//! States the tests need are written with SQL (a lease, a dead letter, an archived job, an
//! error history), as the runtime would leave them.

use std::collections::BTreeSet;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pgbus_core::{
    Consumer, ContentType, Error, Lease, MessageId, NewMessage, Producer, QueueName, QueueOptions,
};
use pgbus_pg::console::{
    Action, Bound, Console, Cursor, JobFilter, JobState, Order, Page, PayloadMatch, Sample, Target,
    COUNT_CAP, ERRORS_KEPT, MAX_IDS, PAYLOAD_SHOWN_MAX, SCAN_WINDOW,
};
use pgbus_pg::{connect, PgBackend, PgListener};
use pgbus_tests::{create, eventually, fresh_backend};
use serde_json::json;
use tokio_postgres::Client;

struct Fixture {
    backend: PgBackend,
    console: Console,
    sql: Client,
    url: String,
}

async fn fixture() -> Fixture {
    let (backend, url) = fresh_backend(4).await;
    let sql = connect(&url, "test").await.expect("sql connection");
    Fixture {
        console: Console::new(backend.clone()),
        backend,
        sql,
        url,
    }
}

impl Fixture {
    async fn queue(&self, name: &str) -> QueueName {
        create(
            &self.backend,
            name,
            QueueOptions::default().keep_history(true),
        )
        .await
    }

    async fn send(&self, q: &QueueName, message: NewMessage) -> i64 {
        self.backend.send(q, message).await.expect("send").0
    }

    /// Leases the jobs for an hour, as a claim does.
    async fn lease(&self, ids: &[i64]) {
        self.exec(
            "UPDATE pgbus.messages SET lease_until = now() + interval '1 hour',
                    attempts = attempts + 1
             WHERE id = ANY ($1)",
            ids,
        )
        .await;
    }

    /// Moves the jobs to the dead letters with `error`, as the worker's dead-letter does.
    async fn dead_letter(&self, ids: &[i64], error: &str) {
        self.sql
            .execute(
                "WITH d AS (DELETE FROM pgbus.messages WHERE id = ANY ($1) RETURNING *)
                 INSERT INTO pgbus.dead_letters (id, queue, priority, enqueued_at, attempts,
                     content_type, headers, group_key, payload, error, limit_key, errors)
                 SELECT id, queue, priority, enqueued_at, attempts, content_type, headers,
                        group_key, payload, $2, limit_key, errors
                 FROM d",
                &[&ids, &error],
            )
            .await
            .expect("dead-letter by SQL");
    }

    /// Moves the jobs to the archive, as an ack of a history-keeping queue does.
    async fn archive(&self, ids: &[i64]) {
        self.exec(
            "WITH d AS (DELETE FROM pgbus.messages WHERE id = ANY ($1) RETURNING *)
             INSERT INTO pgbus.archive (id, queue, priority, enqueued_at, attempts,
                 content_type, headers, group_key, payload, errors)
             SELECT id, queue, priority, enqueued_at, attempts, content_type, headers,
                    group_key, payload, errors
             FROM d",
            ids,
        )
        .await;
    }

    async fn exec(&self, sql: &str, ids: &[i64]) {
        self.sql.execute(sql, &[&ids]).await.expect(sql);
    }

    async fn page(&self, filter: &JobFilter, order: Order) -> Page {
        self.console
            .list(filter, order, None, 100)
            .await
            .expect("list")
    }

    async fn ids(&self, filter: &JobFilter, order: Order) -> Vec<i64> {
        ids(&self.page(filter, order).await)
    }

    /// Every page of a listing, following cursors; the ids and how many pages.
    async fn all_pages(
        &self,
        filter: &JobFilter,
        order: Order,
        limit: usize,
    ) -> (Vec<i64>, Vec<Page>) {
        let mut pages = Vec::new();
        let mut cursor: Option<Cursor> = None;
        loop {
            let page = self
                .console
                .list(filter, order, cursor.as_ref(), limit)
                .await
                .expect("list a page");
            cursor = page.next.clone();
            pages.push(page);
            if cursor.is_none() {
                break;
            }
            assert!(pages.len() < 1000, "the listing never ends");
        }
        (pages.iter().flat_map(ids).collect(), pages)
    }

    async fn count(&self, sql: &str) -> i64 {
        self.sql.query_one(sql, &[]).await.expect(sql).get(0)
    }
}

fn ids(page: &Page) -> Vec<i64> {
    page.jobs.iter().map(|j| j.id.0).collect()
}

fn filter(q: &QueueName, state: JobState) -> JobFilter {
    JobFilter::new(q.clone(), state)
}

fn with(mut f: JobFilter, change: impl FnOnce(&mut JobFilter)) -> JobFilter {
    change(&mut f);
    f
}

fn json_message(value: serde_json::Value) -> NewMessage {
    NewMessage::json(&value).expect("json")
}

fn msgpack_message(value: serde_json::Value) -> NewMessage {
    NewMessage::encode(&value).expect("msgpack")
}

fn invalid(err: Error, needle: &str) {
    match err {
        Error::InvalidArgument(message) => {
            assert!(message.contains(needle), "{message:?} lacks {needle:?}")
        }
        other => panic!("expected an invalid argument ({needle}), got {other}"),
    }
}

#[tokio::test]
async fn listings_per_state_order_and_filter() {
    let f = fixture().await;
    let q = f.queue("jobs").await;
    let r1 = f
        .send(
            &q,
            json_message(json!({"n": 1, "customer": {"id": 7}})).group("a"),
        )
        .await;
    let r2 = f
        .send(
            &q,
            msgpack_message(json!({"n": 2, "customer": {"id": 8}})).priority(5),
        )
        .await;
    let r3 = f
        .send(&q, json_message(json!({"n": 3, "customer": {"id": 7}})))
        .await;
    let hour = Duration::from_secs(3600);
    let s1 = f.send(&q, json_message(json!({"n": 4})).delay(hour)).await;
    let s2 = f
        .send(
            &q,
            msgpack_message(json!({"n": 5, "customer": {"id": 7}}))
                .delay(hour)
                .group("a"),
        )
        .await;
    let f1 = f.send(&q, json_message(json!({"n": 6}))).await;
    let f2 = f.send(&q, json_message(json!({"n": 7})).group("a")).await;
    let d1 = f.send(&q, json_message(json!({"n": 8})).group("a")).await;
    let d2 = f
        .send(&q, msgpack_message(json!({"n": 9, "customer": {"id": 7}})))
        .await;
    let a1 = f.send(&q, json_message(json!({"n": 10})).group("a")).await;
    let a2 = f.send(&q, json_message(json!({"n": 11}))).await;
    f.exec(
        "UPDATE pgbus.messages SET attempts = 2, last_error = 'Boom: 50% off' WHERE id = ANY ($1)",
        &[r3],
    )
    .await;
    f.lease(&[f1, f2]).await;
    f.dead_letter(&[d1], "timeout talking to SMTP").await;
    f.dead_letter(&[d2], "bad address").await;
    f.exec(
        r#"UPDATE pgbus.messages
           SET errors = '[{"attempt": 1, "error": "flaky disk", "at": "2026-12-06T22:00:00Z"}]'
           WHERE id = ANY ($1)"#,
        &[a1],
    )
    .await;
    f.archive(&[a1, a2]).await;

    use JobState::*;
    use Order::*;
    let expected = [
        (Ready, vec![r3, r2, r1]),
        (Scheduled, vec![s2, s1]),
        (InFlight, vec![f2, f1]),
        (Dead, vec![d2, d1]),
        (Archived, vec![a2, a1]),
    ];
    for (state, newest) in &expected {
        let all = filter(&q, *state);
        assert_eq!(&f.ids(&all, NewestFirst).await, newest, "{state:?}");
        let oldest: Vec<i64> = newest.iter().rev().copied().collect();
        assert_eq!(f.ids(&all, OldestFirst).await, oldest, "{state:?}");
        let page = f.page(&all, NewestFirst).await;
        assert!(page.next.is_none(), "{state:?}: one page holds all");
        assert!(page.jobs.iter().all(|j| j.state == *state && j.queue == q));
    }

    // What a summary shows.
    let ready = f.page(&filter(&q, Ready), NewestFirst).await;
    let third = &ready.jobs[0];
    assert_eq!(
        (third.attempts, third.last_error.as_deref()),
        (2, Some("Boom: 50% off"))
    );
    assert_eq!(third.payload_preview, r#"{"customer":{"id":7},"n":3}"#);
    assert!(
        ready.jobs[1]
            .payload_preview
            .contains(r#""customer":{"id":8}"#),
        "MessagePack decoded"
    );
    assert_eq!(ready.jobs[1].priority, 5);
    assert_eq!(ready.jobs[2].group_key.as_deref(), Some("a"));
    let in_flight = f.page(&filter(&q, InFlight), NewestFirst).await;
    assert!(in_flight
        .jobs
        .iter()
        .all(|j| j.lease_until.is_some_and(|t| t > SystemTime::now())));
    let dead = f.page(&filter(&q, Dead), NewestFirst).await;
    assert_eq!(
        dead.jobs[1].last_error.as_deref(),
        Some("timeout talking to SMTP")
    );
    let archived = f.page(&filter(&q, Archived), NewestFirst).await;
    assert_eq!(archived.jobs[1].last_error.as_deref(), Some("flaky disk"));

    // Each filter, on each state it can tell apart.
    let by_id = |state, id: i64| with(filter(&q, state), |f| f.id = Some(MessageId(id)));
    assert_eq!(f.ids(&by_id(Ready, r2), NewestFirst).await, vec![r2]);
    assert_eq!(
        f.ids(&by_id(Scheduled, r2), NewestFirst).await,
        Vec::<i64>::new()
    );
    assert_eq!(f.ids(&by_id(Dead, d1), OldestFirst).await, vec![d1]);
    assert_eq!(f.ids(&by_id(Archived, a2), OldestFirst).await, vec![a2]);
    let group = |state| with(filter(&q, state), |f| f.group_key = Some("a".into()));
    for (state, ids) in [
        (Ready, vec![r1]),
        (Scheduled, vec![s2]),
        (InFlight, vec![f2]),
        (Dead, vec![d1]),
        (Archived, vec![a1]),
    ] {
        assert_eq!(
            f.ids(&group(state), NewestFirst).await,
            ids,
            "group a, {state:?}"
        );
    }
    let priority = with(filter(&q, Ready), |f| f.priority = Some(5));
    assert_eq!(f.ids(&priority, NewestFirst).await, vec![r2]);
    let attempts = with(filter(&q, Ready), |f| f.min_attempts = Some(2));
    assert_eq!(f.ids(&attempts, NewestFirst).await, vec![r3]);
    let attempts = with(filter(&q, InFlight), |f| f.min_attempts = Some(1));
    assert_eq!(f.ids(&attempts, NewestFirst).await, vec![f2, f1]);
    let error =
        |state, text: &str| with(filter(&q, state), |f| f.error_contains = Some(text.into()));
    assert_eq!(
        f.ids(&error(Ready, "boom"), NewestFirst).await,
        vec![r3],
        "case-insensitive"
    );
    assert_eq!(f.ids(&error(Ready, "50%"), NewestFirst).await, vec![r3]);
    assert!(
        f.ids(&error(Ready, "5_%"), NewestFirst).await.is_empty(),
        "_ is literal"
    );
    assert_eq!(f.ids(&error(Dead, "smtp"), NewestFirst).await, vec![d1]);
    assert_eq!(f.ids(&error(Archived, "DISK"), NewestFirst).await, vec![a1]);
    let payload = |state, text: &str| {
        with(filter(&q, state), |f| {
            f.payload = Some(PayloadMatch::parse(text).unwrap())
        })
    };
    assert_eq!(
        f.ids(&payload(Ready, "customer.id=7"), NewestFirst).await,
        vec![r3, r1],
        "JSON"
    );
    assert_eq!(
        f.ids(&payload(Ready, "customer.id=8"), NewestFirst).await,
        vec![r2],
        "MessagePack"
    );
    assert_eq!(
        f.ids(&payload(Scheduled, "customer.id=7"), NewestFirst)
            .await,
        vec![s2]
    );
    assert_eq!(
        f.ids(&payload(Dead, "customer.id=7"), OldestFirst).await,
        vec![d2]
    );
    let combined = with(payload(Ready, "customer.id=7"), |f| {
        f.group_key = Some("a".into())
    });
    assert_eq!(f.ids(&combined, NewestFirst).await, vec![r1]);

    // Refusals.
    let missing = filter(&QueueName::new("nope").unwrap(), Ready);
    let err = f
        .console
        .list(&missing, NewestFirst, None, 10)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::QueueNotFound(_)), "{err}");
    for limit in [0, 501] {
        let err = f
            .console
            .list(&filter(&q, Ready), NewestFirst, None, limit)
            .await
            .unwrap_err();
        invalid(err, "a page holds 1 to 500 jobs");
    }
    let nul = with(filter(&q, Ready), |f| f.group_key = Some("a\0".into()));
    invalid(
        f.console
            .list(&nul, NewestFirst, None, 10)
            .await
            .unwrap_err(),
        "NUL",
    );
}

#[tokio::test]
async fn keyset_pages_cover_a_queue_exactly_once() {
    let f = fixture().await;
    let q = f.queue("pages").await;
    let mut sent = Vec::new();
    for n in 0..23 {
        sent.push(
            f.send(&q, json_message(json!({"n": n})).priority(n % 2))
                .await,
        );
    }
    let ready = filter(&q, JobState::Ready);
    let (newest, pages) = f.all_pages(&ready, Order::NewestFirst, 5).await;
    let mut expected: Vec<i64> = sent.iter().rev().copied().collect();
    assert_eq!(newest, expected);
    assert_eq!(
        pages.iter().map(|p| p.jobs.len()).collect::<Vec<_>>(),
        [5, 5, 5, 5, 3]
    );
    expected.reverse();
    let (oldest, _) = f.all_pages(&ready, Order::OldestFirst, 5).await;
    assert_eq!(oldest, expected);
    // A page that ends exactly at the last job has no next page.
    let (_, pages) = f.all_pages(&ready, Order::OldestFirst, 23).await;
    assert_eq!(pages.len(), 1);
    let odd = with(ready.clone(), |f| f.priority = Some(1));
    let (odd_ids, _) = f.all_pages(&odd, Order::OldestFirst, 4).await;
    let expected_odd: Vec<i64> = sent.iter().skip(1).step_by(2).copied().collect();
    assert_eq!(odd_ids, expected_odd);

    // Cursors belong to their listing.
    let first = f
        .console
        .list(&ready, Order::NewestFirst, None, 5)
        .await
        .unwrap();
    let cursor = first.next.expect("a second page");
    let other_order = f
        .console
        .list(&ready, Order::OldestFirst, Some(&cursor), 5)
        .await;
    invalid(other_order.unwrap_err(), "bad cursor");
    let other_filter = f
        .console
        .list(&odd, Order::NewestFirst, Some(&cursor), 5)
        .await;
    invalid(other_filter.unwrap_err(), "bad cursor");
    let scheduled = filter(&q, JobState::Scheduled);
    let other_state = f
        .console
        .list(&scheduled, Order::NewestFirst, Some(&cursor), 5)
        .await;
    invalid(other_state.unwrap_err(), "bad cursor");
    for garbage in [
        "",
        "hello",
        "c1.ready.n.zzzz.5",
        "c1.ready.n.0000000000000000.5.6",
    ] {
        let err = f
            .console
            .list(&ready, Order::NewestFirst, Some(&Cursor(garbage.into())), 5)
            .await
            .unwrap_err();
        invalid(err, "bad cursor");
    }
}

#[tokio::test]
async fn rare_filters_reach_their_rows_beyond_the_scan_window() {
    let f = fixture().await;
    let q = f.queue("big").await;
    let total = 2 * SCAN_WINDOW as i64 + 100;
    let rare = [3, SCAN_WINDOW as i64 + 50];
    f.sql
        .execute(
            "INSERT INTO pgbus.messages (queue, priority, visible_at, content_type, payload)
             SELECT 'big', CASE WHEN i = ANY ($2) THEN 9 ELSE 0 END, now(), 'application/json',
                    convert_to(CASE WHEN i = ANY ($2) THEN '{\"rare\": true}'
                                    ELSE '{\"rare\": false}' END, 'UTF8')
             FROM generate_series(1, $1::bigint) i",
            &[&total, &rare.to_vec()],
        )
        .await
        .expect("seed");
    let rare_ids: Vec<i64> = f
        .sql
        .query(
            "SELECT id FROM pgbus.messages WHERE priority = 9 ORDER BY id DESC",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(rare_ids.len(), 2);
    let by_priority = with(filter(&q, JobState::Ready), |f| f.priority = Some(9));
    let by_payload = with(filter(&q, JobState::Ready), |f| {
        f.payload = Some(PayloadMatch::parse("rare=true").unwrap())
    });
    for rare_filter in [by_priority, by_payload] {
        let (found, pages) = f.all_pages(&rare_filter, Order::NewestFirst, 10).await;
        assert_eq!(found, rare_ids, "{rare_filter:?}");
        // Three windows of at most SCAN_WINDOW rows; the newest holds no rare row, so the
        // first page is empty and still goes on.
        assert_eq!(pages.len(), 3, "{rare_filter:?}");
        assert!(pages[0].jobs.is_empty() && pages[0].next.is_some());
        let (found, _) = f.all_pages(&rare_filter, Order::OldestFirst, 1).await;
        let mut oldest_first = rare_ids.clone();
        oldest_first.reverse();
        assert_eq!(found, oldest_first);
    }
}

#[tokio::test]
async fn counts_stop_at_the_cap() {
    let f = fixture().await;
    let states = |counts: Vec<(JobState, pgbus_pg::console::Count)>| -> Vec<(JobState, u64, bool)> {
        counts.iter().map(|(s, c)| (*s, c.n, c.exact)).collect()
    };
    // A small queue: every state exact.
    let few = f.queue("few").await;
    let hour = Duration::from_secs(3600);
    for _ in 0..2 {
        f.send(&few, json_message(json!({}))).await;
    }
    for _ in 0..3 {
        f.send(&few, json_message(json!({})).delay(hour)).await;
    }
    let running = f.send(&few, json_message(json!({}))).await;
    f.lease(&[running]).await;
    let dead = f.send(&few, json_message(json!({}))).await;
    f.dead_letter(&[dead], "gone").await;
    let done = f.send(&few, json_message(json!({}))).await;
    f.archive(&[done]).await;
    use JobState::*;
    assert_eq!(
        states(f.console.counts(&few).await.unwrap()),
        [
            (Ready, 2, true),
            (Scheduled, 3, true),
            (InFlight, 1, true),
            (Dead, 1, true),
            (Archived, 1, true)
        ]
    );

    // A large one: two running jobs (the oldest), then more ready jobs than the cap, and
    // more dead letters than the cap. Hot-table counts are what its oldest rows hold.
    let many = f.queue("many").await;
    let leased = [
        f.send(&many, json_message(json!({}))).await,
        f.send(&many, json_message(json!({}))).await,
    ];
    f.lease(&leased).await;
    f.sql
        .execute(
            "INSERT INTO pgbus.messages (queue, visible_at, content_type, payload)
             SELECT 'many', now(), 'application/json', '\\x7b7d'
             FROM generate_series(1, $1::bigint) i",
            &[&(COUNT_CAP as i64 + 5)],
        )
        .await
        .expect("seed ready jobs");
    f.sql
        .execute(
            "INSERT INTO pgbus.dead_letters (id, queue, priority, enqueued_at, attempts,
                 content_type, headers, payload, error)
             SELECT 1000000 + i, 'many', 0, now(), 1, 'application/json', '{}', '\\x7b7d', 'x'
             FROM generate_series(1, $1::bigint) i",
            &[&(COUNT_CAP as i64 + 5)],
        )
        .await
        .expect("seed dead letters");
    assert_eq!(
        states(f.console.counts(&many).await.unwrap()),
        [
            (Ready, COUNT_CAP - 1, false),
            (Scheduled, 0, false),
            (InFlight, 2, false),
            (Dead, COUNT_CAP, false),
            (Archived, 0, true),
        ]
    );
    let err = f
        .console
        .counts(&QueueName::new("nope").unwrap())
        .await
        .unwrap_err();
    assert!(matches!(err, Error::QueueNotFound(_)), "{err}");
}

#[tokio::test]
async fn a_jobs_detail_tells_its_whole_story() {
    let f = fixture().await;
    let q = f.queue("story").await;
    let message = msgpack_message(json!({"order": 42, "lines": ["a", "b"]}))
        .priority(3)
        .group("customer-7")
        .header("pgbus-event-id", "0190f0c4-0000-7000-8000-000000000001")
        .header("pgbus-routing-key", "orders.created")
        .header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        );
    let id = f.send(&q, message).await;
    let history: Vec<serde_json::Value> = (1..=12)
        .map(|n| {
            let at = format!("2026-12-06T22:00:{n:02}Z");
            json!({"attempt": n, "error": format!("error {n}"), "at": at})
        })
        .collect();
    let process: i64 = f
        .sql
        .query_one(
            "INSERT INTO pgbus.processes (hostname, pid, queues, mode, capacity)
             VALUES ('worker-host', 4242, '{story}', 'threads', 4) RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    f.sql
        .execute(
            "UPDATE pgbus.messages
             SET errors = $2, last_error = 'error 12', attempts = 12, leased_by = $3,
                 lease_until = now() + interval '1 hour', batch_id = 77,
                 unique_key = 'order-42', limit_key = 'smtp'
             WHERE id = $1",
            &[&id, &serde_json::Value::Array(history), &process],
        )
        .await
        .unwrap();

    let detail = f
        .console
        .job(MessageId(id))
        .await
        .unwrap()
        .expect("the job");
    assert_eq!(detail.summary.state, JobState::InFlight);
    assert_eq!(detail.summary.queue, q);
    assert_eq!((detail.summary.priority, detail.summary.attempts), (3, 12));
    assert_eq!(detail.summary.group_key.as_deref(), Some("customer-7"));
    assert_eq!(detail.summary.last_error.as_deref(), Some("error 12"));
    assert_eq!(
        detail.max_attempts,
        QueueOptions::default().retry.max_attempts()
    );
    assert_eq!(detail.content_type, ContentType::MessagePack);
    let shown: serde_json::Value = serde_json::from_str(&detail.payload).expect("pretty JSON");
    assert_eq!(shown, json!({"order": 42, "lines": ["a", "b"]}));
    assert!(detail.payload.contains('\n'), "pretty-printed");
    assert!(!detail.payload_truncated);
    let attempts: Vec<u32> = detail.errors.iter().map(|e| e.attempt).collect();
    assert_eq!(
        attempts,
        (3..=12).collect::<Vec<_>>(),
        "the last 10, oldest first"
    );
    assert_eq!(detail.errors[0].error, "error 3");
    assert_eq!(
        detail.errors[0].at,
        UNIX_EPOCH + Duration::from_secs(1_796_594_403)
    );
    let holder = detail.held_by.expect("the holder");
    assert_eq!(
        (holder.id.0, holder.hostname.as_str(), holder.pid),
        (process, "worker-host", 4242)
    );
    assert_eq!(detail.batch_id, Some(77));
    assert_eq!(detail.unique_key.as_deref(), Some("order-42"));
    assert_eq!(detail.limit_key.as_deref(), Some("smtp"));
    let event = detail.event.expect("an event copy");
    assert_eq!(event.routing_key, "orders.created");
    assert_eq!(event.event_id, "0190f0c4-0000-7000-8000-000000000001");
    assert!(detail.headers.contains_key("traceparent"));

    // An expired lease has no holder.
    f.exec(
        "UPDATE pgbus.messages SET lease_until = now() - interval '1 second' WHERE id = ANY ($1)",
        &[id],
    )
    .await;
    let detail = f.console.job(MessageId(id)).await.unwrap().unwrap();
    assert_eq!(detail.summary.state, JobState::Ready);
    assert!(detail.held_by.is_none());

    // Dead letters and the archive.
    f.dead_letter(&[id], "gave up").await;
    let dead = f.console.job(MessageId(id)).await.unwrap().unwrap();
    assert_eq!(dead.summary.state, JobState::Dead);
    assert_eq!(dead.summary.last_error.as_deref(), Some("gave up"));
    assert_eq!(dead.errors.len(), 10, "the history went with it");
    let done = f.send(&q, json_message(json!({"done": true}))).await;
    f.archive(&[done]).await;
    let archived = f.console.job(MessageId(done)).await.unwrap().unwrap();
    assert_eq!(archived.summary.state, JobState::Archived);
    assert_eq!(archived.payload, "{\n  \"done\": true\n}");
    assert!(f.console.job(MessageId(999_999)).await.unwrap().is_none());

    // A large payload is cut for the page; the whole one is there to download.
    let big: Vec<String> = (0..20_000).map(|n| format!("line {n}")).collect();
    let big_message = NewMessage::json(&big).unwrap();
    let bytes = big_message.payload.clone();
    let big_id = f.send(&q, big_message).await;
    let detail = f.console.job(MessageId(big_id)).await.unwrap().unwrap();
    assert!(detail.payload_truncated);
    assert!(
        detail.payload.len() <= PAYLOAD_SHOWN_MAX && detail.payload.len() > PAYLOAD_SHOWN_MAX - 8
    );
    assert_eq!(detail.payload_bytes, bytes.len());
    let (content_type, whole) = f.console.payload(MessageId(big_id)).await.unwrap().unwrap();
    assert_eq!((content_type, whole), (ContentType::Json, bytes));
    assert!(f
        .console
        .payload(MessageId(999_999))
        .await
        .unwrap()
        .is_none());

    // A payload that does not decode is described, not failed on.
    let broken = f
        .send(
            &q,
            NewMessage::raw(b"\xc1\xc1".to_vec(), ContentType::MessagePack),
        )
        .await;
    let detail = f.console.job(MessageId(broken)).await.unwrap().unwrap();
    assert_eq!(detail.payload, "(2 bytes of undecodable MessagePack)");
    assert_eq!(detail.summary.payload_preview, detail.payload);
}

#[tokio::test]
async fn actions_on_ids_apply_where_the_state_allows() {
    let f = fixture().await;
    let q = f.queue("acts").await;
    let mut sent = Vec::new();
    for n in 0..8 {
        sent.push(f.send(&q, json_message(json!({"n": n}))).await);
    }
    let [ready, scheduled, running, dead, archived, ready2, running2, dead2] = sent[..] else {
        unreachable!()
    };
    f.exec(
        "UPDATE pgbus.messages SET visible_at = now() + interval '1 hour' WHERE id = ANY ($1)",
        &[scheduled],
    )
    .await;
    f.lease(&[running, running2]).await;
    f.exec(
        r#"UPDATE pgbus.messages SET attempts = 5,
               errors = '[{"attempt": 5, "error": "boom", "at": "2026-12-06T22:00:00Z"}]'
           WHERE id = ANY ($1)"#,
        &[dead],
    )
    .await;
    f.dead_letter(&[dead, dead2], "gave up").await;
    f.archive(&[archived]).await;
    let state = |id: i64| {
        let console = f.console.clone();
        async move {
            console
                .job(MessageId(id))
                .await
                .unwrap()
                .map(|d| d.summary.state)
        }
    };
    let act = |action: Action, ids: &[i64]| {
        let console = f.console.clone();
        let target = Target::Ids(ids.iter().map(|&id| MessageId(id)).collect());
        async move { console.act("tester", &action, &target).await }
    };

    // Retry: the scheduled job and the dead letter; the running job is left alone.
    let n = act(Action::RetryNow, &[scheduled, running, dead, 999_999])
        .await
        .unwrap();
    assert_eq!(n, 2);
    assert_eq!(state(scheduled).await, Some(JobState::Ready));
    assert_eq!(state(running).await, Some(JobState::InFlight));
    let back = f.console.job(MessageId(dead)).await.unwrap().unwrap();
    assert_eq!(back.summary.state, JobState::Ready);
    assert_eq!(back.summary.attempts, 0, "attempts reset");
    assert_eq!(back.summary.last_error.as_deref(), Some("gave up"));
    assert_eq!(back.errors.len(), 1, "history kept");

    // Reschedule to an exact time.
    let later = UNIX_EPOCH + Duration::from_micros(4_000_000_000_123_456);
    assert_eq!(
        act(Action::Reschedule(later), &[ready, running])
            .await
            .unwrap(),
        1
    );
    let moved = f.console.job(MessageId(ready)).await.unwrap().unwrap();
    assert_eq!(
        (moved.summary.state, moved.summary.at),
        (JobState::Scheduled, later)
    );
    let too_late = SystemTime::now() + Duration::from_secs(200 * 365 * 86_400);
    invalid(
        act(Action::Reschedule(too_late), &[ready])
            .await
            .unwrap_err(),
        "100 years",
    );

    // Priority: waiting jobs and dead letters.
    assert_eq!(
        act(Action::SetPriority(7), &[ready, dead2, running])
            .await
            .unwrap(),
        2
    );
    assert_eq!(
        f.console
            .job(MessageId(dead2))
            .await
            .unwrap()
            .unwrap()
            .summary
            .priority,
        7
    );
    assert_eq!(
        f.console
            .job(MessageId(running))
            .await
            .unwrap()
            .unwrap()
            .summary
            .priority,
        0
    );

    // Dead-letter: any job of the hot table, its columns carried.
    assert_eq!(
        act(Action::DeadLetter, &[scheduled, dead2]).await.unwrap(),
        1
    );
    let gone = f.console.job(MessageId(scheduled)).await.unwrap().unwrap();
    assert_eq!(gone.summary.state, JobState::Dead);
    assert_eq!(
        gone.summary.last_error.as_deref(),
        Some("dead-lettered by tester")
    );

    // Cancel: ready and running jobs leave the hot table.
    assert_eq!(
        act(Action::Cancel, &[ready2, running2, dead2])
            .await
            .unwrap(),
        2
    );
    assert_eq!(state(ready2).await, None);
    assert_eq!(state(running2).await, None);

    // Discard: dead and archived jobs, for good.
    assert_eq!(
        act(Action::Discard, &[dead2, archived, ready])
            .await
            .unwrap(),
        2
    );
    assert_eq!(state(dead2).await, None);
    assert_eq!(state(archived).await, None);
    assert_eq!(state(ready).await, Some(JobState::Scheduled));

    // Nothing matched: zero, not an error. Empty and oversized lists are refused.
    assert_eq!(act(Action::Discard, &[999_999]).await.unwrap(), 0);
    invalid(
        act(Action::Cancel, &[]).await.unwrap_err(),
        "1 to 10000 job ids",
    );
    let too_many: Vec<i64> = (1..=MAX_IDS as i64 + 1).collect();
    invalid(
        act(Action::Cancel, &too_many).await.unwrap_err(),
        "1 to 10000 job ids",
    );
    invalid(
        f.console
            .act(" ", &Action::Cancel, &Target::Ids(vec![MessageId(1)]))
            .await
            .unwrap_err(),
        "actor",
    );

    // The audit log, newest first: one entry per action that ran.
    let log = f.console.audit(100, None).await.unwrap();
    let actions: Vec<(&str, u64)> = log.iter().map(|e| (e.action.as_str(), e.count)).collect();
    assert_eq!(
        actions,
        [
            ("discard", 0),
            ("discard", 2),
            ("cancel", 2),
            ("dead_letter", 1),
            ("priority", 2),
            ("reschedule", 1),
            ("retry", 2),
        ]
    );
    let retry = log.last().unwrap();
    assert_eq!(retry.actor, "tester");
    assert_eq!(retry.queue.as_deref(), Some("acts"));
    assert_eq!(
        retry.detail["ids"],
        json!([scheduled, running, dead, 999_999])
    );
    assert_eq!(log[4].detail["priority"], json!(7));
    assert_eq!(log[0].queue, None, "nothing changed: no queue");
    let older = f.console.audit(2, Some(log[1].id)).await.unwrap();
    assert_eq!(
        older.iter().map(|e| e.id).collect::<Vec<_>>(),
        [log[2].id, log[3].id]
    );

    // Pauses and resumes done elsewhere are recorded too.
    f.console
        .record("loopback", "pause", &q, 0, serde_json::json!({}))
        .await
        .unwrap();
    let entry = f.console.audit(1, None).await.unwrap().remove(0);
    assert_eq!(
        (
            entry.actor.as_str(),
            entry.action.as_str(),
            entry.queue.as_deref()
        ),
        ("loopback", "pause", Some("acts"))
    );
    invalid(
        f.console
            .record("loopback", "drop", &q, 0, serde_json::json!({}))
            .await
            .unwrap_err(),
        "pause, resume, retry, discard",
    );
}

/// A dead letter by the console ends the job's attempt history as the worker's does: one
/// more entry `{"attempt": attempts, "error": "dead-lettered by <actor>", "at": now}`, the
/// last ten kept (`pgbus.append_error`, which both call).
#[tokio::test]
async fn a_console_dead_letter_appends_to_the_attempt_history() {
    let f = fixture().await;
    let q = f.queue("history").await;
    let fresh = f.send(&q, json_message(json!({"n": 1}))).await;
    let failed = f.send(&q, json_message(json!({"n": 2}))).await;
    let history: Vec<serde_json::Value> = (1..=ERRORS_KEPT as i64)
        .map(|n| json!({"attempt": n, "error": format!("error {n}"), "at": "2026-12-06T22:00:00Z"}))
        .collect();
    f.sql
        .execute(
            "UPDATE pgbus.messages SET errors = $2, attempts = $3 WHERE id = $1",
            &[
                &failed,
                &serde_json::Value::Array(history),
                &(ERRORS_KEPT as i32),
            ],
        )
        .await
        .unwrap();
    let before = SystemTime::now() - Duration::from_secs(60);
    let target = Target::Ids(vec![MessageId(fresh), MessageId(failed)]);
    let n = f
        .console
        .act("ops@example", &Action::DeadLetter, &target)
        .await
        .unwrap();
    assert_eq!(n, 2);

    let fresh = f.console.job(MessageId(fresh)).await.unwrap().unwrap();
    let entries: Vec<(u32, &str)> = fresh
        .errors
        .iter()
        .map(|e| (e.attempt, e.error.as_str()))
        .collect();
    assert_eq!(entries, [(0, "dead-lettered by ops@example")]);
    let at = fresh.errors[0].at;
    assert!(
        at > before && at < SystemTime::now() + Duration::from_secs(60),
        "stamped now: {at:?}"
    );

    let failed = f.console.job(MessageId(failed)).await.unwrap().unwrap();
    let entries: Vec<(u32, &str)> = failed
        .errors
        .iter()
        .map(|e| (e.attempt, e.error.as_str()))
        .collect();
    let mut expected: Vec<(u32, String)> = (2..=ERRORS_KEPT as u32)
        .map(|n| (n, format!("error {n}")))
        .collect();
    expected.push((ERRORS_KEPT as u32, "dead-lettered by ops@example".into()));
    let expected: Vec<(u32, &str)> = expected.iter().map(|(n, e)| (*n, e.as_str())).collect();
    assert_eq!(entries, expected, "the last ten, the reason last");
    let stored: i32 = f
        .sql
        .query_one(
            "SELECT jsonb_array_length(errors) FROM pgbus.dead_letters WHERE id = $1",
            &[&failed.summary.id.0],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        stored, ERRORS_KEPT as i32,
        "trimmed in the row, not only shown"
    );
}

/// Whether `err` is PostgreSQL's deadlock error (`40P01`), found along its sources.
fn is_deadlock(err: &Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(pg) = e.downcast_ref::<tokio_postgres::Error>() {
            if pg.code() == Some(&tokio_postgres::error::SqlState::T_R_DEADLOCK_DETECTED) {
                return true;
            }
        }
        source = e.source();
    }
    false
}

/// A worker's batch ack and console actions on the same running jobs, at the same moment,
/// round after round: the ack is given its leases in descending id order (a worker acks in
/// the order its jobs finished), the console its ids in another order, and both lock in id
/// order, so one waits for the other and neither fails with a deadlock. Every job is
/// settled once: acked, or changed by the console.
#[tokio::test]
async fn acks_and_console_actions_on_the_same_jobs_never_deadlock() {
    const ROUNDS: usize = 200;
    const JOBS: usize = 500;
    let f = fixture().await;
    let q = f.queue("race").await;
    let mut deadlocks = Vec::new();
    let started = Instant::now();
    for round in 0..ROUNDS {
        let messages = (0..JOBS).map(|n| json_message(json!({ "n": n })));
        f.backend
            .send_batch(&q, messages.collect())
            .await
            .expect("send");
        let mut leases: Vec<Lease> = f
            .backend
            .claim(&q, JOBS, Duration::from_secs(3600))
            .await
            .expect("claim")
            .into_iter()
            .map(|m| m.lease())
            .collect();
        assert_eq!(leases.len(), JOBS, "round {round}: every job claimed");
        leases.sort_by_key(|l| std::cmp::Reverse(l.id.0));
        // The console's ids interleaved from both ends; every other round a filter on the
        // jobs in flight, up to what its listing saw.
        let action = if round % 2 == 0 {
            Action::Cancel
        } else {
            Action::DeadLetter
        };
        let target = if round % 4 < 2 {
            let mut ids: Vec<MessageId> = leases.iter().map(|l| l.id).collect();
            let (low, high) = ids.split_at_mut(JOBS / 2);
            high.reverse();
            let ids = low
                .iter()
                .zip(high.iter())
                .flat_map(|(a, b)| [*a, *b])
                .collect();
            Target::Ids(ids)
        } else {
            let running = filter(&q, JobState::InFlight);
            let page = f.page(&running, Order::NewestFirst).await;
            Target::Filter(running, page.bound)
        };
        let start = tokio::sync::Barrier::new(2);
        let ack = async {
            start.wait().await;
            f.backend.ack(&leases).await
        };
        let act = async {
            start.wait().await;
            f.console.act("tester", &action, &target).await
        };
        let (acked, acted) =
            tokio::time::timeout(Duration::from_secs(120), async { tokio::join!(ack, act) })
                .await
                .unwrap_or_else(|_| panic!("round {round} never finished"));
        let mut settled = 0;
        for outcome in [acked, acted] {
            match outcome {
                Ok(n) => settled += n,
                Err(err) if is_deadlock(&err) => deadlocks.push(format!("round {round}: {err}")),
                Err(err) => panic!("round {round}: {err}"),
            }
        }
        if deadlocks.is_empty() {
            assert_eq!(settled, JOBS as u64, "round {round}: each job settled once");
        }
        f.sql
            .batch_execute("DELETE FROM pgbus.messages; DELETE FROM pgbus.dead_letters")
            .await
            .expect("clean up");
    }
    assert!(
        deadlocks.is_empty(),
        "{} deadlocks in {ROUNDS} rounds ({:?}): {deadlocks:?}",
        deadlocks.len(),
        started.elapsed()
    );
}

/// A retry wakes the queue's workers: a dead letter retried comes back visible now, and a
/// listening worker hears of it at once rather than at its next poll.
#[tokio::test]
async fn a_retry_wakes_the_queues_workers() {
    let f = fixture().await;
    let q = f.queue("wake").await;
    // Sends that notify nobody, so the only wake-up is the retry's.
    let quiet = PgBackend::builder(&f.url).notify(false).build().unwrap();
    let listener = PgListener::start(&f.url).unwrap();
    assert!(
        listener.wait_live(Duration::from_secs(10)).await,
        "listening"
    );
    let id = quiet.send(&q, json_message(json!({}))).await.unwrap().0;
    f.dead_letter(&[id], "smtp down").await;
    let target = Target::Ids(vec![MessageId(id)]);
    assert_eq!(
        f.console
            .act("tester", &Action::RetryNow, &target)
            .await
            .unwrap(),
        1
    );
    eventually(
        "the retry's wake-up is heard",
        Duration::from_secs(10),
        || async { listener.notifications_heard_for(&q) >= 1 },
    )
    .await;
}

#[tokio::test]
async fn bulk_actions_touch_only_what_the_listing_saw() {
    let f = fixture().await;
    let q = f.queue("bulk").await;
    // A job sent first (the oldest id) that dies only after the list is drawn.
    let late = f.send(&q, json_message(json!({"n": 0})).group("a")).await;
    let mut group_a = Vec::new();
    for n in 1..=3 {
        group_a.push(f.send(&q, json_message(json!({"n": n})).group("a")).await);
    }
    let group_b = f.send(&q, json_message(json!({"n": 4})).group("b")).await;
    f.dead_letter(&group_a, "smtp down").await;
    f.dead_letter(&[group_b], "smtp down").await;
    let dead_a = with(filter(&q, JobState::Dead), |f| {
        f.group_key = Some("a".into())
    });
    let listed = f.page(&dead_a, Order::NewestFirst).await;
    assert_eq!(
        ids(&listed),
        group_a.iter().rev().copied().collect::<Vec<_>>()
    );
    f.dead_letter(&[late], "smtp down").await;
    let target = Target::Filter(dead_a.clone(), listed.bound.clone());
    let retried = f
        .console
        .act("tester", &Action::RetryNow, &target)
        .await
        .unwrap();
    assert_eq!(retried, 3);
    assert_eq!(
        f.ids(&filter(&q, JobState::Dead), Order::OldestFirst).await,
        vec![late, group_b]
    );
    let mut ready = f
        .ids(&filter(&q, JobState::Ready), Order::OldestFirst)
        .await;
    ready.sort_unstable();
    assert_eq!(ready, group_a);
    let entry = f.console.audit(1, None).await.unwrap().remove(0);
    assert_eq!(entry.detail["filter"]["group_key"], json!("a"));
    assert_eq!(entry.detail["bound"], json!(listed.bound.0));
    assert_eq!((entry.queue.as_deref(), entry.count), (Some("bulk"), 3));

    // The hot table: jobs sent after the list was drawn stay.
    let ready_filter = filter(&q, JobState::Ready);
    let listed = f.page(&ready_filter, Order::NewestFirst).await;
    let newcomer = f.send(&q, json_message(json!({"n": 5}))).await;
    let target = Target::Filter(ready_filter.clone(), listed.bound.clone());
    assert_eq!(
        f.console
            .act("tester", &Action::Cancel, &target)
            .await
            .unwrap(),
        3
    );
    assert_eq!(
        f.ids(&ready_filter, Order::NewestFirst).await,
        vec![newcomer]
    );

    // A payload filter selects in Rust, on rows the SQL filters left.
    let mut pay = Vec::new();
    for n in 0..6 {
        pay.push(
            f.send(&q, msgpack_message(json!({"customer": n % 2})))
                .await,
        );
    }
    let by_payload = with(filter(&q, JobState::Ready), |f| {
        f.payload = Some(PayloadMatch::parse("customer=1").unwrap())
    });
    let listed = f.page(&by_payload, Order::NewestFirst).await;
    let target = Target::Filter(by_payload.clone(), listed.bound.clone());
    assert_eq!(
        f.console
            .act("tester", &Action::DeadLetter, &target)
            .await
            .unwrap(),
        3
    );
    let dead_now: BTreeSet<i64> = f
        .ids(&filter(&q, JobState::Dead), Order::NewestFirst)
        .await
        .into_iter()
        .collect();
    assert!(pay
        .iter()
        .skip(1)
        .step_by(2)
        .all(|id| dead_now.contains(id)));
    assert!(pay.iter().step_by(2).all(|id| !dead_now.contains(id)));

    // Running jobs can be cancelled by filter; a retry of running jobs is refused.
    f.lease(&[pay[0], pay[2]]).await;
    let running = filter(&q, JobState::InFlight);
    let listed = f.page(&running, Order::NewestFirst).await;
    let target = Target::Filter(running.clone(), listed.bound.clone());
    let refused = f
        .console
        .act("tester", &Action::RetryNow, &target)
        .await
        .unwrap_err();
    invalid(refused, "retry does not apply to in_flight jobs");
    assert_eq!(
        f.console
            .act("tester", &Action::Cancel, &target)
            .await
            .unwrap(),
        2
    );

    // A bound belongs to its filter.
    let other = with(filter(&q, JobState::Dead), |f| {
        f.group_key = Some("b".into())
    });
    let target = Target::Filter(other, f.page(&dead_a, Order::NewestFirst).await.bound);
    invalid(
        f.console
            .act("tester", &Action::Discard, &target)
            .await
            .unwrap_err(),
        "bad bound",
    );
    let target = Target::Filter(dead_a.clone(), Bound("b1.dead.x".into()));
    invalid(
        f.console
            .act("tester", &Action::Discard, &target)
            .await
            .unwrap_err(),
        "bad bound",
    );
    let log_len = f.console.audit(100, None).await.unwrap().len();
    assert_eq!(log_len, 4, "refused actions write nothing");

    // Selections larger than one batch, and an empty listing's bound.
    let many = QueueName::new("many").unwrap();
    f.queue("many").await;
    let empty = filter(&many, JobState::Ready);
    let empty_bound = f.page(&empty, Order::NewestFirst).await.bound;
    f.sql
        .execute(
            "INSERT INTO pgbus.messages (queue, visible_at, content_type, payload)
             SELECT 'many', now(), 'application/json', '\\x7b7d' FROM generate_series(1, 2500)",
            &[],
        )
        .await
        .unwrap();
    let target = Target::Filter(empty.clone(), empty_bound);
    assert_eq!(
        f.console
            .act("tester", &Action::SetPriority(3), &target)
            .await
            .unwrap(),
        0
    );
    let bound = f.page(&empty, Order::NewestFirst).await.bound;
    let target = Target::Filter(empty.clone(), bound);
    assert_eq!(
        f.console
            .act("tester", &Action::SetPriority(3), &target)
            .await
            .unwrap(),
        2500
    );
    let changed = f
        .count("SELECT count(*) FROM pgbus.messages WHERE queue = 'many' AND priority = 3")
        .await;
    assert_eq!(changed, 2500);
}

/// The indexes a plan reads: in their order (an index scan), and at all (a bitmap scan
/// too, which reads every row its conditions allow before anything is sorted).
#[derive(Default)]
struct Indexes {
    ordered: BTreeSet<String>,
    any: BTreeSet<String>,
}

/// Walks a plan (the `EXPLAIN (FORMAT JSON)` document): the sequential scans of the hot
/// table or the dead letters, and the indexes read.
fn scans(plan: &serde_json::Value, seq: &mut Vec<String>, indexes: &mut Indexes) {
    match plan {
        serde_json::Value::Object(node) => {
            let node_type = node.get("Node Type").and_then(|t| t.as_str());
            if node_type == Some("Seq Scan") {
                let relation = node
                    .get("Relation Name")
                    .and_then(|r| r.as_str())
                    .unwrap_or("?");
                if matches!(relation, "messages" | "dead_letters") {
                    seq.push(relation.to_owned());
                }
            }
            if let Some(index) = node.get("Index Name").and_then(|i| i.as_str()) {
                indexes.any.insert(index.to_owned());
                if matches!(node_type, Some("Index Scan" | "Index Only Scan")) {
                    indexes.ordered.insert(index.to_owned());
                }
            }
            node.values().for_each(|v| scans(v, seq, indexes));
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| scans(v, seq, indexes)),
        _ => {}
    }
}

/// The part of a plan that reads a listing's or a selection's window (the CTE `scan`), or
/// the whole plan when it has none.
fn window(plan: &serde_json::Value) -> Option<&serde_json::Value> {
    match plan {
        serde_json::Value::Object(node) => {
            if node.get("Subplan Name") == Some(&json!("CTE scan")) {
                return Some(plan);
            }
            node.values().find_map(window)
        }
        serde_json::Value::Array(items) => items.iter().find_map(window),
        _ => None,
    }
}

/// Every console statement on 2,000,000 messages in 20 queues (each 60% ready, 30%
/// scheduled, 10% in flight, a seventh grouped) and 100,000 dead letters (plus 100,000
/// archived jobs; `Sample::FULL`, the `console` bench scenario's data): none scans the hot
/// table or the dead letters whole.
#[tokio::test]
async fn no_console_query_scans_a_table_on_millions_of_rows() {
    let started = Instant::now();
    let f = fixture().await;
    f.console.seed_sample(Sample::FULL).await.expect("seed");
    let seeded = started.elapsed();
    // The planner's estimates depend on where a queue's name sorts among the others: the
    // first, second and last names, and one between.
    let explained = Instant::now();
    let mut plans = Vec::new();
    for n in [0, 1, 7, 9] {
        let q = QueueName::new(format!("q{n}")).unwrap();
        let ids: Vec<MessageId> = (0..100).map(|k| MessageId(n + 20 * k)).collect();
        // Group `g<n>` holds jobs of queue `q<n>`.
        let explained = f
            .console
            .explain_all(&q, &format!("g{n}"), &ids)
            .await
            .expect("explain");
        plans.extend(
            explained
                .into_iter()
                .map(|(name, plan)| (format!("{q}: {name}"), plan)),
        );
    }
    let explained = explained.elapsed();
    let q = QueueName::new("q7").unwrap();
    let ids: Vec<MessageId> = (0..100).map(|k| MessageId(7 + 20 * k)).collect();
    let mut offenders = Vec::new();
    for (name, plan) in &plans {
        let (mut seq, mut indexes) = (Vec::new(), Indexes::default());
        scans(plan, &mut seq, &mut Indexes::default());
        scans(window(plan).unwrap_or(plan), &mut Vec::new(), &mut indexes);
        if !seq.is_empty() {
            offenders.push(format!("{name}: Seq Scan on {seq:?}\n{plan:#}"));
        }
        // Every page's scan window, and every batch of a selection, reads the queue through
        // one of its indexes, never the primary key, however deep its cursor. A queue far
        // larger than a window (the hot table's, 100,000 jobs each) is read in the order of
        // the index the design names, from the cursor, stopping at the window's end. The
        // dead letters' and the archive's queues hold one window each here, which the
        // planner may rightly read whole through any of the queue's indexes.
        let words: Vec<&str> = name.split(' ').collect();
        let (state, variant) = match words[..] {
            [_, "list", state, _, variant, ..] | [_, "select", state, variant, ..] => {
                (state, variant)
            }
            _ => ("", ""),
        };
        let ordered = match (state, variant) {
            (_, "id") | ("", _) => continue,
            ("ready" | "scheduled" | "in_flight", "group" | "group+filters") => {
                Some("messages_group_idx")
            }
            ("ready" | "scheduled" | "in_flight", _) => Some("messages_queue_id_idx"),
            _ => None,
        };
        let by_queue = indexes.any.iter().any(|index| !index.ends_with("_pkey"));
        let by_key = indexes.any.iter().any(|index| index.ends_with("_pkey"));
        let as_designed = match ordered {
            Some(index) => indexes.ordered.contains(index),
            None => by_queue,
        };
        if by_key || !as_designed {
            offenders.push(format!(
                "{name}: its window is not read as designed ({}; in order: {:?}; at all: \
                 {:?})\n{plan:#}",
                ordered.unwrap_or("an index of the queue"),
                indexes.ordered,
                indexes.any
            ));
        }
    }
    assert!(
        plans.len() > 4 * 250,
        "every statement explained ({})",
        plans.len()
    );
    assert!(offenders.is_empty(), "{}", offenders.join("\n\n"));

    // What the real calls take on this data (printed for the docs, not asserted: the
    // bench measures latencies).
    let mut timings = Vec::new();
    let mut time =
        |what: &str, since: Instant| timings.push(format!("{what}: {:?}", since.elapsed()));
    for state in JobState::ALL {
        let t = Instant::now();
        let page = f
            .console
            .list(&filter(&q, state), Order::NewestFirst, None, 50)
            .await
            .unwrap();
        time(
            &format!(
                "list {} first page ({} jobs)",
                state.as_str(),
                page.jobs.len()
            ),
            t,
        );
    }
    let rare = with(filter(&q, JobState::InFlight), |f| {
        f.error_contains = Some("no such".into())
    });
    let t = Instant::now();
    f.console
        .list(&rare, Order::NewestFirst, None, 50)
        .await
        .unwrap();
    time("list a filter matching nothing (one full window)", t);
    let t = Instant::now();
    let counts = f.console.counts(&q).await.unwrap();
    time(&format!("counts {counts:?}"), t);
    let t = Instant::now();
    f.console.job(ids[0]).await.unwrap().expect("a job");
    time("job detail", t);
    println!(
        "seeded in {seeded:?}; {} statements explained in {explained:?}; whole test {:?}\n{}",
        plans.len(),
        started.elapsed(),
        timings.join("\n")
    );
}
