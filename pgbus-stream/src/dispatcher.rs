//! The dispatcher: one task, the single owner of the registry and of every connection's
//! cursor. Everything that changes either arrives as a [`Msg`] in its mailbox.
//!
//! The mailbox ([`crate::mailbox`]) is also the in-flight buffer of a connecting client: the client's stream is
//! LISTENed to before its `Connect` is sent, so every signal that arrives while the
//! dispatcher replays history waits in the mailbox and is handled after the client is
//! registered, against its cursor (which drops what the replay already sent).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use pgbus_core::{
    Horizon, Result, StreamEvent, StreamListener, StreamName, StreamSignal, StreamStore,
};
use tokio::sync::mpsc;

use crate::config::{Config, IterationHook};
use crate::cursor::Start;
use crate::frame;
use crate::mailbox::{ConnId, Flow, Inbox, Msg};

/// Counters the dispatcher keeps (read through [`Instance::stats`](crate::Instance::stats)).
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) connections: AtomicU64,
    pub(crate) streams: AtomicU64,
    pub(crate) delivered: AtomicU64,
    pub(crate) dropped_slow: AtomicU64,
    pub(crate) dropped_idle: AtomicU64,
    pub(crate) store_errors: AtomicU64,
    pub(crate) iterations: AtomicU64,
}

/// One registered connection.
struct Client {
    stream: StreamName,
    /// The id of the last event queued to it.
    cursor: i64,
    frames: mpsc::Sender<Bytes>,
    flow: Arc<Flow>,
    /// Since when its queue has been full without draining.
    blocked_since: Option<Instant>,
    last_event: Instant,
}

enum Push {
    Sent,
    Full,
    Closed,
}

impl Client {
    fn push(&mut self, frame: Bytes) -> Push {
        match self.frames.try_send(frame) {
            Ok(()) => Push::Sent,
            Err(mpsc::error::TrySendError::Full(frame)) => self.fell_behind(frame),
            Err(mpsc::error::TrySendError::Closed(_)) => Push::Closed,
        }
    }

    /// Its queue was full when `frame` came: it is lagging, and its stream asks for the
    /// rest when it takes a frame and sees the flag up. A stream that took its last frame
    /// between the failed send and the flag saw the flag down and has no frame left to
    /// take, so it would never ask: then the queue is empty, and the flag is taken back
    /// and the frame sent after all. (The flag goes up with a swap, which reads the
    /// stream's own swap of it, so the emptied queue is seen whenever that came first.)
    fn fell_behind(&mut self, frame: Bytes) -> Push {
        self.flow.lagging.swap(true, Ordering::SeqCst);
        if self.frames.capacity() == self.frames.max_capacity()
            && self.flow.lagging.swap(false, Ordering::SeqCst)
        {
            return self.push(frame);
        }
        self.blocked_since.get_or_insert_with(Instant::now);
        Push::Full
    }

    fn lagging(&self) -> bool {
        self.flow.lagging.load(Ordering::SeqCst)
    }

    /// Queues the events after its cursor, in order, until its queue is full.
    fn deliver(&mut self, events: &[(i64, Bytes)], counters: &Counters) {
        let after = self.cursor;
        for (id, frame) in events.iter().filter(|(id, _)| *id > after) {
            match self.push(frame.clone()) {
                Push::Sent => {
                    self.cursor = *id;
                    self.last_event = Instant::now();
                    counters.delivered.fetch_add(1, Ordering::Relaxed);
                }
                Push::Full | Push::Closed => return,
            }
        }
    }
}

/// Stream name to its connections.
#[derive(Default)]
struct Registry {
    streams: HashMap<StreamName, HashMap<ConnId, Client>>,
    by_id: HashMap<ConnId, StreamName>,
}

impl Registry {
    fn insert(&mut self, id: ConnId, client: Client) {
        self.by_id.insert(id, client.stream.clone());
        self.streams
            .entry(client.stream.clone())
            .or_default()
            .insert(id, client);
    }

    fn remove(&mut self, id: ConnId) -> Option<Client> {
        let stream = self.by_id.remove(&id)?;
        let clients = self.streams.get_mut(&stream)?;
        let client = clients.remove(&id);
        if clients.is_empty() {
            self.streams.remove(&stream);
        }
        client
    }

    fn get_mut(&mut self, id: ConnId) -> Option<&mut Client> {
        let stream = self.by_id.get(&id)?;
        self.streams.get_mut(stream)?.get_mut(&id)
    }

    fn clients(&mut self) -> impl Iterator<Item = (&ConnId, &mut Client)> {
        self.streams.values_mut().flat_map(|c| c.iter_mut())
    }
}

pub(crate) struct Dispatcher<S, L> {
    pub(crate) store: S,
    pub(crate) listener: Arc<L>,
    pub(crate) config: Config,
    pub(crate) counters: Arc<Counters>,
    pub(crate) on_iteration: Option<IterationHook>,
    registry: Registry,
    /// Streams whose last read failed: read again on the next tick.
    dirty: HashSet<StreamName>,
}

