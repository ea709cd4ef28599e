//! The streamer instance of one web process: listener, dispatcher, heartbeat, registry.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pgbus_core::{Error, Result, StreamListener, StreamName, StreamStore};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::client::{EventStream, Slot};
use crate::config::{Config, IterationHook};
use crate::cursor::Start;
use crate::dispatcher::{Counters, Dispatcher};
use crate::frame;
use crate::mailbox::{mailbox, ConnId, Flow, Inbox, Mailbox, Msg};

/// Why a connection was not registered.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// The instance already serves `max_connections`.
    #[error("too many stream connections (limit {0})")]
    Full(usize),
    /// The listener is down or the history could not be read; try again later.
    #[error("streams are unavailable: {0}")]
    Unavailable(#[source] Error),
}

/// What an instance is doing now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct InstanceStats {
    /// Registered connections.
    pub connections: u64,
    /// Streams with at least one connection.
    pub streams: u64,
    /// Frames (events and broadcasts) queued to clients.
    pub delivered: u64,
    /// Clients dropped for not reading within the write deadline.
    pub dropped_slow: u64,
    /// Connections closed after the idle timeout.
    pub dropped_idle: u64,
    /// Failed reads of the store.
    pub store_errors: u64,
    /// Messages the dispatcher handled.
    pub iterations: u64,
    /// Broadcasts dropped because [`Config::max_queued_broadcasts`] were waiting.
    pub dropped_broadcasts: u64,
}

/// One streamer per web process: a [`StreamListener`] (LISTEN per followed stream), a
/// dispatcher task (owner of the registry and of every cursor), a heartbeat task and a
/// pruning task. [`new`](Instance::new) starts nothing; [`start`](Instance::start) does;
/// [`shutdown`](Instance::shutdown) stops the heartbeat, then the listener, then the
/// dispatcher, which sends every client a `shutdown` event and closes it.
///
/// Clones share the instance.
pub struct Instance<S, L> {
    inner: Arc<Inner<S, L>>,
}

impl<S, L> Clone for Instance<S, L> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<S, L> std::fmt::Debug for Instance<S, L> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

struct Inner<S, L> {
    store: S,
    listener: Arc<L>,
    config: Config,
    mailbox: Mailbox,
    /// The dispatcher's end of the mailbox until `start` takes it.
    unstarted: Mutex<Option<(Inbox, Option<IterationHook>)>>,
    tasks: Mutex<Tasks>,
    background: CancellationToken,
    shutting_down: AtomicBool,
    slots: Arc<AtomicUsize>,
    next_id: AtomicU64,
    counters: Arc<Counters>,
}

#[derive(Default)]
struct Tasks {
    dispatcher: Option<JoinHandle<()>>,
    background: Vec<JoinHandle<()>>,
}

impl<S: StreamStore, L: StreamListener> Instance<S, L> {
    /// An instance over `store` and `listener` with `config`; starts nothing.
    pub fn new(store: S, listener: L, config: Config) -> Self {
        Self::with_hook(store, listener, config, None)
    }

    /// As [`new`](Self::new), calling `hook` after each dispatcher iteration.
    pub fn with_hook(store: S, listener: L, config: Config, hook: Option<IterationHook>) -> Self {
        let (mailbox, inbox) = mailbox(config.max_queued_broadcasts);
        Self {
            inner: Arc::new(Inner {
                store,
                listener: Arc::new(listener),
                config,
                mailbox,
                unstarted: Mutex::new(Some((inbox, hook))),
                tasks: Mutex::default(),
                background: CancellationToken::new(),
                shutting_down: AtomicBool::new(false),
                slots: Arc::default(),
                next_id: AtomicU64::new(1),
                counters: Arc::default(),
            }),
        }
    }

    /// The listener (for its own counters).
    pub fn listener(&self) -> &L {
        &self.inner.listener
    }

    /// Starts the listener, the dispatcher, the heartbeat and the pruner on the current
    /// tokio runtime. A second call does nothing.
    pub fn start(&self) -> Result<()> {
        let Some((inbox, hook)) = self.inner.unstarted.lock().expect("unstarted").take() else {
            return Ok(());
        };
        let inner = &self.inner;
        let mailbox = inner.mailbox.clone();
        inner
            .listener
            .start(Arc::new(move |signal| mailbox.signal(signal)))?;
        let dispatcher = Dispatcher::new(
            inner.store.clone(),
            inner.listener.clone(),
            inner.config.clone(),
            inner.counters.clone(),
            hook,
        );
        let mut tasks = inner.tasks.lock().expect("tasks");
        tasks.dispatcher = Some(tokio::spawn(dispatcher.run(inbox)));
        tasks.background.push(tokio::spawn(heartbeat(
            inner.config.heartbeat,
            inner.mailbox.clone(),
            inner.background.clone(),
        )));
        if let Some(retention) = inner.config.retention {
            tasks.background.push(tokio::spawn(prune(
                inner.store.clone(),
                retention,
                inner.background.clone(),
            )));
        }
        Ok(())
    }

