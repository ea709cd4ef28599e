//! The streamer's LISTEN connection (`pgbus:stream`): one per streamer instance, listening
//! on one channel per followed stream.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgbus_core::{Error, Result, SignalFn, StreamListener, StreamName, StreamSignal};
use tokio::sync::{mpsc, oneshot};
use tokio_postgres::Notification;
use tokio_util::sync::CancellationToken;

use crate::connect::ConnectOptions;
use crate::error::describe;
use crate::listener::{health_check, reconnect_backoff, NotifyConnection, HEALTH_CHECK_AFTER};
use crate::sql;
use crate::stream::BroadcastPayload;

/// How long [`listen`](StreamListener::listen) waits for the server to confirm.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(5);

/// A dedicated connection that `LISTEN`s on `pgbus_stream_<name>` for every stream some
/// client follows (reference-counted: the first `listen` of a stream issues `LISTEN`, the
/// last `unlisten` `UNLISTEN`).
///
/// When the connection breaks it reconnects with capped exponential backoff, re-listens
/// to every stream, and signals [`StreamSignal::Reconnected`] so the owner re-reads
/// whatever was committed meanwhile.
pub struct PgStreamListener {
    target: ConnectOptions,
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    commands: Mutex<Option<mpsc::UnboundedSender<Command>>>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    stop: CancellationToken,
    live: AtomicBool,
    connections: AtomicU64,
    heard: AtomicU64,
}

enum Command {
    Listen(StreamName, oneshot::Sender<Result<()>>),
    Unlisten(StreamName),
}

impl std::fmt::Debug for PgStreamListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStreamListener")
            .field("live", &self.is_live())
            .field("connections_made", &self.connections_made())
            .finish_non_exhaustive()
    }
}

impl PgStreamListener {
    /// A listener for the database at `url`; nothing connects until
    /// [`start`](StreamListener::start). Fails only on a malformed URL.
    pub fn new(url: &str) -> Result<Self> {
        Ok(Self {
            target: ConnectOptions::parse(url)?,
            inner: Arc::default(),
        })
    }

    /// Successful connections so far (1 + reconnects).
    pub fn connections_made(&self) -> u64 {
        self.inner.connections.load(Ordering::Relaxed)
    }

    /// Notifications received so far.
    pub fn notifications_heard(&self) -> u64 {
        self.inner.heard.load(Ordering::Relaxed)
    }

    fn send(&self, command: Command) -> Result<()> {
        let commands = self.inner.commands.lock().expect("commands");
        let sent = commands.as_ref().map(|tx| tx.send(command).is_ok());
        match sent {
            Some(true) => Ok(()),
            Some(false) => Err(unavailable("the stream listener has stopped")),
            None => Err(Error::InvalidArgument(
                "the stream listener was not started".to_owned(),
            )),
        }
    }
}

fn unavailable(why: &str) -> Error {
    Error::Backend {
        message: why.to_owned(),
        transient: true,
        source: None,
    }
}

impl StreamListener for PgStreamListener {
    fn start(&self, signal: SignalFn) -> Result<()> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.inner.commands.lock().expect("commands") = Some(tx);
        let task = tokio::spawn(run(self.target.clone(), signal, rx, self.inner.clone()));
        *self.inner.task.lock().expect("task") = Some(task);
        Ok(())
    }

    async fn listen(&self, stream: &StreamName) -> Result<()> {
        if !self.is_live() {
            return Err(unavailable("the stream listener is not connected"));
        }
        let (reply, confirmed) = oneshot::channel();
        self.send(Command::Listen(stream.clone(), reply))?;
        match tokio::time::timeout(LISTEN_TIMEOUT, confirmed).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(unavailable("the stream listener has stopped")),
            Err(_) => Err(unavailable("LISTEN was not confirmed in time")),
        }
    }

    async fn unlisten(&self, stream: &StreamName) -> Result<()> {
        self.send(Command::Unlisten(stream.clone()))
    }

    async fn stop(&self) {
        self.inner.stop.cancel();
        let task = self.inner.task.lock().expect("task").take();
        if let Some(task) = task {
            let _ = task.await;
        }
        self.inner.live.store(false, Ordering::Relaxed);
    }

    fn is_live(&self) -> bool {
        self.inner.live.load(Ordering::Relaxed)
    }
}

impl Drop for PgStreamListener {
    fn drop(&mut self) {
        self.inner.stop.cancel();
    }
}

/// Streams listened to, with how many followers asked for each.
type Wanted = HashMap<StreamName, usize>;

