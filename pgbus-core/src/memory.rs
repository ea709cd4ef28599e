//! The in-memory reference backend.
//!
//! It keeps the whole contract (ordering, leases, fencing, dead letters, stats) in a
//! mutex-protected map, so pools, workers and the stream dispatcher can be tested without a
//! database, and so the conformance suite has a second implementation to agree with.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

mod topics;

use crate::process::{
    ProcessId, ProcessInfo, ProcessRecord, ProcessRegistry, QueueThroughput, THROUGHPUT_BUCKET,
    THROUGHPUT_RETENTION,
};
use crate::queue::{
    Consumer, DeadLetters, Producer, QueueAdmin, QueueInfo, QueueOptions, QueueStats, Selection,
    Stats,
};
use crate::stream::{
    Horizon, SignalFn, StreamEvent, StreamListener, StreamName, StreamSignal, StreamStore,
    MAX_EPHEMERAL_BYTES,
};
use crate::{
    ContentType, DeadMessage, Error, Extension, GroupFailure, GroupNext, GroupSettle, Headers,
    KeyLimit, Lease, Limits, Message, MessageId, NewMessage, OnConflict, OrphanSightings,
    QueueName, Recovered, Result, Settled, Visibility, DEFAULT_MAX_PAYLOAD_BYTES,
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
    stream_listeners: Vec<Weak<ListenerState>>,
    /// Key limits, with the start and count of the current rate window.
    limits: BTreeMap<String, (KeyLimit, SystemTime, u32)>,
    /// Bindings, the event log and dedup records.
    topics: topics::TopicState,
}

#[derive(Debug)]
struct QueueState {
    options: QueueOptions,
    paused: bool,
    /// The circuit breaker is open until then.
    breaker_until: SystemTime,
    messages: BTreeMap<i64, Stored>,
    dead: BTreeMap<i64, DeadMessage>,
    archive: Vec<(SystemTime, Stored)>,
    /// Reported throughput: bucket start to (processed, failed).
    throughput: BTreeMap<SystemTime, (u64, u64)>,
}

#[derive(Debug, Clone)]
struct Stored {
    payload: Vec<u8>,
    content_type: ContentType,
    headers: Headers,
    priority: i16,
    enqueued_at: SystemTime,
    /// When it becomes claimable; while leased, when the lease runs out.
    visible_at: SystemTime,
    /// When it had become claimable before its current lease: a release puts it back
    /// there, in its old place among the others.
    ready_at: SystemTime,
    leased: bool,
    attempts: u32,
    group_key: Option<String>,
    unique_key: Option<String>,
    limit_key: Option<String>,
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
    /// Whether claims hand out nothing now: paused, or the circuit breaker is open.
    fn closed(&self, now: SystemTime) -> bool {
        self.paused || self.breaker_until > now
    }

