//! The execution-pool contract shared by the thread and async pools.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

/// A unit of work: a future the pool drives to completion. On the thread pool it runs on
/// one of the pool's OS threads (inside that thread's own single-threaded runtime), so it
/// may block; on the async pool it is a task on the caller's tokio runtime.
pub type Job = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Called after every job completion (success, panic or kill), once per completion, so a
/// worker can fetch more work at once instead of sleeping.
pub type StateChangeCallback = Arc<dyn Fn() + Send + Sync + 'static>;

/// How jobs are executed. Both modes always parse and print, whichever pools this build
/// has (features `threads` and `async` of this crate); [`is_built`](Self::is_built) tells,
/// and a worker for a mode that is not built fails to build with [`ExecError::NotBuilt`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExecutionMode {
    /// Each job on an OS thread: for blocking or CPU-bound handlers.
    Threads,
    /// Jobs as tasks on the tokio runtime, bounded by a semaphore: for many concurrent
    /// I/O-bound handlers. `fiber` is accepted as an alias.
    Async,
}

impl ExecutionMode {
    /// The canonical name: `threads` or `async`.
    pub fn as_str(self) -> &'static str {
        match self {
            ExecutionMode::Threads => "threads",
            ExecutionMode::Async => "async",
        }
    }

    /// Whether this build has the mode's pool (its cargo feature, `threads` or `async`).
    pub const fn is_built(self) -> bool {
        match self {
            ExecutionMode::Threads => cfg!(feature = "threads"),
            ExecutionMode::Async => cfg!(feature = "async"),
        }
    }

    /// Fails with [`ExecError::NotBuilt`] unless this build has the mode.
    pub fn check_built(self) -> Result<Self, ExecError> {
        if self.is_built() {
            Ok(self)
        } else {
            Err(ExecError::NotBuilt(self))
        }
    }
}

/// `Async` when this build has it, else `Threads`.
impl Default for ExecutionMode {
    fn default() -> Self {
        if ExecutionMode::Async.is_built() {
            ExecutionMode::Async
        } else {
            ExecutionMode::Threads
        }
    }
}

impl fmt::Display for ExecutionMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ExecutionMode {
    type Err = ExecError;

    fn from_str(s: &str) -> Result<Self, ExecError> {
        match s {
            "threads" => Ok(ExecutionMode::Threads),
            "async" | "fiber" => Ok(ExecutionMode::Async),
            other => Err(ExecError::UnknownMode(other.to_owned())),
        }
    }
}

/// Why a job was refused. The job is handed back so the caller can give its message back;
/// the slot it would have taken is free again.
pub struct Refused {
    /// Why.
    pub reason: RefusedReason,
    /// The job that was not run.
    pub job: Job,
}

impl fmt::Debug for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Refused")
            .field("reason", &self.reason)
            .finish_non_exhaustive()
    }
}

/// Why a pool refused a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RefusedReason {
    /// Every slot is taken.
    Full,
    /// The pool is shutting down or was killed.
    ShutDown,
}

/// What a pool is and how busy it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolMetadata {
    /// Threads or async.
    pub mode: ExecutionMode,
    /// Most jobs running at once.
    pub capacity: usize,
    /// Jobs running now.
    pub busy: usize,
}

/// Errors of the execution crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ExecError {
    /// An execution mode name that is not `threads`, `async` or `fiber`.
    #[error(
        "unknown execution mode {0:?}: expected threads or async (fiber is an alias of async)"
    )]
    UnknownMode(String),
    /// A mode whose pool this build does not have (its cargo feature was off).
    #[error("execution mode {0} is not built into this program (it was built without the `{0}` feature)")]
    NotBuilt(ExecutionMode),
    /// A pool capacity of zero.
    #[error("pool capacity must be at least 1")]
    ZeroCapacity,
    /// A thread could not be started.
    #[error("could not start a pool thread")]
    Spawn(#[source] std::io::Error),
}

/// A bounded pool that runs [`Job`]s. Both implementations keep the same contract:
///
/// - `post` takes a slot or refuses; a refused job gets its slot back at once and is
///   returned inside [`Refused`]. A running job holds its slot until it ends, however it
///   ends (completion, panic, kill).
/// - A panicking job is caught and logged; its slot is returned and the pool keeps going.
/// - The state-change callback fires once after every completion, after the slot is free.
/// - `shutdown` refuses new jobs and lets running ones finish; `wait_for_termination`
///   waits for them up to a deadline; `kill` cancels running jobs at their next await point
///   (a job blocking a thread cannot be interrupted; its slot comes back when it returns).
pub trait ExecutionPool: Send + Sync + 'static {
    /// Runs `job` in a free slot, or refuses it.
    fn post(&self, job: Job) -> Result<(), Refused>;

    /// Slots free now.
    fn available_capacity(&self) -> usize;

    /// Whether at least one slot is free (a post would not be refused as full).
    fn has_free_slot(&self) -> bool {
        self.available_capacity() > 0
    }

    /// Whether no job is running.
    fn is_idle(&self) -> bool;

    /// Sets the callback fired after every completion (replacing any earlier one).
    fn on_state_change(&self, callback: StateChangeCallback);

    /// Stops accepting jobs; running jobs go on.
    fn shutdown(&self);

    /// Waits until no job is running or `deadline` passes; `true` when all finished.
    fn wait_for_termination(
        &self,
        deadline: Duration,
    ) -> Pin<Box<dyn Future<Output = bool> + Send + '_>>;

    /// Shuts down and cancels running jobs.
    fn kill(&self);

    /// Mode, capacity and busy slots.
    fn metadata(&self) -> PoolMetadata;
}