async fn run(
    target: ConnectOptions,
    signal: SignalFn,
    mut commands: mpsc::UnboundedReceiver<Command>,
    inner: Arc<Inner>,
) {
    let backoff = reconnect_backoff();
    let mut wanted = Wanted::new();
    let mut failures = 0u32;
    loop {
        let outcome = tokio::select! {
            _ = inner.stop.cancelled() => return,
            outcome = session(&target, &signal, &mut commands, &mut wanted, &inner) => outcome,
        };
        let was_live = inner.live.swap(false, Ordering::Relaxed);
        match outcome {
            Ok(()) => return,
            Err(err) => {
                failures = failures_in_a_row(failures, was_live);
                tracing::warn!(target: "pgbus::stream", error = %err, attempt = failures, "stream listener connection lost; reconnecting");
            }
        }
        tokio::select! {
            _ = inner.stop.cancelled() => return,
            _ = tokio::time::sleep(backoff.backoff(failures)) => {}
        }
    }
}

/// The reconnect backoff's count: a connection that had gone live starts it over, so a
/// listener that loses its connection now and then always reconnects quickly.
fn failures_in_a_row(before: u32, was_live: bool) -> u32 {
    if was_live {
        1
    } else {
        before.saturating_add(1)
    }
}

/// One connection's life: connect, re-listen, then serve commands and forward
/// notifications until it breaks (`Err`) or the listener stops (`Ok`).
async fn session(
    target: &ConnectOptions,
    signal: &SignalFn,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    wanted: &mut Wanted,
    inner: &Inner,
) -> std::result::Result<(), String> {
    let mut conn = NotifyConnection::open(target, "stream").await?;
    for stream in wanted.keys() {
        execute(&conn, &sql::listen_stream(stream)).await?;
    }
    inner.live.store(true, Ordering::Relaxed);
    if inner.connections.fetch_add(1, Ordering::Relaxed) > 0 {
        signal(StreamSignal::Reconnected);
    }
    tracing::info!(target: "pgbus::stream", streams = wanted.len(), "stream listener connected");
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                None => return Ok(()),
                Some(Command::Listen(stream, reply)) => {
                    if reply.is_closed() {
                        continue; // the caller gave up waiting: it will not unlisten either
                    }
                    let count = wanted.entry(stream.clone()).or_default();
                    if *count == 0 {
                        if let Err(err) = execute(&conn, &sql::listen_stream(&stream)).await {
                            wanted.remove(&stream);
                            let _ = reply.send(Err(unavailable(&err)));
                            return Err(err);
                        }
                    }
                    *count += 1;
                    let _ = reply.send(Ok(()));
                }
                Some(Command::Unlisten(stream)) => {
                    let Some(count) = wanted.get_mut(&stream) else { continue };
                    *count -= 1;
                    if *count == 0 {
                        wanted.remove(&stream);
                        execute(&conn, &sql::unlisten_stream(&stream)).await?;
                    }
                }
            },
            notification = conn.notifications.recv() => match notification {
                Some(Ok(notification)) => {
                    inner.heard.fetch_add(1, Ordering::Relaxed);
                    if let Some(decoded) = decode(&notification) {
                        signal(decoded);
                    }
                }
                Some(Err(err)) => return Err(err),
                None => return Err("connection closed".to_owned()),
            },
            _ = tokio::time::sleep(HEALTH_CHECK_AFTER) => health_check(&conn.client).await?,
        }
    }
}

async fn execute(conn: &NotifyConnection, statement: &str) -> std::result::Result<(), String> {
    conn.client
        .batch_execute(statement)
        .await
        .map_err(|e| describe(&e))
}

/// A notification as a signal: an empty payload is a durable commit, anything else the
/// JSON of an ephemeral broadcast.
fn decode(notification: &Notification) -> Option<StreamSignal> {
    let name = notification
        .channel()
        .strip_prefix(sql::STREAM_CHANNEL_PREFIX)?;
    let stream = StreamName::new(name).ok()?;
    if notification.payload().is_empty() {
        return Some(StreamSignal::Published(stream));
    }
    match serde_json::from_str::<BroadcastPayload<'_>>(notification.payload()) {
        Ok(b) => Some(StreamSignal::Broadcast {
            stream,
            event: b.event.into_owned(),
            data: b.data.into_owned(),
        }),
        Err(err) => {
            tracing::warn!(target: "pgbus::stream", stream = %stream, error = %err, "ignoring a malformed broadcast notification");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_that_went_live_starts_the_backoff_over() {
        let backoff = reconnect_backoff();
        let mut failures = 0;
        // Eight connections lost before ever listening: the backoff grows.
        for _ in 0..8 {
            failures = failures_in_a_row(failures, false);
        }
        assert_eq!(failures, 8);
        assert!(backoff.backoff_with(failures, 0.0) >= Duration::from_secs(12));
        // Then one lost after it went live: back to the first step.
        failures = failures_in_a_row(failures, true);
        assert_eq!(failures, 1);
        assert_eq!(
            backoff.backoff_with(failures, 0.0),
            Duration::from_millis(100)
        );
    }
}
