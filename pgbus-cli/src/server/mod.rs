//! The HTTP server of `pgbus serve` and `pgbus demo`: the dashboard at `/`, the console at
//! `/console`, the JSON API under `/api`, SSE streams at `/streams/...`, Prometheus text at `/metrics`, `/livez` and `/readyz`.
//!
//! One background task reads a snapshot of the system every `--refresh`; the dashboard,
//! its live updates and `/metrics` are served from that snapshot, so the database load
//! does not grow with the number of browsers or scrapers, and no pooled connection is
//! held by a waiting client.
//!
//! Connections are taken by `connections.rs`: a header timeout, a cap sized from the
//! open-files limit, graceful shutdown.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use pgbus_pg::PgBackend;
use tokio_util::sync::CancellationToken;

#[cfg(feature = "dashboard")]
mod api;
mod app;
mod auth;
mod connections;
#[cfg(feature = "dashboard")]
mod error;
#[cfg(feature = "dashboard")]
mod jobs;
mod metrics;
#[cfg(feature = "dashboard")]
mod pages;
#[cfg(feature = "metrics")]
pub(crate) mod scrape;
mod snapshot;

use app::{App, Readiness};
use connections::Capacity;
use snapshot::Snapshots;

/// A running server: where it listens and how to wait for it.
pub(crate) struct Server {
    pub(crate) addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    /// The address to print for people: `http://127.0.0.1:8080/`.
    pub(crate) fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// Waits until the server has stopped (after `stop` was cancelled).
    pub(crate) async fn wait(self) -> anyhow::Result<()> {
        self.task.await.context("the HTTP server")
    }
}

/// Starts serving on `listener` until `stop` is cancelled. With the `stream` feature it
/// also starts a streamer instance, shut down (every client told) before the server ends;
/// its LISTEN connection goes to `session_url` (see `Database::session_url`).
pub(crate) async fn start(
    session_url: Option<&str>,
    backend: PgBackend,
    listener: tokio::net::TcpListener,
    token: Option<String>,
    refresh: Duration,
    stop: CancellationToken,
) -> anyhow::Result<Server> {
    let addr = listener.local_addr()?;
    let token = auth::listen_token(addr, token, "--token or PGBUS_TOKEN")?;

    let capacity = Capacity::for_this_process(crate::support::database::POOL_SIZE);
    let open_files = capacity
        .open_files
        .map_or_else(|| "unlimited".to_owned(), |limit| limit.to_string());
    #[cfg(feature = "stream")]
    let stream_config = {
        let mut config = pgbus_stream::Config::default();
        config.max_connections = config.max_connections.min(capacity.streams());
        tracing::info!(
            target: "pgbus::serve",
            "serving at most {} connections at once, {} of them event streams \
             (open-files limit {open_files})",
            capacity.connections,
            config.max_connections,
        );
        config
    };
    #[cfg(not(feature = "stream"))]
    tracing::info!(
        target: "pgbus::serve",
        "serving at most {} connections at once (open-files limit {open_files})",
        capacity.connections,
    );
    #[cfg(feature = "stream")]
    let streams = {
        let Some(url) = session_url else {
            anyhow::bail!(
                "streams need LISTEN, which a transaction-mode pooler does not carry: \
                 give --listen-url a direct URL to PostgreSQL"
            );
        };
        let instance = pgbus_stream::Instance::new(
            backend.clone(),
            pgbus_pg::PgStreamListener::new(url)?,
            stream_config.clone(),
        );
        instance.start()?;
        wait_for_stream_listener(instance.listener()).await;
        instance
    };
    #[cfg(not(feature = "stream"))]
    let _ = session_url;

    let snapshots = Snapshots::start(
        backend.clone(),
        refresh,
        #[cfg(feature = "stream")]
        streams.clone(),
        stop.clone(),
    );
    let app = App {
        backend,
        snapshots,
        readiness: Readiness::default(),
        stop: stop.clone(),
    };

    // Everything added before the token layer is behind it.
    let mut router = Router::new().route("/metrics", get(metrics::metrics));
    #[cfg(feature = "dashboard")]
    {
        router = router
            .merge(pages::routes())
            .merge(api::routes())
            .merge(jobs::routes());
    }
    if let Some(token) = &token {
        router = router.layer(axum::middleware::from_fn_with_state(
            token.clone(),
            auth::require,
        ));
    }
    router = router
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz));
    #[cfg(feature = "stream")]
    {
        let endpoint = pgbus_stream::http::Streams::new(
            streams.clone(),
            crate::support::stream_secret::signer()?,
        );
        router = router.merge(endpoint.router());
    }
    if token.is_none() {
        router = router.layer(axum::middleware::from_fn(auth::loopback_host));
    }
    let router = router
        .layer(axum::middleware::from_fn(response_headers))
        .with_state(app);

    let task = tokio::spawn(async move {
        let shutdown = {
            let stop = stop.clone();
            #[cfg(feature = "stream")]
            let streams = streams.clone();
            async move {
                stop.cancelled().await;
                // Every SSE client gets `event: shutdown` and its response ends, so the
                // graceful shutdown below does not wait for them.
                #[cfg(feature = "stream")]
                streams.shutdown().await;
            }
        };
        // A client that stops reading an event stream is cut off after the write deadline.
        #[cfg(feature = "stream")]
        let listener =
            pgbus_stream::http::WriteDeadline::new(listener, stream_config.write_deadline);
        connections::serve(listener, router, capacity.connections, shutdown).await;
    });
    Ok(Server { addr, task })
}

