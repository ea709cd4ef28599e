//! The process's one LISTEN connection (`pgbus:listen`), fanning wake-ups out to workers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::StreamExt;
use pgbus_core::{QueueName, Result, RetryPolicy, Subscription, WakeFn, WakeupSource};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, Notification};
use tokio_util::sync::CancellationToken;

use crate::connect::ConnectOptions;
use crate::error::describe;
use crate::sql;

/// How long the connection may stay quiet before the listener checks it is alive.
pub(crate) const HEALTH_CHECK_AFTER: Duration = Duration::from_secs(30);
/// How long that check may take.
const HEALTH_CHECK_TIMEOUT: Duration = Duration::from_secs(5);

/// One dedicated connection per process that runs `LISTEN pgbus_wakeup` and wakes the
/// workers subscribed to the queue named in each notification.
///
/// It is not a pooled connection: a pooled tokio-postgres connection does not deliver
/// notifications. When the connection cannot be opened or `LISTEN` is refused, the
/// listener logs it once, reports [`is_live`](WakeupSource::is_live) `false` (workers keep
/// polling) and retries with capped exponential backoff. After every (re)connection it
/// wakes every subscriber, because notifications sent meanwhile were lost.
pub struct PgListener {
    shared: Arc<Shared>,
    stop: CancellationToken,
}

#[derive(Default)]
struct Shared {
    subscribers: Mutex<HashMap<u64, (Vec<QueueName>, WakeFn)>>,
    next_id: AtomicU64,
    live: AtomicBool,
    heard: Mutex<HashMap<String, u64>>,
    connections: AtomicU64,
    failures: AtomicU64,
}

impl Shared {
    fn wake(&self, queue: Option<&str>) {
        let subscribers = self.subscribers.lock().expect("subscribers");
        for (queues, wake) in subscribers.values() {
            if queue.is_none_or(|q| queues.iter().any(|name| name.as_str() == q)) {
                wake();
            }
        }
    }
}

impl std::fmt::Debug for PgListener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgListener")
            .field("live", &self.is_live())
            .field("heard", &self.notifications_heard())
            .finish_non_exhaustive()
    }
}

impl PgListener {
    /// Starts listening on the database at `url` in a background task (needs a tokio
    /// runtime). Fails only on a malformed URL; connection problems are retried. Behind a
    /// transaction-mode pooler, give it a direct URL: LISTEN needs a session of its own.
    pub fn start(url: &str) -> Result<Self> {
        Self::start_with(ConnectOptions::parse(url)?)
    }

    /// [`start`](Self::start) with parsed connection options.
    pub fn start_with(target: ConnectOptions) -> Result<Self> {
        let shared = Arc::new(Shared::default());
        let stop = CancellationToken::new();
        tokio::spawn(run(target, Arc::downgrade(&shared), stop.clone()));
        Ok(Self { shared, stop })
    }

    /// Notifications received so far, for all queues (each wakes the matching
    /// subscribers).
    pub fn notifications_heard(&self) -> u64 {
        self.shared.heard.lock().expect("heard").values().sum()
    }

    /// Notifications received so far for one queue.
    pub fn notifications_heard_for(&self, queue: &QueueName) -> u64 {
        let heard = self.shared.heard.lock().expect("heard");
        heard.get(queue.as_str()).copied().unwrap_or(0)
    }

    /// Failed attempts to connect and LISTEN, or lost connections, so far.
    pub fn failures(&self) -> u64 {
        self.shared.failures.load(Ordering::Relaxed)
    }

    /// Successful connections so far (1 + reconnects).
    pub fn connections_made(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }

    /// Waits until the listener is live or `timeout` passes; returns whether it is live.
    pub async fn wait_live(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.is_live() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        true
    }
}

impl Drop for PgListener {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

struct ListenerSubscription {
    shared: Weak<Shared>,
    id: u64,
}

impl Subscription for ListenerSubscription {}

impl Drop for ListenerSubscription {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.upgrade() {
            shared
                .subscribers
                .lock()
                .expect("subscribers")
                .remove(&self.id);
        }
    }
}

impl WakeupSource for PgListener {
    fn subscribe(&self, queues: &[QueueName], wake: WakeFn) -> Box<dyn Subscription> {
        let id = self.shared.next_id.fetch_add(1, Ordering::Relaxed);
        self.shared
            .subscribers
            .lock()
            .expect("subscribers")
            .insert(id, (queues.to_vec(), wake));
        Box::new(ListenerSubscription {
            shared: Arc::downgrade(&self.shared),
            id,
        })
    }

    fn is_live(&self) -> bool {
        self.shared.live.load(Ordering::Relaxed)
    }
}

