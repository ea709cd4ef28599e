//! The `threads` execution mode: a fixed set of OS threads, one job per thread at a time.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use crate::pool::{
    ExecError, ExecutionMode, ExecutionPool, Job, PoolMetadata, Refused, RefusedReason,
    StateChangeCallback,
};
use crate::slots::{self, Slot, Slots};

/// A job with its reserved slot, on its way to a pool thread.
struct Task {
    slot: Slot,
    job: Job,
}

/// An [`ExecutionPool`] of `capacity` OS threads named `pgbus-worker-N` (N from 0).
///
/// Each thread drives one job at a time to completion itself, so a job may block its thread
/// (CPU work, blocking I/O, `std::thread::sleep`) without stalling the caller's runtime.
/// Created inside a tokio runtime (the normal case), the threads run their jobs with that
/// runtime's handle: the job's own future is polled on the pool thread, while timers, I/O
/// and tasks it spawns (database connections opened by a pool, for instance) belong to the
/// caller's runtime and keep running between jobs. Created outside a runtime, each thread
/// gets a single-threaded runtime of its own, whose spawned tasks run only while one of its
/// jobs is running.
///
/// Jobs reach the threads through one shared channel; a slot is reserved before the send,
/// so at most `capacity` jobs are ever queued or running and none waits for a thread for
/// longer than it takes a finishing thread to loop round.
///
/// The threads exit once the pool is shut down (or dropped) and the jobs already posted
/// have run. Dropping the pool neither waits for nor cancels running jobs; call
/// [`kill`](ExecutionPool::kill) first for that.
pub struct ThreadPool {
    slots: Arc<Slots>,
    /// `None` once shut down: dropping the sender lets the threads drain and exit.
    sender: Mutex<Option<Sender<Task>>>,
}

impl ThreadPool {
    /// Starts `capacity` threads.
    ///
    /// # Errors
    ///
    /// [`ExecError::ZeroCapacity`] for a capacity of zero; [`ExecError::Spawn`] when a
    /// thread or its runtime cannot be started (the threads already started then exit).
    pub fn new(capacity: usize) -> Result<ThreadPool, ExecError> {
        if capacity == 0 {
            return Err(ExecError::ZeroCapacity);
        }
        let slots = Slots::new(ExecutionMode::Threads, capacity);
        let (sender, receiver) = mpsc::channel::<Task>();
        let receiver = Arc::new(Mutex::new(receiver));
        let caller = tokio::runtime::Handle::try_current().ok();
        for index in 0..capacity {
            let runtime = match &caller {
                Some(handle) => ThreadRuntime::Shared(handle.clone()),
                None => tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map(|runtime| ThreadRuntime::Own(Some(runtime)))
                    .map_err(ExecError::Spawn)?,
            };
            let receiver = Arc::clone(&receiver);
            std::thread::Builder::new()
                .name(format!("pgbus-worker-{index}"))
                .spawn(move || worker_thread(&runtime, &receiver))
                .map_err(ExecError::Spawn)?;
        }
        Ok(ThreadPool {
            slots,
            sender: Mutex::new(Some(sender)),
        })
    }

    /// Closes the channel: threads finish what is queued, then exit.
    fn close(&self) {
        self.sender
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
    }
}

/// A thread's loop: take the next task, run it to completion on this thread's runtime.
/// Ends when the channel is closed and empty.
fn worker_thread(runtime: &ThreadRuntime, receiver: &Mutex<Receiver<Task>>) {
    loop {
        // The lock is held while waiting, so idle threads queue on the mutex, not the
        // channel; it is released before the job runs.
        let next = receiver
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .recv();
        let Ok(Task { slot, job }) = next else { break };
        runtime.block_on(slots::run(slot, job));
    }
}

