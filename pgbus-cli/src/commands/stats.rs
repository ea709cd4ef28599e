//! `pgbus stats`: queue statistics, worker processes, open batches and topics.

use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::Args;
use pgbus_core::{BatchInfo, ProcessRegistry, QueueName, Stats, TopicStats, Topics};
use pgbus_pg::PgBackend;
use serde_json::json;

use crate::support::database::Database;
use crate::support::json::{batches_json, processes_json, queues_json, topics_json};
use crate::support::output::{Align, Table};

// No doc comment: the `Command` variant's is the command's about.
#[derive(Debug, Args)]
pub(crate) struct StatsArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

/// `pgbus stats`.
pub(crate) async fn run(args: StatsArgs, db: &Database) -> anyhow::Result<ExitCode> {
    let json = args.json;
    let backend = db.ready().await?;
    let stats = backend.stats().await?;
    let processes = backend.processes().await?;
    let batches = backend.open_batches().await?;
    let now = SystemTime::now();
    let age = |t: SystemTime| now.duration_since(t).unwrap_or_default();
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "queues": queues_json(&stats),
                "processes": processes_json(&processes, now),
                "batches": batches_json(&batches),
                "topics": topics_json(&backend.topic_stats().await?),
            }))?
        );
    } else {
        let mut table = Table::new(&[
            ("QUEUE", Align::Left),
            ("DEPTH", Align::Right),
            ("READY", Align::Right),
            ("IN_FLIGHT", Align::Right),
            ("SCHEDULED", Align::Right),
            ("DEAD", Align::Right),
            ("OLDEST", Align::Right),
            ("DONE/MIN", Align::Right),
            ("FAILED/MIN", Align::Right),
        ]);
        for s in &stats {
            let oldest = s
                .oldest_ready_age
                .map(|a| humantime::format_duration(Duration::from_secs(a.as_secs())).to_string())
                .unwrap_or_else(|| "-".into());
            let name = match (s.paused, s.breaker_open_for) {
                (true, _) => format!("{} (paused)", s.queue),
                (false, Some(open)) => format!("{} (breaker {}s)", s.queue, open.as_secs() + 1),
                (false, None) => s.queue.to_string(),
            };
            table.row(vec![
                name,
                s.depth().to_string(),
                s.ready.to_string(),
                s.in_flight.to_string(),
                s.scheduled.to_string(),
                s.dead_lettered.to_string(),
                oldest,
                s.processed_per_minute.to_string(),
                s.failed_per_minute.to_string(),
            ]);
        }
        table.print();
        if !processes.is_empty() {
            println!();
            let mut table = Table::new(&[
                ("ID", Align::Right),
                ("HOST", Align::Left),
                ("PID", Align::Right),
                ("MODE", Align::Left),
                ("BUSY", Align::Right),
                ("HEARTBEAT", Align::Right),
                ("QUEUES", Align::Left),
            ]);
            for p in &processes {
                table.row(vec![
                    p.id.0.to_string(),
                    p.info.hostname.clone(),
                    p.info.pid.to_string(),
                    p.info.mode.clone(),
                    format!("{}/{}", p.busy, p.info.capacity),
                    format!("{}s ago", age(p.heartbeat_at).as_secs()),
                    p.info
                        .queues
                        .iter()
                        .map(QueueName::as_str)
                        .collect::<Vec<_>>()
                        .join(","),
                ]);
            }
            table.print();
        }
        print_batches(&batches);
        print_topics(backend).await?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Open batches for the `stats` table.
fn print_batches(batches: &[BatchInfo]) {
    if batches.is_empty() {
        return;
    }
    println!();
    let mut table = Table::new(&[
        ("BATCH", Align::Right),
        ("QUEUE", Align::Left),
        ("TOTAL", Align::Right),
        ("PENDING", Align::Right),
        ("SUCCEEDED", Align::Right),
        ("DEAD", Align::Right),
    ]);
    for b in batches {
        table.row(vec![
            b.id.0.to_string(),
            b.queue.to_string(),
            b.total.to_string(),
            b.pending.to_string(),
            b.succeeded().to_string(),
            b.dead_lettered.to_string(),
        ]);
    }
    table.print();
}

/// The topics table of `stats`.
async fn print_topics(backend: &PgBackend) -> anyhow::Result<()> {
    let topics: Vec<TopicStats> = backend.topic_stats().await?;
    if topics.is_empty() {
        return Ok(());
    }
    println!();
    let mut table = Table::new(&[
        ("TOPIC", Align::Left),
        ("PUBLISHED", Align::Right),
        ("COPIES", Align::Right),
        ("UNROUTED", Align::Right),
    ]);
    for t in &topics {
        table.row(vec![
            t.routing_key.to_string(),
            t.published.to_string(),
            t.copies.to_string(),
            t.unrouted.to_string(),
        ]);
    }
    table.print();
    Ok(())
}
