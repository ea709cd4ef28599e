//! Batches: a group of jobs whose completion enqueues callback jobs.

use std::time::SystemTime;

use crate::{NewMessage, QueueName};

/// A batch's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BatchId(pub i64);

/// The jobs a batch enqueues as its jobs complete, each at most once: `finished` when
/// every job has left the queue (acked, discarded or dead-lettered), `succeeded` then too
/// if none was dead-lettered, `dead_lettered` at the first dead letter. Callback jobs carry
/// the headers `pgbus-batch` (the id) and `pgbus-batch-callback` (the kind).
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct BatchCallbacks {
    /// Enqueued when every job has finished.
    pub finished: Option<(QueueName, NewMessage)>,
    /// Enqueued when every job has finished and none was dead-lettered.
    pub succeeded: Option<(QueueName, NewMessage)>,
    /// Enqueued at the batch's first dead letter.
    pub dead_lettered: Option<(QueueName, NewMessage)>,
}

impl BatchCallbacks {
    /// No callbacks.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the finished callback.
    pub fn on_finished(mut self, queue: QueueName, message: NewMessage) -> Self {
        self.finished = Some((queue, message));
        self
    }

    /// Sets the succeeded callback.
    pub fn on_succeeded(mut self, queue: QueueName, message: NewMessage) -> Self {
        self.succeeded = Some((queue, message));
        self
    }

    /// Sets the dead-lettered callback.
    pub fn on_dead_lettered(mut self, queue: QueueName, message: NewMessage) -> Self {
        self.dead_lettered = Some((queue, message));
        self
    }
}

/// A batch's progress.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct BatchInfo {
    /// Its id.
    pub id: BatchId,
    /// The queue of its jobs.
    pub queue: QueueName,
    /// Jobs in the batch.
    pub total: u32,
    /// Jobs not finished yet.
    pub pending: u32,
    /// Jobs dead-lettered.
    pub dead_lettered: u32,
    /// When it was created.
    pub created_at: SystemTime,
    /// When its last job finished.
    pub finished_at: Option<SystemTime>,
}

impl BatchInfo {
    /// A batch of `total` jobs none of which has finished.
    pub fn new(id: BatchId, queue: QueueName, total: u32, created_at: SystemTime) -> Self {
        Self {
            id,
            queue,
            total,
            pending: total,
            dead_lettered: 0,
            created_at,
            finished_at: None,
        }
    }

    /// Jobs that finished without a dead letter (acked or discarded).
    pub fn succeeded(&self) -> u32 {
        self.total - self.pending - self.dead_lettered
    }
}
