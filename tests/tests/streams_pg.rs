//! Streams on real Postgres: gap-free replay while publishing, concurrent publishers with
//! late commits, the listener's reconnect, and pool hygiene of the dispatcher.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use pgbus_core::{Horizon, Result, StreamEvent, StreamName, StreamStore};
use pgbus_pg::{connect, PgBackend, PgStreamListener};
use pgbus_stream::parse::SseParser;
use pgbus_stream::{Config, EventStream, Instance, IterationHook, Start};
use pgbus_tests::{connections, eventually, fresh_backend};
use rand::Rng;
use tokio::sync::watch;

const DEADLINE: Duration = Duration::from_secs(60);

fn stream(name: &str) -> StreamName {
    StreamName::new(name).unwrap()
}

fn config() -> Config {
    let mut config = Config::default();
    config.heartbeat = Duration::from_millis(100);
    config.client_retry = None;
    config.retention = None;
    config
}

fn started<S: StreamStore>(
    store: S,
    url: &str,
    config: Config,
    hook: Option<IterationHook>,
) -> Instance<S, PgStreamListener> {
    let listener = PgStreamListener::new(url).unwrap();
    let instance = Instance::with_hook(store, listener, config, hook);
    instance.start().unwrap();
    instance
}

async fn wait_live<S: StreamStore>(instance: &Instance<S, PgStreamListener>) {
    eventually("the stream listener is connected", DEADLINE, || async {
        pgbus_core::StreamListener::is_live(instance.listener())
    })
    .await;
}

