//! The in-memory reference backend.
//!
//! It keeps the whole contract (ordering, leases, fencing, dead letters, stats) in a
//! mutex-protected map, so pools, workers and the stream dispatcher can be tested without a
//! database, and so the conformance suite has a second implementation to agree with.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

mod topics;

use crate::process::{ProcessId, ProcessInfo, ProcessRecord, ProcessRegistry};
use crate::queue::{
    Consumer, DeadLetters, Producer, QueueAdmin, QueueInfo, QueueOptions, QueueStats, Selection,
    Stats,
};
use crate::stream::{Horizon, StreamEvent, StreamName, StreamStore, MAX_EPHEMERAL_BYTES};
use crate::{
    ContentType, DeadMessage, Error, Headers, Lease, Message, MessageId, NewMessage, QueueName,
    Result, Visibility, DEFAULT_MAX_PAYLOAD_BYTES,
};

/// An in-memory [`Backend`](crate::Backend). Clones share the same state.
#[derive(Debug, Clone)]
pub struct MemoryBackend {
    state: Arc<Mutex<State>>,
    max_payload_bytes: usize,
}

#[derive(Debug, Default)]
struct State {
    next_id: i64,
    queues: BTreeMap<QueueName, QueueState>,
    next_process: i64,
    processes: BTreeMap<i64, ProcessRecord>,
    next_session: u64,
    /// Group locks: (queue, group) to the session holding it.
    group_locks: HashMap<(QueueName, String), u64>,
    next_event: i64,
    streams: BTreeMap<StreamName, Vec<StreamEvent>>,
    /// Per stream, the highest id pruned.
    pruned_through: HashMap<StreamName, i64>,
    /// Bindings, the event log and dedup records.
    topics: topics::TopicState,
}

#[derive(Debug)]
struct QueueState {
    options: QueueOptions,
    paused: bool,
    messages: BTreeMap<i64, Stored>,
    dead: BTreeMap<i64, DeadMessage>,
    archive: Vec<(SystemTime, Stored)>,
}

