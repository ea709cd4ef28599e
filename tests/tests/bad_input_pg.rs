//! Bad input through the library's public surface, against real Postgres: oversized
//! payloads, SQL metacharacters in every name and key, NUL bytes, adversarial topic
//! patterns, ids that do not exist. Each is a clear, non-transient error or is stored
//! verbatim as a bound value; nothing is half-stored and no statement is changed by input
//! (the tables still exist and hold their rows). Delays, leases and priorities at and
//! beyond their limits are in the conformance suite
//! (`extreme_delays_are_refused_and_extreme_priorities_kept`).

use std::time::{Duration, Instant};

use pgbus_core::{
    Consumer, ContentType, DeadLetters, Error, MessageId, NewEvent, NewMessage, Producer,
    QueueName, QueueOptions, RoutingKey, Selection, StartAt, StreamName, StreamStore, TopicPattern,
    Topics, Unique, DEFAULT_MAX_PAYLOAD_BYTES,
};
use pgbus_pg::{connect, test_database, PgBackend};
use pgbus_tests::{create, stats_of};

const INJECTION: &str = "x'; drop table pgbus.messages; --";
const LONG: Duration = Duration::from_secs(600);

/// The row counts of the tables an injection would hit.
async fn table_counts(url: &str) -> Vec<(String, i64)> {
    let observer = connect(url, "observer").await.expect("observer connection");
    let mut counts = Vec::new();
    for table in [
        "queues",
        "messages",
        "dead_letters",
        "topic_bindings",
        "events",
        "stream_events",
    ] {
        let row = observer
            .query_one(&format!("SELECT count(*) FROM pgbus.{table}"), &[])
            .await
            .unwrap_or_else(|e| panic!("pgbus.{table} is gone: {e}"));
        counts.push((table.to_owned(), row.get(0)));
    }
    counts
}

