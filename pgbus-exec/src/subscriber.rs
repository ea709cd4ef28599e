//! Typed event subscribers: a subscription delivers into an ordinary queue, so a subscriber
//! is a queue handler that reads the event envelope and picks the handler whose pattern
//! matches the routing key. Retries, backoff and dead-lettering are the queue's, as for jobs.

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

use pgbus_core::{
    envelope, Backend, DedupClaim, Deduplication, Event, EventId, Message, QueueName, StartAt,
    TopicPattern, Topics,
};
use serde::de::DeserializeOwned;

use crate::builder::WorkerBuilder;
use crate::handler::{BoxFuture, ErasedHandler, IntoOutcome, JobContext, Outcome};

/// A subscription: the queue its events are delivered to, and a typed handler per
/// routing-key pattern bound to it. Register it with [`WorkerBuilder::subscribe`]; the
/// worker declares the bindings (idempotently) when it starts.
///
/// ```
/// use pgbus_core::{Event, MemoryBackend, QueueName};
/// use pgbus_exec::{JobContext, Subscription};
///
/// #[derive(serde::Deserialize)]
/// struct OrderPaid { order: u64 }
///
/// # fn main() -> pgbus_core::Result<()> {
/// let billing = Subscription::new(QueueName::new("billing")?)
///     .on("order.paid".parse()?, |_ctx: JobContext<MemoryBackend>, event: Event<OrderPaid>| async move {
///         println!("order {} paid (event {})", event.payload.order, event.id);
///     })
///     .idempotent();
/// # let _ = billing; Ok(()) }
/// ```
pub struct Subscription<B> {
    queue: QueueName,
    routes: Vec<(TopicPattern, Arc<dyn ErasedHandler<B>>)>,
    start: StartAt,
    dedup: Option<Arc<dyn DedupGuard<B>>>,
}

impl<B: Send + Sync + Clone + 'static> Subscription<B> {
    /// A subscription delivering into `queue` (create the queue first; its options set
    /// the retry policy and lease).
    pub fn new(queue: QueueName) -> Self {
        Self {
            queue,
            routes: Vec::new(),
            start: StartAt::Now,
            dedup: None,
        }
    }

    /// Binds `pattern` to the queue and handles its events with `f`, an async function or
    /// closure `(JobContext<B>, Event<T>) -> impl IntoOutcome`. When several patterns
    /// match a routing key, the first registered wins.
    pub fn on<F, T, Fut, R>(mut self, pattern: TopicPattern, f: F) -> Self
    where
        F: Fn(JobContext<B>, Event<T>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = R> + Send + 'static,
        R: IntoOutcome,
        T: DeserializeOwned + Send + 'static,
    {
        let handler = EventFn {
            f: Arc::new(f),
            _payload: PhantomData,
        };
        self.routes.push((pattern, Arc::new(handler)));
        self
    }

    /// Where a new binding starts (default [`StartAt::Now`]); an existing binding keeps
    /// its position.
    pub fn start_at(mut self, start: StartAt) -> Self {
        self.start = start;
        self
    }

    /// The queue the subscription delivers to.
    pub fn queue(&self) -> &QueueName {
        &self.queue
    }
}

impl<B: Deduplication + Send + Sync + Clone + 'static> Subscription<B> {
    /// Makes the subscriber idempotent: a dedup record per (event, subscriber queue) is
    /// claimed before a handler runs and completed after it succeeds, before the ack. A
    /// delivery that dies before completion is run again; once completed, the event is
    /// acked without running, however often it is delivered again.
    pub fn idempotent(mut self) -> Self {
        self.dedup = Some(Arc::new(Dedup));
        self
    }
}

impl<B: Backend + Topics> WorkerBuilder<B> {
    /// Registers a subscription: its router handles the subscription's queue, and the
    /// worker binds its patterns (idempotently, with its start position) when it starts.
    pub fn subscribe(mut self, subscription: Subscription<B>) -> Self {
        let Subscription {
            queue,
            routes,
            start,
            dedup,
        } = subscription;
        let patterns: Vec<TopicPattern> = routes.iter().map(|(p, _)| p.clone()).collect();
        let declare_queue = queue.clone();
        self.declarations.push(Arc::new(move |backend: B| {
            let (queue, patterns) = (declare_queue.clone(), patterns.clone());
            Box::pin(async move {
                for pattern in &patterns {
                    backend.bind(pattern, &queue, start).await?;
                }
                Ok(())
            })
        }));
        self.handlers
            .push((queue, Arc::new(Router { routes, dedup })));
        self
    }
}

