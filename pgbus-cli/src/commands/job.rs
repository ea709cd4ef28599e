//! `pgbus job show|list|retry|cancel|dead-letter|discard|reschedule|priority|audit`: find
//! any job, see its whole story, act on it, read what was done. Every query and action is
//! `pgbus_pg::console`'s, the ones `pgbus serve`'s job pages and `/api/jobs` run, and
//! `--json` prints the API's shapes (`support/json.rs`), so scripts and the page see the
//! same thing.

use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::{Args, Subcommand};
use pgbus_core::{MessageId, OneLine, QueueAdmin, QueueName};
use pgbus_pg::console::{
    Action, Console, Count, Cursor, JobDetail, JobFilter, JobState, JobSummary, Order,
    PayloadMatch, Target, MAX_PAGE, PAYLOAD_SHOWN_MAX,
};
use pgbus_pg::PgBackend;

use crate::support::audit::cli_actor;
use crate::support::database::Database;
use crate::support::json::{audit_json, job_detail_json, job_list_json};
use crate::support::output::{self, Align, Table};
use crate::support::time::{duration, rfc3339, time};

/// The most of a last error or a payload preview a listing's cell shows.
const CELL: usize = 60;
/// The most of one error text `job show` prints (`--json` has it whole).
const SHOWN_ERROR: usize = 1024;

#[derive(Debug, Subcommand)]
pub(crate) enum JobCommand {
    /// Everything about one job, wherever it is (queue, dead letters, archive): payload,
    /// headers, error history, lease holder, batch, unique key, event origin.
    Show(ShowArgs),
    /// One queue's jobs in one state, newest first, a page at a time, then how many jobs
    /// each state holds.
    List(ListArgs),
    /// Make jobs ready now: ready and scheduled ones run next, dead-lettered ones go back
    /// to their queue (attempts reset, error history kept).
    Retry(Ids),
    /// Remove jobs from their queue: ready and scheduled ones are deleted; a running one's
    /// worker cancels its handler at its next lease extension.
    Cancel(Ids),
    /// Move ready, scheduled or running jobs to the dead letters.
    DeadLetter(Ids),
    /// Delete dead-lettered and archived jobs for good.
    Discard(Ids),
    /// Make ready, scheduled and dead-lettered jobs visible at a time (dead-lettered ones
    /// back in their queue).
    Reschedule(RescheduleArgs),
    /// Change the priority of ready, scheduled and dead-lettered jobs.
    Priority(PriorityArgs),
    /// The audit log of these actions (and of queue pauses and resumes), newest first.
    Audit(AuditArgs),
}

#[derive(Debug, Args)]
pub(crate) struct ShowArgs {
    /// Job id (as `send` printed it, or `job list` shows it).
    #[arg(value_parser = clap::value_parser!(i64).range(1..))]
    id: i64,
    /// Print JSON.
    #[arg(long, conflicts_with = "payload")]
    json: bool,
    /// Print only the payload, whole and as stored (bytes), for a file or a pipe.
    #[arg(long)]
    payload: bool,
}

#[derive(Debug, Args)]
pub(crate) struct ListArgs {
    /// Queue name.
    queue: String,
    /// ready, scheduled, in_flight, dead or archived (queues that keep history).
    #[arg(long, default_value = "ready", value_parser = job_state)]
    state: JobState,
    /// Oldest first (default: newest first).
    #[arg(long)]
    oldest: bool,
    /// Only this job.
    #[arg(long, value_parser = clap::value_parser!(i64).range(1..))]
    id: Option<i64>,
    /// Only this ordered group.
    #[arg(long)]
    group: Option<String>,
    /// Only this priority.
    #[arg(long, allow_negative_numbers = true)]
    priority: Option<i16>,
    /// Only jobs delivered at least this many times.
    #[arg(long)]
    min_attempts: Option<u32>,
    /// Only jobs whose last error (a dead letter's reason) contains this text, ignoring
    /// case.
    #[arg(long)]
    error: Option<String>,
    /// Only payloads (JSON, or MessagePack read as JSON) with VALUE at PATH:
    /// `customer.id=42`, `tags.0=vip` (a VALUE that is not JSON is a string).
    #[arg(long, value_name = "PATH=VALUE", value_parser = payload_match)]
    payload: Option<PayloadMatch>,
    /// Most jobs on the page.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u16).range(1..=MAX_PAGE as i64))]
    limit: u16,
    /// Where to go on: the cursor the previous page noted (`more: --cursor C`).
    #[arg(long)]
    cursor: Option<String>,
    /// Print JSON: the page (`jobs`, `next`, `bound`) and `counts`, as `GET /api/jobs`.
    #[arg(long)]
    json: bool,
}

