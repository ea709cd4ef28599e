//! What a claim loop runs on: the execution pool whose free slots it fills, the fetch
//! connection it finds work on, and what it reports to. A lone [`Worker`](crate::Worker)
//! or [`GroupWorker`](crate::GroupWorker) has a lane of its own; the two loops of a
//! [`MixedWorker`](crate::MixedWorker) share one pool, one fetch connection, one report
//! and one kill switch, and divide the slots by a [`Share`].
//!
//! **Slots are taken only under the fetch connection's lock.** A loop locks the fetch
//! connection, counts the free slots, claims (or takes at most that many groups) and posts
//! at most that many jobs before it lets go (a plain loop keeps what it claimed ahead for
//! later, and starts those under the lock too), so two loops on one pool never count the
//! same free slot; a post can then be refused only at shutdown. A group holds its slot
//! for its whole run (see `group.rs`), so nothing else posts.

use std::sync::Arc;

use pgbus_core::{Backend, Error, OpenFetcher, Result};
use tokio::sync::{Mutex, MutexGuard, Notify};
use tokio_util::sync::CancellationToken;

use crate::report::Counters;
use crate::share::{Kind, Share};
#[cfg(feature = "async")]
use crate::AsyncPool;
#[cfg(feature = "threads")]
use crate::ThreadPool;
use crate::{ExecError, ExecutionMode, ExecutionPool};

/// A fetch connection, opened on first use and again after an error, used by one loop at a
/// time.
pub(crate) struct FetchConn<B: OpenFetcher> {
    backend: B,
    conn: Mutex<Option<B::Fetcher>>,
}

impl<B: OpenFetcher> FetchConn<B> {
    pub(crate) fn new(backend: B) -> Self {
        Self {
            backend,
            conn: Mutex::new(None),
        }
    }

    /// Waits for the connection, opening it if it is not open.
    pub(crate) async fn lock(&self) -> Result<FetchGuard<'_, B::Fetcher>> {
        self.hold().await.open().await
    }

    /// Waits for the connection's lock without opening it: taking slots needs the lock,
    /// not the connection (a worker's claimed-ahead jobs start even while it cannot be
    /// opened).
    pub(crate) async fn hold(&self) -> Held<'_, B> {
        Held {
            backend: &self.backend,
            conn: self.conn.lock().await,
        }
    }
}

/// The locked fetch connection, maybe not open.
pub(crate) struct Held<'a, B: OpenFetcher> {
    backend: &'a B,
    conn: MutexGuard<'a, Option<B::Fetcher>>,
}

impl<'a, B: OpenFetcher> Held<'a, B> {
    /// The connection, opened if it is not open.
    pub(crate) async fn open(mut self) -> Result<FetchGuard<'a, B::Fetcher>> {
        if self.conn.is_none() {
            *self.conn = Some(self.backend.open_fetcher().await?);
        }
        Ok(FetchGuard(self.conn))
    }
}

/// The locked, open fetch connection.
pub(crate) struct FetchGuard<'a, F>(MutexGuard<'a, Option<F>>);

impl<F> FetchGuard<'_, F> {
    /// The connection.
    pub(crate) fn get(&mut self) -> &mut F {
        self.0.as_mut().expect("opened by FetchConn::lock")
    }

    /// Drops the connection after an error; the next lock opens a new one.
    pub(crate) fn discard(mut self) {
        *self.0 = None;
    }
}

/// One claim loop's pool, fetch connection, report and kill switch; see the module docs.
pub(crate) struct Lane<B: Backend> {
    /// Which loop this is.
    pub(crate) kind: Kind,
    pub(crate) pool: Arc<dyn ExecutionPool>,
    /// Notified after every job completion in the pool.
    pub(crate) freed: Arc<Notify>,
    pub(crate) fetch: Arc<FetchConn<B>>,
    /// What the loop counts (shared by both loops of a mixed worker).
    pub(crate) report: Arc<Counters>,
    /// Cancelled at the drain deadline: running jobs are cut off, their messages left leased.
    pub(crate) kill: CancellationToken,
    /// How the slots are divided with the other loop, when there is one.
    pub(crate) share: Option<Arc<Share>>,
    /// Notified when the share moves this loop's way (never, without a share).
    pub(crate) turn: Arc<Notify>,
}

impl<B: Backend> Lane<B> {
    /// A lane of its own: a new pool whose completions wake only this loop, and a fetch
    /// connection opened on first use.
    pub(crate) fn alone(
        backend: &B,
        kind: Kind,
        mode: ExecutionMode,
        capacity: usize,
    ) -> Result<Self> {
        let pool = new_pool(mode, capacity)?;
        let freed = Arc::new(Notify::new());
        {
            let freed = Arc::clone(&freed);
            pool.on_state_change(Arc::new(move || freed.notify_one()));
        }
        Ok(Lane {
            kind,
            pool,
            freed,
            fetch: Arc::new(FetchConn::new(backend.clone())),
            report: Arc::new(Counters::default()),
            kill: CancellationToken::new(),
            share: None,
            turn: Arc::new(Notify::new()),
        })
    }

    /// Free slots this loop may fill now: every free one, unless the other loop of a mixed
    /// worker waits for slots too and this one holds its share.
    pub(crate) fn free(&self) -> usize {
        let free = self.pool.available_capacity();
        match &self.share {
            None => free,
            Some(share) => share.allowance(self.kind, free, self.pool.metadata().busy),
        }
    }

    /// Records whether this loop has work it has no slot for.
    pub(crate) fn set_waiting(&self, waiting: bool) {
        if let Some(share) = &self.share {
            share.set_waiting(self.kind, waiting);
        }
    }

    /// Records that this loop just took slots.
    pub(crate) fn took(&self) {
        if let Some(share) = &self.share {
            share.took(self.kind, self.pool.metadata().busy);
        }
    }
}

/// Creates the execution pool for a mode ([`ExecError::NotBuilt`] for a mode this build
/// lacks).
pub(crate) fn new_pool(mode: ExecutionMode, capacity: usize) -> Result<Arc<dyn ExecutionPool>> {
    let pool: Arc<dyn ExecutionPool> = match mode {
        #[cfg(feature = "async")]
        ExecutionMode::Async => Arc::new(AsyncPool::new(capacity).map_err(exec)?),
        #[cfg(feature = "threads")]
        ExecutionMode::Threads => Arc::new(ThreadPool::new(capacity).map_err(exec)?),
        #[allow(unreachable_patterns)]
        other => return Err(exec(ExecError::NotBuilt(other))),
    };
    Ok(pool)
}

pub(crate) fn exec(err: ExecError) -> Error {
    Error::InvalidArgument(err.to_string())
}