fn render(events: &[StreamEvent]) -> Vec<(i64, Bytes)> {
    events
        .iter()
        .map(|e| (e.id, frame::event(Some(e.id), &e.event, &e.data)))
        .collect()
}

impl<S: StreamStore, L: StreamListener> Dispatcher<S, L> {
    pub(crate) fn new(
        store: S,
        listener: Arc<L>,
        config: Config,
        counters: Arc<Counters>,
        on_iteration: Option<IterationHook>,
    ) -> Self {
        Self {
            store,
            listener,
            config,
            counters,
            on_iteration,
            registry: Registry::default(),
            dirty: HashSet::new(),
        }
    }

    pub(crate) async fn run(mut self, mut inbox: Inbox) {
        while let Some(msg) = inbox.recv().await {
            let done = self.handle(msg).await;
            self.counters.iterations.fetch_add(1, Ordering::Relaxed);
            self.counters
                .connections
                .store(self.registry.by_id.len() as u64, Ordering::Relaxed);
            self.counters
                .streams
                .store(self.registry.streams.len() as u64, Ordering::Relaxed);
            if let Some(hook) = &self.on_iteration {
                hook();
            }
            if done {
                return;
            }
        }
    }

    /// Handles one message; `true` when the dispatcher is done.
    async fn handle(&mut self, msg: Msg) -> bool {
        match msg {
            Msg::Connect {
                stream,
                start,
                id,
                frames,
                flow,
                reply,
            } => {
                let result = self.connect(id, stream.clone(), start, frames, flow).await;
                if let Err(err) = &result {
                    self.counters.store_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(target: "pgbus::stream", stream = %stream, error = %err.report(), "could not replay a stream to a new client");
                    self.unlisten(&stream).await;
                }
                let _ = reply.send(result);
            }
            Msg::Signal(StreamSignal::Published(stream)) => self.fan_out(&stream).await,
            Msg::Signal(StreamSignal::Broadcast {
                stream,
                event,
                data,
            }) => self.broadcast(&stream, &event, &data),
            Msg::Signal(StreamSignal::Reconnected) => {
                let streams: Vec<_> = self.registry.streams.keys().cloned().collect();
                for stream in streams {
                    self.fan_out(&stream).await;
                }
            }
            Msg::Ready(id) => self.catch_up(id).await,
            Msg::Gone(id) => self.drop_client(id).await,
            Msg::Tick => self.tick().await,
            Msg::Census(reply) => {
                let mut census: Vec<_> = self
                    .registry
                    .streams
                    .iter()
                    .map(|(stream, clients)| (stream.clone(), clients.len()))
                    .collect();
                census.sort();
                let _ = reply.send(census);
            }
            Msg::Shutdown(done) => {
                for (_, client) in self.registry.clients() {
                    let _ = client.push(frame::shutdown());
                }
                self.registry = Registry::default();
                let _ = done.send(());
                return true;
            }
        }
        false
    }

    async fn connect(
        &mut self,
        id: ConnId,
        stream: StreamName,
        start: Start,
        frames: mpsc::Sender<Bytes>,
        flow: Arc<Flow>,
    ) -> Result<()> {
        let (cursor, gap) = match start {
            Start::Latest => (self.store.latest(&stream).await?, false),
            Start::After(cursor) => (
                cursor,
                self.store.horizon(&stream, cursor).await? == Horizon::Gap,
            ),
        };
        let mut client = Client {
            stream,
            cursor,
            frames,
            flow,
            blocked_since: None,
            last_event: Instant::now(),
        };
        if let Some(retry) = self.config.client_retry {
            client.push(frame::retry(retry));
        }
        if gap {
            client.push(frame::gap_detected(cursor));
        }
        self.replay(&mut client).await?;
        self.registry.insert(id, client);
        Ok(())
    }

    /// Queues stored events after the client's cursor, batch by batch, until it is caught
    /// up or its queue is full.
    async fn replay(&self, client: &mut Client) -> Result<()> {
        loop {
            let events = self
                .store
                .read_after(&client.stream, client.cursor, self.config.read_batch)
                .await?;
            client.deliver(&render(&events), &self.counters);
            if events.len() < self.config.read_batch || client.lagging() {
                return Ok(());
            }
        }
    }

    /// New durable events on `stream`: read them once and queue them to every connection
    /// that is keeping up (lagging ones catch up on their own when they drain).
    async fn fan_out(&mut self, stream: &StreamName) {
        loop {
            let Some(clients) = self.registry.streams.get_mut(stream) else {
                return;
            };
            let Some(from) = clients
                .values()
                .filter(|c| !c.lagging())
                .map(|c| c.cursor)
                .min()
            else {
                return;
            };
            let events = match self
                .store
                .read_after(stream, from, self.config.read_batch)
                .await
            {
                Ok(events) => events,
                Err(err) => {
                    self.counters.store_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(target: "pgbus::stream", stream = %stream, error = %err.report(), "reading new events failed; retrying on the next heartbeat");
                    self.dirty.insert(stream.clone());
                    return;
                }
            };
            let frames = render(&events);
            if let Some(clients) = self.registry.streams.get_mut(stream) {
                // The batch holds every event after `from`, so it continues exactly the
                // connections at or past `from`. One that stopped lagging during the read
                // (its stream clears the flag) may be behind `from`: its `Ready` catches it
                // up instead.
                for client in clients
                    .values_mut()
                    .filter(|c| !c.lagging() && c.cursor >= from)
                {
                    client.deliver(&frames, &self.counters);
                }
            }
            if events.len() < self.config.read_batch {
                return;
            }
        }
    }