/// The jobs an action applies to.
#[derive(Debug, Args)]
pub(crate) struct Ids {
    /// Job ids (as `job list` shows them).
    #[arg(required = true, value_parser = clap::value_parser!(i64).range(1..))]
    ids: Vec<i64>,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("when").required(true).args(["at", "after"])))]
pub(crate) struct RescheduleArgs {
    /// When, in UTC: 2025-01-31T09:00:00Z.
    #[arg(long, value_name = "TIME", value_parser = time)]
    at: Option<SystemTime>,
    /// Or this long from now (e.g. 10m, 1h 30m).
    #[arg(long = "in", id = "after", value_name = "DURATION", value_parser = duration, allow_hyphen_values = true)]
    after: Option<Duration>,
    #[command(flatten)]
    ids: Ids,
}

#[derive(Debug, Args)]
pub(crate) struct PriorityArgs {
    /// The new priority: higher runs first.
    #[arg(long, allow_negative_numbers = true)]
    to: i16,
    #[command(flatten)]
    ids: Ids,
}

#[derive(Debug, Args)]
pub(crate) struct AuditArgs {
    /// Most entries shown.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u16).range(1..=MAX_PAGE as i64))]
    limit: u16,
    /// Only entries older than this one (its id): the next page.
    #[arg(long)]
    before: Option<i64>,
    /// Print JSON, as `GET /api/audit`.
    #[arg(long)]
    json: bool,
}

fn job_state(text: &str) -> Result<JobState, String> {
    JobState::parse(text).map_err(reason)
}

fn payload_match(text: &str) -> Result<PayloadMatch, String> {
    PayloadMatch::parse(text).map_err(reason)
}

/// A refusal's own text, without the "invalid argument: " its display adds (clap already
/// says the value is invalid).
fn reason(err: pgbus_core::Error) -> String {
    match err {
        pgbus_core::Error::InvalidArgument(text) => text,
        other => other.to_string(),
    }
}

/// `pgbus job ...`.
pub(crate) async fn run(command: JobCommand, db: &Database) -> anyhow::Result<ExitCode> {
    let backend = db.ready().await?;
    let console = Console::new(backend.clone());
    let (action, ids) = match command {
        JobCommand::Show(args) => return show(&console, args).await,
        JobCommand::List(args) => return list(backend, &console, args).await,
        JobCommand::Audit(args) => return audit(&console, args).await,
        JobCommand::Retry(ids) => (Action::RetryNow, ids),
        JobCommand::Cancel(ids) => (Action::Cancel, ids),
        JobCommand::DeadLetter(ids) => (Action::DeadLetter, ids),
        JobCommand::Discard(ids) => (Action::Discard, ids),
        JobCommand::Reschedule(args) => {
            let at = match (args.at, args.after) {
                (Some(at), _) => at,
                (None, after) => SystemTime::now() + after.unwrap_or_default(),
            };
            (Action::Reschedule(at), args.ids)
        }
        JobCommand::Priority(args) => (Action::SetPriority(args.to), args.ids),
    };
    act(&console, &action, ids).await
}

/// `job show`.
async fn show(console: &Console, args: ShowArgs) -> anyhow::Result<ExitCode> {
    let id = MessageId(args.id);
    if args.payload {
        let Some((_, payload)) = console.payload(id).await? else {
            anyhow::bail!("no job {id}");
        };
        use std::io::Write;
        let mut stdout = std::io::stdout().lock();
        stdout.write_all(&payload)?;
        stdout.flush()?;
        return Ok(ExitCode::SUCCESS);
    }
    let Some(job) = console.job(id).await? else {
        anyhow::bail!("no job {id}");
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&job_detail_json(&job))?);
    } else {
        print!("{}", detail_text(&job));
    }
    Ok(ExitCode::SUCCESS)
}

