//! Unique jobs: at most one unfinished (or running) job per (queue, key).

use crate::QueueName;

/// How long a unique key holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum UniqueStrategy {
    /// From the send until the job leaves the queue: no duplicate can be sent meanwhile
    /// (the conflict behaviour applies).
    #[default]
    UntilDone,
    /// Only while a job runs: duplicates are always accepted, but at most one job with the
    /// key runs at a time; the others wait without taking a worker slot. (A concurrency
    /// limit of 1 on a key of the queue; a job with this strategy cannot also have a limit
    /// key.)
    WhileRunning,
}

/// What a send does when a job with the same key is already in the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum OnConflict {
    /// Refuse the send with [`Error::DuplicateJob`](crate::Error::DuplicateJob); in a
    /// batch, nothing of the batch is stored.
    Reject,
    /// Store nothing for this message and return the existing job's id in its place.
    #[default]
    ReturnExisting,
}

/// A uniqueness key. With [`UniqueStrategy::UntilDone`] (the default): while a job with
/// this key is in its queue (waiting, delayed, running or backing off before a retry), no
/// other job with the key can be sent to that queue. The key is released when the job
/// leaves the queue: acked, discarded, dead-lettered or purged. (A job retried from the
/// dead-letter queue comes back without its key.) With [`UniqueStrategy::WhileRunning`]:
/// one job with the key runs at a time.
///
/// The key is stored on the job itself, so it cannot outlive it: a job whose worker
/// crashed is delivered again when its lease runs out and releases its key when it
/// finishes; nothing is left to expire.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct Unique {
    /// The key, unique per queue; 1 to 255 bytes.
    pub key: String,
    /// What a duplicate send does.
    pub on_conflict: OnConflict,
    /// How long the key holds.
    pub strategy: UniqueStrategy,
}

impl Unique {
    /// A key whose duplicates get the existing job's id back.
    pub fn new(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            on_conflict: OnConflict::default(),
            strategy: UniqueStrategy::UntilDone,
        }
    }

    /// A key held only while a job runs (see [`UniqueStrategy::WhileRunning`]).
    pub fn while_running(key: impl Into<String>) -> Self {
        Self {
            strategy: UniqueStrategy::WhileRunning,
            ..Self::new(key)
        }
    }

    /// The key the unique index holds, for [`UniqueStrategy::UntilDone`].
    pub fn until_done_key(&self) -> Option<&str> {
        (self.strategy == UniqueStrategy::UntilDone).then_some(self.key.as_str())
    }

    /// Sets the conflict behaviour.
    pub fn on_conflict(mut self, on_conflict: OnConflict) -> Self {
        self.on_conflict = on_conflict;
        self
    }
}

/// Checks a job key (uniqueness or concurrency key): 1 to 255 bytes.
pub(crate) fn check_key(key: &str, what: &'static str) -> crate::Result<()> {
    if key.is_empty() || key.len() > crate::MAX_GROUP_KEY_LEN {
        return Err(crate::Error::InvalidArgument(format!(
            "{what} must be 1 to {} bytes long",
            crate::MAX_GROUP_KEY_LEN
        )));
    }
    crate::check_text(what, key)
}

/// The prefix of the limit keys that carry [`UniqueStrategy::WhileRunning`] keys; such a
/// key without limits of its own has a concurrency limit of 1.
pub const WHILE_RUNNING_PREFIX: &str = "unique:";

impl crate::NewMessage {
    /// The limit key the job is stored with in `queue`: its own, or the one standing for a
    /// [`UniqueStrategy::WhileRunning`] key (`unique:<queue>:<key>`).
    pub fn limit_key_in(&self, queue: &QueueName) -> Option<String> {
        match &self.unique {
            Some(u) if u.strategy == UniqueStrategy::WhileRunning => {
                Some(format!("{WHILE_RUNNING_PREFIX}{queue}:{}", u.key))
            }
            _ => self.limit_key.clone(),
        }
    }
}