/// How long one `/readyz` answer is reused: a flood of probes costs at most one check
/// (one short-lived connection) per second, and takes nothing from the pool the stream
/// dispatcher reads with.
const READY_CACHED_FOR: Duration = Duration::from_secs(1);

/// `/readyz`: the database answers and its schema is current. The body says only ready or
/// not (it is unauthenticated); why not is in the server's log.
async fn readyz(State(app): State<App>) -> Response {
    let mut last = app.readiness.0.lock().await;
    let ready = match *last {
        Some((at, ready)) if at.elapsed() < READY_CACHED_FOR => ready,
        _ => {
            let checked =
                tokio::time::timeout(Duration::from_secs(2), app.backend.check_schema()).await;
            let ready = match checked {
                Ok(Ok(())) => true,
                Ok(Err(err)) => {
                    tracing::warn!(target: "pgbus::serve", error = %err.report(), "readiness check failed");
                    false
                }
                Err(_) => {
                    tracing::warn!(target: "pgbus::serve", "readiness check failed: the database did not answer within 2 s");
                    false
                }
            };
            *last = Some((Instant::now(), ready));
            ready
        }
    };
    if ready {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

/// Nothing pgbus serves may be cached by a browser or proxy, sniffed as another type, or
/// framed by another site (which could trick clicks on "discard all").
async fn response_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CACHE_CONTROL, "no-store"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::CONTENT_SECURITY_POLICY, "frame-ancestors 'none'"),
    ] {
        headers
            .entry(name)
            .or_insert(header::HeaderValue::from_static(value));
    }
    response
}

/// How long `serve` waits at start for its stream listener to connect before serving anyway.
#[cfg(feature = "stream")]
const STREAM_LISTENER_START: Duration = Duration::from_secs(5);

/// Waits (at most [`STREAM_LISTENER_START`]) until the stream listener is connected, so a
/// browser's first `EventSource` request is not refused with 503 (which an `EventSource`
/// does not retry) for the few milliseconds the LISTEN connection takes to open. A
/// database that is down does not hold the server back: it serves, `/readyz` says not
/// ready, and stream requests get 503 with `Retry-After` until the listener reconnects.
#[cfg(feature = "stream")]
async fn wait_for_stream_listener(listener: &impl pgbus_core::StreamListener) {
    let deadline = tokio::time::Instant::now() + STREAM_LISTENER_START;
    while !listener.is_live() {
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(target: "pgbus::serve", "the stream listener is not connected yet: serving anyway");
            return;
        }
        // The listener has no connected signal to await; its connect takes milliseconds.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// For `demo`: binds `addr`, or any free port on loopback if it is taken.
pub(crate) async fn bind_or_any(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    match tokio::net::TcpListener::bind(addr).await {
        Ok(listener) => Ok(listener),
        Err(_) => tokio::net::TcpListener::bind((addr.ip(), 0))
            .await
            .with_context(|| format!("listening on {}", addr.ip())),
    }
}

/// Parses a listen address: `IP:PORT` (`[::1]:PORT` for IPv6), or `localhost:PORT` for
/// 127.0.0.1.
pub(crate) fn listen_addr(text: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    if let Some(Ok(port)) = text.strip_prefix("localhost:").map(str::parse::<u16>) {
        return Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    }
    Err(
        "expected IP:PORT or localhost:PORT, e.g. 127.0.0.1:8080 (0.0.0.0:8080: every \
         interface)"
            .into(),
    )
}