    /// Leases message `id` (which must exist) and returns it as claimed.
    fn lease(&mut self, queue: &QueueName, id: i64, now: SystemTime, lease: Duration) -> Message {
        let expires = now + lease;
        let m = self.messages.get_mut(&id).expect("claimed message exists");
        m.leased = true;
        m.attempts += 1;
        m.ready_at = m.visible_at;
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
                breaker_until: SystemTime::UNIX_EPOCH,
                messages: BTreeMap::new(),
                dead: BTreeMap::new(),
                archive: Vec::new(),
                throughput: BTreeMap::new(),
            },
        );
        Ok(true)
    }

    async fn alter_queue(&self, name: &QueueName, options: &QueueOptions) -> Result<()> {
        let mut state = self.lock();
        let queue = state.queue_mut(name)?;
        queue.options = options.clone();
        if options.circuit_breaker.is_none() {
            queue.breaker_until = SystemTime::UNIX_EPOCH;
        }
        Ok(())
    }

    async fn drop_queue(&self, name: &QueueName) -> Result<bool> {
        Ok(self.lock().queues.remove(name).is_some())
    }

    async fn trip_breaker(&self, name: &QueueName, backoff: Duration) -> Result<()> {
        self.lock().queue_mut(name)?.breaker_until = SystemTime::now() + backoff;
        Ok(())
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
    /// Stores messages in a queue (which must exist), ids in input order; a duplicate
    /// unique key returns the existing id or refuses the whole batch.
    fn insert(
        &mut self,
        queue: &QueueName,
        messages: Vec<NewMessage>,
        now: SystemTime,
    ) -> Result<Vec<MessageId>> {
        // Keys held now, and by the batch as it goes; decided before anything is stored so
        // a refused batch stores nothing.
        let mut held: HashMap<String, i64> = self
            .queue(queue)?
            .messages
            .iter()
            .filter_map(|(id, m)| m.unique_key.clone().map(|k| (k, *id)))
            .collect();
        let mut next_id = self.next_id;
        let mut plan = Vec::with_capacity(messages.len());
        for m in messages {
            if let Some((unique, key)) = m
                .unique
                .as_ref()
                .and_then(|u| Some((u, u.until_done_key()?)))
            {
                if let Some(&existing) = held.get(key) {
                    if unique.on_conflict == OnConflict::Reject {
                        return Err(Error::DuplicateJob {
                            queue: queue.clone(),
                            key: unique.key.clone(),
                            existing: Some(MessageId(existing)),
                        });
                    }
                    plan.push((existing, None));
                    continue;
                }
            }
            next_id += 1;
            if let Some(key) = m.unique.as_ref().and_then(|u| u.until_done_key()) {
                held.insert(key.to_owned(), next_id);
            }
            plan.push((next_id, Some(m)));
        }
        self.next_id = next_id;
        let name = queue;
        let queue = self.queue_mut(queue)?;
        let mut ids = Vec::with_capacity(plan.len());
        for (id, m) in plan {
            ids.push(MessageId(id));
            let Some(m) = m else { continue };
            let limit_key = m.limit_key_in(name);
            let visible_at = visible_at(m.visibility, now);
            queue.messages.insert(
                id,
                Stored {
                    payload: m.payload,
                    content_type: m.content_type,
                    headers: m.headers,
                    priority: m.priority,
                    enqueued_at: now,
                    visible_at,
                    ready_at: visible_at,
                    leased: false,
                    attempts: 0,
                    group_key: m.group_key,
                    limit_key,
                    unique_key: m.unique.and_then(|u| u.until_done_key().map(str::to_owned)),
                    last_error: None,
                },
            );
        }
        Ok(ids)
    }
}

