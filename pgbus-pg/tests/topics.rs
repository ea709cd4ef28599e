//! Topics on Postgres: routing, fan-out inside the publisher's transaction, unrouted
//! publishes, subscriptions with a start position.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use pgbus_core::{
    envelope, Consumer, Error, EventId, NewEvent, QueueAdmin, QueueName, QueueOptions, RoutingKey,
    StartAt, Stats, TopicPattern, Topics, ROUTING_CASES,
};
use pgbus_pg::{connect, test_database, PgBackend};

async fn backend() -> (PgBackend, String) {
    let db = test_database().await;
    let backend = PgBackend::connect(db.url()).expect("backend");
    backend.migrate().await.expect("migrate");
    (backend, db.url().to_owned())
}

async fn bound_queue(backend: &PgBackend, name: &str, pattern: &str) -> QueueName {
    let queue = QueueName::new(name).unwrap();
    backend
        .create_queue(&queue, &QueueOptions::default())
        .await
        .unwrap();
    let bound = backend
        .bind(&TopicPattern::new(pattern).unwrap(), &queue, StartAt::Now)
        .await
        .unwrap();
    assert!(bound.created);
    queue
}

/// Claims everything in the queue; returns (event id, routing key) per copy.
async fn drain(backend: &PgBackend, queue: &QueueName) -> Vec<(EventId, String)> {
    let mut copies = Vec::new();
    loop {
        let claimed = backend
            .claim(queue, 1000, Duration::from_secs(60))
            .await
            .unwrap();
        if claimed.is_empty() {
            return copies;
        }
        for m in &claimed {
            let (id, key, _) = envelope(&m.headers).expect("an event copy");
            copies.push((id, key.to_string()));
        }
        let leases: Vec<_> = claimed.iter().map(|m| m.lease()).collect();
        backend.ack(&leases).await.unwrap();
    }
}

fn event(key: &str) -> NewEvent {
    NewEvent::json(key, &serde_json::json!({ "key": key })).unwrap()
}

