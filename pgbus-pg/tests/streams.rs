//! Stream ordering under concurrent publishers whose transactions commit late.

use std::time::{Duration, Instant};

use pgbus_core::{StreamName, StreamStore};
use pgbus_pg::{connect, test_database, PgBackend};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follower_never_skips_an_event_committed_after_a_higher_one() {
    const PUBLISHERS: usize = 8;
    const EACH: usize = 25;
    let db = test_database().await;
    let backend = PgBackend::builder(db.url())
        .max_connections(4)
        .build()
        .unwrap();
    backend.migrate().await.unwrap();
    let stream = StreamName::new("ledger").unwrap();

    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let (url, backend, stream) = (db.url().to_owned(), backend.clone(), stream.clone());
        publishers.push(tokio::spawn(async move {
            let mut client = connect(&url, "publisher").await.unwrap();
            let mut ids = Vec::new();
            for i in 0..EACH {
                let tx = client.transaction().await.unwrap();
                ids.push(
                    backend
                        .publish_in(&tx, &stream, "entry", &format!("{p}/{i}"))
                        .await
                        .unwrap(),
                );
                // Commit late, by a varying amount: part of the scenario, not a wait.
                tokio::time::sleep(Duration::from_millis(((p * 7 + i * 13) % 15) as u64)).await;
                tx.commit().await.unwrap();
            }
            ids
        }));
    }

    // A follower reads after its cursor while the publishers run.
    let mut seen: Vec<i64> = Vec::new();
    let mut cursor = 0;
    let start = Instant::now();
    while seen.len() < PUBLISHERS * EACH {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "follower stalled at {}",
            seen.len()
        );
        let page = backend.read_after(&stream, cursor, 50).await.unwrap();
        for event in page {
            assert!(event.id > cursor, "ids go forward");
            cursor = event.id;
            seen.push(event.id);
        }
        tokio::task::yield_now().await;
    }
    let mut published = Vec::new();
    for publisher in publishers {
        published.extend(publisher.await.unwrap());
    }
    published.sort_unstable();
    assert_eq!(
        seen, published,
        "every event once, in id order, none skipped"
    );
}
