//! `pgbus demo`: a queue with a steady trickle of jobs, some failing into the dead-letter
//! queue and some grouped, worked in async mode; stats printed as it runs.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use pgbus_core::{NewMessage, Producer, QueueAdmin, QueueName, QueueOptions, RetryPolicy, Stats};
use pgbus_exec::{JobContext, Outcome, Worker, WorkerBuilder};
use pgbus_pg::PgBackend;
use serde::{Deserialize, Serialize};

use crate::support::database::Database;
use crate::support::signals::stop_on_signals;
use crate::support::time::duration;

// No doc comment: the `Command` variant's is the command's about.
#[derive(Debug, Args)]
pub(crate) struct DemoArgs {
    /// Stop by itself after this long (e.g. 10s).
    #[arg(long, value_parser = duration, allow_hyphen_values = true)]
    pub(crate) duration: Option<Duration>,
    /// Where to serve the dashboard (a free port is taken if this one is busy).
    #[cfg(feature = "serve")]
    #[arg(long, value_parser = crate::server::listen_addr, default_value = "127.0.0.1:8080")]
    pub(crate) listen: std::net::SocketAddr,
}

#[derive(Debug, Serialize, Deserialize)]
struct DemoJob {
    n: u64,
    fail: bool,
}

/// `pgbus demo`.
pub(crate) async fn run(args: DemoArgs, db: &Database) -> anyhow::Result<ExitCode> {
    let backend = db.ready().await?.clone();
    let queue = QueueName::new("demo")?;
    let retry = RetryPolicy::builder()
        .base(Duration::from_millis(200))
        .cap(Duration::from_secs(2))
        .max_attempts(3)
        .build()?;
    backend
        .create_queue(&queue, &QueueOptions::default().retry(retry))
        .await?;
    let stop = stop_on_signals()?;
    #[cfg(feature = "serve")]
    let server = {
        let listener = crate::server::bind_or_any(args.listen).await?;
        let server = crate::server::start(
            db.session_url(),
            backend.clone(),
            listener,
            None,
            Duration::from_secs(1),
            stop.clone(),
        )
        .await?;
        println!("pgbus demo: dashboard at {}", server.url());
        server
    };
    if let Some(duration) = args.duration {
        let stop = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(duration).await;
            stop.cancel();
        });
    }
    // The workers' default poll interval.
    let wakeups = db.wakeups(Duration::from_secs(1))?;
    let with_wakeups = |builder: WorkerBuilder<PgBackend>| match &wakeups {
        Some(wakeups) => builder.wakeups(Arc::clone(wakeups)),
        None => builder,
    };
    let handler = |ctx: JobContext<PgBackend>, job: DemoJob| async move {
        // Pretend to do some I/O.
        tokio::time::sleep(Duration::from_millis(20 + job.n % 50)).await;
        if job.fail {
            return Outcome::retry(format!("job {} failed on attempt {}", job.n, ctx.attempt()));
        }
        Outcome::Ack
    };
    // Plain and grouped jobs on one set of slots, as `pgbus work` runs them.
    let worker = with_wakeups(Worker::builder(backend.clone()))
        .concurrency(8)
        .handle(queue.clone(), handler)
        .build_mixed()?;
    let worker = tokio::spawn(worker.run(stop.clone()));

    println!("pgbus demo: sending jobs to queue `demo` (every 10th fails into the dead-letter queue, every 3rd is grouped); Ctrl-C stops");
    let mut n = 0u64;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut report = tokio::time::interval(Duration::from_secs(2));
    while !stop.is_cancelled() {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {
                n += 1;
                let mut message = NewMessage::encode(&DemoJob { n, fail: n.is_multiple_of(10) })?;
                if n.is_multiple_of(3) {
                    message = message.group(format!("customer_{}", n % 4));
                }
                backend.send(&queue, message).await?;
            }
            _ = report.tick() => {
                for s in backend.stats().await? {
                    println!(
                        "queue {}: sent {n}, ready {}, in flight {}, scheduled {}, dead-lettered {}",
                        s.queue, s.ready, s.in_flight, s.scheduled, s.dead_lettered
                    );
                }
            }
        }
    }
    let report = worker.await??;
    #[cfg(feature = "serve")]
    server.wait().await?;
    println!(
        "pgbus demo: stopped after sending {n} jobs; {} acked, {} retried, {} dead-lettered",
        report.acked, report.retried, report.dead_lettered
    );
    Ok(ExitCode::SUCCESS)
}