#[tokio::test]
async fn the_routing_table_delivers_to_exactly_the_right_queues() {
    let (backend, url) = backend().await;
    let patterns: BTreeSet<&str> = ROUTING_CASES.iter().map(|c| c.0).collect();
    let keys: BTreeSet<&str> = ROUTING_CASES.iter().map(|c| c.1).collect();
    let mut queues = BTreeMap::new();
    for (i, pattern) in patterns.iter().enumerate() {
        queues.insert(
            *pattern,
            bound_queue(&backend, &format!("q{i}"), pattern).await,
        );
    }
    let published = backend
        .publish_batch(keys.iter().map(|k| event(k)).collect())
        .await
        .unwrap();
    assert_eq!(published.len(), keys.len());

    let mut received: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for (pattern, queue) in &queues {
        let copies = drain(&backend, queue).await;
        let set: BTreeSet<String> = copies.iter().map(|(_, k)| k.clone()).collect();
        assert_eq!(set.len(), copies.len(), "one copy per event in {pattern}");
        received.insert(pattern, set);
    }
    for &(pattern, key, expected) in ROUTING_CASES {
        assert_eq!(
            received[pattern].contains(key),
            expected,
            "delivery of {key} to the queue bound to {pattern}"
        );
    }
    // Every pattern against every key: delivery in Postgres agrees with the Rust matcher,
    // and so does the regex translation on its own.
    let client = connect(&url, "test").await.unwrap();
    for pattern in &patterns {
        let p = TopicPattern::new(*pattern).unwrap();
        for key in &keys {
            let rust = p.matches(&RoutingKey::new(*key).unwrap());
            assert_eq!(received[pattern].contains(*key), rust, "{pattern} ~ {key}");
            let sql: bool = client
                .query_one(
                    "SELECT ('.' || $2) ~ pgbus.topic_regex($1)",
                    &[pattern, key],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(sql, rust, "regex of {pattern} ~ {key}");
        }
    }
    // The copies counted per event agree with the deliveries.
    for (p, key) in published.iter().zip(&keys) {
        let expected = received.values().filter(|s| s.contains(*key)).count() as u64;
        assert_eq!(p.copies, expected, "copies of {key}");
    }
}

#[tokio::test]
async fn patterns_with_empty_segments_are_refused_before_and_by_the_database() {
    let (backend, url) = backend().await;
    for bad in ["a..b", ".a", "a.", "", "a.b*", "a b"] {
        let err = TopicPattern::new(bad).unwrap_err();
        assert!(matches!(err, Error::InvalidTopicPattern { .. }), "{bad}");
    }
    assert!(matches!(
        NewEvent::json("a..b", &1).unwrap_err(),
        Error::InvalidRoutingKey { .. }
    ));
    // A binding written behind pgbus's back is refused by the table's own check.
    let queue = QueueName::new("raw").unwrap();
    backend
        .create_queue(&queue, &QueueOptions::default())
        .await
        .unwrap();
    let client = connect(&url, "test").await.unwrap();
    for bad in ["a..b", ".a", "a.", "a.b*"] {
        let err = client
            .execute(
                "INSERT INTO pgbus.topic_bindings (pattern, queue) VALUES ($1, 'raw')",
                &[&bad],
            )
            .await
            .unwrap_err();
        assert!(err.to_string().contains("db error"), "{bad}: {err}");
    }
    assert!(backend.bindings().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_publish_fans_out_in_the_publishers_transaction() {
    let (backend, url) = backend().await;
    let mut queues = Vec::new();
    for i in 0..5 {
        queues.push(bound_queue(&backend, &format!("sub{i}"), "order.*").await);
    }
    let mut client = connect(&url, "publisher").await.unwrap();

    let tx = client.transaction().await.unwrap();
    let published = backend
        .publish_event_in(&tx, event("order.paid"))
        .await
        .unwrap();
    assert_eq!(published.copies, 5);
    tx.rollback().await.unwrap();
    for q in &queues {
        assert!(
            drain(&backend, q).await.is_empty(),
            "rolled back: nothing in {q}"
        );
    }
    assert!(
        backend.topic_stats().await.unwrap().is_empty(),
        "nor in the log"
    );

    let tx = client.transaction().await.unwrap();
    let published = backend
        .publish_event_in(&tx, event("order.paid"))
        .await
        .unwrap();
    // Not visible before the commit.
    let depth: u64 = backend
        .stats()
        .await
        .unwrap()
        .iter()
        .map(|s| s.depth())
        .sum();
    assert_eq!(depth, 0);
    // One statement wrote the 5 copies: they share the transaction's command id.
    let written = tx
        .query_one(
            "SELECT count(*), count(DISTINCT cmin::text) FROM pgbus.messages
             WHERE xmin = pg_current_xact_id()::xid",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(
        (written.get::<_, i64>(0), written.get::<_, i64>(1)),
        (5, 1),
        "5 copies from one command"
    );
    tx.commit().await.unwrap();
    for q in &queues {
        let copies = drain(&backend, q).await;
        assert_eq!(copies, vec![(published.id, "order.paid".to_owned())], "{q}");
    }
    let stats = backend.topic_stats().await.unwrap();
    assert_eq!(stats.len(), 1);
    assert_eq!(
        (stats[0].published, stats[0].copies, stats[0].unrouted),
        (1, 5, 0)
    );
}

#[tokio::test]
async fn a_queue_bound_twice_gets_one_copy_and_unrouted_publishes_are_reported() {
    let (backend, _url) = backend().await;
    let q = bound_queue(&backend, "billing", "order.*").await;
    backend
        .bind(&TopicPattern::new("order.#").unwrap(), &q, StartAt::Now)
        .await
        .unwrap();
    let published = backend.publish(event("order.paid")).await.unwrap();
    assert_eq!(published.copies, 1);
    assert_eq!(drain(&backend, &q).await.len(), 1);

    let unrouted = backend.publish(event("invoice.sent")).await.unwrap();
    assert_eq!(unrouted.copies, 0);
    let stats = backend.topic_stats().await.unwrap();
    let invoice = stats
        .iter()
        .find(|s| s.routing_key.as_str() == "invoice.sent")
        .unwrap();
    assert_eq!((invoice.published, invoice.unrouted), (1, 1));

    // Dropping the queue drops its bindings.
    backend.drop_queue(&q).await.unwrap();
    assert!(backend.bindings().await.unwrap().is_empty());
}

#[tokio::test]
async fn a_new_subscription_with_a_start_position_receives_what_was_published_since() {
    let (backend, _url) = backend().await;
    let early = backend.publish(event("order.created")).await.unwrap();
    let mark = SystemTime::now();
    let later = backend.publish(event("order.paid")).await.unwrap();
    backend.publish(event("invoice.sent")).await.unwrap();
    let pattern = TopicPattern::new("order.*").unwrap();

    let mut queues = Vec::new();
    for (name, start) in [
        ("from_now", StartAt::Now),
        ("since_mark", StartAt::Since(mark)),
        ("earliest", StartAt::Earliest),
    ] {
        let q = QueueName::new(name).unwrap();
        backend
            .create_queue(&q, &QueueOptions::default())
            .await
            .unwrap();
        backend.bind(&pattern, &q, start).await.unwrap();
        queues.push(q);
    }
    let ids = |copies: Vec<(EventId, String)>| copies.into_iter().map(|c| c.0).collect::<Vec<_>>();
    assert!(drain(&backend, &queues[0]).await.is_empty());
    assert_eq!(ids(drain(&backend, &queues[1]).await), [later.id]);
    assert_eq!(ids(drain(&backend, &queues[2]).await), [early.id, later.id]);

    // Declaring again (every subscriber start-up does) changes nothing and replays nothing.
    let again = backend
        .bind(&pattern, &queues[2], StartAt::Earliest)
        .await
        .unwrap();
    assert!(!again.created);
    assert_eq!(again.replayed, 0);
    assert!(drain(&backend, &queues[2]).await.is_empty());

    // Missing queue: a typed error.
    let missing = QueueName::new("missing").unwrap();
    let err = backend
        .bind(&pattern, &missing, StartAt::Now)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::QueueNotFound(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bind_racing_publishers_neither_loses_nor_repeats_an_event() {
    let (backend, _url) = backend().await;
    let start = SystemTime::now();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut publishers = Vec::new();
    for _ in 0..4 {
        let (backend, stopped) = (backend.clone(), stopped.clone());
        publishers.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            while !*stopped.borrow() {
                let batch: Vec<_> = (0..5).map(|_| event("tick.ok")).collect();
                ids.extend(
                    backend
                        .publish_batch(batch)
                        .await
                        .unwrap()
                        .iter()
                        .map(|p| p.id),
                );
            }
            ids
        }));
    }
    // Bind once the publishers are under way.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while backend.topic_stats().await.unwrap().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "publishers never published"
        );
        tokio::task::yield_now().await;
    }
    let q = QueueName::new("late").unwrap();
    backend
        .create_queue(&q, &QueueOptions::default())
        .await
        .unwrap();
    let bound = backend
        .bind(
            &TopicPattern::new("tick.*").unwrap(),
            &q,
            StartAt::Since(start),
        )
        .await
        .unwrap();
    assert!(bound.replayed > 0, "events before the bind were replayed");
    // Let them publish on past the bind, then stop them.
    let published_before: u64 = backend.topic_stats().await.unwrap()[0].published;
    while backend.topic_stats().await.unwrap()[0].published < published_before + 40 {
        tokio::task::yield_now().await;
    }
    stop.send_replace(true);
    let mut all = BTreeSet::new();
    for p in publishers {
        all.extend(p.await.unwrap());
    }
    let copies: Vec<EventId> = drain(&backend, &q).await.into_iter().map(|c| c.0).collect();
    let received: BTreeSet<EventId> = copies.iter().copied().collect();
    assert_eq!(received.len(), copies.len(), "no event delivered twice");
    assert_eq!(
        received, all,
        "every event published since the start arrived once"
    );
}
