//! The console's public types: states, filters, cursors and bounds, pages, details, actions
//! and audit entries, and the limits every query keeps.

use std::time::SystemTime;

use pgbus_core::{ContentType, Error, Headers, MessageId, ProcessId, QueueName, Result};

/// Most rows of an index one page reads before it stops (a rare filter then returns a
/// short page and a cursor to go on).
pub const SCAN_WINDOW: usize = 5_000;
/// Counts are exact up to this many jobs per state and "at least" beyond. Ready,
/// scheduled and in-flight jobs are counted among the queue's oldest `COUNT_CAP + 1`
/// unfinished jobs: exact while the queue holds no more, "at least" beyond.
pub const COUNT_CAP: u64 = 10_000;
/// Most jobs one page holds.
pub const MAX_PAGE: usize = 500;
/// Longest payload [`Console::job`](super::Console::job) returns in
/// [`JobDetail::payload`] (the whole one is [`Console::payload`](super::Console::payload)).
pub const PAYLOAD_SHOWN_MAX: usize = 64 * 1024;
/// Most job ids one action takes ([`Target::Ids`]); larger selections go by filter.
pub const MAX_IDS: usize = 10_000;
/// Failed attempts a job keeps in its history (the oldest are dropped).
pub const ERRORS_KEPT: usize = 10;

/// Where a job is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobState {
    /// In the hot table, visible now, not leased.
    Ready,
    /// In the hot table, visible later (delayed, or waiting for a retry).
    Scheduled,
    /// In the hot table with a live lease: a worker runs it.
    InFlight,
    /// In the dead letters.
    Dead,
    /// Completed, in the archive (queues that keep history).
    Archived,
}

impl JobState {
    /// Every state, in the order pages show them.
    pub const ALL: [JobState; 5] = [
        JobState::Ready,
        JobState::Scheduled,
        JobState::InFlight,
        JobState::Dead,
        JobState::Archived,
    ];

    /// `ready`, `scheduled`, `in_flight`, `dead`, `archived`.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Ready => "ready",
            JobState::Scheduled => "scheduled",
            JobState::InFlight => "in_flight",
            JobState::Dead => "dead",
            JobState::Archived => "archived",
        }
    }

    /// Parses [`as_str`](Self::as_str)'s names.
    pub fn parse(text: &str) -> Result<Self> {
        JobState::ALL
            .into_iter()
            .find(|s| s.as_str() == text)
            .ok_or_else(|| {
                Error::InvalidArgument(format!(
                    "unknown job state {text:?} (ready, scheduled, in_flight, dead or archived)"
                ))
            })
    }
}

/// Page order, by id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Order {
    /// Highest id first.
    #[default]
    NewestFirst,
    /// Lowest id first.
    OldestFirst,
}

/// JSON path equality on a JSON (or MessagePack, decoded) payload: `path` `a.b.0` and a JSON
/// `value`, parsed from `a.b.0=VALUE` (a VALUE that is not JSON is a string).
#[derive(Debug, Clone, PartialEq)]
pub struct PayloadMatch {
    /// Object keys (and array indexes) from the payload's root.
    pub path: Vec<String>,
    /// The value at `path`.
    pub value: serde_json::Value,
}

impl PayloadMatch {
    /// Parses `path=value`.
    pub fn parse(text: &str) -> Result<Self> {
        let (path, value) = text.split_once('=').ok_or_else(|| {
            Error::InvalidArgument(format!("payload filter {text:?} is not PATH=VALUE"))
        })?;
        let path: Vec<String> = path.split('.').map(str::to_owned).collect();
        if path.iter().any(String::is_empty) {
            return Err(Error::InvalidArgument(format!(
                "payload filter path {:?} has an empty part",
                text.split_once('=').map_or(text, |(p, _)| p)
            )));
        }
        let value = serde_json::from_str(value)
            .unwrap_or_else(|_| serde_json::Value::String(value.to_owned()));
        Ok(Self { path, value })
    }
}

/// Which jobs of one queue a listing (or a bulk action) covers.
#[derive(Debug, Clone, PartialEq)]
pub struct JobFilter {
    /// The queue.
    pub queue: QueueName,
    /// The state.
    pub state: JobState,
    /// Only this job.
    pub id: Option<MessageId>,
    /// Only this ordered group.
    pub group_key: Option<String>,
    /// Only this priority.
    pub priority: Option<i16>,
    /// Only jobs delivered at least this many times.
    pub min_attempts: Option<u32>,
    /// Only jobs whose last error contains this text (case-insensitive).
    pub error_contains: Option<String>,
    /// Only payloads with this value at this JSON path.
    pub payload: Option<PayloadMatch>,
}

impl JobFilter {
    /// Every job of `queue` in `state`.
    pub fn new(queue: QueueName, state: JobState) -> Self {
        Self {
            queue,
            state,
            id: None,
            group_key: None,
            priority: None,
            min_attempts: None,
            error_contains: None,
            payload: None,
        }
    }
}

/// Where the next page starts: opaque text from [`Page::next`], checked when read back
/// (a cursor from another queue, state or order is refused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor(pub String);

/// What the operator saw when a list was drawn: a bulk action by filter touches only jobs
/// that were in the filter's state then (ids up to the newest one seen for the hot table
/// and the archive; dead letters that failed no later than the list was drawn). Opaque
/// text from [`Page::bound`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bound(pub String);

