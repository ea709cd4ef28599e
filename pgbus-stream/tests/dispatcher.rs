//! The dispatcher against the in-memory backend: replay, live delivery, lagging and slow
//! clients, broadcasts, limits and shutdown.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use pgbus_core::{
    Horizon, MemoryBackend, MemoryStreamListener, Result, StreamEvent, StreamName, StreamStore,
};
use pgbus_stream::parse::{SseFrame, SseParser};
use pgbus_stream::{Config, EventStream, Instance, RegisterError, Start};

const DEADLINE: Duration = Duration::from_secs(10);

fn stream(name: &str) -> StreamName {
    StreamName::new(name).unwrap()
}

fn config() -> Config {
    let mut config = Config::default();
    config.client_retry = None;
    config.heartbeat = Duration::from_millis(20);
    config
}

fn instance(config: Config) -> (MemoryBackend, Instance<MemoryBackend, MemoryStreamListener>) {
    let backend = MemoryBackend::new();
    let instance = Instance::new(backend.clone(), backend.stream_listener(), config);
    instance.start().unwrap();
    (backend, instance)
}

/// Reads the next event frame (skipping comments), or `None` at the end.
async fn next_frame(events: &mut EventStream) -> Option<SseFrame> {
    let mut parser = SseParser::default();
    loop {
        let bytes = tokio::time::timeout(DEADLINE, events.next())
            .await
            .expect("a frame in time")?;
        // The dispatcher queues whole frames, one per chunk.
        if let Some(frame) = parser.feed(&bytes).pop() {
            return Some(frame);
        }
    }
}

async fn ids(events: &mut EventStream, n: usize) -> Vec<i64> {
    let mut ids = Vec::new();
    while ids.len() < n {
        let frame = next_frame(events).await.expect("stream ended early");
        ids.push(frame.event_id().expect("durable events carry ids"));
    }
    ids
}

#[tokio::test]
async fn replays_after_the_cursor_then_delivers_live() {
    let (backend, instance) = instance(config());
    let s = stream("orders");
    let mut published = Vec::new();
    for n in 0..5 {
        published.push(
            backend
                .publish(&s, "created", &format!("{n}"))
                .await
                .unwrap(),
        );
    }
    let mut from_two = instance
        .register(s.clone(), Start::After(published[1]))
        .await
        .unwrap();
    let mut latest = instance.register(s.clone(), Start::Latest).await.unwrap();
    for n in 5..8 {
        published.push(
            backend
                .publish(&s, "created", &format!("{n}"))
                .await
                .unwrap(),
        );
    }
    assert_eq!(ids(&mut from_two, 6).await, &published[2..]);
    assert_eq!(ids(&mut latest, 3).await, &published[5..]);
}

#[tokio::test]
async fn a_pruned_cursor_gets_gap_detected_first() {
    let (backend, instance) = instance(config());
    let s = stream("pruned");
    let first = backend.publish(&s, "e", "old").await.unwrap();
    backend.prune(Duration::ZERO, 10).await.unwrap();
    let kept = backend.publish(&s, "e", "new").await.unwrap();
    let mut events = instance.register(s, Start::After(first - 1)).await.unwrap();
    let gap = next_frame(&mut events).await.unwrap();
    assert_eq!((gap.id, gap.event.as_deref()), (None, Some("gap-detected")));
    assert_eq!(ids(&mut events, 1).await, vec![kept]);
}

#[tokio::test]
async fn broadcasts_reach_connected_clients_without_an_id() {
    let (backend, instance) = instance(config());
    let s = stream("live");
    let mut events = instance.register(s.clone(), Start::Latest).await.unwrap();
    assert_eq!(
        backend.broadcast(&s, "tick", "line1\nline2").await.unwrap(),
        None
    );
    let frame = next_frame(&mut events).await.unwrap();
    assert_eq!(
        frame,
        SseFrame {
            id: None,
            event: Some("tick".to_owned()),
            data: "line1\nline2".to_owned()
        }
    );
}

