//! The claim and ack statements, as a worker runs them: a claim of 100 on a fetch
//! connection (`OpenFetcher`, the statement prepared once) and an ack of 100 leases on the
//! backend's pool, against a throwaway local cluster.
//!
//! The cluster runs with `fast(true)` (no fsync): this measures the statements and their
//! round trips, not the disk, whose commit latency the `cargo xtask bench` scenarios show
//! under durable settings. Each iteration sends 100 messages first (not timed).

use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use pgbus_core::{
    Consumer, Fetcher, Lease, NewMessage, OpenFetcher, Producer, QueueAdmin, QueueName,
    QueueOptions,
};
use pgbus_pg::{LocalCluster, PgBackend};
use tokio::runtime::Runtime;

const BATCH: usize = 100;
const LEASE: Duration = Duration::from_secs(30);

struct Setup {
    backend: PgBackend,
    queue: QueueName,
}

impl Setup {
    async fn new(url: &str) -> Setup {
        let backend = PgBackend::connect(url).expect("backend");
        backend.migrate().await.expect("migrate");
        let queue = QueueName::new("bench").expect("queue name");
        backend
            .create_queue(&queue, &QueueOptions::default())
            .await
            .expect("queue");
        Setup { backend, queue }
    }

    async fn fill(&self) {
        let batch = (0..BATCH as u64)
            .map(|i| NewMessage::encode(&i).expect("encodes"))
            .collect();
        self.backend
            .send_batch(&self.queue, batch)
            .await
            .expect("send");
    }
}

fn statements(c: &mut Criterion, runtime: &Runtime, url: &str) {
    let setup = runtime.block_on(Setup::new(url));
    let mut fetcher = runtime
        .block_on(setup.backend.open_fetcher())
        .expect("fetcher");
    let mut group = c.benchmark_group("statements");
    group.throughput(Throughput::Elements(BATCH as u64));

    group.bench_function("claim_100", |b| {
        b.iter_custom(|iterations| {
            runtime.block_on(async {
                let mut timed = Duration::ZERO;
                for _ in 0..iterations {
                    setup.fill().await;
                    let started = Instant::now();
                    let claimed = fetcher
                        .claim(&setup.queue, BATCH, LEASE)
                        .await
                        .expect("claim");
                    timed += started.elapsed();
                    assert_eq!(claimed.len(), BATCH);
                    let leases: Vec<Lease> = claimed.iter().map(|m| m.lease()).collect();
                    setup.backend.ack(&leases).await.expect("ack");
                }
                timed
            })
        });
    });

    group.bench_function("ack_100", |b| {
        b.iter_custom(|iterations| {
            runtime.block_on(async {
                let mut timed = Duration::ZERO;
                for _ in 0..iterations {
                    setup.fill().await;
                    let claimed = fetcher
                        .claim(&setup.queue, BATCH, LEASE)
                        .await
                        .expect("claim");
                    let leases: Vec<Lease> = claimed.iter().map(|m| m.lease()).collect();
                    let started = Instant::now();
                    let acked = setup.backend.ack(&leases).await.expect("ack");
                    timed += started.elapsed();
                    assert_eq!(acked, BATCH as u64);
                }
                timed
            })
        });
    });
    group.finish();
}

// What `criterion_group!`/`criterion_main!` expand to, written out because the generated
// `pub fn` would trip the workspace's `missing_docs` lint.
fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let cluster = LocalCluster::builder()
        .fast(true)
        .start()
        .expect("a throwaway PostgreSQL cluster");
    statements(&mut criterion, &runtime, &cluster.url());
    criterion.final_summary();
    drop(runtime);
    cluster.stop();
}
