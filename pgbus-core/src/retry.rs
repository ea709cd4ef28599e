//! Retry policy: exponential backoff with jitter, bounded by a cap and a maximum number of
//! attempts.

use std::time::Duration;

use crate::{Error, Result};

/// What to do with a message whose handler failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    /// Make the message visible again after this delay.
    RetryAfter(Duration),
    /// Attempts are used up: move the message to the dead-letter queue.
    DeadLetter,
}

/// Exponential backoff with jitter: attempt `n` (1-based) waits
/// `min(cap, base * 2^(n-1))`, reduced by a random fraction of up to `jitter` so that
/// failures of many messages at once do not retry in lockstep. After `max_attempts`
/// attempts the message is dead-lettered.
///
/// ```
/// use std::time::Duration;
/// use pgbus_core::{RetryDecision, RetryPolicy};
///
/// let policy = RetryPolicy::builder()
///     .base(Duration::from_secs(1))
///     .cap(Duration::from_secs(60))
///     .jitter(0.0)
///     .max_attempts(5)
///     .build()
///     .unwrap();
/// assert_eq!(policy.decide(3), RetryDecision::RetryAfter(Duration::from_secs(4)));
/// assert_eq!(policy.decide(5), RetryDecision::DeadLetter);
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    base: Duration,
    cap: Duration,
    jitter: f64,
    max_attempts: u32,
}

impl Default for RetryPolicy {
    /// 1 s base, 10 min cap, 20 % jitter, 5 attempts.
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(600),
            jitter: 0.2,
            max_attempts: 5,
        }
    }
}

impl RetryPolicy {
    /// A builder starting from the defaults.
    pub fn builder() -> RetryPolicyBuilder {
        RetryPolicyBuilder {
            policy: Self::default(),
        }
    }

    /// Delay before the first retry.
    pub fn base(&self) -> Duration {
        self.base
    }
    /// Largest delay.
    pub fn cap(&self) -> Duration {
        self.cap
    }
    /// Fraction (0..=1) of the delay that is randomised away.
    pub fn jitter(&self) -> f64 {
        self.jitter
    }
    /// Attempts before a message is dead-lettered.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// The delay before retrying after failed attempt `attempt` (1-based), without jitter.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(63);
        let factor = 1u64 << exponent;
        let nanos = (self.base.as_nanos()).saturating_mul(u128::from(factor));
        let cap = self.cap.as_nanos();
        let nanos = nanos.min(cap);
        Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// The jittered delay for `attempt`, with `unit` a sample from `[0, 1)`: the result lies
    /// in `[ceiling * (1 - jitter), ceiling]`.
    pub fn backoff_with(&self, attempt: u32, unit: f64) -> Duration {
        let unit = unit.clamp(0.0, 1.0);
        self.ceiling(attempt).mul_f64(1.0 - self.jitter * unit)
    }

    /// The jittered delay for `attempt`, randomised with the thread-local generator.
    pub fn backoff(&self, attempt: u32) -> Duration {
        self.backoff_with(attempt, rand::random::<f64>())
    }

    /// What to do after failed attempt `attempt` (1-based).
    pub fn decide(&self, attempt: u32) -> RetryDecision {
        if attempt >= self.max_attempts {
            RetryDecision::DeadLetter
        } else {
            RetryDecision::RetryAfter(self.backoff(attempt))
        }
    }
}

/// Builds a [`RetryPolicy`]; checked in [`build`](Self::build).
#[derive(Debug, Clone)]
pub struct RetryPolicyBuilder {
    policy: RetryPolicy,
}

impl RetryPolicyBuilder {
    /// Delay before the first retry.
    pub fn base(mut self, base: Duration) -> Self {
        self.policy.base = base;
        self
    }
    /// Largest delay.
    pub fn cap(mut self, cap: Duration) -> Self {
        self.policy.cap = cap;
        self
    }
    /// Fraction of the delay randomised away, in `0.0..=1.0`.
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.policy.jitter = jitter;
        self
    }
    /// Attempts before dead-lettering; at least 1.
    pub fn max_attempts(mut self, max_attempts: u32) -> Self {
        self.policy.max_attempts = max_attempts;
        self
    }
    /// Checks the values and returns the policy.
    pub fn build(self) -> Result<RetryPolicy> {
        let p = self.policy;
        if !(0.0..=1.0).contains(&p.jitter) {
            return Err(Error::InvalidArgument(format!(
                "retry jitter must be between 0 and 1, got {}",
                p.jitter
            )));
        }
        if p.max_attempts == 0 {
            return Err(Error::InvalidArgument(
                "max_attempts must be at least 1".into(),
            ));
        }
        if p.cap < p.base {
            return Err(Error::InvalidArgument(format!(
                "retry cap ({:?}) must not be below the base ({:?})",
                p.cap, p.base
            )));
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(base_ms: u64, cap_ms: u64, jitter: f64, max: u32) -> RetryPolicy {
        RetryPolicy::builder()
            .base(Duration::from_millis(base_ms))
            .cap(Duration::from_millis(cap_ms))
            .jitter(jitter)
            .max_attempts(max)
            .build()
            .unwrap()
    }

    #[test]
    fn doubles_until_the_cap() {
        let p = policy(100, 1_000, 0.0, 10);
        let delays: Vec<u64> = (1..=6).map(|a| p.ceiling(a).as_millis() as u64).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1_000, 1_000]);
    }

    #[test]
    fn refuses_bad_settings() {
        assert!(RetryPolicy::builder().jitter(1.5).build().is_err());
        assert!(RetryPolicy::builder().max_attempts(0).build().is_err());
        assert!(RetryPolicy::builder()
            .base(Duration::from_secs(10))
            .cap(Duration::from_secs(1))
            .build()
            .is_err());
    }

    proptest! {
        #[test]
        fn backoff_stays_within_jitter_band_and_cap(
            base_ms in 1u64..10_000,
            extra_ms in 0u64..1_000_000,
            jitter in 0.0f64..=1.0,
            attempt in 1u32..200,
            unit in 0.0f64..1.0,
        ) {
            let p = policy(base_ms, base_ms + extra_ms, jitter, 1000);
            let ceiling = p.ceiling(attempt);
            let delay = p.backoff_with(attempt, unit);
            prop_assert!(ceiling <= p.cap());
            prop_assert!(delay <= ceiling);
            // mul_f64 rounds to the nanosecond.
            let floor = ceiling.mul_f64(1.0 - jitter);
            prop_assert!(delay + Duration::from_nanos(1) >= floor);
        }

        #[test]
        fn ceiling_never_shrinks(base_ms in 1u64..10_000, extra_ms in 0u64..1_000_000, attempt in 1u32..200) {
            let p = policy(base_ms, base_ms + extra_ms, 0.5, 1000);
            prop_assert!(p.ceiling(attempt + 1) >= p.ceiling(attempt));
            prop_assert!(p.ceiling(1) == p.base());
        }

        #[test]
        fn dead_letters_exactly_at_max_attempts(max in 1u32..50, attempt in 1u32..100) {
            let p = policy(10, 1_000, 0.2, max);
            let decision = p.decide(attempt);
            prop_assert_eq!(decision == RetryDecision::DeadLetter, attempt >= max);
        }
    }
}