#[derive(Debug, Clone)]
struct Stored {
    payload: Vec<u8>,
    content_type: ContentType,
    headers: Headers,
    priority: i16,
    enqueued_at: SystemTime,
    visible_at: SystemTime,
    leased: bool,
    attempts: u32,
    group_key: Option<String>,
    last_error: Option<String>,
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryBackend {
    /// An empty backend with the default payload limit.
    pub fn new() -> Self {
        Self::with_max_payload_bytes(DEFAULT_MAX_PAYLOAD_BYTES)
    }

    /// An empty backend refusing payloads over `limit` bytes.
    pub fn with_max_payload_bytes(limit: usize) -> Self {
        Self {
            state: Arc::default(),
            max_payload_bytes: limit,
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than losing the whole backend, so keep going with the data.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of archived (acked, history-keeping) messages of a queue.
    pub fn archived(&self, queue: &QueueName) -> Result<usize> {
        let state = self.lock();
        Ok(state.queue(queue)?.archive.len())
    }
}

impl QueueState {
    /// Leases message `id` (which must exist) and returns it as claimed.
    fn lease(&mut self, queue: &QueueName, id: i64, now: SystemTime, lease: Duration) -> Message {
        let expires = now + lease;
        let m = self.messages.get_mut(&id).expect("claimed message exists");
        m.leased = true;
        m.attempts += 1;
        m.visible_at = expires;
        Message {
            id: MessageId(id),
            queue: queue.clone(),
            payload: m.payload.clone(),
            content_type: m.content_type,
            headers: m.headers.clone(),
            priority: m.priority,
            enqueued_at: m.enqueued_at,
            attempts: m.attempts,
            group_key: m.group_key.clone(),
            last_error: m.last_error.clone(),
            lease_expires_at: expires,
        }
    }

    /// The oldest message of a group: (id, visible now).
    fn group_head(&self, group: &str, now: SystemTime) -> Option<(i64, bool)> {
        self.messages
            .iter()
            .find(|(_, m)| m.group_key.as_deref() == Some(group))
            .map(|(id, m)| (*id, m.visible_at <= now))
    }
}

impl State {
    fn queue(&self, name: &QueueName) -> Result<&QueueState> {
        self.queues
            .get(name)
            .ok_or_else(|| Error::QueueNotFound(name.clone()))
    }

    fn queue_mut(&mut self, name: &QueueName) -> Result<&mut QueueState> {
        self.queues
            .get_mut(name)
            .ok_or_else(|| Error::QueueNotFound(name.clone()))
    }

    /// The queue holding a message, when the lease on it is still current.
    fn current(&mut self, lease: &Lease) -> Option<(&QueueName, &mut QueueState)> {
        self.queues
            .iter_mut()
            .find_map(|(name, q)| match q.messages.get(&lease.id.0) {
                Some(m) if m.attempts == lease.attempt => Some((name, q)),
                _ => None,
            })
    }
}

fn visible_at(visibility: Visibility, now: SystemTime) -> SystemTime {
    match visibility {
        Visibility::Now => now,
        Visibility::After(delay) => now + delay,
        Visibility::At(at) => at,
    }
}

fn ids_of(which: Selection<'_>, map: &BTreeMap<i64, DeadMessage>) -> Vec<i64> {
    match which {
        Selection::All => map.keys().copied().collect(),
        Selection::Ids(ids) => ids
            .iter()
            .map(|id| id.0)
            .filter(|id| map.contains_key(id))
            .collect(),
    }
}

impl QueueAdmin for MemoryBackend {
    async fn create_queue(&self, name: &QueueName, options: &QueueOptions) -> Result<bool> {
        let mut state = self.lock();
        if state.queues.contains_key(name) {
            return Ok(false);
        }
        state.queues.insert(
            name.clone(),
            QueueState {
                options: options.clone(),
                paused: false,
                messages: BTreeMap::new(),
                dead: BTreeMap::new(),
                archive: Vec::new(),
            },
        );
        Ok(true)
    }

    async fn drop_queue(&self, name: &QueueName) -> Result<bool> {
        Ok(self.lock().queues.remove(name).is_some())
    }

    async fn set_paused(&self, name: &QueueName, paused: bool) -> Result<()> {
        self.lock().queue_mut(name)?.paused = paused;
        Ok(())
    }

    async fn purge_queue(&self, name: &QueueName) -> Result<u64> {
        let mut state = self.lock();
        let queue = state.queue_mut(name)?;
        let purged = queue.messages.len() as u64;
        queue.messages.clear();
        Ok(purged)
    }

    async fn queue_info(&self, name: &QueueName) -> Result<QueueInfo> {
        let state = self.lock();
        let queue = state.queue(name)?;
        Ok(QueueInfo {
            name: name.clone(),
            options: queue.options.clone(),
            paused: queue.paused,
        })
    }

    async fn list_queues(&self) -> Result<Vec<QueueInfo>> {
        let state = self.lock();
        Ok(state
            .queues
            .iter()
            .map(|(name, q)| QueueInfo {
                name: name.clone(),
                options: q.options.clone(),
                paused: q.paused,
            })
            .collect())
    }
}

impl Producer for MemoryBackend {
    async fn send(&self, queue: &QueueName, message: NewMessage) -> Result<MessageId> {
        let ids = self.send_batch(queue, vec![message]).await?;
        Ok(ids[0])
    }

    async fn send_batch(
        &self,
        queue: &QueueName,
        messages: Vec<NewMessage>,
    ) -> Result<Vec<MessageId>> {
        for message in &messages {
            message.check(self.max_payload_bytes)?;
        }
        self.lock().insert(queue, messages, SystemTime::now())
    }
}

impl State {
    /// Stores messages in a queue (which must exist), ids in input order.
    fn insert(
        &mut self,
        queue: &QueueName,
        messages: Vec<NewMessage>,
        now: SystemTime,
    ) -> Result<Vec<MessageId>> {
        self.queue(queue)?;
        let first = self.next_id + 1;
        self.next_id += messages.len() as i64;
        let queue = self.queue_mut(queue)?;
        let mut ids = Vec::with_capacity(messages.len());
        for (id, m) in (first..).zip(messages) {
            queue.messages.insert(
                id,
                Stored {
                    payload: m.payload,
                    content_type: m.content_type,
                    headers: m.headers,
                    priority: m.priority,
                    enqueued_at: now,
                    visible_at: visible_at(m.visibility, now),
                    leased: false,
                    attempts: 0,
                    group_key: m.group_key,
                    last_error: None,
                },
            );
            ids.push(MessageId(id));
        }
        Ok(ids)
    }
}

impl Consumer for MemoryBackend {
    async fn claim(&self, queue: &QueueName, max: usize, lease: Duration) -> Result<Vec<Message>> {
        let now = SystemTime::now();
        let mut state = self.lock();
        let q = state.queue_mut(queue)?;
        if q.paused {
            return Ok(Vec::new());
        }
        let mut candidates: Vec<(Reverse<i16>, SystemTime, i64)> = q
            .messages
            .iter()
            .filter(|(_, m)| m.visible_at <= now && m.group_key.is_none())
            .map(|(id, m)| (Reverse(m.priority), m.visible_at, *id))
            .collect();
        candidates.sort_unstable();
        Ok(candidates
            .into_iter()
            .take(max)
            .map(|(_, _, id)| q.lease(queue, id, now, lease))
            .collect())
    }

    async fn ack(&self, leases: &[Lease]) -> Result<u64> {
        let now = SystemTime::now();
        let mut state = self.lock();
        let mut acked = 0;
        for lease in leases {
            if let Some((_, q)) = state.current(lease) {
                let stored = q.messages.remove(&lease.id.0).expect("current lease");
                if q.options.keep_history {
                    q.archive.push((now, stored));
                }
                acked += 1;
            }
        }
        Ok(acked)
    }

    async fn extend(&self, leases: &[Lease], lease: Duration) -> Result<u64> {
        let expires = SystemTime::now() + lease;
        let mut state = self.lock();
        let mut extended = 0;
        for l in leases {
            if let Some((_, q)) = state.current(l) {
                let m = q.messages.get_mut(&l.id.0).expect("current lease");
                if m.leased {
                    m.visible_at = expires;
                    extended += 1;
                }
            }
        }
        Ok(extended)
    }

    async fn nack(&self, lease: &Lease, delay: Duration, error: Option<&str>) -> Result<bool> {
        let now = SystemTime::now();
        let mut state = self.lock();
        let Some((_, q)) = state.current(lease) else {
            return Ok(false);
        };
        let m = q.messages.get_mut(&lease.id.0).expect("current lease");
        m.leased = false;
        m.visible_at = now + delay;
        m.last_error = error.map(str::to_owned);
        Ok(true)
    }

    async fn dead_letter(&self, lease: &Lease, reason: &str) -> Result<bool> {
        let now = SystemTime::now();
        let mut state = self.lock();
        let Some((name, q)) = state.current(lease) else {
            return Ok(false);
        };
        let name = name.clone();
        let m = q.messages.remove(&lease.id.0).expect("current lease");
        q.dead.insert(
            lease.id.0,
            DeadMessage {
                id: lease.id,
                queue: name,
                payload: m.payload,
                content_type: m.content_type,
                headers: m.headers,
                priority: m.priority,
                group_key: m.group_key,
                enqueued_at: m.enqueued_at,
                attempts: m.attempts,
                failed_at: now,
                error: reason.to_owned(),
            },
        );
        Ok(true)
    }
}

impl DeadLetters for MemoryBackend {
    async fn list_dead(&self, queue: &QueueName, limit: usize) -> Result<Vec<DeadMessage>> {
        let state = self.lock();
        let mut dead: Vec<DeadMessage> = state.queue(queue)?.dead.values().cloned().collect();
        dead.sort_by_key(|d| (d.failed_at, d.id));
        dead.truncate(limit);
        Ok(dead)
    }

    async fn retry_dead(&self, queue: &QueueName, which: Selection<'_>) -> Result<u64> {
        let now = SystemTime::now();
        let mut state = self.lock();
        let q = state.queue_mut(queue)?;
        let ids = ids_of(which, &q.dead);
        for id in &ids {
            let d = q.dead.remove(id).expect("selected id exists");
            q.messages.insert(
                *id,
                Stored {
                    payload: d.payload,
                    content_type: d.content_type,
                    headers: d.headers,
                    priority: d.priority,
                    enqueued_at: d.enqueued_at,
                    visible_at: now,
                    leased: false,
                    attempts: 0,
                    group_key: d.group_key,
                    last_error: Some(d.error),
                },
            );
        }
        Ok(ids.len() as u64)
    }

    async fn discard_dead(&self, queue: &QueueName, which: Selection<'_>) -> Result<u64> {
        let mut state = self.lock();
        let q = state.queue_mut(queue)?;
        let ids = ids_of(which, &q.dead);
        for id in &ids {
            q.dead.remove(id);
        }
        Ok(ids.len() as u64)
    }
}

impl Stats for MemoryBackend {
    async fn stats(&self) -> Result<Vec<QueueStats>> {
        let now = SystemTime::now();
        let state = self.lock();
        Ok(state
            .queues
            .iter()
            .map(|(name, q)| {
                let mut stats = QueueStats {
                    queue: name.clone(),
                    paused: q.paused,
                    ready: 0,
                    in_flight: 0,
                    scheduled: 0,
                    dead_lettered: q.dead.len() as u64,
                    oldest_ready_age: None,
                };
                for m in q.messages.values() {
                    if m.visible_at <= now {
                        stats.ready += 1;
                        let age = now.duration_since(m.visible_at).unwrap_or_default();
                        stats.oldest_ready_age = stats.oldest_ready_age.max(Some(age));
                    } else if m.leased {
                        stats.in_flight += 1;
                    } else {
                        stats.scheduled += 1;
                    }
                }
                stats
            })
            .collect())
    }
}

impl ProcessRegistry for MemoryBackend {
    async fn register(&self, info: &ProcessInfo) -> Result<ProcessId> {
        let now = SystemTime::now();
        let mut state = self.lock();
        state.next_process += 1;
        let id = ProcessId(state.next_process);
        state.processes.insert(
            id.0,
            ProcessRecord {
                id,
                info: info.clone(),
                busy: 0,
                started_at: now,
                heartbeat_at: now,
            },
        );
        Ok(id)
    }

    async fn heartbeat(&self, id: ProcessId, busy: u32) -> Result<bool> {
        let mut state = self.lock();
        Ok(match state.processes.get_mut(&id.0) {
            Some(record) => {
                record.busy = busy;
                record.heartbeat_at = SystemTime::now();
                true
            }
            None => false,
        })
    }

    async fn deregister(&self, id: ProcessId) -> Result<()> {
        self.lock().processes.remove(&id.0);
        Ok(())
    }

    async fn prune_stale(&self, stale_after: Duration) -> Result<u64> {
        let now = SystemTime::now();
        let mut state = self.lock();
        let before = state.processes.len();
        state
            .processes
            .retain(|_, p| now.duration_since(p.heartbeat_at).unwrap_or_default() <= stale_after);
        Ok((before - state.processes.len()) as u64)
    }

    async fn processes(&self) -> Result<Vec<ProcessRecord>> {
        Ok(self.lock().processes.values().cloned().collect())
    }
}

/// The in-memory backend has no connections: its fetcher is a handle on the same state.
impl crate::OpenFetcher for MemoryBackend {
    type Fetcher = MemoryBackend;

    async fn open_fetcher(&self) -> Result<MemoryBackend> {
        Ok(self.clone())
    }
}

impl crate::Fetcher for MemoryBackend {
    async fn claim(
        &mut self,
        queue: &QueueName,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Message>> {
        Consumer::claim(&*self, queue, max, lease).await
    }

    async fn queue_info(&mut self, queue: &QueueName) -> Result<QueueInfo> {
        QueueAdmin::queue_info(&*self, queue).await
    }

    async fn group_candidates(
        &mut self,
        queue: &QueueName,
        limit: usize,
        exclude: &[String],
    ) -> Result<Vec<String>> {
        let now = SystemTime::now();
        let state = self.lock();
        let q = state.queue(queue)?;
        if q.paused {
            return Ok(Vec::new());
        }
        let mut seen = std::collections::HashSet::new();
        let mut ready = Vec::new();
        // Messages are ordered by id, so the first of each group is its head.
        for m in q.messages.values() {
            let Some(group) = &m.group_key else { continue };
            if seen.insert(group.clone()) && m.visible_at <= now && !exclude.contains(group) {
                ready.push(group.clone());
                if ready.len() == limit {
                    break;
                }
            }
        }
        Ok(ready)
    }
}

/// A group session of the in-memory backend: its locks are released when it is dropped,
/// as a Postgres session's advisory locks are when its connection closes.
#[derive(Debug)]
pub struct MemoryGroupSession {
    backend: MemoryBackend,
    id: u64,
}

impl Drop for MemoryGroupSession {
    fn drop(&mut self) {
        let id = self.id;
        self.backend
            .lock()
            .group_locks
            .retain(|_, holder| *holder != id);
    }
}

impl crate::GroupSession for MemoryGroupSession {
    async fn try_lock(&mut self, queue: &QueueName, group: &str) -> Result<bool> {
        let mut state = self.backend.lock();
        let holder = state
            .group_locks
            .entry((queue.clone(), group.to_owned()))
            .or_insert(self.id);
        Ok(*holder == self.id)
    }

    async fn claim_head(
        &mut self,
        queue: &QueueName,
        group: &str,
        lease: Duration,
    ) -> Result<Option<Message>> {
        let now = SystemTime::now();
        let mut state = self.backend.lock();
        let q = state.queue_mut(queue)?;
        if q.paused {
            return Ok(None);
        }
        Ok(match q.group_head(group, now) {
            Some((id, true)) => Some(q.lease(queue, id, now, lease)),
            _ => None,
        })
    }

    async fn extend(&mut self, lease: &Lease, by: Duration) -> Result<bool> {
        Ok(Consumer::extend(&self.backend, std::slice::from_ref(lease), by).await? == 1)
    }

    async fn ack(&mut self, lease: &Lease) -> Result<bool> {
        Ok(Consumer::ack(&self.backend, std::slice::from_ref(lease)).await? == 1)
    }

    async fn nack(&mut self, lease: &Lease, delay: Duration, error: Option<&str>) -> Result<bool> {
        Consumer::nack(&self.backend, lease, delay, error).await
    }

    async fn dead_letter(&mut self, lease: &Lease, reason: &str) -> Result<bool> {
        Consumer::dead_letter(&self.backend, lease, reason).await
    }

    async fn unlock(&mut self, queue: &QueueName, group: &str) -> Result<()> {
        let mut state = self.backend.lock();
        let key = (queue.clone(), group.to_owned());
        if state.group_locks.get(&key) == Some(&self.id) {
            state.group_locks.remove(&key);
        }
        Ok(())
    }
}

/// The recovery session of the in-memory backend.
#[derive(Debug, Clone)]
pub struct MemoryGroupRecovery {
    backend: MemoryBackend,
}

impl ProcessRegistry for MemoryGroupRecovery {
    async fn register(&self, info: &ProcessInfo) -> Result<ProcessId> {
        self.backend.register(info).await
    }
    async fn heartbeat(&self, id: ProcessId, busy: u32) -> Result<bool> {
        self.backend.heartbeat(id, busy).await
    }
    async fn deregister(&self, id: ProcessId) -> Result<()> {
        self.backend.deregister(id).await
    }
    async fn prune_stale(&self, stale_after: Duration) -> Result<u64> {
        self.backend.prune_stale(stale_after).await
    }
    async fn processes(&self) -> Result<Vec<ProcessRecord>> {
        self.backend.processes().await
    }
}

impl crate::GroupRecovery for MemoryGroupRecovery {
    async fn recover(&mut self, queues: &[QueueName]) -> Result<u64> {
        let now = SystemTime::now();
        let mut state = self.backend.lock();
        let State {
            queues: all,
            group_locks,
            ..
        } = &mut *state;
        let mut recovered = 0;
        for queue in queues {
            let Some(q) = all.get_mut(queue) else {
                continue;
            };
            for m in q.messages.values_mut() {
                let Some(group) = &m.group_key else { continue };
                let locked = group_locks.contains_key(&(queue.clone(), group.clone()));
                if m.leased && m.visible_at > now && !locked {
                    m.leased = false;
                    m.visible_at = now;
                    recovered += 1;
                }
            }
        }
        Ok(recovered)
    }
}

impl crate::OpenGroupSession for MemoryBackend {
    type Session = MemoryGroupSession;
    type Recovery = MemoryGroupRecovery;

    async fn open_group_session(&self) -> Result<MemoryGroupSession> {
        let mut state = self.lock();
        state.next_session += 1;
        Ok(MemoryGroupSession {
            backend: self.clone(),
            id: state.next_session,
        })
    }

    async fn open_group_recovery(&self) -> Result<MemoryGroupRecovery> {
        Ok(MemoryGroupRecovery {
            backend: self.clone(),
        })
    }
}

impl StreamStore for MemoryBackend {
    async fn publish(&self, stream: &StreamName, event: &str, data: &str) -> Result<i64> {
        let mut state = self.lock();
        state.next_event += 1;
        let id = state.next_event;
        state
            .streams
            .entry(stream.clone())
            .or_default()
            .push(StreamEvent::new(
                id,
                stream.clone(),
                event.to_owned(),
                data.to_owned(),
                SystemTime::now(),
            ));
        Ok(id)
    }

    /// The in-memory backend has no listeners to carry ephemeral broadcasts; only one
    /// too large for a notification is kept (durably, as Postgres would).
    async fn broadcast(&self, stream: &StreamName, event: &str, data: &str) -> Result<Option<i64>> {
        if event.len() + data.len() > MAX_EPHEMERAL_BYTES {
            return self.publish(stream, event, data).await.map(Some);
        }
        Ok(None)
    }

    async fn read_after(
        &self,
        stream: &StreamName,
        after: i64,
        limit: usize,
    ) -> Result<Vec<StreamEvent>> {
        let state = self.lock();
        Ok(state
            .streams
            .get(stream)
            .map(|events| {
                events
                    .iter()
                    .filter(|e| e.id > after)
                    .take(limit)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default())
    }

    async fn horizon(&self, stream: &StreamName, cursor: i64) -> Result<Horizon> {
        let state = self.lock();
        let pruned = state.pruned_through.get(stream).copied().unwrap_or(0);
        Ok(if cursor < pruned {
            Horizon::Gap
        } else {
            Horizon::Complete
        })
    }

    async fn prune(&self, retention: Duration, batch: usize) -> Result<u64> {
        let _ = batch; // one lock, no statements to bound
        let cutoff = SystemTime::now() - retention;
        let mut state = self.lock();
        let State {
            streams,
            pruned_through,
            ..
        } = &mut *state;
        let mut pruned = 0;
        for (name, events) in streams.iter_mut() {
            let before = events.len();
            if let Some(last) = events
                .iter()
                .filter(|e| e.published_at < cutoff)
                .map(|e| e.id)
                .max()
            {
                let mark = pruned_through.entry(name.clone()).or_default();
                *mark = (*mark).max(last);
            }
            events.retain(|e| e.published_at >= cutoff);
            pruned += (before - events.len()) as u64;
        }
        Ok(pruned)
    }
}