/// What `job show` prints for people: the fields, the headers, the payload and the error
/// history, each part after an empty line. Whatever a producer or a job wrote (headers,
/// error texts) is escaped onto its line.
fn detail_text(job: &JobDetail) -> String {
    let s = &job.summary;
    let mut fields: Vec<(&str, String)> = vec![
        ("queue", s.queue.to_string()),
        ("state", s.state.as_str().to_owned()),
        ("priority", s.priority.to_string()),
    ];
    if let Some(group) = &s.group_key {
        fields.push(("group", OneLine::new(group, usize::MAX).to_string()));
    }
    fields.push((
        "attempts",
        format!("{} of {}", s.attempts, job.max_attempts),
    ));
    fields.push(("enqueued_at", rfc3339(s.enqueued_at)));
    fields.push((at_label(s.state), rfc3339(s.at)));
    if let Some(until) = s.lease_until {
        fields.push(("lease_until", rfc3339(until)));
    }
    if let Some(holder) = &job.held_by {
        fields.push((
            "held_by",
            format!(
                "process {} ({}, pid {})",
                holder.id.0, holder.hostname, holder.pid
            ),
        ));
    }
    if let Some(batch) = job.batch_id {
        fields.push(("batch", batch.to_string()));
    }
    if let Some(key) = &job.unique_key {
        fields.push(("unique_key", OneLine::new(key, usize::MAX).to_string()));
    }
    if let Some(key) = &job.limit_key {
        fields.push(("limit_key", OneLine::new(key, usize::MAX).to_string()));
    }
    if let Some(event) = &job.event {
        fields.push((
            "event",
            format!(
                "{} (event {})",
                OneLine::new(&event.routing_key, usize::MAX),
                OneLine::new(&event.event_id, usize::MAX)
            ),
        ));
    }
    if let Some(error) = &s.last_error {
        fields.push(("last_error", OneLine::new(error, SHOWN_ERROR).to_string()));
    }
    fields.push((
        "payload",
        format!("{}, {} bytes", job.content_type.mime(), job.payload_bytes),
    ));
    let width = fields.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let mut out = format!("job {}\n", s.id);
    for (key, value) in &fields {
        out.push_str(&format!("  {key:<width$}  {value}\n"));
    }

    if !job.headers.is_empty() {
        out.push_str("\nheaders\n");
        for (name, value) in &job.headers {
            out.push_str(&format!(
                "  {}: {}\n",
                OneLine::new(name, usize::MAX),
                OneLine::new(value, usize::MAX)
            ));
        }
    }

    out.push_str("\npayload\n");
    out.push_str(&job.payload);
    if !job.payload.ends_with('\n') {
        out.push('\n');
    }
    if job.payload_truncated {
        out.push_str(&format!(
            "(the first {} KiB of {} bytes: `pgbus job show {} --payload` prints it whole)\n",
            PAYLOAD_SHOWN_MAX / 1024,
            job.payload_bytes,
            s.id
        ));
    }

    if !job.errors.is_empty() {
        out.push_str("\nerrors\n");
        let mut table = Table::new(&[
            ("ATTEMPT", Align::Right),
            ("AT", Align::Left),
            ("ERROR", Align::Left),
        ]);
        for e in &job.errors {
            table.row(vec![
                e.attempt.to_string(),
                rfc3339(e.at),
                OneLine::new(&e.error, SHOWN_ERROR).to_string(),
            ]);
        }
        out.push_str(&table.render());
    }
    out
}

/// What a summary's `at` is in `state`.
fn at_label(state: JobState) -> &'static str {
    match state {
        JobState::Ready | JobState::Scheduled | JobState::InFlight => "visible_at",
        JobState::Dead => "failed_at",
        JobState::Archived => "acked_at",
    }
}

/// `job list`.
async fn list(backend: &PgBackend, console: &Console, args: ListArgs) -> anyhow::Result<ExitCode> {
    let queue = QueueName::new(args.queue)?;
    // A misspelt queue fails, rather than listing nothing.
    let info = backend.queue_info(&queue).await?;
    if args.state == JobState::Archived && !info.options.keep_history {
        output::note(format_args!(
            "queue {queue} keeps no history, so it archives nothing \
             (`pgbus queue alter {queue} --keep-history` starts it)"
        ));
    }
    let mut filter = JobFilter::new(queue.clone(), args.state);
    filter.id = args.id.map(MessageId);
    filter.group_key = args.group;
    filter.priority = args.priority;
    filter.min_attempts = args.min_attempts;
    filter.error_contains = args.error;
    filter.payload = args.payload;
    let order = if args.oldest {
        Order::OldestFirst
    } else {
        Order::NewestFirst
    };
    let cursor = args.cursor.map(Cursor);
    let (page, counts) = tokio::try_join!(
        console.list(&filter, order, cursor.as_ref(), usize::from(args.limit)),
        console.counts(&queue),
    )?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&job_list_json(&page, &counts))?
        );
        return Ok(ExitCode::SUCCESS);
    }
    print!("{}", jobs_table(&page.jobs, args.state).render());
    println!("{}", counts_line(&counts));
    if let Some(next) = &page.next {
        output::note(format_args!("more: --cursor {}", next.0));
    }
    Ok(ExitCode::SUCCESS)
}