/// What a pool thread drives its jobs with.
enum ThreadRuntime {
    /// The runtime the pool was created in.
    Shared(tokio::runtime::Handle),
    /// A runtime of the thread's own, shut down in the background when dropped, so that
    /// dropping it outside its thread (a failed spawn inside an async caller) cannot panic.
    Own(Option<tokio::runtime::Runtime>),
}

impl ThreadRuntime {
    fn block_on<F: Future>(&self, future: F) -> F::Output {
        match self {
            ThreadRuntime::Shared(handle) => handle.block_on(future),
            ThreadRuntime::Own(runtime) => runtime
                .as_ref()
                .expect("the runtime is present until dropped")
                .block_on(future),
        }
    }
}

impl Drop for ThreadRuntime {
    fn drop(&mut self) {
        if let ThreadRuntime::Own(runtime) = self {
            if let Some(runtime) = runtime.take() {
                runtime.shutdown_background();
            }
        }
    }
}

impl ExecutionPool for ThreadPool {
    fn post(&self, job: Job) -> Result<(), Refused> {
        let slot = match self.slots.reserve() {
            Ok(slot) => slot,
            Err(reason) => return Err(Refused { reason, job }),
        };
        let sender = self.sender.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(sender) = sender.as_ref() else {
            // Shut down between the reservation and here: give the slot back.
            slot.refuse();
            return Err(Refused {
                reason: RefusedReason::ShutDown,
                job,
            });
        };
        sender
            .send(Task { slot, job })
            .map_err(|mpsc::SendError(Task { slot, job })| {
                // No thread left to receive: give the slot back (lesson 8).
                slot.refuse();
                Refused {
                    reason: RefusedReason::ShutDown,
                    job,
                }
            })
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
        self.close();
    }

    fn wait_for_termination(
        &self,
        deadline: Duration,
    ) -> Pin<Box<dyn Future<Output = bool> + Send + '_>> {
        Box::pin(self.slots.wait_idle(deadline))
    }

    fn kill(&self) {
        self.slots.kill();
        self.close();
    }

    fn metadata(&self) -> PoolMetadata {
        self.slots.metadata()
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.slots.shutdown();
        self.close();
    }
}

impl fmt::Debug for ThreadPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ThreadPool")
            .field("metadata", &self.slots.metadata())
            .field("shut_down", &self.slots.is_shut_down())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    //! The refusal paths after a slot was reserved, which the contract suite can reach only
    //! by racing `shutdown` (lesson 8: a failed post gives its slot back).

    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn counting_callback(pool: &ThreadPool) -> Arc<AtomicUsize> {
        let fired = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&fired);
        pool.on_state_change(Arc::new(move || {
            counted.fetch_add(1, Ordering::SeqCst);
        }));
        fired
    }

    #[test]
    fn channel_closed_after_reserving_gives_the_slot_back() {
        let pool = ThreadPool::new(2).expect("pool starts");
        let fired = counting_callback(&pool);
        // The interleaving of a post that reserved just before `shutdown` closed the channel.
        pool.close();
        let refused = pool.post(Box::pin(async {})).expect_err("no channel");
        assert_eq!(refused.reason, RefusedReason::ShutDown);
        assert_eq!(pool.available_capacity(), 2);
        assert!(pool.is_idle());
        assert_eq!(
            fired.load(Ordering::SeqCst),
            0,
            "a refusal is not a completion"
        );
    }

    #[test]
    fn send_failure_gives_the_slot_back() {
        let (sender, receiver) = mpsc::channel();
        drop(receiver); // every thread gone
        let pool = ThreadPool {
            slots: Slots::new(ExecutionMode::Threads, 1),
            sender: Mutex::new(Some(sender)),
        };
        let fired = counting_callback(&pool);
        for _ in 0..3 {
            let refused = pool.post(Box::pin(async {})).expect_err("nobody receives");
            assert_eq!(refused.reason, RefusedReason::ShutDown);
            assert_eq!(pool.available_capacity(), 1, "the slot is back");
        }
        assert_eq!(fired.load(Ordering::SeqCst), 0);
    }
}
