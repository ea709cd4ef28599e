//! The `async` execution mode (alias `fiber`): jobs as tasks on a tokio runtime.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Handle;

use crate::pool::{
    ExecError, ExecutionMode, ExecutionPool, Job, PoolMetadata, Refused, StateChangeCallback,
};
use crate::slots::{self, Slots};

/// An [`ExecutionPool`] that spawns each job as a task on a tokio runtime, at most
/// `capacity` at once: for many concurrent I/O-bound jobs sharing a few connections.
///
/// `post` never waits: it takes a slot with one atomic update or refuses at once. A job
/// must not block its worker thread; blocking or CPU-bound handlers belong on a
/// [`ThreadPool`](crate::ThreadPool).
///
/// Dropping the pool neither waits for nor cancels running jobs (they are ordinary tasks of
/// the runtime); call [`kill`](ExecutionPool::kill) first for that. If the runtime itself
/// shuts down, its unfinished jobs are dropped and their slots released.
pub struct AsyncPool {
    slots: Arc<Slots>,
    handle: Handle,
}

impl AsyncPool {
    /// A pool of `capacity` slots spawning onto the current tokio runtime.
    ///
    /// # Errors
    ///
    /// [`ExecError::ZeroCapacity`] for a capacity of zero.
    ///
    /// # Panics
    ///
    /// When called outside a tokio runtime (as `tokio::spawn` does); use
    /// [`AsyncPool::with_handle`] there.
    pub fn new(capacity: usize) -> Result<AsyncPool, ExecError> {
        AsyncPool::with_handle(capacity, Handle::current())
    }

    /// A pool of `capacity` slots spawning onto the runtime behind `handle`; usable outside
    /// any runtime.
    ///
    /// # Errors
    ///
    /// [`ExecError::ZeroCapacity`] for a capacity of zero.
    pub fn with_handle(capacity: usize, handle: Handle) -> Result<AsyncPool, ExecError> {
        if capacity == 0 {
            return Err(ExecError::ZeroCapacity);
        }
        Ok(AsyncPool {
            slots: Slots::new(ExecutionMode::Async, capacity),
            handle,
        })
    }
}

impl ExecutionPool for AsyncPool {
    fn post(&self, job: Job) -> Result<(), Refused> {
        match self.slots.reserve() {
            Ok(slot) => {
                // Dropping the returned JoinHandle detaches the task; the slot travels with it.
                drop(self.handle.spawn(slots::run(slot, job)));
                Ok(())
            }
            Err(reason) => Err(Refused { reason, job }),
        }
    }

    fn available_capacity(&self) -> usize {
        self.slots.available()
    }

    fn is_idle(&self) -> bool {
        self.slots.busy() == 0
    }

    fn on_state_change(&self, callback: StateChangeCallback) {
        self.slots.set_callback(callback);
    }

    fn shutdown(&self) {
        self.slots.shutdown();
    }

    fn wait_for_termination(
        &self,
        deadline: Duration,
    ) -> Pin<Box<dyn Future<Output = bool> + Send + '_>> {
        Box::pin(self.slots.wait_idle(deadline))
    }

    fn kill(&self) {
        self.slots.kill();
    }

    fn metadata(&self) -> PoolMetadata {
        self.slots.metadata()
    }
}

impl fmt::Debug for AsyncPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AsyncPool")
            .field("metadata", &self.slots.metadata())
            .field("shut_down", &self.slots.is_shut_down())
            .finish()
    }
}
