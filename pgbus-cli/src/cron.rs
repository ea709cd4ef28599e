//! `cron list`: the recurring tasks schedulers have declared, with their next run.

use std::process::ExitCode;

use clap::Subcommand;
use serde_json::json;

use crate::admin::rfc3339;
use crate::database::Database;

#[derive(Debug, Subcommand)]
pub(crate) enum CronCommand {
    /// List the recurring tasks, their schedule, last and next occurrence.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) async fn cron(db: &Database, command: CronCommand) -> anyhow::Result<ExitCode> {
    let backend = db.ready().await?;
    let CronCommand::List { json } = command;
    let schedules = backend.schedules().await?;
    let time = |t: Option<std::time::SystemTime>| t.map(rfc3339);
    if json {
        let tasks: Vec<_> = schedules
            .iter()
            .map(|s| {
                json!({
                    "task": s.task,
                    "queue": s.queue,
                    "schedule": s.schedule,
                    "missed": s.missed,
                    "last_at": time(s.last_at),
                    "next_at": time(s.next_at),
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "tasks": tasks }))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "{:<24} {:<16} {:<28} {:<14} {:<26} {:<26}",
        "TASK", "QUEUE", "SCHEDULE", "MISSED", "LAST", "NEXT"
    );
    for s in &schedules {
        let dash = || "-".to_owned();
        println!(
            "{:<24} {:<16} {:<28} {:<14} {:<26} {:<26}",
            s.task,
            s.queue,
            s.schedule,
            s.missed,
            time(s.last_at).unwrap_or_else(dash),
            time(s.next_at).unwrap_or_else(dash),
        );
    }
    Ok(ExitCode::SUCCESS)
}
