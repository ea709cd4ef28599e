//! The SSE endpoint over real HTTP (axum on a loopback port), with the in-memory backend.

use std::sync::Arc;
use std::time::Duration;

use pgbus_core::{MemoryBackend, MemoryStreamListener, StreamName, StreamStore};
use pgbus_stream::http::{Streams, WriteDeadline};
use pgbus_stream::parse::{SseFrame, SseParser};
use pgbus_stream::{Config, Instance, Signer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DEADLINE: Duration = Duration::from_secs(20);

struct Server {
    backend: MemoryBackend,
    instance: Instance<MemoryBackend, MemoryStreamListener>,
    signer: Signer,
    base: String,
    addr: std::net::SocketAddr,
}

fn stream(name: &str) -> StreamName {
    StreamName::new(name).unwrap()
}

async fn serve(config: Config) -> Server {
    let backend = MemoryBackend::new();
    let write_deadline = config.write_deadline;
    let instance = Instance::new(backend.clone(), backend.stream_listener(), config);
    instance.start().unwrap();
    let signer = Signer::new("the secret used by these tests").unwrap();
    let app = Streams::new(instance.clone(), signer.clone())
        .authorize(Arc::new(|_, headers| !headers.contains_key("x-deny")))
        .router();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let listener = WriteDeadline::new(tcp, write_deadline);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Server {
        backend,
        instance,
        signer,
        base: format!("http://{addr}"),
        addr,
    }
}

fn config() -> Config {
    let mut config = Config::default();
    config.heartbeat = Duration::from_millis(50);
    config.client_retry = None;
    config
}

/// Reads frames from a response until `n` event frames (comments skipped) arrived, or the
/// body ended.
async fn frames(response: &mut reqwest::Response, n: usize) -> Vec<SseFrame> {
    let mut parser = SseParser::default();
    let mut frames = Vec::new();
    while frames.len() < n {
        let chunk = tokio::time::timeout(DEADLINE, response.chunk())
            .await
            .expect("a chunk in time")
            .unwrap();
        let Some(chunk) = chunk else { break };
        frames.extend(parser.feed(&chunk));
    }
    frames
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_refusal_has_its_status() {
    let server = serve(config()).await;
    let s = stream("orders");
    let http = reqwest::Client::new();
    let url = format!("{}{}", server.base, server.signer.url_path(&s));
    let get = |url: String| http.get(url);

    let tampered = url.replace("/orders.", "/orderz.");
    assert_eq!(get(tampered).send().await.unwrap().status(), 404);
    let unsigned = format!("{}/streams/orders", server.base);
    assert_eq!(get(unsigned).send().await.unwrap().status(), 404);
    let denied = get(url.clone()).header("x-deny", "1").send().await.unwrap();
    assert_eq!(denied.status(), 403);
    let bad_header = get(url.clone())
        .header("last-event-id", "12x")
        .send()
        .await
        .unwrap();
    assert_eq!(bad_header.status(), 400);
    let bad_since = get(format!("{url}?since=-4")).send().await.unwrap();
    assert_eq!(bad_since.status(), 400);
    assert!(bad_since.text().await.unwrap().contains("invalid cursor"));

    let ok = get(url.clone()).send().await.unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.headers()["content-type"], "text/event-stream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_connection_limit_is_503_with_retry_after() {
    let mut config = config();
    config.max_connections = 1;
    let server = serve(config).await;
    let url = format!("{}{}", server.base, server.signer.url_path(&stream("busy")));
    let first = reqwest::get(&url).await.unwrap();
    assert_eq!(first.status(), 200);
    let second = reqwest::get(&url).await.unwrap();
    assert_eq!(second.status(), 503);
    assert!(second.headers().contains_key("retry-after"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_event_id_wins_over_since() {
    let server = serve(config()).await;
    let s = stream("resume");
    let mut ids = Vec::new();
    for n in 0..5 {
        ids.push(
            server
                .backend
                .publish(&s, "e", &n.to_string())
                .await
                .unwrap(),
        );
    }
    let url = format!(
        "{}{}?since={}",
        server.base,
        server.signer.url_path(&s),
        ids[0]
    );
    let mut response = reqwest::Client::new()
        .get(&url)
        .header("last-event-id", ids[2].to_string())
        .send()
        .await
        .unwrap();
    let got: Vec<_> = frames(&mut response, 2)
        .await
        .iter()
        .map(|f| f.event_id())
        .collect();
    assert_eq!(got, vec![Some(ids[3]), Some(ids[4])]);

    let mut since_only = reqwest::get(&url).await.unwrap();
    let first = frames(&mut since_only, 1).await;
    assert_eq!(first[0].event_id(), Some(ids[1]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_sends_the_sentinel_without_an_id_and_ends_the_response() {
    let server = serve(config()).await;
    let s = stream("closing");
    let url = format!("{}{}", server.base, server.signer.url_path(&s));
    let mut response = reqwest::get(&url).await.unwrap();
    server.backend.publish(&s, "e", "before").await.unwrap();
    assert_eq!(frames(&mut response, 1).await.len(), 1);
    server.instance.shutdown().await;
    let rest = frames(&mut response, usize::MAX).await;
    let last = rest.last().expect("the shutdown event");
    assert_eq!(
        (last.id.as_deref(), last.event.as_deref()),
        (None, Some("shutdown"))
    );

    // A connection arriving after shutdown began gets the sentinel and is closed.
    let mut late = reqwest::get(&url).await.unwrap();
    let frames = frames(&mut late, usize::MAX).await;
    assert_eq!(frames.len(), 1);
    assert_eq!(frames[0].event.as_deref(), Some("shutdown"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_dropped_while_others_keep_receiving() {
    let mut config = config();
    config.queue_capacity = 8;
    config.write_deadline = Duration::from_millis(300);
    config.max_connections = 2;
    let server = serve(config).await;
    let s = stream("big");
    let path = server.signer.url_path(&s);

    // A raw client that sends its request and then never reads.
    let mut stalled = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    stalled
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let mut reader = reqwest::get(format!("{}{path}", server.base))
        .await
        .unwrap();
    let start = tokio::time::Instant::now();
    while server.instance.stats().connections < 2 {
        assert!(start.elapsed() < DEADLINE, "both connected");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // 64 KiB events fill the stalled client's socket buffers and then its queue. Whichever
    // deadline fires first drops it: its full queue's (the dispatcher) or its blocked
    // write's (the listener, which closes the connection).
    let payload = "x".repeat(64 * 1024);
    let mut published = Vec::new();
    let mut received = Vec::new();
    while server.instance.stats().connections == 2 {
        assert!(
            start.elapsed() < DEADLINE,
            "the stalled client was never dropped"
        );
        published.push(server.backend.publish(&s, "e", &payload).await.unwrap());
        received.extend(
            frames(&mut reader, 1)
                .await
                .iter()
                .map(|f| f.event_id().unwrap()),
        );
    }
    for _ in 0..3 {
        published.push(server.backend.publish(&s, "e", "after").await.unwrap());
    }
    while received.len() < published.len() {
        received.extend(
            frames(&mut reader, 1)
                .await
                .iter()
                .map(|f| f.event_id().unwrap()),
        );
    }
    assert_eq!(
        received, published,
        "the reading client got everything, in order"
    );
    assert_eq!(server.instance.stats().connections, 1);
    // The server gave up writing to the stalled socket and closed it, so its place in the
    // connection limit (2) is free again although the client never read.
    loop {
        let third = reqwest::get(format!("{}{path}", server.base))
            .await
            .unwrap();
        if third.status() == reqwest::StatusCode::OK {
            break;
        }
        assert_eq!(third.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            start.elapsed() < DEADLINE,
            "the stalled connection kept its place in the limit"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut sink = Vec::new();
    // The stalled socket drains what was queued, then the response ends.
    let drained = tokio::time::timeout(DEADLINE, stalled.read_to_end(&mut sink)).await;
    assert!(drained.is_ok(), "the dropped client's response ended");
}