/// The subscription's queue handler: reads the envelope, picks the route, runs it (under
/// the dedup record when idempotent).
struct Router<B> {
    routes: Vec<(TopicPattern, Arc<dyn ErasedHandler<B>>)>,
    dedup: Option<Arc<dyn DedupGuard<B>>>,
}

impl<B: Send + Clone + 'static> ErasedHandler<B> for Router<B> {
    fn call(&self, ctx: JobContext<B>, message: &Message) -> BoxFuture<Outcome> {
        let dead = |reason: String| -> BoxFuture<Outcome> {
            Box::pin(std::future::ready(Outcome::DeadLetter(reason)))
        };
        let (id, key, _) = match envelope(&message.headers) {
            Ok(envelope) => envelope,
            Err(err) => return dead(err.report()),
        };
        let Some((_, handler)) = self.routes.iter().find(|(p, _)| p.matches(&key)) else {
            return dead(format!(
                "no handler for routing key {key} on queue {}",
                message.queue
            ));
        };
        match &self.dedup {
            None => handler.call(ctx, message),
            Some(dedup) => {
                let run = handler.call(ctx.clone(), message);
                dedup.around(ctx, id, run)
            }
        }
    }
}

/// An event handler made from a closure: decodes `Event<T>`, then runs.
struct EventFn<F, T> {
    f: Arc<F>,
    _payload: PhantomData<fn(T)>,
}

impl<B, F, T, Fut, R> ErasedHandler<B> for EventFn<F, T>
where
    B: Send + 'static,
    F: Fn(JobContext<B>, Event<T>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = R> + Send + 'static,
    R: IntoOutcome,
    T: DeserializeOwned + Send + 'static,
{
    fn call(&self, ctx: JobContext<B>, message: &Message) -> BoxFuture<Outcome> {
        match Event::<T>::from_message(message) {
            // A payload that does not decode now never will: no retry.
            Err(err) => Box::pin(std::future::ready(Outcome::DeadLetter(err.report()))),
            Ok(event) => {
                let f = Arc::clone(&self.f);
                Box::pin(async move { f(ctx, event).await.into_outcome() })
            }
        }
    }
}

/// The two-phase dedup record around a handler run, with the backend's capability erased.
trait DedupGuard<B>: Send + Sync {
    fn around(
        &self,
        ctx: JobContext<B>,
        event: EventId,
        run: BoxFuture<Outcome>,
    ) -> BoxFuture<Outcome>;
}

struct Dedup;

impl<B: Deduplication + Send + Sync + Clone + 'static> DedupGuard<B> for Dedup {
    fn around(
        &self,
        ctx: JobContext<B>,
        event_id: EventId,
        run: BoxFuture<Outcome>,
    ) -> BoxFuture<Outcome> {
        Box::pin(async move {
            let (backend, queue, lease) = (ctx.backend(), ctx.queue(), ctx.lease());
            match backend.claim_event(queue, event_id, &lease).await {
                Err(err) => return Outcome::retry(err.report()),
                Ok(DedupClaim::Done) => {
                    tracing::debug!(target: "pgbus::events", event_id = %event_id, queue.name = %queue, "event already handled: acking without running");
                    return Outcome::Ack;
                }
                Ok(DedupClaim::Busy) => {
                    return Outcome::retry(format!(
                        "event {event_id} is being handled by another delivery"
                    ))
                }
                Ok(DedupClaim::Run) => {}
            }
            let outcome = run.await;
            if matches!(outcome, Outcome::Ack | Outcome::Committed) {
                // Completed before the ack: a crash from here on cannot run it again.
                match backend.complete_event(queue, event_id, &lease).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(target: "pgbus::events", event_id = %event_id, queue.name = %queue, "dedup claim passed to another delivery while the handler ran")
                    }
                    Err(err) => {
                        tracing::warn!(target: "pgbus::events", error = %err.report(), event_id = %event_id, queue.name = %queue, "could not record the event as completed; a redelivery would run it again")
                    }
                }
            }
            outcome
        })
    }
}
