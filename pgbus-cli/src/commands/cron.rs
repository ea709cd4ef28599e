//! `cron list`: the recurring tasks schedulers have declared, with their next run;
//! `cron run`: a scheduler for the tasks of a config file.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;

use crate::support::database::Database;
use crate::support::json::schedules_json;
use crate::support::output::{Align, Table};
use crate::support::signals::stop_on_signals;
use crate::support::time::{positive_duration, rfc3339};

#[derive(Debug, Subcommand)]
pub(crate) enum CronCommand {
    /// List the recurring tasks, their schedule, last and next occurrence.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run a scheduler for the recurring tasks of a JSON config file until SIGTERM or
    /// Ctrl-C. Run it in as many processes as you like: one leads at a time.
    Run {
        /// The tasks: a JSON array of {"name", "queue", "cron" (e.g. "0 3 * * *", or six
        /// fields with seconds first: "*/5 * * * * *") or "every_secs", "payload",
        /// optional "headers", "priority", "catch_up"} (see docs/cli.md).
        #[arg(long)]
        config: PathBuf,
        /// How long a dead leader's lease lasts before another scheduler takes over.
        #[arg(long, value_parser = positive_duration, default_value = "30s", allow_hyphen_values = true)]
        lease: Duration,
    },
}

/// `pgbus cron ...`.
pub(crate) async fn run(command: CronCommand, db: &Database) -> anyhow::Result<ExitCode> {
    let backend = db.ready().await?;
    let json = match command {
        CronCommand::List { json } => json,
        CronCommand::Run { config, lease } => {
            let text = std::fs::read_to_string(&config)
                .with_context(|| format!("reading {}", config.display()))?;
            let tasks = pgbus_core::tasks_from_json(&text)
                .with_context(|| format!("in {}", config.display()))?;
            let mut scheduler = pgbus_pg::Scheduler::builder(backend.clone()).lease(lease);
            for task in tasks {
                scheduler = scheduler.task(task);
            }
            let stop = stop_on_signals()?;
            scheduler.build()?.run(stop).await?;
            return Ok(ExitCode::SUCCESS);
        }
    };
    let schedules = backend.schedules().await?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&schedules_json(&schedules))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = Table::new(&[
        ("TASK", Align::Left),
        ("QUEUE", Align::Left),
        ("SCHEDULE", Align::Left),
        ("MISSED", Align::Left),
        ("LAST", Align::Left),
        ("NEXT", Align::Left),
    ]);
    for s in &schedules {
        table.row(vec![
            s.task.clone(),
            s.queue.clone(),
            s.schedule.clone(),
            s.missed.clone(),
            s.last_at.map_or_else(|| "never".to_owned(), rfc3339),
            // Unknown until a leading scheduler has computed it.
            s.next_at.map_or_else(|| "-".to_owned(), rfc3339),
        ]);
    }
    table.print();
    Ok(ExitCode::SUCCESS)
}
