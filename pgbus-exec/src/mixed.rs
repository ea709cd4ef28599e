//! The mixed worker: plain and grouped messages of the same queues on one set of slots,
//! divided between its two loops by a [`Share`].

use std::sync::Arc;

use pgbus_core::{Backend, Result};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::group::GroupWorker;
use crate::lane::{new_pool, FetchConn, Lane};
use crate::report::{Counters, WorkerReport};
use crate::share::{Kind, Share};
use crate::worker::{Worker, WorkerMonitor};

/// A worker for every message of its queues, plain and grouped, on one set of
/// `concurrency` slots: what `pgbus work` runs. Build it with
/// [`WorkerBuilder::build_mixed`](crate::WorkerBuilder::build_mixed).
///
/// It runs the claim loop of a [`Worker`] and the group loop of a [`GroupWorker`] with
/// their guarantees, but as one worker of one process:
/// - **One limit.** Both loops fill the free slots of one execution pool, so at most
///   `concurrency` jobs run at once, plain and grouped together. A running group holds its
///   slot from its first message to its last.
/// - **Fair shares.** A loop takes every free slot while the other has nothing waiting;
///   when both have work waiting, each is entitled to half the slots (an odd one goes to
///   each in turn): a loop then takes no more than its half, and a group that finishes a
///   message while groups hold more than their half gives its slot up (it is taken up
///   again later, in order). Neither kind starves the other.
/// - **One process entry** in the registry, `busy/concurrency` for the shared slots, and
///   one [`WorkerReport`] for both kinds.
/// - **Connections only for work there is.** The group loop finds groups on the plain
///   loop's fetch connection; its recovery connection and group sessions are opened when
///   grouped messages are first seen, and closed once unused for the group idle timeout
///   ([`WorkerBuilder::group_idle_timeout`](crate::WorkerBuilder::group_idle_timeout),
///   30 s by default). For Postgres: `pgbus:fetch`, plus while grouped work runs
///   `pgbus:recovery` and one `pgbus:group` per running group: at most `concurrency + 2`
///   (reported by [`WorkerMetadata::connection_budget`](crate::WorkerMetadata)), plus the
///   backend's pool and the process's listener. A dead owner's group waits for its lease
///   to run out when no grouped work keeps the recovery connection open here.
/// - **Shutdown** drains both loops under one deadline.
pub struct MixedWorker<B: Backend> {
    pub(crate) plain: Worker<B>,
    groups: GroupWorker<B>,
}

impl<B: Backend> MixedWorker<B> {
    pub(crate) fn new(plain: Worker<B>, groups: GroupWorker<B>) -> Self {
        Self { plain, groups }
    }

    /// A handle to watch the worker while it runs: capacity and busy slots are the shared
    /// ones; `group_sessions` counts the open group sessions.
    pub fn monitor(&self) -> WorkerMonitor {
        self.plain.monitor()
    }

    /// Runs both loops until `shutdown` is cancelled, then drains them (see [`Worker::run`]
    /// and [`GroupWorker::run`]); returns what both did.
    pub async fn run(self, shutdown: CancellationToken) -> Result<WorkerReport> {
        let concurrency = self.plain.config.concurrency;
        let pool = new_pool(self.plain.shared.mode, concurrency)?;
        let share = Arc::new(Share::new(concurrency));
        let freed = [Arc::new(Notify::new()), Arc::new(Notify::new())];
        {
            let freed = freed.clone();
            pool.on_state_change(Arc::new(move || {
                for loop_freed in &freed {
                    loop_freed.notify_one();
                }
            }));
        }
        let fetch = Arc::new(FetchConn::new(self.plain.backend.clone()));
        let report = Arc::new(Counters::default());
        let kill = CancellationToken::new();
        let lane = |kind: Kind| Lane {
            kind,
            pool: Arc::clone(&pool),
            freed: Arc::clone(&freed[kind.index()]),
            fetch: Arc::clone(&fetch),
            report: Arc::clone(&report),
            kill: kill.clone(),
            share: Some(Arc::clone(&share)),
            turn: Arc::clone(&share.turn[kind.index()]),
        };
        // A loop that fails to start ends the other (dropping it kills its jobs).
        tokio::try_join!(
            self.plain.run_in(lane(Kind::Plain), shutdown.clone()),
            self.groups.run_in(lane(Kind::Groups), shutdown),
        )?;
        Ok(report.snapshot())
    }
}