/// One job in a listing.
#[derive(Debug, Clone, PartialEq)]
pub struct JobSummary {
    /// Id.
    pub id: MessageId,
    /// Queue.
    pub queue: QueueName,
    /// State.
    pub state: JobState,
    /// Priority.
    pub priority: i16,
    /// Ordered group.
    pub group_key: Option<String>,
    /// Deliveries so far.
    pub attempts: u32,
    /// When it was sent.
    pub enqueued_at: SystemTime,
    /// Ready, scheduled, in flight: when it is (was) visible. Dead: when it failed.
    /// Archived: when it was acked.
    pub at: SystemTime,
    /// In flight: when the lease runs out.
    pub lease_until: Option<SystemTime>,
    /// The last error (dead letters: the reason).
    pub last_error: Option<String>,
    /// The start of the payload as text (JSON, MessagePack decoded to JSON), at most 200
    /// characters.
    pub payload_preview: String,
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    /// The jobs, in the requested order.
    pub jobs: Vec<JobSummary>,
    /// The next page, or `None` at the end.
    pub next: Option<Cursor>,
    /// For a bulk action on this filter: what this listing saw.
    pub bound: Bound,
}

/// A count that stops at [`COUNT_CAP`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Count {
    /// Jobs counted.
    pub n: u64,
    /// `false` when counting stopped at the cap (of jobs, or for the hot table's states, of
    /// the queue's rows read): at least `n`.
    pub exact: bool,
}

/// One failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttemptError {
    /// The delivery that failed (1 is the first).
    pub attempt: u32,
    /// The error text.
    pub error: String,
    /// When.
    pub at: SystemTime,
}

/// The worker process holding a lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// Its registry id.
    pub id: ProcessId,
    /// Host name.
    pub hostname: String,
    /// OS process id.
    pub pid: i32,
}

/// An event copy's origin, for a link to its topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventOrigin {
    /// The topic (routing key) it was published with.
    pub routing_key: String,
    /// The event's id.
    pub event_id: String,
}

/// Everything about one job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobDetail {
    /// What a listing shows.
    pub summary: JobSummary,
    /// The queue's `max_attempts`.
    pub max_attempts: u32,
    /// How the payload is encoded.
    pub content_type: ContentType,
    /// Payload size in bytes.
    pub payload_bytes: usize,
    /// The payload as pretty JSON (MessagePack decoded), or a note when it cannot be
    /// decoded; at most [`PAYLOAD_SHOWN_MAX`] bytes.
    pub payload: String,
    /// `payload` was cut at [`PAYLOAD_SHOWN_MAX`].
    pub payload_truncated: bool,
    /// Headers (event envelope, trace context).
    pub headers: Headers,
    /// Failed attempts, oldest first (the last 10).
    pub errors: Vec<AttemptError>,
    /// In flight: the process whose worker holds the lease, when it is registered.
    pub held_by: Option<Holder>,
    /// Its batch.
    pub batch_id: Option<i64>,
    /// Its unique key.
    pub unique_key: Option<String>,
    /// Its limit key.
    pub limit_key: Option<String>,
    /// An event copy's topic and event id.
    pub event: Option<EventOrigin>,
}

/// What to do to the selected jobs.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Ready, scheduled and dead jobs become ready now (dead ones back in the queue with
    /// their attempts reset and their history kept).
    RetryNow,
    /// Ready, scheduled and dead jobs become visible at this time.
    Reschedule(SystemTime),
    /// Ready, scheduled and dead jobs get this priority.
    SetPriority(i16),
    /// Jobs in the hot table are deleted; a running one's worker sees its lease gone at its
    /// next lease extension and cancels the handler's cancellation token.
    Cancel,
    /// Jobs in the hot table move to the dead letters (reason: dead-lettered by the actor).
    DeadLetter,
    /// Dead and archived jobs are deleted for good.
    Discard,
}

impl Action {
    /// `retry`, `reschedule`, `priority`, `cancel`, `dead_letter`, `discard` (the audit
    /// log's and the API's names).
    pub fn name(&self) -> &'static str {
        match self {
            Action::RetryNow => "retry",
            Action::Reschedule(_) => "reschedule",
            Action::SetPriority(_) => "priority",
            Action::Cancel => "cancel",
            Action::DeadLetter => "dead_letter",
            Action::Discard => "discard",
        }
    }
}

/// The jobs an action applies to.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// These jobs, wherever they are (each where the action applies to its state).
    Ids(Vec<MessageId>),
    /// The jobs of a filter that the listing with this bound saw.
    Filter(JobFilter, Bound),
}

/// One audit log entry.
#[derive(Debug, Clone, PartialEq)]
pub struct AuditEntry {
    /// Id (newest is highest).
    pub id: i64,
    /// When.
    pub at: SystemTime,
    /// Who: a token's name, `loopback`, or `cli:<user>`.
    pub actor: String,
    /// [`Action::name`], or `pause` / `resume`.
    pub action: String,
    /// The queue, when one.
    pub queue: Option<String>,
    /// How many jobs it changed.
    pub count: u64,
    /// The selection (`{"ids": [..]}` or `{"filter": {..}, "bound": ..}`) and arguments.
    pub detail: serde_json::Value,
}