/// Reads durable event ids from `events` until the last one is `until()`'s answer.
async fn follow(events: &mut EventStream, mut last: watch::Receiver<Option<i64>>) -> Vec<i64> {
    let mut parser = SseParser::default();
    let mut ids = Vec::new();
    loop {
        if let Some(end) = *last.borrow_and_update() {
            if ids.last() == Some(&end) {
                return ids;
            }
        }
        tokio::select! {
            chunk = events.next() => {
                let chunk = chunk.expect("the stream ended early");
                ids.extend(parser.feed(&chunk).iter().filter_map(|f| f.event_id()));
            }
            _ = last.changed() => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_joining_at_random_moments_get_every_event_after_their_cursor_once() {
    const EVENTS: usize = 5_000;
    const CLIENTS: usize = 50;
    let (backend, url) = fresh_backend(20).await;
    let instance = started(backend.clone(), &url, config(), None);
    wait_live(&instance).await;
    let s = stream("replay");
    let published = Arc::new(Mutex::new(Vec::with_capacity(EVENTS)));
    let (count_tx, count_rx) = watch::channel(0usize);
    let (last_tx, last_rx) = watch::channel(None);
    // Every client registers before the last event is published: one that registered
    // after it (its registration slowed by a loaded machine), starting at the newest event
    // or at the last id, would wait for an event that never comes (seen in CI under load).
    let registered = Arc::new(watch::channel(0usize).0);

    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let join_at = rand::rng().random_range(0..EVENTS);
        let (instance, s, published) = (instance.clone(), s.clone(), published.clone());
        let (mut count, last) = (count_rx.clone(), last_rx.clone());
        let registered = Arc::clone(&registered);
        clients.push(tokio::spawn(async move {
            count.wait_for(|n| *n >= join_at).await.unwrap();
            let start = {
                let seen = published.lock().unwrap();
                let mut rng = rand::rng();
                match rng.random_range(0..10) {
                    0 => Start::Latest,
                    1 => Start::After(0),
                    _ if seen.is_empty() => Start::After(0),
                    _ => Start::After(seen[rng.random_range(0..seen.len())]),
                }
            };
            let mut events = instance.register(s, start).await.unwrap();
            registered.send_modify(|n| *n += 1);
            (start, follow(&mut events, last).await)
        }));
    }
    for n in 0..EVENTS {
        if n == EVENTS - 1 {
            let mut all_registered = registered.subscribe();
            tokio::time::timeout(DEADLINE, all_registered.wait_for(|n| *n == CLIENTS))
                .await
                .expect("every client registered in time")
                .expect("the count is kept");
        }
        let id = backend.publish(&s, "n", &n.to_string()).await.unwrap();
        published.lock().unwrap().push(id);
        count_tx.send_replace(n + 1);
    }
    let all = published.lock().unwrap().clone();
    last_tx.send_replace(all.last().copied());

    for client in clients {
        let (start, received) = tokio::time::timeout(DEADLINE, client)
            .await
            .expect("client caught up in time")
            .unwrap();
        let expected: Vec<i64> = match start {
            Start::After(cursor) => all.iter().copied().filter(|id| *id > cursor).collect(),
            // From the newest event at connection time: a contiguous tail.
            Start::Latest => {
                let first = all.iter().position(|id| Some(id) == received.first());
                all[first.expect("received a published id")..].to_vec()
            }
        };
        let first_difference = received.iter().zip(&expected).position(|(r, e)| r != e);
        assert!(
            received == expected,
            "client starting {start:?}: received {} events, expected {}, first difference at {first_difference:?}",
            received.len(),
            expected.len()
        );
    }
    instance.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_committed_late_by_concurrent_publishers_are_never_skipped() {
    const PUBLISHERS: usize = 8;
    const EACH: usize = 40;
    let (backend, url) = fresh_backend(20).await;
    let instance = started(backend.clone(), &url, config(), None);
    wait_live(&instance).await;
    let s = stream("concurrent");
    let (last_tx, last_rx) = watch::channel(None);
    let mut followers = Vec::new();
    for _ in 0..4 {
        let mut events = instance.register(s.clone(), Start::Latest).await.unwrap();
        let last = last_rx.clone();
        followers.push(tokio::spawn(async move { follow(&mut events, last).await }));
    }
    let mut publishers = Vec::new();
    for p in 0..PUBLISHERS {
        let (backend, url, s) = (backend.clone(), url.clone(), s.clone());
        publishers.push(tokio::spawn(async move {
            let mut client = connect(&url, "publisher").await.unwrap();
            let mut ids = Vec::new();
            for n in 0..EACH {
                let tx = client.transaction().await.unwrap();
                ids.push(
                    backend
                        .publish_in(&tx, &s, "n", &format!("{p}:{n}"))
                        .await
                        .unwrap(),
                );
                // Commit after a random delay: a reader may look meanwhile.
                let delay = rand::rng().random_range(0..8);
                tokio::time::sleep(Duration::from_millis(delay)).await;
                tx.commit().await.unwrap();
            }
            ids
        }));
    }
    let mut all = Vec::new();
    for publisher in publishers {
        all.extend(publisher.await.unwrap());
    }
    all.sort_unstable();
    last_tx.send_replace(all.last().copied());
    for follower in followers {
        let received = tokio::time::timeout(DEADLINE, follower)
            .await
            .expect("follower caught up")
            .unwrap();
        assert_eq!(received, all, "every committed event, once, in id order");
    }
    instance.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn followers_get_what_was_published_while_the_listener_reconnected() {
    let (backend, url) = fresh_backend(10).await;
    let instance = started(backend.clone(), &url, config(), None);
    wait_live(&instance).await;
    let s = stream("reconnect");
    let mut events = instance.register(s.clone(), Start::Latest).await.unwrap();
    let (last_tx, last_rx) = watch::channel(None);
    let follower = tokio::spawn(async move { follow(&mut events, last_rx).await });
    let mut ids = Vec::new();
    for n in 0..10 {
        ids.push(backend.publish(&s, "n", &n.to_string()).await.unwrap());
    }
    let killer = connect(&url, "observer").await.unwrap();
    let killed: i64 = killer
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = current_database() AND application_name = 'pgbus:stream'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(killed, 1, "one stream listener connection");
    for n in 10..20 {
        ids.push(backend.publish(&s, "n", &n.to_string()).await.unwrap());
    }
    last_tx.send_replace(ids.last().copied());
    let received = tokio::time::timeout(DEADLINE, follower)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(received, ids);
    eventually("the listener reconnected", DEADLINE, || async {
        instance.listener().connections_made() >= 2
    })
    .await;
    assert_eq!(connections(&url, "stream").await, 1);
    instance.shutdown().await;
    assert_eq!(connections(&url, "stream").await, 0, "shutdown closes it");
}

/// A store whose every third read fails after it used (and returned) a pooled connection.
#[derive(Clone)]
struct Flaky {
    inner: PgBackend,
    reads: Arc<AtomicUsize>,
}

impl StreamStore for Flaky {
    async fn publish(&self, stream: &StreamName, event: &str, data: &str) -> Result<i64> {
        self.inner.publish(stream, event, data).await
    }
    async fn broadcast(&self, stream: &StreamName, event: &str, data: &str) -> Result<Option<i64>> {
        self.inner.broadcast(stream, event, data).await
    }
    async fn read_after(
        &self,
        stream: &StreamName,
        after: i64,
        limit: usize,
    ) -> Result<Vec<StreamEvent>> {
        let events = self.inner.read_after(stream, after, limit).await?;
        if self.reads.fetch_add(1, Ordering::SeqCst) % 3 == 2 {
            return Err(pgbus_core::Error::InvalidArgument(
                "injected read failure".into(),
            ));
        }
        Ok(events)
    }
    async fn latest(&self, stream: &StreamName) -> Result<i64> {
        self.inner.latest(stream).await
    }
    async fn horizon(&self, stream: &StreamName, cursor: i64) -> Result<Horizon> {
        self.inner.horizon(stream, cursor).await
    }
    async fn prune(&self, retention: Duration, batch: usize) -> Result<u64> {
        self.inner.prune(retention, batch).await
    }
}

/// An iteration hook counting the dispatcher iterations after which `pool` still had a
/// connection checked out.
fn pool_watch(pool: &PgBackend) -> (IterationHook, Arc<AtomicUsize>) {
    let violations = Arc::new(AtomicUsize::new(0));
    let hook: IterationHook = {
        let (pool, violations) = (pool.clone(), violations.clone());
        Arc::new(move || {
            if pool.pool_in_use() != 0 {
                violations.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    (hook, violations)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_dispatcher_holds_no_pooled_connection_between_iterations() {
    let (publisher, url) = fresh_backend(4).await;
    // The dispatcher's store has a pool of its own, so only its use is counted.
    let dispatcher_pool = PgBackend::builder(&url).max_connections(4).build().unwrap();
    let store = Flaky {
        inner: dispatcher_pool.clone(),
        reads: Arc::default(),
    };
    let (hook, violations) = pool_watch(&dispatcher_pool);
    let instance = started(store.clone(), &url, config(), Some(hook));
    wait_live(&instance).await;
    let s = stream("hygiene");
    let (last_tx, last_rx) = watch::channel(None);
    let mut followers = Vec::new();
    for _ in 0..3 {
        // Connecting may hit an injected failure too: the client would retry.
        let mut events = loop {
            if let Ok(events) = instance.register(s.clone(), Start::After(0)).await {
                break events;
            }
        };
        let last = last_rx.clone();
        followers.push(tokio::spawn(async move { follow(&mut events, last).await }));
    }
    let mut ids = Vec::new();
    for n in 0..200 {
        ids.push(publisher.publish(&s, "n", &n.to_string()).await.unwrap());
    }
    last_tx.send_replace(ids.last().copied());
    for follower in followers {
        let received = tokio::time::timeout(DEADLINE, follower)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(received, ids, "injected failures lose nothing");
    }
    let stats = instance.stats();
    assert!(stats.store_errors > 0, "failures were injected: {stats:?}");
    // Three connects, then reads of new events (a burst of commits costs a few reads,
    // not one each, so there are not many more).
    assert!(
        stats.iterations > 3,
        "the hook checked iterations that read events: {stats:?}"
    );
    assert_eq!(
        violations.load(Ordering::SeqCst),
        0,
        "a pooled connection was held after an iteration"
    );
    instance.shutdown().await;
}

/// A read that fails inside Postgres while it holds a pooled connection (cancelled while
/// waiting for a lock) gives the connection back before the dispatcher's next iteration.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_read_failing_while_it_holds_a_connection_gives_it_back() {
    let (publisher, url) = fresh_backend(4).await;
    let dispatcher_pool = PgBackend::builder(&url)
        .role("dispatcher")
        .max_connections(4)
        .build()
        .unwrap();
    let (hook, violations) = pool_watch(&dispatcher_pool);
    let instance = started(dispatcher_pool.clone(), &url, config(), Some(hook));
    wait_live(&instance).await;
    let s = stream("cancelled");
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(publisher.publish(&s, "n", &n.to_string()).await.unwrap());
    }

    // The replay read of a new connection waits for this lock; cancel it there.
    let admin = connect(&url, "admin").await.unwrap();
    admin
        .batch_execute("BEGIN; LOCK TABLE pgbus.stream_events IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let connecting = {
        let (instance, s) = (instance.clone(), s.clone());
        tokio::spawn(async move { instance.register(s, Start::After(0)).await.is_ok() })
    };
    // Observed from another session: pg_stat_activity is a snapshot per transaction.
    let observer = connect(&url, "observer").await.unwrap();
    eventually("the replay read waits for the lock", DEADLINE, || async {
        observer
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE application_name = 'pgbus:dispatcher' AND wait_event_type = 'Lock'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
            == 1
    })
    .await;
    let cancelled: bool = observer
        .query_one(
            "SELECT pg_cancel_backend(pid) FROM pg_stat_activity
             WHERE application_name = 'pgbus:dispatcher' AND wait_event_type = 'Lock'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(cancelled);
    let registered = tokio::time::timeout(DEADLINE, connecting)
        .await
        .unwrap()
        .unwrap();
    assert!(!registered, "the failed replay refused the connection");
    admin.batch_execute("ROLLBACK").await.unwrap();
    assert!(instance.stats().store_errors >= 1, "{:?}", instance.stats());
    assert_eq!(dispatcher_pool.pool_in_use(), 0);
    assert_eq!(
        violations.load(Ordering::SeqCst),
        0,
        "a pooled connection was held after the failed iteration"
    );

    // The client retries and gets everything.
    let mut events = instance.register(s.clone(), Start::After(0)).await.unwrap();
    let (_last_tx, last_rx) = watch::channel(ids.last().copied());
    let received = tokio::time::timeout(DEADLINE, follow(&mut events, last_rx))
        .await
        .unwrap();
    assert_eq!(received, ids);
    instance.shutdown().await;
}
