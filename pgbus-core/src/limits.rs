//! Concurrency and rate limits per key, across all workers and processes.
//!
//! A job sent with a limit key ([`NewMessage::limit_key`](crate::NewMessage::limit_key))
//! runs only while its key is under its limits: at most `concurrency` jobs with the key
//! running at once, and at most `rate` started per `interval`. A job over the limit stays
//! in its queue without taking a worker slot and is claimed when room frees. Running jobs
//! are counted by their live leases, so a crashed worker's slots free themselves when its
//! leases run out. A key with no limit set runs unlimited.

use std::future::Future;
use std::time::Duration;

use crate::{Error, Result};

/// The limits of one key. Built with consuming setters, checked by [`build`](Self::build).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct KeyLimit {
    /// At most this many jobs with the key run at once.
    pub concurrency: Option<u32>,
    /// At most `.0` jobs with the key start per `.1` (a fixed window).
    pub rate: Option<(u32, Duration)>,
}

impl KeyLimit {
    /// At most `n` jobs with the key running at once.
    pub fn concurrency(n: u32) -> Self {
        Self::default().and_concurrency(n)
    }

    /// At most `n` jobs with the key started per `interval`.
    pub fn rate(n: u32, interval: Duration) -> Self {
        Self::default().and_rate(n, interval)
    }

    /// Adds a concurrency limit.
    pub fn and_concurrency(mut self, n: u32) -> Self {
        self.concurrency = Some(n);
        self
    }

    /// Adds a rate limit.
    pub fn and_rate(mut self, n: u32, interval: Duration) -> Self {
        self.rate = Some((n, interval));
        self
    }

    /// Checks the limits: counts at least 1, intervals at least a millisecond.
    pub fn build(self) -> Result<Self> {
        let bad = |what: &str| Err(Error::InvalidArgument(what.to_owned()));
        if self.concurrency == Some(0) {
            return bad("a concurrency limit must be at least 1");
        }
        if let Some((n, interval)) = self.rate {
            if n == 0 || interval < Duration::from_millis(1) {
                return bad("a rate limit needs at least 1 job per interval of at least 1 ms");
            }
        }
        if self.concurrency.is_none() && self.rate.is_none() {
            return bad("a key limit needs a concurrency or a rate limit");
        }
        Ok(self)
    }
}

/// Checks a limit key: 1 to 255 bytes, like every job key.
pub fn check_limit_key(key: &str) -> Result<()> {
    crate::unique::check_key(key, "a limit key")
}

/// Setting and reading key limits.
pub trait Limits: Send + Sync {
    /// Sets (or replaces) the limits of `key`; checked with [`KeyLimit::build`].
    fn set_limit(&self, key: &str, limit: KeyLimit) -> impl Future<Output = Result<()>> + Send;

    /// Removes the limits of `key` (its jobs then run unlimited); `false` when it had none.
    fn remove_limit(&self, key: &str) -> impl Future<Output = Result<bool>> + Send;

    /// Every key's limits, by key.
    fn limits(&self) -> impl Future<Output = Result<Vec<(String, KeyLimit)>>> + Send;
}
