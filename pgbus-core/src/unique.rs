//! Unique jobs: at most one unfinished job per (queue, key).

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

/// A uniqueness key: while a job with this key is in its queue (waiting, delayed, running
/// or backing off before a retry), no other job with the key can be sent to that queue.
/// The key is released when the job leaves the queue: acked, discarded, dead-lettered or
/// purged. (A job retried from the dead-letter queue comes back without its key.)
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
}

impl Unique {
    /// A key whose duplicates get the existing job's id back.
    pub fn new(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            on_conflict: OnConflict::default(),
        }
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
    Ok(())
}