    /// Registers a connection following `stream` from `start`: listens to the stream
    /// (confirmed), then hands it to the dispatcher, which replays what is stored after
    /// the cursor before any live event. After shutdown has begun, the connection gets the
    /// `shutdown` event and is closed at once.
    pub async fn register(
        &self,
        stream: StreamName,
        start: Start,
    ) -> Result<EventStream, RegisterError> {
        let inner = &self.inner;
        if inner.shutting_down.load(Ordering::SeqCst) {
            return Ok(EventStream::closed(&[frame::shutdown()]));
        }
        let taken = inner.slots.fetch_add(1, Ordering::SeqCst);
        let slot = Slot(inner.slots.clone());
        if taken >= inner.config.max_connections {
            return Err(RegisterError::Full(inner.config.max_connections));
        }
        inner
            .listener
            .listen(&stream)
            .await
            .map_err(RegisterError::Unavailable)?;
        let id = ConnId(inner.next_id.fetch_add(1, Ordering::Relaxed));
        let capacity = inner.config.queue_capacity.max(2);
        let (frames, receiver) = mpsc::channel(capacity);
        let flow = Arc::new(Flow::default());
        let (reply, replayed) = oneshot::channel();
        let connect = Msg::Connect {
            stream,
            start,
            id,
            frames,
            flow: flow.clone(),
            reply,
        };
        if inner.mailbox.send(connect).is_err() {
            return Ok(EventStream::closed(&[frame::shutdown()]));
        }
        match replayed.await {
            Ok(Ok(())) => Ok(EventStream::new(
                receiver,
                capacity,
                id,
                flow,
                inner.mailbox.clone(),
                slot,
            )),
            Ok(Err(err)) => Err(RegisterError::Unavailable(err)),
            // The dispatcher stopped before handling it: shutdown.
            Err(_) => Ok(EventStream::closed(&[frame::shutdown()])),
        }
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.shutting_down.load(Ordering::SeqCst)
    }

    /// Counters for metrics and tests.
    pub fn stats(&self) -> InstanceStats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        InstanceStats {
            connections: get(&c.connections),
            streams: get(&c.streams),
            delivered: get(&c.delivered),
            dropped_slow: get(&c.dropped_slow),
            dropped_idle: get(&c.dropped_idle),
            store_errors: get(&c.store_errors),
            iterations: get(&c.iterations),
            dropped_broadcasts: self.inner.mailbox.dropped_broadcasts(),
        }
    }

    /// Each followed stream with its number of connections, by name (empty once shut
    /// down).
    pub async fn census(&self) -> Vec<(StreamName, usize)> {
        let (reply, census) = oneshot::channel();
        if self.inner.mailbox.send(Msg::Census(reply)).is_err() {
            return Vec::new();
        }
        census.await.unwrap_or_default()
    }

    /// Stops the heartbeat and pruner, then the listener, then the dispatcher, which sends
    /// every client the `shutdown` event (no `id:`) and closes it. Registrations from now
    /// on are closed at once.
    pub async fn shutdown(&self) {
        let inner = &self.inner;
        if inner.shutting_down.swap(true, Ordering::SeqCst) {
            return;
        }
        inner.background.cancel();
        let (dispatcher, background) = {
            let mut tasks = inner.tasks.lock().expect("tasks");
            (
                tasks.dispatcher.take(),
                std::mem::take(&mut tasks.background),
            )
        };
        for task in background {
            let _ = task.await;
        }
        inner.listener.stop().await;
        let (done, stopped) = oneshot::channel();
        if inner.mailbox.send(Msg::Shutdown(done)).is_ok() {
            let _ = stopped.await;
        }
        if let Some(dispatcher) = dispatcher {
            let _ = dispatcher.await;
        }
    }
}

async fn heartbeat(every: Duration, mailbox: Mailbox, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await; // the first tick is immediate
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => if mailbox.send(Msg::Tick).is_err() { return },
        }
    }
}

/// How often expired events are pruned, and how many per statement.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
const PRUNE_BATCH: usize = 1_000;

async fn prune<S: StreamStore>(store: S, retention: Duration, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(PRUNE_EVERY) => {}
        }
        let pruned = tokio::select! {
            _ = stop.cancelled() => return,
            pruned = store.prune(retention, PRUNE_BATCH) => pruned,
        };
        match pruned {
            Ok(0) => {}
            Ok(n) => {
                tracing::debug!(target: "pgbus::stream", pruned = n, "pruned expired stream events")
            }
            Err(err) => {
                tracing::warn!(target: "pgbus::stream", error = %err.report(), "pruning stream events failed")
            }
        }
    }
}
