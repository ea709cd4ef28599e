//! Migrates, sends jobs and processes them, on `DATABASE_URL` or, when that is not set, on
//! a throwaway PostgreSQL cluster started from the machine's binaries.
//!
//! ```sh
//! cargo run -p pgbus-pg --example quickstart
//! ```

use std::time::{Duration, Instant};

use pgbus_core::{
    Consumer, DeadLetters, NewMessage, Producer, QueueAdmin, QueueName, QueueOptions,
    RetryDecision, Stats,
};
use pgbus_pg::{LocalCluster, PgBackend};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct Resize {
    image: String,
    width: u32,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Keep the cluster alive until the end of main; dropping it stops and removes it.
    let (url, _cluster) = match std::env::var("DATABASE_URL") {
        Ok(url) => (url, None),
        Err(_) => {
            let cluster = tokio::task::spawn_blocking(|| LocalCluster::builder().start()).await??;
            println!(
                "started a throwaway PostgreSQL cluster on port {} in {}",
                cluster.port(),
                cluster.data_dir().display()
            );
            (cluster.url(), Some(cluster))
        }
    };

    let backend = PgBackend::connect(&url)?;
    let applied = backend.migrate().await?;
    println!("migrated (applied versions {applied:?})");

    let queue = QueueName::new("images")?;
    backend
        .create_queue(&queue, &QueueOptions::default())
        .await?;

    let jobs: Vec<NewMessage> = (0..10_000)
        .map(|n| {
            NewMessage::encode(&Resize {
                image: format!("img-{n}.png"),
                width: 100 + n % 900,
            })
        })
        .collect::<Result<_, _>>()?;
    let started = Instant::now();
    backend.send_batch(&queue, jobs).await?;
    backend
        .send(
            &queue,
            NewMessage::json(&serde_json::json!({"image": 1}))?.priority(10),
        )
        .await?;
    println!("sent 10,001 jobs in {:?}", started.elapsed());

    let policy = backend.queue_info(&queue).await?.options.retry;
    let started = Instant::now();
    let (mut done, mut dead) = (0, 0);
    loop {
        let batch = backend.claim(&queue, 500, Duration::from_secs(30)).await?;
        if batch.is_empty() {
            break;
        }
        let mut acks = Vec::with_capacity(batch.len());
        for message in &batch {
            // A payload that does not decode never will: dead-letter it at once.
            let job = match message.decode::<Resize>() {
                Ok(job) => job,
                Err(err) => {
                    backend
                        .dead_letter(&message.lease(), &err.to_string())
                        .await?;
                    dead += 1;
                    continue;
                }
            };
            match handle(&job) {
                Ok(()) => acks.push(message.lease()),
                Err(error) => match policy.decide(message.attempts) {
                    RetryDecision::RetryAfter(delay) => {
                        backend.nack(&message.lease(), delay, Some(&error)).await?;
                    }
                    RetryDecision::DeadLetter => {
                        backend.dead_letter(&message.lease(), &error).await?;
                        dead += 1;
                    }
                },
            }
        }
        done += backend.ack(&acks).await?;
    }
    println!(
        "processed {done} jobs in {:?}; {dead} dead-lettered",
        started.elapsed()
    );
    for dead in backend.list_dead(&queue, 10).await? {
        println!("dead letter {}: {}", dead.id, dead.error);
    }
    for stats in backend.stats().await? {
        println!(
            "queue {}: ready {}, in flight {}, scheduled {}, dead-lettered {}",
            stats.queue, stats.ready, stats.in_flight, stats.scheduled, stats.dead_lettered
        );
    }
    Ok(())
}

fn handle(job: &Resize) -> Result<(), String> {
    if job.width == 0 {
        return Err(format!("cannot resize {} to width 0", job.image));
    }
    Ok(())
}