#[tokio::test]
async fn a_lagging_client_catches_up_in_order() {
    let mut config = config();
    config.queue_capacity = 4;
    config.read_batch = 7;
    let (backend, instance) = instance(config);
    let s = stream("burst");
    let mut events = instance.register(s.clone(), Start::Latest).await.unwrap();
    let mut published = Vec::new();
    for n in 0..100 {
        published.push(backend.publish(&s, "e", &n.to_string()).await.unwrap());
    }
    assert_eq!(ids(&mut events, 100).await, published);
}

#[tokio::test]
async fn a_client_that_stops_reading_is_dropped_and_others_keep_receiving() {
    let mut config = config();
    config.queue_capacity = 4;
    config.write_deadline = Duration::from_millis(100);
    let (backend, instance) = instance(config);
    let s = stream("fanout");
    let mut stalled = instance.register(s.clone(), Start::Latest).await.unwrap();
    let mut reader = instance.register(s.clone(), Start::Latest).await.unwrap();
    let mut published = Vec::new();
    let mut received = Vec::new();
    for n in 0..50 {
        published.push(backend.publish(&s, "e", &n.to_string()).await.unwrap());
        received.extend(ids(&mut reader, 1).await);
    }
    assert_eq!(received, published);
    let start = tokio::time::Instant::now();
    while instance.stats().dropped_slow == 0 {
        assert!(
            start.elapsed() < DEADLINE,
            "the stalled client was never dropped"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // What was queued before the drop is still readable, then the stream ends.
    let mut queued = 0;
    while let Some(frame) = next_frame(&mut stalled).await {
        assert_eq!(frame.event_id(), Some(published[queued]));
        queued += 1;
    }
    assert!(queued <= 4, "no more than its queue held: {queued}");
    assert_eq!(instance.stats().connections, 1);
}

#[tokio::test]
async fn connections_beyond_the_limit_are_refused() {
    let mut config = config();
    config.max_connections = 2;
    let (_backend, instance) = instance(config);
    let s = stream("limited");
    let first = instance.register(s.clone(), Start::Latest).await.unwrap();
    let _second = instance.register(s.clone(), Start::Latest).await.unwrap();
    assert!(matches!(
        instance.register(s.clone(), Start::Latest).await,
        Err(RegisterError::Full(2))
    ));
    drop(first);
    instance
        .register(s, Start::Latest)
        .await
        .expect("a place was freed");
}

#[tokio::test]
async fn shutdown_sends_every_client_the_sentinel_and_closes() {
    let (_backend, instance) = instance(config());
    let s = stream("bye");
    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(instance.register(s.clone(), Start::Latest).await.unwrap());
    }
    instance.shutdown().await;
    for client in &mut clients {
        let last = next_frame(client).await.expect("the shutdown event");
        assert_eq!((last.id, last.event.as_deref()), (None, Some("shutdown")));
        assert!(next_frame(client).await.is_none(), "closed after it");
    }
    let mut late = instance.register(s, Start::Latest).await.unwrap();
    let frame = next_frame(&mut late).await.expect("the shutdown event");
    assert_eq!(frame.event.as_deref(), Some("shutdown"));
    assert!(next_frame(&mut late).await.is_none());
}

#[tokio::test]
async fn the_last_client_of_a_stream_unlistens() {
    let backend = MemoryBackend::new();
    let listener = backend.stream_listener();
    let instance = Instance::new(backend.clone(), listener.clone(), config());
    instance.start().unwrap();
    let (a, b) = (stream("a"), stream("b"));
    let first = instance.register(a.clone(), Start::Latest).await.unwrap();
    let second = instance.register(a.clone(), Start::Latest).await.unwrap();
    let other = instance.register(b.clone(), Start::Latest).await.unwrap();
    assert_eq!(listener.listening(), vec![a.clone(), b.clone()]);
    assert_eq!(
        instance.census().await,
        vec![(a.clone(), 2), (b.clone(), 1)]
    );
    drop(first);
    drop(other);
    let start = tokio::time::Instant::now();
    while listener.listening() != vec![a.clone()] {
        assert!(
            start.elapsed() < DEADLINE,
            "still {:?}",
            listener.listening()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    drop(second);
}

/// The memory store, counting reads, whose reads wait while the test holds the gate: the
/// dispatcher is busy for as long as the test wants.
#[derive(Clone)]
struct Gated {
    backend: MemoryBackend,
    reads: Arc<AtomicUsize>,
    gate: Arc<tokio::sync::Mutex<()>>,
}

impl StreamStore for Gated {
    async fn publish(&self, stream: &StreamName, event: &str, data: &str) -> Result<i64> {
        self.backend.publish(stream, event, data).await
    }

    async fn broadcast(&self, stream: &StreamName, event: &str, data: &str) -> Result<Option<i64>> {
        self.backend.broadcast(stream, event, data).await
    }

    async fn read_after(
        &self,
        stream: &StreamName,
        after: i64,
        limit: usize,
    ) -> Result<Vec<StreamEvent>> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        drop(self.gate.lock().await);
        self.backend.read_after(stream, after, limit).await
    }

    async fn latest(&self, stream: &StreamName) -> Result<i64> {
        self.backend.latest(stream).await
    }

    async fn horizon(&self, stream: &StreamName, cursor: i64) -> Result<Horizon> {
        self.backend.horizon(stream, cursor).await
    }

    async fn prune(&self, retention: Duration, batch: usize) -> Result<u64> {
        self.backend.prune(retention, batch).await
    }
}

fn gated(config: Config) -> (Gated, Instance<Gated, MemoryStreamListener>) {
    let backend = MemoryBackend::new();
    let store = Gated {
        backend: backend.clone(),
        reads: Arc::default(),
        gate: Arc::default(),
    };
    let instance = Instance::new(store.clone(), backend.stream_listener(), config);
    instance.start().unwrap();
    (store, instance)
}

/// Waits until the dispatcher is inside a read (which waits for the gate).
async fn reading(store: &Gated, reads_before: usize) {
    let start = tokio::time::Instant::now();
    while store.reads.load(Ordering::SeqCst) == reads_before {
        assert!(start.elapsed() < DEADLINE, "the dispatcher never read");
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_signalled_during_a_read_cost_one_more_read_not_one_each() {
    const EVENTS: usize = 1_000;
    let mut config = config();
    config.queue_capacity = 2 * EVENTS;
    let (store, instance) = gated(config);
    let s = stream("busy");
    let mut events = instance.register(s.clone(), Start::Latest).await.unwrap();
    let gate = store.gate.lock().await;
    let before = store.reads.load(Ordering::SeqCst);
    let mut published = vec![store.publish(&s, "e", "0").await.unwrap()];
    reading(&store, before).await;
    for n in 1..EVENTS {
        published.push(store.publish(&s, "e", &n.to_string()).await.unwrap());
    }
    drop(gate);
    assert_eq!(ids(&mut events, EVENTS).await, published);
    // The read under way, the one signal that waited (batches of 500: three statements
    // each at most), and none per commit.
    let reads = store.reads.load(Ordering::SeqCst) - before;
    assert!(reads <= 6, "{reads} reads for {EVENTS} commits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broadcasts_beyond_the_mailbox_bound_are_dropped_and_counted() {
    const BROADCASTS: usize = 100;
    const BOUND: usize = 10;
    let mut config = config();
    config.max_queued_broadcasts = BOUND;
    config.queue_capacity = 2 * BROADCASTS;
    let (store, instance) = gated(config);
    let s = stream("chatty");
    let mut events = instance.register(s.clone(), Start::Latest).await.unwrap();
    let gate = store.gate.lock().await;
    let before = store.reads.load(Ordering::SeqCst);
    let durable = store.publish(&s, "durable", "0").await.unwrap();
    reading(&store, before).await;
    for n in 0..BROADCASTS {
        assert_eq!(
            store.broadcast(&s, "tick", &n.to_string()).await.unwrap(),
            None
        );
    }
    assert_eq!(
        instance.stats().dropped_broadcasts,
        (BROADCASTS - BOUND) as u64
    );
    drop(gate);
    assert_eq!(
        next_frame(&mut events).await.unwrap().event_id(),
        Some(durable)
    );
    for n in 0..BOUND {
        let frame = next_frame(&mut events).await.unwrap();
        assert_eq!((frame.event_id(), frame.data), (None, n.to_string()));
    }
}