/// Connect, LISTEN, dispatch; on any failure back off and start over.
async fn run(target: ConnectOptions, shared: Weak<Shared>, stop: CancellationToken) {
    let backoff = reconnect_backoff();
    let mut failures = 0u32;
    let mut warned = false;
    loop {
        let outcome = tokio::select! {
            _ = stop.cancelled() => return,
            outcome = listen(&target, &shared, &stop) => outcome,
        };
        let Some(shared_now) = shared.upgrade() else {
            return;
        };
        shared_now.live.store(false, Ordering::Relaxed);
        if outcome.is_err() {
            shared_now.failures.fetch_add(1, Ordering::Relaxed);
        }
        drop(shared_now);
        match outcome {
            Ok(()) => return, // stopped
            Err(Failure::BeforeListening(err)) => {
                failures += 1;
                if !warned {
                    tracing::warn!(target: "pgbus::listen", error = %err, "wake-ups unavailable, workers poll until LISTEN works");
                    warned = true;
                } else {
                    tracing::debug!(target: "pgbus::listen", error = %err, "LISTEN still unavailable");
                }
            }
            Err(Failure::WhileListening(err)) => {
                failures = 1;
                warned = true;
                tracing::warn!(target: "pgbus::listen", error = %err, "listener connection lost; workers poll while it reconnects");
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff.backoff(failures)) => {}
        }
    }
}

enum Failure {
    /// Connecting or LISTEN failed: nothing was ever heard on this connection.
    BeforeListening(String),
    /// The connection broke after LISTEN succeeded.
    WhileListening(String),
}

async fn listen(
    target: &ConnectOptions,
    shared: &Weak<Shared>,
    stop: &CancellationToken,
) -> std::result::Result<(), Failure> {
    let NotifyConnection {
        client,
        notifications: mut rx,
        _driver,
    } = NotifyConnection::open(target, "listen")
        .await
        .map_err(Failure::BeforeListening)?;
    client
        .batch_execute(sql::LISTEN)
        .await
        .map_err(|e| Failure::BeforeListening(describe(&e)))?;
    {
        let Some(shared) = shared.upgrade() else {
            return Ok(());
        };
        if shared.connections.fetch_add(1, Ordering::Relaxed) > 0 {
            crate::telemetry::listener_reconnected();
        }
        shared.live.store(true, Ordering::Relaxed);
        tracing::info!(target: "pgbus::listen", channel = sql::WAKEUP_CHANNEL, "listening for wake-ups");
        // Anything sent while we were not listening was not heard: make everyone look.
        shared.wake(None);
    }
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            message = rx.recv() => match message {
                Some(Ok(notification)) => {
                    let queue = notification.payload();
                    let Some(shared) = shared.upgrade() else { return Ok(()) };
                    *shared.heard.lock().expect("heard").entry(queue.to_owned()).or_default() += 1;
                    tracing::trace!(target: "pgbus::listen", queue = %queue, "wake-up");
                    shared.wake(Some(queue));
                }
                Some(Err(err)) => return Err(Failure::WhileListening(err)),
                None => return Err(Failure::WhileListening("connection closed".to_owned())),
            },
            _ = tokio::time::sleep(HEALTH_CHECK_AFTER) => {
                health_check(&client).await.map_err(Failure::WhileListening)?;
            }
        }
    }
}

/// The backoff between attempts to reopen a LISTEN connection.
pub(crate) fn reconnect_backoff() -> RetryPolicy {
    RetryPolicy::builder()
        .base(Duration::from_millis(100))
        .cap(Duration::from_secs(30))
        .jitter(0.3)
        .max_attempts(u32::MAX)
        .build()
        .expect("valid backoff")
}

/// Checks that a quiet LISTEN connection still answers.
pub(crate) async fn health_check(client: &Client) -> std::result::Result<(), String> {
    match tokio::time::timeout(HEALTH_CHECK_TIMEOUT, client.simple_query("SELECT 1")).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(err)) => Err(describe(&err)),
        Err(_) => Err("health check timed out".to_owned()),
    }
}

/// Notifications in arrival order; an `Err` (then the end) says why the connection ended.
pub(crate) type Notifications = mpsc::UnboundedReceiver<std::result::Result<Notification, String>>;

/// A dedicated (unpooled) connection whose notifications are forwarded to a channel: the
/// connection object delivers them only to whoever polls it.
pub(crate) struct NotifyConnection {
    pub(crate) client: Client,
    pub(crate) notifications: Notifications,
    /// Stops forwarding when the connection is dropped.
    pub(crate) _driver: AbortOnDrop,
}

impl NotifyConnection {
    pub(crate) async fn open(
        target: &ConnectOptions,
        role: &str,
    ) -> std::result::Result<Self, String> {
        let (client, mut connection) = target.open_raw(role).await.map_err(|e| describe(&e))?;
        let (tx, notifications) = mpsc::unbounded_channel();
        let driver = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(n)) => {
                        let _ = tx.send(Ok(n));
                    }
                    Ok(_) => {}
                    Err(err) => {
                        let _ = tx.send(Err(describe(&err)));
                        return;
                    }
                }
            }
            let _ = tx.send(Err("connection closed".to_owned()));
        });
        Ok(Self {
            client,
            notifications,
            _driver: AbortOnDrop(driver),
        })
    }
}

pub(crate) struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
