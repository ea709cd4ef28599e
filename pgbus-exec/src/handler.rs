//! Typed handlers, their context and their outcomes.

use std::fmt::Display;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use pgbus_core::{Headers, Lease, Message, MessageId, QueueName, Result, TransactionalAck};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

/// What a handler decided about its message.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Outcome {
    /// Done: ack the message.
    Ack,
    /// Failed: try again, after `after` or, when `None`, after the queue's retry policy's
    /// backoff. Once attempts are used up the message is dead-lettered with `error`.
    Retry {
        /// Why it failed; recorded on the message and, at the end, in the dead letter.
        error: String,
        /// An explicit delay instead of the policy's backoff (at most
        /// [`MAX_DELAY`](pgbus_core::MAX_DELAY): a longer one is shortened to it).
        after: Option<Duration>,
    },
    /// Failed for good: move it to the dead-letter queue now, with this reason.
    DeadLetter(String),
    /// Drop the message without running it again and without a dead letter.
    Discard,
    /// The handler already acked inside its own transaction
    /// ([`JobContext::ack_in`]); nothing is left to do.
    Committed,
}

impl Outcome {
    /// A retry with the policy's backoff.
    pub fn retry(error: impl Display) -> Self {
        Outcome::Retry {
            error: error.to_string(),
            after: None,
        }
    }

    /// A retry after an explicit delay.
    pub fn retry_after(error: impl Display, after: Duration) -> Self {
        Outcome::Retry {
            error: error.to_string(),
            after: Some(after),
        }
    }

    /// Dead-letter now.
    pub fn dead_letter(reason: impl Display) -> Self {
        Outcome::DeadLetter(reason.to_string())
    }
}

/// What a handler may return: an [`Outcome`], `()` (success), or a `Result` whose error
/// means "retry with the policy".
pub trait IntoOutcome {
    /// The outcome this value stands for.
    fn into_outcome(self) -> Outcome;
}

impl IntoOutcome for Outcome {
    fn into_outcome(self) -> Outcome {
        self
    }
}

impl IntoOutcome for () {
    fn into_outcome(self) -> Outcome {
        Outcome::Ack
    }
}

impl<T: IntoOutcome, E: Display> IntoOutcome for std::result::Result<T, E> {
    fn into_outcome(self) -> Outcome {
        match self {
            Ok(value) => value.into_outcome(),
            Err(error) => Outcome::retry(error),
        }
    }
}

/// What a handler knows about the delivery it runs.
#[derive(Debug, Clone)]
pub struct JobContext<B> {
    message_id: MessageId,
    attempt: u32,
    queue: QueueName,
    group_key: Option<String>,
    headers: Headers,
    lease: Lease,
    cancellation: CancellationToken,
    backend: B,
}

impl<B> JobContext<B> {
    pub(crate) fn new(message: &Message, cancellation: CancellationToken, backend: B) -> Self {
        Self {
            message_id: message.id,
            attempt: message.attempts,
            queue: message.queue.clone(),
            group_key: message.group_key.clone(),
            headers: message.headers.clone(),
            lease: message.lease(),
            cancellation,
            backend,
        }
    }

    /// The message id.
    pub fn message_id(&self) -> MessageId {
        self.message_id
    }
    /// The attempt this run is (1 for the first).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }
    /// The queue the message came from.
    pub fn queue(&self) -> &QueueName {
        &self.queue
    }
    /// The message's group key.
    pub fn group_key(&self) -> Option<&str> {
        self.group_key.as_deref()
    }
    /// The lease of this delivery.
    pub fn lease(&self) -> Lease {
        self.lease
    }
    /// The message's headers.
    pub fn headers(&self) -> &Headers {
        &self.headers
    }
    /// Cancelled when the job times out, when the worker stops waiting for it, or when its
    /// lease is lost (its message was deleted, e.g. an operator cancelled the job, or claimed
    /// again): stop soon. After a lost lease, nothing the handler returns is written.
    pub fn cancellation(&self) -> &CancellationToken {
        &self.cancellation
    }
    /// The backend, for writes of the handler's own.
    pub fn backend(&self) -> &B {
        &self.backend
    }
}

impl<B: TransactionalAck> JobContext<B> {
    /// Opens a transaction for the handler's writes; finish it with
    /// [`ack_in`](Self::ack_in).
    pub async fn begin(&self) -> Result<B::Tx> {
        self.backend.begin().await
    }

    /// Acks this delivery inside `tx` and commits, so the handler's writes and the ack
    /// land together. Returns [`Outcome::Committed`], or a retry when the lease was lost
    /// (the writes were rolled back; the redelivery will run them again).
    pub async fn ack_in(&self, tx: B::Tx) -> Result<Outcome> {
        if self.backend.ack_and_commit(tx, &self.lease).await? {
            Ok(Outcome::Committed)
        } else {
            Ok(Outcome::retry(
                "lease lost before commit; writes rolled back",
            ))
        }
    }
}

/// A typed handler for one queue.
pub trait Handler<B>: Send + Sync + 'static {
    /// The payload type, decoded with the message's codec.
    type Payload: DeserializeOwned + Send + 'static;

    /// Runs one delivery.
    fn handle(
        &self,
        ctx: JobContext<B>,
        payload: Self::Payload,
    ) -> impl Future<Output = Outcome> + Send;
}

/// A handler made from an async function or closure `Fn(JobContext<B>, T) -> impl
/// Future<Output = impl IntoOutcome>`; see [`handler_fn`].
pub struct FnHandler<F, T> {
    f: F,
    _payload: PhantomData<fn(T)>,
}

/// Wraps an async function or closure as a [`Handler`].
pub fn handler_fn<F, T>(f: F) -> FnHandler<F, T> {
    FnHandler {
        f,
        _payload: PhantomData,
    }
}

impl<B, F, T, Fut, R> Handler<B> for FnHandler<F, T>
where
    B: Send + 'static,
    F: Fn(JobContext<B>, T) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = R> + Send,
    R: IntoOutcome,
    T: DeserializeOwned + Send + 'static,
{
    type Payload = T;

    async fn handle(&self, ctx: JobContext<B>, payload: T) -> Outcome {
        (self.f)(ctx, payload).await.into_outcome()
    }
}

pub(crate) type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// Declares a subscription's bindings when the worker starts.
pub(crate) type Declare<B> = Arc<dyn Fn(B) -> BoxFuture<Result<()>> + Send + Sync>;

/// A handler with its payload type erased: decodes, then runs.
pub(crate) trait ErasedHandler<B>: Send + Sync {
    fn call(&self, ctx: JobContext<B>, message: &Message) -> BoxFuture<Outcome>;
}

pub(crate) struct Erased<H>(pub(crate) Arc<H>);

impl<B, H> ErasedHandler<B> for Erased<H>
where
    B: Send + 'static,
    H: Handler<B>,
{
    fn call(&self, ctx: JobContext<B>, message: &Message) -> BoxFuture<Outcome> {
        match message.decode::<H::Payload>() {
            // A payload that does not decode now never will: no retry.
            Err(err) => Box::pin(std::future::ready(Outcome::DeadLetter(err.report()))),
            Ok(payload) => {
                let handler = Arc::clone(&self.0);
                Box::pin(async move { handler.handle(ctx, payload).await })
            }
        }
    }
}