/// A listing for people: one line per job, the last error and the payload cut to a cell.
fn jobs_table(jobs: &[JobSummary], state: JobState) -> Table {
    let at = match at_label(state) {
        "failed_at" => "FAILED_AT",
        "acked_at" => "ACKED_AT",
        _ => "VISIBLE_AT",
    };
    let mut table = Table::new(&[
        ("ID", Align::Right),
        ("STATE", Align::Left),
        ("PRIORITY", Align::Right),
        ("GROUP", Align::Left),
        ("ATTEMPTS", Align::Right),
        (at, Align::Left),
        ("LAST_ERROR", Align::Left),
        ("PAYLOAD", Align::Left),
    ]);
    for job in jobs {
        table.row(vec![
            job.id.to_string(),
            job.state.as_str().to_owned(),
            job.priority.to_string(),
            job.group_key
                .as_deref()
                .map(|g| OneLine::new(g, CELL).to_string())
                .unwrap_or_default(),
            job.attempts.to_string(),
            rfc3339(job.at),
            job.last_error
                .as_deref()
                .map(|e| OneLine::new(e, CELL).to_string())
                .unwrap_or_default(),
            OneLine::new(&job.payload_preview, CELL).to_string(),
        ]);
    }
    table
}

/// `ready 12 · scheduled 0 · in_flight 1 · dead ≥10000 · archived 0`: `≥` where counting
/// stopped at the cap.
fn counts_line(counts: &[(JobState, Count)]) -> String {
    counts
        .iter()
        .map(|(state, count)| {
            let at_least = if count.exact { "" } else { "≥" };
            format!("{} {at_least}{}", state.as_str(), count.n)
        })
        .collect::<Vec<_>>()
        .join(" · ")
}

/// `job retry|cancel|...`: acts on the ids as `cli:<user>` and prints how many changed.
/// Fails (exit 1) when not every id changed, as `dlq retry` does: a script that names jobs
/// expects each of them acted on, and learns otherwise from the status, not by parsing the
/// count.
async fn act(console: &Console, action: &Action, ids: Ids) -> anyhow::Result<ExitCode> {
    let mut distinct: Vec<MessageId> = Vec::with_capacity(ids.ids.len());
    for id in ids.ids.into_iter().map(MessageId) {
        if !distinct.contains(&id) {
            distinct.push(id);
        }
    }
    let asked = distinct.len() as u64;
    let changed = console
        .act(&cli_actor(), action, &Target::Ids(distinct))
        .await?;
    let (verb, applies_to) = describe(action);
    println!("{verb} {changed} of {asked}");
    if changed < asked {
        anyhow::bail!(
            "{} of {asked} jobs not {verb}: gone, or not {applies_to} (`pgbus job show ID` \
             says where one is)",
            asked - changed
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `job audit`.
async fn audit(console: &Console, args: AuditArgs) -> anyhow::Result<ExitCode> {
    let entries = console.audit(usize::from(args.limit), args.before).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&audit_json(&entries))?);
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = Table::new(&[
        ("ID", Align::Right),
        ("AT", Align::Left),
        ("ACTOR", Align::Left),
        ("ACTION", Align::Left),
        ("QUEUE", Align::Left),
        ("COUNT", Align::Right),
        ("SELECTION", Align::Left),
    ]);
    for e in &entries {
        table.row(vec![
            e.id.to_string(),
            rfc3339(e.at),
            OneLine::new(&e.actor, CELL).to_string(),
            e.action.clone(),
            e.queue.clone().unwrap_or_default(),
            e.count.to_string(),
            OneLine::new(&e.detail.to_string(), CELL).to_string(),
        ]);
    }
    table.print();
    Ok(ExitCode::SUCCESS)
}

/// An action's past tense and the states it applies to (as `Action`'s variants say).
fn describe(action: &Action) -> (&'static str, &'static str) {
    match action {
        Action::RetryNow => ("retried", "ready, scheduled or dead"),
        Action::Reschedule(_) => ("rescheduled", "ready, scheduled or dead"),
        Action::SetPriority(_) => ("reprioritised", "ready, scheduled or dead"),
        Action::Cancel => ("cancelled", "ready, scheduled or in flight"),
        Action::DeadLetter => ("dead-lettered", "ready, scheduled or in flight"),
        Action::Discard => ("discarded", "dead or archived"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_say_at_least_where_counting_stopped() {
        let counts = [
            (JobState::Ready, Count { n: 12, exact: true }),
            (
                JobState::Dead,
                Count {
                    n: 10_000,
                    exact: false,
                },
            ),
        ];
        assert_eq!(counts_line(&counts), "ready 12 · dead ≥10000");
    }
}
