//! `groups`: ordered groups. Many groups of a few messages each, pre-inserted interleaved,
//! drained by a `GroupWorker` (one at a time and in order per group, each in-flight group
//! on its own connection); throughput, peak connections, and a check of the order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pgbus_core::{NewMessage, WakeupSource};
use pgbus_exec::{JobContext, Worker};
use pgbus_pg::{GroupLocks, PgBackend};

use super::{
    live_listener, on_fresh_database, pgbus_backend, preinsert_messages, queue, rate, Tally,
};
use crate::observer::ConnectionObserver;
use crate::server::Server;

/// One run's figures.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Run {
    pub(crate) jobs_per_s: f64,
    pub(crate) peak_connections: i64,
    /// What the worker reports as its budget (`concurrency + 2`), when it does.
    pub(crate) connection_budget: Option<usize>,
    /// Messages that ran out of their group's send order.
    pub(crate) out_of_order: u64,
    pub(crate) startup: Duration,
}

/// The lock modes the scenario runs, with their labels.
pub(crate) const LOCK_MODES: [(&str, GroupLocks); 2] = [
    ("advisory locks", GroupLocks::Advisory),
    (
        "lease rows",
        GroupLocks::Lease {
            ttl: Duration::from_secs(30),
        },
    ),
];

/// `groups` × `per_group` no-op messages, sent round-robin over the groups (so every group
/// has work from the start), drained by one group worker of `concurrency` whose groups
/// are held by `locks`.
pub(crate) async fn run_once(
    server: &Server,
    groups: u32,
    per_group: u32,
    concurrency: usize,
    locks: GroupLocks,
) -> anyhow::Result<Run> {
    on_fresh_database(server, |url| async move {
        let messages = (0..per_group).flat_map(move |seq| {
            (0..groups)
                .map(move |g| NewMessage::encode(&(g, seq)).map(|m| m.group(format!("g{g}"))))
        });
        let backend = {
            let setup_backend = pgbus_backend(&url, |b| b).await?;
            preinsert_messages(&setup_backend, &url, messages).await?;
            PgBackend::builder(&url).group_locks(locks).build()?
        };
        let observer = ConnectionObserver::start(&url).await?;
        let listener = live_listener(&url).await?;

        let n = (groups * per_group) as usize;
        let tally = Tally::new(n);
        // The next sequence number each group should run; anything else is out of order.
        let next: Arc<Mutex<HashMap<u32, u32>>> = Arc::default();
        let out_of_order = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let worker = {
            let (tally, next, out_of_order) = (tally.clone(), next.clone(), out_of_order.clone());
            Worker::builder(backend.clone())
                .concurrency(concurrency)
                .wakeups(Arc::clone(&listener) as Arc<dyn WakeupSource>)
                .handle(
                    queue(),
                    move |_ctx: JobContext<PgBackend>, (g, seq): (u32, u32)| {
                        tally.started();
                        {
                            let mut next = next.lock().expect("order map");
                            let expected = next.entry(g).or_insert(0);
                            if seq != *expected {
                                out_of_order.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            *expected = seq + 1;
                        }
                        tally.finished();
                        async {}
                    },
                )
                .build_groups()?
        };
        let monitor = worker.monitor();
        let started = Instant::now();
        let run = tokio::spawn(worker.run(tally.stop()));
        let drained = tally.time(started, vec![run]).await;
        let peak = observer.finish().await?;
        let drained = drained?;
        Ok(Run {
            jobs_per_s: rate(drained.acked, drained.elapsed),
            peak_connections: peak,
            connection_budget: monitor.metadata().connection_budget,
            out_of_order: out_of_order.load(std::sync::atomic::Ordering::Relaxed),
            startup: drained.startup,
        })
    })
    .await
}
