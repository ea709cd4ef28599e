//! Topics, the event log and idempotent-consumer records of the in-memory backend.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime};

use super::{MemoryBackend, State};
use crate::events::{
    Binding, Bound, DedupClaim, Deduplication, EventId, NewEvent, Published, StartAt, TopicPattern,
    TopicStats, Topics,
};
use crate::{ContentType, Headers, Lease, NewMessage, QueueName, Result};

#[derive(Debug, Default)]
pub(super) struct TopicState {
    bindings: BTreeMap<(TopicPattern, QueueName), SystemTime>,
    log: Vec<Logged>,
    dedup: HashMap<(QueueName, EventId), Claim>,
}

#[derive(Debug, Clone)]
struct Logged {
    event: NewEvent,
    headers: Headers,
    copies: u64,
    published_at: SystemTime,
}

#[derive(Debug, Clone, Copy)]
struct Claim {
    completed: bool,
    lease: Lease,
    updated_at: SystemTime,
}

fn copy(payload: &[u8], content_type: ContentType, headers: &Headers) -> NewMessage {
    let mut message = NewMessage::raw(payload.to_vec(), content_type);
    message.headers = headers.clone();
    message
}

impl State {
    /// Whether the delivery `lease` still holds its message.
    fn lease_live(&self, lease: &Lease, now: SystemTime) -> bool {
        self.queues.values().any(|q| {
            q.messages
                .get(&lease.id.0)
                .is_some_and(|m| m.attempts == lease.attempt && m.leased && m.visible_at > now)
        })
    }
}

impl Topics for MemoryBackend {
    async fn bind(
        &self,
        pattern: &TopicPattern,
        queue: &QueueName,
        start: StartAt,
    ) -> Result<Bound> {
        let now = SystemTime::now();
        let mut state = self.lock();
        state.queue(queue)?;
        let key = (pattern.clone(), queue.clone());
        if state.topics.bindings.contains_key(&key) {
            return Ok(Bound::new(false, 0));
        }
        state.topics.bindings.insert(key, now);
        let since = match start {
            StartAt::Now => return Ok(Bound::new(true, 0)),
            StartAt::Since(at) => Some(at),
            StartAt::Earliest => None,
        };
        let replay: Vec<NewMessage> = state
            .topics
            .log
            .iter()
            .filter(|l| since.is_none_or(|at| l.published_at >= at))
            .filter(|l| pattern.matches(&l.event.routing_key))
            .map(|l| copy(&l.event.payload, l.event.content_type, &l.headers))
            .collect();
        let replayed = state.insert(queue, replay, now)?.len() as u64;
        Ok(Bound::new(true, replayed))
    }

    async fn unbind(&self, pattern: &TopicPattern, queue: &QueueName) -> Result<bool> {
        let key = (pattern.clone(), queue.clone());
        Ok(self.lock().topics.bindings.remove(&key).is_some())
    }

    async fn bindings(&self) -> Result<Vec<Binding>> {
        let state = self.lock();
        Ok(state
            .topics
            .bindings
            .iter()
            .filter(|((_, queue), _)| state.queues.contains_key(queue))
            .map(|((pattern, queue), at)| Binding::new(pattern.clone(), queue.clone(), *at))
            .collect())
    }

    async fn publish_batch(&self, events: Vec<NewEvent>) -> Result<Vec<Published>> {
        for event in &events {
            event.check(self.max_payload_bytes)?;
        }
        let now = SystemTime::now();
        let mut state = self.lock();
        let mut reports = Vec::with_capacity(events.len());
        for event in events {
            let headers = event.envelope_headers(now);
            // A queue bound by several matching patterns gets one copy; bindings of
            // dropped queues are gone with them.
            let mut queues: Vec<QueueName> = state
                .topics
                .bindings
                .keys()
                .filter(|(pattern, queue)| {
                    pattern.matches(&event.routing_key) && state.queues.contains_key(queue)
                })
                .map(|(_, queue)| queue.clone())
                .collect();
            queues.sort();
            queues.dedup();
            for queue in &queues {
                let message = copy(&event.payload, event.content_type, &headers);
                state.insert(queue, vec![message], now)?;
            }
            let copies = queues.len() as u64;
            reports.push(Published::new(event.id, copies));
            state.topics.log.push(Logged {
                event,
                headers,
                copies,
                published_at: now,
            });
        }
        Ok(reports)
    }

    async fn topic_stats(&self) -> Result<Vec<TopicStats>> {
        let state = self.lock();
        let mut by_key: BTreeMap<_, TopicStats> = BTreeMap::new();
        for l in &state.topics.log {
            let stats = by_key
                .entry(l.event.routing_key.clone())
                .or_insert_with(|| TopicStats::new(l.event.routing_key.clone(), l.published_at));
            stats.published += 1;
            stats.unrouted += u64::from(l.copies == 0);
            stats.copies += l.copies;
            stats.last_published_at = stats.last_published_at.max(l.published_at);
        }
        Ok(by_key.into_values().collect())
    }

    async fn prune_event_log(&self, retention: Duration, _batch: usize) -> Result<u64> {
        let cutoff = SystemTime::now() - retention;
        let log = &mut self.lock().topics.log;
        let before = log.len();
        log.retain(|l| l.published_at >= cutoff);
        Ok((before - log.len()) as u64)
    }
}

impl Deduplication for MemoryBackend {
    async fn claim_event(
        &self,
        subscriber: &QueueName,
        event: EventId,
        lease: &Lease,
    ) -> Result<DedupClaim> {
        let now = SystemTime::now();
        let mut state = self.lock();
        let key = (subscriber.clone(), event);
        let verdict = match state.topics.dedup.get(&key) {
            None => DedupClaim::Run,
            Some(claim) if claim.completed => DedupClaim::Done,
            // The same message's earlier attempt, or a delivery whose lease is gone, died
            // while holding the claim.
            Some(claim) if claim.lease.id == lease.id || !state.lease_live(&claim.lease, now) => {
                DedupClaim::Run
            }
            Some(_) => DedupClaim::Busy,
        };
        if verdict == DedupClaim::Run {
            state.topics.dedup.insert(
                key,
                Claim {
                    completed: false,
                    lease: *lease,
                    updated_at: now,
                },
            );
        }
        Ok(verdict)
    }

    async fn complete_event(
        &self,
        subscriber: &QueueName,
        event: EventId,
        lease: &Lease,
    ) -> Result<bool> {
        let mut state = self.lock();
        match state.topics.dedup.get_mut(&(subscriber.clone(), event)) {
            Some(claim) if claim.lease == *lease => {
                claim.completed = true;
                claim.updated_at = SystemTime::now();
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn prune_dedup(&self, retention: Duration, _batch: usize) -> Result<u64> {
        let cutoff = SystemTime::now() - retention;
        let dedup = &mut self.lock().topics.dedup;
        let before = dedup.len();
        dedup.retain(|_, claim| claim.updated_at >= cutoff);
        Ok((before - dedup.len()) as u64)
    }
}
