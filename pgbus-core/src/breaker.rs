//! Per-queue circuit breakers.

use std::time::Duration;

use crate::{Error, Result};

/// A queue's circuit breaker: after `failures` failed jobs in a row (retried or
/// dead-lettered) seen by a worker, the queue hands out nothing, in every process, for
/// `backoff`, then resumes by itself. After a resume one more failure in a row opens it
/// again (half-open); a success closes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct CircuitBreaker {
    /// Failures in a row that open the breaker.
    pub failures: u32,
    /// How long it stays open.
    pub backoff: Duration,
}

impl CircuitBreaker {
    /// Opens after `failures` failures in a row, for `backoff`; both must be positive (at
    /// least one failure, at least a millisecond).
    pub fn new(failures: u32, backoff: Duration) -> Result<Self> {
        if failures == 0 || backoff < Duration::from_millis(1) {
            return Err(Error::InvalidArgument(
                "a circuit breaker needs at least 1 failure and a backoff of at least 1 ms".into(),
            ));
        }
        Ok(Self { failures, backoff })
    }
}