#[track_caller]
fn refused(err: &Error) {
    assert!(!err.is_transient(), "{err}");
    assert!(!err.to_string().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payloads_over_the_configured_limit_are_refused_and_nothing_is_stored() {
    let db = test_database().await;
    let backend = PgBackend::builder(db.url())
        .max_payload_bytes(1024)
        .build()
        .unwrap();
    backend.migrate().await.unwrap();
    let q = create(&backend, "limited", QueueOptions::default()).await;
    let raw = |n: usize| NewMessage::raw(vec![b'x'; n], ContentType::Json);

    let err = backend.send(&q, raw(1025)).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::PayloadTooLarge {
                size: 1025,
                limit: 1024
            }
        ),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        "payload of 1025 bytes exceeds the limit of 1024 bytes"
    );
    let err = backend
        .send_batch(&q, vec![raw(1), raw(1024), raw(10 * 1024 * 1024)])
        .await
        .unwrap_err();
    assert!(matches!(err, Error::PayloadTooLarge { .. }), "{err}");
    assert_eq!(
        stats_of(&backend, &q).await.depth(),
        0,
        "nothing of the batch"
    );

    // The limit itself is accepted.
    backend.send(&q, raw(1024)).await.unwrap();
    assert_eq!(stats_of(&backend, &q).await.depth(), 1);

    // Events obey the same limit; the event log stays empty.
    backend
        .bind(&TopicPattern::new("#").unwrap(), &q, StartAt::Now)
        .await
        .unwrap();
    let event = NewEvent::raw("order.paid", vec![b'x'; 1025], ContentType::Json).unwrap();
    let err = Topics::publish(&backend, event).await.unwrap_err();
    assert!(matches!(err, Error::PayloadTooLarge { .. }), "{err}");
    let counts = table_counts(db.url()).await;
    assert!(counts.contains(&("events".to_owned(), 0)), "{counts:?}");
    assert!(counts.contains(&("messages".to_owned(), 1)), "{counts:?}");

    // The default backend allows 1 MiB and no more.
    let default = PgBackend::connect(db.url()).unwrap();
    let err = default
        .send(&q, raw(DEFAULT_MAX_PAYLOAD_BYTES + 1))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::PayloadTooLarge { limit, .. } if limit == DEFAULT_MAX_PAYLOAD_BYTES)
    );
    default
        .send(&q, raw(DEFAULT_MAX_PAYLOAD_BYTES))
        .await
        .unwrap();
    assert_eq!(stats_of(&backend, &q).await.depth(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_metacharacters_are_refused_in_names_and_bound_verbatim_in_keys() {
    let db = test_database().await;
    let backend = PgBackend::connect(db.url()).unwrap();
    backend.migrate().await.unwrap();
    let q = create(&backend, "victim", QueueOptions::default()).await;
    backend
        .send_batch(&q, vec![NewMessage::json(&1).unwrap(); 3])
        .await
        .unwrap();
    let claimed = backend.claim(&q, 1, LONG).await.unwrap();
    assert!(backend.dead_letter(&claimed[0].lease(), "x").await.unwrap());
    let before = table_counts(db.url()).await;

    // Names never reach the database: the types refuse them.
    for name in [
        INJECTION,
        "victim; drop table pgbus.messages",
        "victim'--",
        "victim\"",
        "victim\0",
    ] {
        let err = QueueName::new(name).unwrap_err();
        assert!(matches!(err, Error::InvalidQueueName { .. }), "{err}");
        assert!(err.to_string().contains("[a-z0-9_]"), "{err}");
        let err = StreamName::new(name).unwrap_err();
        assert!(matches!(err, Error::InvalidStreamName { .. }), "{err}");
        let err = RoutingKey::new(name).unwrap_err();
        assert!(matches!(err, Error::InvalidRoutingKey { .. }), "{err}");
        let err = TopicPattern::new(name).unwrap_err();
        assert!(matches!(err, Error::InvalidTopicPattern { .. }), "{err}");
        assert!(NewEvent::raw(name, vec![], ContentType::Json).is_err());
    }
    // A schema-qualified table name is a fine routing key, never a queue or stream name.
    assert!(QueueName::new("pgbus.messages").is_err());
    assert!(StreamName::new("pgbus.messages").is_err());
    assert_eq!(table_counts(db.url()).await, before);

    // Free-form keys, headers and stream texts are bound parameters: stored as given.
    let message = NewMessage::json(&INJECTION)
        .unwrap()
        .group(INJECTION)
        .header(INJECTION, INJECTION);
    backend.send(&q, message).await.unwrap();
    let unique = NewMessage::json(&2).unwrap().unique(Unique::new(INJECTION));
    let first = backend.send(&q, unique.clone()).await.unwrap();
    assert_eq!(
        backend.send(&q, unique).await.unwrap(),
        first,
        "one job per key"
    );
    backend
        .send(&q, NewMessage::json(&3).unwrap().limit_key(INJECTION))
        .await
        .unwrap();
    let stream = StreamName::new("orders").unwrap();
    let id = StreamStore::publish(&backend, &stream, INJECTION, INJECTION)
        .await
        .unwrap();
    let read = backend.read_after(&stream, id - 1, 10).await.unwrap();
    assert_eq!(
        (read[0].event.as_str(), read[0].data.as_str()),
        (INJECTION, INJECTION)
    );

    let claimed = backend.claim(&q, 10, LONG).await.unwrap();
    let grouped = pgbus_core::GroupSession::lock_and_claim(
        &mut pgbus_core::OpenGroupSession::open_group_session(&backend)
            .await
            .unwrap(),
        &q,
        INJECTION,
        LONG,
        10,
    )
    .await
    .unwrap()
    .expect("the group is not locked")
    .pop()
    .expect("the group's message");
    assert_eq!(grouped.group_key.as_deref(), Some(INJECTION));
    assert_eq!(
        grouped.headers.get(INJECTION).map(String::as_str),
        Some(INJECTION)
    );
    assert_eq!(grouped.decode::<String>().unwrap(), INJECTION);
    assert!(
        claimed.iter().all(|m| m.group_key.is_none()),
        "grouped jobs are not in plain claims"
    );

    // Ids that do not exist (negative, zero, extreme) touch nothing: a count of 0.
    for id in [
        MessageId(-1),
        MessageId(0),
        MessageId(i64::MAX),
        MessageId(i64::MIN),
    ] {
        let ids = [id];
        assert_eq!(
            backend.retry_dead(&q, Selection::Ids(&ids)).await.unwrap(),
            0
        );
        assert_eq!(
            backend
                .discard_dead(&q, Selection::Ids(&ids))
                .await
                .unwrap(),
            0
        );
    }

    let after = table_counts(db.url()).await;
    let count =
        |counts: &[(String, i64)], table: &str| counts.iter().find(|(t, _)| t == table).unwrap().1;
    assert_eq!(count(&after, "queues"), 1);
    assert_eq!(count(&after, "dead_letters"), 1);
    assert_eq!(count(&after, "messages"), 2 + 3, "{after:?}");
    assert_eq!(count(&after, "stream_events"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_bytes_and_bad_unicode_in_texts_are_clear_errors() {
    let db = test_database().await;
    let backend = PgBackend::connect(db.url()).unwrap();
    backend.migrate().await.unwrap();
    let q = create(&backend, "texts", QueueOptions::default()).await;
    let stream = StreamName::new("texts").unwrap();
    let before = table_counts(db.url()).await;

    let results = [
        backend
            .send(&q, NewMessage::json(&1).unwrap().group("a\0b"))
            .await
            .map(|_| ()),
        backend
            .send(&q, NewMessage::json(&1).unwrap().header("h", "a\0b"))
            .await
            .map(|_| ()),
        backend
            .send(&q, NewMessage::json(&1).unwrap().header("a\0b", "h"))
            .await
            .map(|_| ()),
        backend
            .send(
                &q,
                NewMessage::json(&1).unwrap().unique(Unique::new("a\0b")),
            )
            .await
            .map(|_| ()),
        StreamStore::publish(&backend, &stream, "a\0b", "data")
            .await
            .map(|_| ()),
        StreamStore::publish(&backend, &stream, "event", "a\0b")
            .await
            .map(|_| ()),
        backend
            .broadcast(&stream, "event", "a\0b")
            .await
            .map(|_| ()),
    ];
    for (n, result) in results.into_iter().enumerate() {
        let err = result.expect_err(&format!("case {n}: a NUL byte is refused"));
        refused(&err);
        assert!(err.to_string().contains("NUL"), "case {n}: {err}");
    }
    assert_eq!(table_counts(db.url()).await, before, "nothing stored");

    // A NUL inside a JSON payload is escaped by the codec and comes back intact.
    backend
        .send_batch(&q, vec![NewMessage::json("a\0b").unwrap(); 2])
        .await
        .unwrap();
    let claimed = backend.claim(&q, 2, LONG).await.unwrap();
    assert_eq!(claimed[0].decode::<String>().unwrap(), "a\0b");

    // Error texts (a failing command's output may hold NUL) are stored with U+FFFD, so
    // the message still settles instead of failing the same way at every delivery.
    assert!(backend
        .nack(&claimed[0].lease(), Duration::ZERO, Some("exit 1: a\0b"))
        .await
        .unwrap());
    assert!(backend
        .dead_letter(&claimed[1].lease(), "exit 65: a\0b")
        .await
        .unwrap());
    let again = backend.claim(&q, 1, LONG).await.unwrap();
    assert_eq!(again[0].last_error.as_deref(), Some("exit 1: a\u{fffd}b"));
    let dead = backend.list_dead(&q, 10).await.unwrap();
    assert_eq!(dead[0].error, "exit 65: a\u{fffd}b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adversarial_topic_patterns_route_quickly_in_rust_and_in_postgres() {
    let db = test_database().await;
    let backend = PgBackend::connect(db.url()).unwrap();
    backend.migrate().await.unwrap();
    let q = create(&backend, "hashes", QueueOptions::default()).await;
    // As many `#` as fit, then a literal the keys lack: backtracking matchers explode.
    let pattern = TopicPattern::new(format!("{}x", "#.".repeat(126))).unwrap();
    let miss = RoutingKey::new(format!("{}b", "a.".repeat(127))).unwrap();
    let hit = RoutingKey::new(format!("{}x", "a.".repeat(127))).unwrap();
    backend.bind(&pattern, &q, StartAt::Now).await.unwrap();

    let started = Instant::now();
    assert!(!pattern.matches(&miss));
    assert!(pattern.matches(&hit));
    let published = backend
        .publish_batch(vec![
            NewEvent::json(miss.as_str(), &1).unwrap(),
            NewEvent::json(hit.as_str(), &2).unwrap(),
        ])
        .await
        .unwrap();
    assert_eq!(
        published.iter().map(|p| p.copies).collect::<Vec<_>>(),
        [0, 1]
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "routing took {:?}",
        started.elapsed()
    );
}

/// Headers that plain SQL stored as other JSON than an object of strings: claimed, run and
/// acked like any message (reading them once panicked the worker's claim), a value kept
/// as its JSON text, a column that is no object read as no headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_of_any_json_written_by_plain_sql_are_read_not_panicked_on() {
    let db = test_database().await;
    let backend = PgBackend::connect(db.url()).unwrap();
    backend.migrate().await.unwrap();
    let q = create(&backend, "odd_headers", QueueOptions::default()).await;
    let client = connect(db.url(), "producer").await.unwrap();
    client
        .batch_execute(
            "INSERT INTO pgbus.messages (queue, visible_at, content_type, headers, payload)
             VALUES ('odd_headers', now(), 'application/json',
                     '{\"n\": 1, \"s\": \"x\", \"o\": {\"a\": true}}', '\\x31'),
                    ('odd_headers', now(), 'application/json', '[1, 2]', '\\x32')",
        )
        .await
        .unwrap();
    let claimed = backend.claim(&q, 10, LONG).await.unwrap();
    assert_eq!(claimed.len(), 2);
    let headers: Vec<Vec<(&str, &str)>> = claimed
        .iter()
        .map(|m| {
            m.headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect()
        })
        .collect();
    assert_eq!(
        headers,
        [vec![("n", "1"), ("o", "{\"a\":true}"), ("s", "x")], vec![]]
    );
    let leases: Vec<_> = claimed.iter().map(|m| m.lease()).collect();
    backend.ack(&leases).await.unwrap();
    assert_eq!(stats_of(&backend, &q).await.ready, 0);
}
