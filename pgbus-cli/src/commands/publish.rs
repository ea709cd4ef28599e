//! `pgbus publish`: events from an argument or standard input, a copy to every queue
//! bound to a matching pattern.

use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
use pgbus_core::{NewEvent, Published, Topics};
use serde_json::Value;

use crate::support::database::Database;
use crate::support::output;
use crate::support::stdin::stdin_batches;

// No doc comment: the `Command` variant's is the command's about.
#[derive(Debug, Args)]
pub(crate) struct PublishArgs {
    /// Routing key: dot-separated segments of [A-Za-z0-9_-], e.g. `order.paid`.
    pub(crate) routing_key: String,
    /// The event payload as JSON; without it, one JSON document per line is read from
    /// stdin.
    pub(crate) json: Option<String>,
    /// Events per statement when reading stdin.
    #[arg(long, default_value_t = 1000)]
    pub(crate) batch: usize,
}

/// One event from its JSON text, checked against the limits the backend enforces (the
/// default payload limit) so that a refusal can name its line.
fn event(routing_key: &str, json: &str) -> anyhow::Result<NewEvent> {
    let value: Value = serde_json::from_str(json).context("not valid JSON")?;
    let event = NewEvent::json(routing_key, &value)?;
    event.check(pgbus_core::DEFAULT_MAX_PAYLOAD_BYTES)?;
    Ok(event)
}

/// Prints `EVENT_ID COPIES` per event, and warns about events that matched no binding.
fn report(published: &[Published], routing_key: &str) {
    for p in published {
        println!("{} {}", p.id, p.copies);
    }
    let unrouted = published.iter().filter(|p| p.copies == 0).count();
    if unrouted > 0 {
        output::warn(format_args!(
            "{unrouted} event(s) with routing key {routing_key} matched no binding: delivered nowhere (kept in the event log)"
        ));
    }
}

/// `pgbus publish`.
pub(crate) async fn run(args: PublishArgs, db: &Database) -> anyhow::Result<ExitCode> {
    // The key is checked before the database is touched.
    pgbus_core::RoutingKey::new(args.routing_key.clone())?;
    let backend = db.ready().await?;
    if let Some(json) = &args.json {
        let event = event(&args.routing_key, json).context("the event is refused")?;
        let published = backend.publish(event).await?;
        report(&[published], &args.routing_key);
        return Ok(ExitCode::SUCCESS);
    }
    let key = args.routing_key.as_str();
    stdin_batches(
        args.batch,
        "events",
        |line| event(key, line),
        async |batch, progress| {
            let published = backend.publish_batch(batch).await?;
            progress.suspend(|| report(&published, key));
            Ok(())
        },
    )
    .await?;
    Ok(ExitCode::SUCCESS)
}
