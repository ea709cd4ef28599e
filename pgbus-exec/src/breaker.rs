//! The worker's side of per-queue circuit breakers: counting failures in a row.

use std::collections::HashMap;
use std::time::Duration;

use pgbus_core::{CircuitBreaker, Fetcher, QueueName, Result};

/// Failures in a row per queue, for the queues that have a circuit breaker.
#[derive(Debug, Default)]
pub(crate) struct Breakers {
    queues: HashMap<QueueName, (CircuitBreaker, u32)>,
}

impl Breakers {
    /// The breakers of `queues`, read on the worker's fetch connection.
    pub(crate) async fn load<F: Fetcher>(fetcher: &mut F, queues: &[QueueName]) -> Result<Self> {
        let mut breakers = Self::default();
        for queue in queues {
            if let Some(breaker) = fetcher.queue_info(queue).await?.options.circuit_breaker {
                breakers.queues.insert(queue.clone(), (breaker, 0));
            }
        }
        Ok(breakers)
    }

    /// Counts a settled job; returns how long to open the queue's breaker when this
    /// failure made too many in a row. After that, one more failure opens it again (the
    /// breaker is half-open) until a success closes it.
    pub(crate) fn record(&mut self, queue: &QueueName, failed: bool) -> Option<Duration> {
        let (breaker, in_a_row) = self.queues.get_mut(queue)?;
        if !failed {
            *in_a_row = 0;
            return None;
        }
        *in_a_row += 1;
        if *in_a_row < breaker.failures {
            return None;
        }
        *in_a_row = breaker.failures - 1;
        Some(breaker.backoff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_failures_in_a_row_then_half_open_until_a_success() {
        let q = QueueName::new("q").unwrap();
        let mut breakers = Breakers::default();
        let backoff = Duration::from_secs(5);
        breakers
            .queues
            .insert(q.clone(), (CircuitBreaker::new(3, backoff).unwrap(), 0));
        assert_eq!(breakers.record(&q, true), None);
        assert_eq!(
            breakers.record(&q, false),
            None,
            "a success resets the count"
        );
        assert_eq!(breakers.record(&q, true), None);
        assert_eq!(breakers.record(&q, true), None);
        assert_eq!(breakers.record(&q, true), Some(backoff));
        assert_eq!(breakers.record(&q, true), Some(backoff), "half-open");
        assert_eq!(breakers.record(&q, false), None);
        assert_eq!(breakers.record(&q, true), None, "closed again");
        let other = QueueName::new("other").unwrap();
        assert_eq!(breakers.record(&other, true), None, "no breaker, no count");
    }
}
