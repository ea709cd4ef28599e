//! Slot, callback and termination bookkeeping shared by the thread and async pools.
//!
//! Both pools keep the [`ExecutionPool`](crate::ExecutionPool) contract through this one
//! struct: a pool only decides *where* a job runs; [`Slots`] decides *whether* it may run,
//! and [`run`] wraps every job so that panics are caught, `kill` cancels it, and the slot is
//! released before the state-change callback fires.
//!
//! The busy count and the shut-down flag share one atomic word, so a post that starts after
//! `shutdown()` returned is always refused, and two posts can never both take the last slot.

use std::panic::AssertUnwindSafe;
use std::pin::pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use futures_util::FutureExt;
use pgbus_core::panic_message;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::pool::{ExecutionMode, Job, PoolMetadata, RefusedReason, StateChangeCallback};

/// The high bit of [`Slots::state`]: set once the pool is shut down or killed.
const SHUT_DOWN: usize = 1 << (usize::BITS - 1);

/// The largest capacity a pool accepts; larger requests are clamped to it.
pub(crate) const MAX_CAPACITY: usize = SHUT_DOWN - 1;

/// Capacity, busy count, shut-down flag, callback and idle notification of one pool.
pub(crate) struct Slots {
    mode: ExecutionMode,
    capacity: usize,
    /// Busy slots in the low bits, [`SHUT_DOWN`] in the high bit.
    state: AtomicUsize,
    callback: RwLock<Option<StateChangeCallback>>,
    /// Woken (all waiters) whenever the busy count drops to zero.
    idle: Notify,
    /// Cancelled by `kill`; every running job is selected against it.
    kill: CancellationToken,
}

impl Slots {
    /// Bookkeeping for a pool of `capacity` slots (clamped to [`MAX_CAPACITY`]).
    pub(crate) fn new(mode: ExecutionMode, capacity: usize) -> Arc<Self> {
        Arc::new(Slots {
            mode,
            capacity: capacity.min(MAX_CAPACITY),
            state: AtomicUsize::new(0),
            callback: RwLock::new(None),
            idle: Notify::new(),
            kill: CancellationToken::new(),
        })
    }

    /// Takes a slot, or says why not. Atomic: the check and the increment are one CAS.
    pub(crate) fn reserve(self: &Arc<Self>) -> Result<Slot, RefusedReason> {
        let capacity = self.capacity;
        self.state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |state| {
                (state & SHUT_DOWN == 0 && state < capacity).then_some(state + 1)
            })
            .map(|_| Slot {
                slots: Some(Arc::clone(self)),
            })
            .map_err(|state| {
                if state & SHUT_DOWN != 0 {
                    RefusedReason::ShutDown
                } else {
                    RefusedReason::Full
                }
            })
    }

    /// Jobs holding a slot now (running, or on the thread pool also queued for a thread).
    pub(crate) fn busy(&self) -> usize {
        self.state.load(Ordering::Acquire) & !SHUT_DOWN
    }

    /// Slots free now. A shut-down pool still reports its free slots; `post` refuses anyway.
    pub(crate) fn available(&self) -> usize {
        self.capacity - self.busy()
    }

    pub(crate) fn is_shut_down(&self) -> bool {
        self.state.load(Ordering::Acquire) & SHUT_DOWN != 0
    }

    pub(crate) fn metadata(&self) -> PoolMetadata {
        PoolMetadata {
            mode: self.mode,
            capacity: self.capacity,
            busy: self.busy(),
        }
    }

    pub(crate) fn set_callback(&self, callback: StateChangeCallback) {
        *self
            .callback
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Some(callback);
    }

    /// Refuses every later post.
    pub(crate) fn shutdown(&self) {
        self.state.fetch_or(SHUT_DOWN, Ordering::AcqRel);
    }

    /// Shuts down and cancels every running (and every not yet started) job.
    pub(crate) fn kill(&self) {
        self.shutdown();
        self.kill.cancel();
    }

    /// Waits until no slot is held, up to `deadline`. Never polls: it registers on
    /// [`Slots::idle`] before reading the count, so a release in between is not missed.
    pub(crate) async fn wait_idle(&self, deadline: Duration) -> bool {
        let until = tokio::time::Instant::now() + deadline;
        loop {
            let mut notified = pin!(self.idle.notified());
            notified.as_mut().enable();
            if self.busy() == 0 {
                return true;
            }
            if tokio::time::timeout_at(until, notified).await.is_err() {
                return self.busy() == 0;
            }
        }
    }

    /// Gives a slot back; wakes termination waiters when it was the last one; then, for a
    /// completion (not a refusal), fires the callback, so it sees the freed slot.
    fn release(&self, completed: bool) {
        let before = self.state.fetch_sub(1, Ordering::AcqRel);
        if before & !SHUT_DOWN == 1 {
            self.idle.notify_waiters();
        }
        if !completed {
            return;
        }
        let callback = self
            .callback
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if let Some(callback) = callback {
            if let Err(panic) = std::panic::catch_unwind(AssertUnwindSafe(|| callback())) {
                tracing::error!(
                    target: "pgbus::pool",
                    panic = panic_message(&*panic),
                    pool.mode = self.mode.as_str(),
                    "state-change callback panicked"
                );
            }
        }
    }
}

/// One reserved slot. Dropping it is a completion: the slot is released and the callback
/// fires (so a job dropped without running, e.g. by a runtime shutting down, still frees
/// its slot). [`Slot::refuse`] releases it without the callback, for a post that failed
/// after reserving.
pub(crate) struct Slot {
    slots: Option<Arc<Slots>>,
}

impl Slot {
    /// Gives the slot back without firing the callback: the job never ran.
    #[cfg(feature = "threads")]
    pub(crate) fn refuse(mut self) {
        if let Some(slots) = self.slots.take() {
            slots.release(false);
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(slots) = self.slots.take() {
            slots.release(true);
        }
    }
}

/// Drives `job` in `slot`: cancelled by `kill` at its next await point, panics caught and
/// logged, and the slot released (then the callback fired) however it ends.
pub(crate) async fn run(slot: Slot, job: Job) {
    let Some(slots) = slot.slots.clone() else {
        return;
    };
    tokio::select! {
        biased;
        () = slots.kill.cancelled() => {
            // A dotted field must not come first after `target:` (tracing issue 1421).
            tracing::debug!(
                target: "pgbus::pool",
                outcome = "killed",
                pool.mode = slots.mode.as_str(),
                "job cancelled by kill"
            );
        }
        outcome = AssertUnwindSafe(job).catch_unwind() => {
            if let Err(panic) = outcome {
                tracing::error!(
                    target: "pgbus::pool",
                    panic = panic_message(&*panic),
                    pool.mode = slots.mode.as_str(),
                    "job panicked; its slot is released and the pool goes on"
                );
            }
        }
    }
    // The job future is dropped by now; only then is the slot free.
    drop(slot);
}
