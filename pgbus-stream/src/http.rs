//! The SSE endpoint: `GET /streams/{signed_name}`.
//!
//! Status codes: 404 for a name that is not signed by this server, 403 for an expired
//! one and when the authorization hook refuses, 400 for a malformed cursor, 503 with `Retry-After` beyond
//! the connection limit or while the listener is down. The cursor is `Last-Event-ID`
//! (wins) or `?since=`.
//!
//! Serve it on a [`WriteDeadline`] listener: the dispatcher drops a client that stopped
//! reading, but only a deadline on the socket's writes closes that client's connection
//! (and frees its place in the connection limit) while the server is blocked writing to it.
//! The server itself should time out request headers and cap its connections below the
//! process's open-files limit, leaving [`Config::max_connections`](crate::Config) under
//! that cap; `axum::serve` does neither (`pgbus serve` serves hyper's HTTP/1 connections
//! with a header-read timeout, behind a semaphore sized from the limit).

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use futures_util::StreamExt;
use pgbus_core::{StreamListener, StreamName, StreamStore};
use tokio::net::{TcpListener, TcpStream};
use tokio_io_timeout::TimeoutStream;

use crate::cursor::start_from;
use crate::{Instance, SignatureError, Signer};

/// Decides whether a request may follow a stream (after its signature checked out).
pub type Authorize = Arc<dyn Fn(&StreamName, &HeaderMap) -> bool + Send + Sync>;

/// Seconds a refused client is asked to wait before trying again.
const RETRY_AFTER_SECS: &str = "5";

/// What the endpoint needs.
pub struct Streams<S, L> {
    instance: Instance<S, L>,
    signer: Signer,
    authorize: Option<Authorize>,
}

impl<S, L> Clone for Streams<S, L> {
    fn clone(&self) -> Self {
        Self {
            instance: self.instance.clone(),
            signer: self.signer.clone(),
            authorize: self.authorize.clone(),
        }
    }
}

impl<S: StreamStore, L: StreamListener> Streams<S, L> {
    /// Serves `instance`'s streams to clients holding names signed by `signer`.
    pub fn new(instance: Instance<S, L>, signer: Signer) -> Self {
        Self {
            instance,
            signer,
            authorize: None,
        }
    }

    /// Adds an authorization hook; a `false` answers 403.
    pub fn authorize(mut self, hook: Authorize) -> Self {
        self.authorize = Some(hook);
        self
    }

    /// The routes, to merge into an application's router.
    pub fn router<T>(self) -> Router<T> {
        Router::new()
            .route("/streams/{signed}", get(follow::<S, L>))
            .with_state(self)
    }
}

/// A TCP listener whose connections fail a write that cannot make progress for
/// `deadline`, which closes the connection: a client that stops reading cannot hold a
/// response (and its place in the stream connection limit) open for ever. Use the
/// instance's [`Config::write_deadline`](crate::Config::write_deadline).
#[derive(Debug)]
pub struct WriteDeadline {
    listener: TcpListener,
    deadline: Duration,
}

impl WriteDeadline {
    /// Wraps a bound listener.
    pub fn new(listener: TcpListener, deadline: Duration) -> Self {
        Self { listener, deadline }
    }
}

impl axum::serve::Listener for WriteDeadline {
    type Io = Pin<Box<TimeoutStream<TcpStream>>>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (stream, addr) = axum::serve::Listener::accept(&mut self.listener).await;
        let mut stream = TimeoutStream::new(stream);
        stream.set_write_timeout(Some(self.deadline));
        (Box::pin(stream), addr)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

fn refuse(status: StatusCode, why: String) -> Response {
    (status, why).into_response()
}

async fn follow<S: StreamStore, L: StreamListener>(
    State(streams): State<Streams<S, L>>,
    Path(signed): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let stream = match streams.signer.verify(&signed) {
        Ok(stream) => stream,
        Err(SignatureError::Expired) => {
            return refuse(
                StatusCode::FORBIDDEN,
                "this stream URL expired: ask for a new one\n".to_owned(),
            )
        }
        Err(_) => return refuse(StatusCode::NOT_FOUND, "no such stream\n".to_owned()),
    };
    if let Some(authorize) = &streams.authorize {
        if !authorize(&stream, &headers) {
            return refuse(
                StatusCode::FORBIDDEN,
                "not allowed to follow this stream\n".to_owned(),
            );
        }
    }
    let last_event_id = match headers.get("last-event-id").map(|v| v.to_str()) {
        Some(Err(_)) => {
            return refuse(
                StatusCode::BAD_REQUEST,
                "Last-Event-ID is not text\n".to_owned(),
            )
        }
        Some(Ok(value)) => Some(value),
        None => None,
    };
    let start = match start_from(last_event_id, query.get("since").map(String::as_str)) {
        Ok(start) => start,
        Err(err) => return refuse(StatusCode::BAD_REQUEST, format!("{err}\n")),
    };
    match streams.instance.register(stream, start).await {
        Ok(events) => {
            let body = Body::from_stream(events.map(Ok::<_, std::convert::Infallible>));
            let mut response = Response::new(body);
            let headers = response.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            // Tells nginx-style proxies not to buffer the stream.
            headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
            response
        }
        Err(err) => {
            let mut response = refuse(StatusCode::SERVICE_UNAVAILABLE, format!("{err}\n"));
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECS),
            );
            response
        }
    }
}