    fn broadcast(&mut self, stream: &StreamName, event: &str, data: &str) {
        let Some(clients) = self.registry.streams.get_mut(stream) else {
            return;
        };
        let frame = frame::event(None, event, data);
        for client in clients.values_mut().filter(|c| !c.lagging()) {
            if let Push::Sent = client.push(frame.clone()) {
                self.counters.delivered.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    async fn catch_up(&mut self, id: ConnId) {
        let Some(mut client) = self.registry.remove(id) else {
            return;
        };
        client.blocked_since = None;
        let result = self.replay(&mut client).await;
        self.registry.insert(id, client);
        if let Err(err) = result {
            // It stays behind its stream; the next signal or heartbeat tries again.
            self.counters.store_errors.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(target: "pgbus::stream", error = %err.report(), "catching a client up failed");
            if let Some(client) = self.registry.get_mut(id) {
                client.flow.lagging.store(false, Ordering::SeqCst);
                self.dirty.insert(client.stream.clone());
            }
        }
    }

    async fn drop_client(&mut self, id: ConnId) {
        if let Some(client) = self.registry.remove(id) {
            self.unlisten(&client.stream).await;
        }
    }

    async fn unlisten(&self, stream: &StreamName) {
        if let Err(err) = self.listener.unlisten(stream).await {
            tracing::debug!(target: "pgbus::stream", stream = %stream, error = %err.report(), "unlisten failed");
        }
    }

    /// Heartbeat: a comment to every connection keeping up; drops connections blocked past
    /// the write deadline or idle past the idle timeout; retries failed reads.
    async fn tick(&mut self) {
        let now = Instant::now();
        let (deadline, idle_timeout) = (self.config.write_deadline, self.config.idle_timeout);
        let (mut slow, mut idle, mut closed) = (Vec::new(), Vec::new(), Vec::new());
        for (id, client) in self.registry.clients() {
            if client.lagging() {
                if client
                    .blocked_since
                    .is_some_and(|since| now.duration_since(since) >= deadline)
                {
                    slow.push(*id);
                }
                continue;
            }
            if now.duration_since(client.last_event) >= idle_timeout {
                idle.push(*id);
                continue;
            }
            match client.push(frame::comment()) {
                Push::Closed => closed.push(*id),
                Push::Sent | Push::Full => {}
            }
        }
        if !slow.is_empty() {
            tracing::info!(target: "pgbus::stream", clients = slow.len(), "dropping clients that stopped reading");
        }
        for id in slow.iter().chain(&idle).chain(&closed) {
            self.drop_client(*id).await;
        }
        self.counters
            .dropped_slow
            .fetch_add(slow.len() as u64, Ordering::Relaxed);
        self.counters
            .dropped_idle
            .fetch_add(idle.len() as u64, Ordering::Relaxed);
        for stream in std::mem::take(&mut self.dirty) {
            self.fan_out(&stream).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(capacity: usize) -> (Client, mpsc::Receiver<Bytes>) {
        let (frames, receiver) = mpsc::channel(capacity);
        let client = Client {
            stream: StreamName::new("s").expect("a valid name"),
            cursor: 0,
            frames,
            flow: Arc::default(),
            blocked_since: None,
            last_event: Instant::now(),
        };
        (client, receiver)
    }

    #[test]
    fn a_full_queue_makes_a_connection_lag() {
        let (mut client, _receiver) = client(1);
        assert!(matches!(client.push(Bytes::from_static(b"a")), Push::Sent));
        assert!(matches!(client.push(Bytes::from_static(b"b")), Push::Full));
        assert!(client.lagging());
        assert!(client.blocked_since.is_some());
    }

    /// The stream took every frame before the lagging flag went up (it saw the flag down):
    /// the frame goes after all, or nothing would ever ask for the rest.
    #[test]
    fn a_queue_emptied_before_the_flag_went_up_takes_the_frame() {
        let (mut client, mut receiver) = client(1);
        assert!(matches!(client.push(Bytes::from_static(b"a")), Push::Sent));
        // The send of "b" found the queue full; the stream then took "a".
        assert_eq!(receiver.try_recv().ok(), Some(Bytes::from_static(b"a")));
        assert!(matches!(
            client.fell_behind(Bytes::from_static(b"b")),
            Push::Sent
        ));
        assert!(!client.lagging());
        assert!(client.blocked_since.is_none());
        assert_eq!(receiver.try_recv().ok(), Some(Bytes::from_static(b"b")));
    }
}