impl Consumer for MemoryBackend {
    async fn claim(&self, queue: &QueueName, max: usize, lease: Duration) -> Result<Vec<Message>> {
        crate::check_delay("a lease", lease)?;
        let now = SystemTime::now();
        let mut state = self.lock();
        let q = state.queue_mut(queue)?;
        if q.closed(now) {
            return Ok(Vec::new());
        }
        let mut candidates: Vec<(Reverse<i16>, SystemTime, i64)> = q
            .messages
            .iter()
            .filter(|(_, m)| m.visible_at <= now && m.group_key.is_none() && m.limit_key.is_none())
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

    async fn extend(&self, leases: &[Lease], lease: Duration) -> Result<Extension> {
        crate::check_delay("a lease", lease)?;
        let expires = SystemTime::now() + lease;
        let mut state = self.lock();
        // Nothing here is ever busy elsewhere (one lock guards all): every lease is
        // extended or lost.
        let mut found = Extension::default();
        for l in leases {
            let leased = state
                .current(l)
                .and_then(|(_, q)| q.messages.get_mut(&l.id.0))
                .filter(|m| m.leased);
            match leased {
                Some(m) => {
                    m.visible_at = expires;
                    found.extended += 1;
                }
                None => found.lost.push(*l),
            }
        }
        Ok(found)
    }

    async fn nack(&self, lease: &Lease, delay: Duration, error: Option<&str>) -> Result<bool> {
        crate::check_delay("a retry delay", delay)?;
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

    async fn release(&self, leases: &[Lease]) -> Result<u64> {
        let mut state = self.lock();
        let mut released = 0;
        for lease in leases {
            let leased = state
                .current(lease)
                .and_then(|(_, q)| q.messages.get_mut(&lease.id.0))
                .filter(|m| m.leased);
            if let Some(m) = leased {
                m.leased = false;
                m.attempts -= 1;
                m.visible_at = m.ready_at;
                released += 1;
            }
        }
        Ok(released)
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
                limit_key: m.limit_key,
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
                    ready_at: now,
                    leased: false,
                    attempts: 0,
                    group_key: d.group_key,
                    unique_key: None,
                    limit_key: d.limit_key,
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
            .map(|(name, q)| queue_stats(name, q, now))
            .collect())
    }

    async fn queue_stats(&self, queue: &QueueName) -> Result<QueueStats> {
        let state = self.lock();
        Ok(queue_stats(queue, state.queue(queue)?, SystemTime::now()))
    }
}

/// One queue's counts at `now` (both [`Stats`] methods).
fn queue_stats(name: &QueueName, q: &QueueState, now: SystemTime) -> QueueStats {
    let mut stats = QueueStats {
        queue: name.clone(),
        paused: q.paused,
        ready: 0,
        in_flight: 0,
        scheduled: 0,
        next_due_in: None,
        dead_lettered: q.dead.len() as u64,
        oldest_ready_age: None,
        breaker_open_for: q.breaker_until.duration_since(now).ok(),
        processed_per_minute: 0,
        failed_per_minute: 0,
    };
    let minute_ago = now - Duration::from_secs(60);
    let last_minute = (Bound::Excluded(minute_ago), Bound::Unbounded);
    for (processed, failed) in q.throughput.range(last_minute).map(|(_, c)| c) {
        stats.processed_per_minute += processed;
        stats.failed_per_minute += failed;
    }
    for m in q.messages.values() {
        if m.visible_at <= now {
            stats.ready += 1;
            let age = now.duration_since(m.visible_at).unwrap_or_default();
            stats.oldest_ready_age = stats.oldest_ready_age.max(Some(age));
        } else if m.leased {
            stats.in_flight += 1;
        } else {
            stats.scheduled += 1;
            let due = m.visible_at.duration_since(now).unwrap_or_default();
            stats.next_due_in = Some(stats.next_due_in.map_or(due, |d| d.min(due)));
        }
    }
    stats
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

    async fn record_throughput(&self, counts: &[QueueThroughput]) -> Result<()> {
        let now = SystemTime::now();
        let bucket = throughput_bucket(now);
        let horizon = now - THROUGHPUT_RETENTION;
        let mut state = self.lock();
        for count in counts {
            if let Some(q) = state.queues.get_mut(&count.queue) {
                let (processed, failed) = q.throughput.entry(bucket).or_default();
                *processed += count.processed;
                *failed += count.failed;
            }
        }
        for q in state.queues.values_mut() {
            q.throughput.retain(|bucket, _| *bucket >= horizon);
        }
        Ok(())
    }
}

/// The start of the throughput bucket `at` falls in.
fn throughput_bucket(at: SystemTime) -> SystemTime {
    let since_epoch = at
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let width = THROUGHPUT_BUCKET.as_secs();
    SystemTime::UNIX_EPOCH + Duration::from_secs(since_epoch.as_secs() / width * width)
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

    async fn claim_limited(
        &mut self,
        queue: &QueueName,
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Message>> {
        let now = SystemTime::now();
        let mut state = self.lock();
        let state = &mut *state;
        if state.queue(queue)?.closed(now) {
            return Ok(Vec::new());
        }
        let mut running: HashMap<String, u32> = HashMap::new();
        for q in state.queues.values() {
            for m in q.messages.values() {
                if let (Some(key), true) = (&m.limit_key, m.leased && m.visible_at > now) {
                    *running.entry(key.clone()).or_default() += 1;
                }
            }
        }
        let q = state.queues.get_mut(queue).expect("checked above");
        let mut candidates: Vec<(Reverse<i16>, SystemTime, i64)> = q
            .messages
            .iter()
            .filter(|(_, m)| m.visible_at <= now && m.limit_key.is_some())
            .map(|(id, m)| (Reverse(m.priority), m.visible_at, *id))
            .collect();
        candidates.sort_unstable();
        let mut claimed = Vec::new();
        for (_, _, id) in candidates {
            if claimed.len() == max {
                break;
            }
            let key = q.messages[&id].limit_key.clone().expect("filtered");
            // A while-running unique key without limits of its own runs one at a time.
            let mut implicit = (key.starts_with(crate::WHILE_RUNNING_PREFIX)
                && !state.limits.contains_key(&key))
            .then(|| (KeyLimit::concurrency(1), now, 0));
            let limits = match implicit.as_mut() {
                Some(limits) => Some(limits),
                None => state.limits.get_mut(&key),
            };
            if let Some((limit, window_start, started)) = limits {
                if limit
                    .concurrency
                    .is_some_and(|n| running.get(&key).copied().unwrap_or(0) >= n)
                {
                    continue;
                }
                if let Some((n, interval)) = limit.rate {
                    if *window_start + interval <= now {
                        *window_start = now;
                        *started = 0;
                    }
                    if *started >= n {
                        continue;
                    }
                    *started += 1;
                }
            }
            *running.entry(key).or_default() += 1;
            claimed.push(q.lease(queue, id, now, lease));
        }
        Ok(claimed)
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
        if q.closed(now) {
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

    async fn claim(
        &mut self,
        queue: &QueueName,
        group: &str,
        lease: Duration,
        max: usize,
    ) -> Result<Vec<Message>> {
        self.claim_run(queue, group, lease, max, &[])
    }

    async fn settle_orphans(
        &mut self,
        finished: &[Lease],
        unstarted: &[Lease],
    ) -> Result<(u64, u64)> {
        let acked = Consumer::ack(&self.backend, finished).await?;
        Ok((acked, Consumer::release(&self.backend, unstarted).await?))
    }

    async fn extend(&mut self, leases: &[Lease], by: Duration) -> Result<Extension> {
        Consumer::extend(&self.backend, leases, by).await
    }

    async fn settle(&mut self, settle: &GroupSettle, then: GroupNext<'_>) -> Result<Settled> {
        let mut settled = Settled::default();
        for lease in &settle.ack {
            if Consumer::ack(&self.backend, std::slice::from_ref(lease)).await? == 1 {
                settled.acked.push(lease.id);
            }
        }
        settled.failed = match &settle.failed {
            Some((lease, GroupFailure::Retry { delay, error })) => {
                Consumer::nack(&self.backend, lease, *delay, error.as_deref()).await?
            }
            Some((lease, GroupFailure::DeadLetter { reason })) => {
                Consumer::dead_letter(&self.backend, lease, reason).await?
            }
            None => false,
        };
        {
            let now = SystemTime::now();
            let mut state = self.backend.lock();
            for lease in &settle.give_back {
                let Some((_, q)) = state.current(lease) else {
                    continue;
                };
                let m = q.messages.get_mut(&lease.id.0).expect("current lease");
                if m.leased {
                    // It was visible when it was claimed.
                    m.leased = false;
                    m.visible_at = now;
                    m.attempts -= 1;
                    settled.given_back += 1;
                }
            }
        }
        match then {
            GroupNext::Keep => {}
            GroupNext::Claim {
                queue,
                group,
                lease,
                max,
            } => {
                // The run stops before what this step retried or gave back, as it would
                // had the claim read the group before the settle.
                let stop: Vec<Lease> = settle
                    .failed
                    .iter()
                    .map(|(lease, _)| *lease)
                    .chain(settle.give_back.iter().copied())
                    .collect();
                settled.claimed = self.claim_run(queue, group, lease, max, &stop)?;
                if settled.claimed.is_empty() {
                    self.unlock(queue, group).await?;
                }
            }
            GroupNext::Release { queue, group } => self.unlock(queue, group).await?,
        }
        Ok(settled)
    }

    async fn trip_breaker(&mut self, queue: &QueueName, backoff: Duration) -> Result<()> {
        QueueAdmin::trip_breaker(&self.backend, queue, backoff).await
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

impl MemoryGroupSession {
    /// [`GroupSession::claim`](crate::GroupSession::claim), stopping also before the
    /// messages of `stop`.
    fn claim_run(
        &self,
        queue: &QueueName,
        group: &str,
        lease: Duration,
        max: usize,
        stop: &[Lease],
    ) -> Result<Vec<Message>> {
        crate::check_delay("a lease", lease)?;
        let now = SystemTime::now();
        let mut state = self.backend.lock();
        // Only the lock holder claims.
        let key = (queue.clone(), group.to_owned());
        if state.group_locks.get(&key) != Some(&self.id) {
            return Ok(Vec::new());
        }
        let q = state.queue_mut(queue)?;
        if q.closed(now) {
            return Ok(Vec::new());
        }
        // A leased message's `visible_at` is its lease's end: the run stops at the first
        // message that is delayed or leased.
        let run: Vec<i64> = q
            .messages
            .iter()
            .filter(|(_, m)| m.group_key.as_deref() == Some(group))
            .take(max)
            .take_while(|(id, m)| m.visible_at <= now && !stop.iter().any(|l| l.id.0 == **id))
            .map(|(id, _)| *id)
            .collect();
        Ok(run
            .into_iter()
            .map(|id| q.lease(queue, id, now, lease))
            .collect())
    }
}

/// The recovery session of the in-memory backend.
#[derive(Debug, Clone)]
pub struct MemoryGroupRecovery {
    backend: MemoryBackend,
    sightings: OrphanSightings,
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
    async fn record_throughput(&self, counts: &[QueueThroughput]) -> Result<()> {
        self.backend.record_throughput(counts).await
    }
}

impl crate::GroupRecovery for MemoryGroupRecovery {
    async fn recover(&mut self, queues: &[QueueName], grace: Duration) -> Result<Recovered> {
        let now = SystemTime::now();
        let due = self.sightings.due(grace);
        let mut state = self.backend.lock();
        let State {
            queues: all,
            group_locks,
            ..
        } = &mut *state;
        let mut freed = 0;
        let mut waiting = Vec::new();
        for queue in queues {
            let Some(q) = all.get_mut(queue) else {
                continue;
            };
            for (id, m) in q.messages.iter_mut() {
                let Some(group) = &m.group_key else { continue };
                let locked = group_locks.contains_key(&(queue.clone(), group.clone()));
                if !m.leased || m.visible_at <= now || locked {
                    continue;
                }
                let claim = (MessageId(*id), m.attempts);
                if due.contains(&claim) {
                    m.leased = false;
                    m.visible_at = now;
                    freed += 1;
                } else {
                    waiting.push(claim);
                }
            }
        }
        drop(state);
        let waiting = self.sightings.observe(waiting);
        Ok(Recovered { freed, waiting })
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
            sightings: OrphanSightings::default(),
        })
    }
}

impl StreamStore for MemoryBackend {
    async fn publish(&self, stream: &StreamName, event: &str, data: &str) -> Result<i64> {
        crate::check_stream_texts(event, data, self.max_payload_bytes)?;
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
        drop(state);
        self.signal(stream, StreamSignal::Published(stream.clone()));
        Ok(id)
    }

    /// Delivered to this backend's stream listeners; one too large for a notification is
    /// kept durably instead, as Postgres would.
    async fn broadcast(&self, stream: &StreamName, event: &str, data: &str) -> Result<Option<i64>> {
        crate::check_stream_texts(event, data, self.max_payload_bytes)?;
        if event.len() + data.len() > MAX_EPHEMERAL_BYTES {
            return self.publish(stream, event, data).await.map(Some);
        }
        self.signal(
            stream,
            StreamSignal::Broadcast {
                stream: stream.clone(),
                event: event.to_owned(),
                data: data.to_owned(),
            },
        );
        Ok(None)
    }

    async fn latest(&self, stream: &StreamName) -> Result<i64> {
        let state = self.lock();
        let stored = state
            .streams
            .get(stream)
            .and_then(|events| events.last())
            .map(|e| e.id);
        let pruned = state.pruned_through.get(stream).copied();
        Ok(stored.or(pruned).unwrap_or(0))
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

impl MemoryBackend {
    /// A [`StreamListener`] for this backend's streams: publishes and broadcasts are
    /// signalled to it at once (there are no transactions to wait for).
    pub fn stream_listener(&self) -> MemoryStreamListener {
        let state = Arc::new(ListenerState::default());
        let mut backend = self.lock();
        backend.stream_listeners.retain(|l| l.strong_count() > 0);
        backend.stream_listeners.push(Arc::downgrade(&state));
        MemoryStreamListener { state }
    }

    fn signal(&self, stream: &StreamName, signal: StreamSignal) {
        let listeners: Vec<_> = self
            .lock()
            .stream_listeners
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for listener in listeners {
            listener.deliver(stream, signal.clone());
        }
    }
}

/// The in-memory [`StreamListener`], from [`MemoryBackend::stream_listener`].
#[derive(Debug, Clone)]
pub struct MemoryStreamListener {
    state: Arc<ListenerState>,
}

#[derive(Default)]
struct ListenerState {
    signal: Mutex<Option<SignalFn>>,
    /// Streams listened to, with how many `listen`s each (as the Postgres listener counts).
    streams: Mutex<HashMap<StreamName, usize>>,
    stopped: AtomicBool,
}

impl std::fmt::Debug for ListenerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ListenerState")
            .field("streams", &self.streams)
            .field("stopped", &self.stopped)
            .finish_non_exhaustive()
    }
}

impl ListenerState {
    fn deliver(&self, stream: &StreamName, signal: StreamSignal) {
        if self.stopped.load(Ordering::SeqCst)
            || !self.streams.lock().expect("streams").contains_key(stream)
        {
            return;
        }
        let target = self.signal.lock().expect("signal").clone();
        if let Some(target) = target {
            target(signal);
        }
    }
}

impl MemoryStreamListener {
    /// Signals [`StreamSignal::Reconnected`], as a real listener does after it lost its
    /// connection.
    pub fn simulate_reconnect(&self) {
        let target = self.state.signal.lock().expect("signal").clone();
        if let Some(target) = target {
            target(StreamSignal::Reconnected);
        }
    }

    /// The streams listened to now.
    pub fn listening(&self) -> Vec<StreamName> {
        let mut streams: Vec<_> = self
            .state
            .streams
            .lock()
            .expect("streams")
            .keys()
            .cloned()
            .collect();
        streams.sort();
        streams
    }
}

impl StreamListener for MemoryStreamListener {
    fn start(&self, signal: SignalFn) -> Result<()> {
        *self.state.signal.lock().expect("signal") = Some(signal);
        Ok(())
    }

    async fn listen(&self, stream: &StreamName) -> Result<()> {
        *self
            .state
            .streams
            .lock()
            .expect("streams")
            .entry(stream.clone())
            .or_default() += 1;
        Ok(())
    }

    async fn unlisten(&self, stream: &StreamName) -> Result<()> {
        let mut streams = self.state.streams.lock().expect("streams");
        if let Some(count) = streams.get_mut(stream) {
            *count -= 1;
            if *count == 0 {
                streams.remove(stream);
            }
        }
        Ok(())
    }

    async fn stop(&self) {
        self.state.stopped.store(true, Ordering::SeqCst);
    }

    fn is_live(&self) -> bool {
        !self.state.stopped.load(Ordering::SeqCst)
    }
}

impl Limits for MemoryBackend {
    async fn set_limit(&self, key: &str, limit: KeyLimit) -> Result<()> {
        crate::check_limit_key(key)?;
        let limit = limit.build()?;
        self.lock()
            .limits
            .insert(key.to_owned(), (limit, SystemTime::now(), 0));
        Ok(())
    }

    async fn remove_limit(&self, key: &str) -> Result<bool> {
        Ok(self.lock().limits.remove(key).is_some())
    }

    async fn limits(&self) -> Result<Vec<(String, KeyLimit)>> {
        Ok(self
            .lock()
            .limits
            .iter()
            .map(|(key, (limit, _, _))| (key.clone(), *limit))
            .collect())
    }
}
