//! How long handlers take, as a moving average: what sizes the work a worker claims before
//! it can start it (a group's run, the plain worker's claim-ahead buffer), so claimed work
//! waits about [`WITHIN`] at most instead of the length of the jobs ahead of it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// How long claimed work should wait for its turn at most, at the measured pace: the
/// window a group's run must fit in, and in which the plain worker's busy slots are
/// expected to start what it claims ahead.
pub(crate) const WITHIN: Duration = Duration::from_millis(50);

/// How long handlers take: a moving average (each run weighs an eighth), unknown until
/// one has run. Shared by the jobs that record it and the loop that reads it.
#[derive(Debug, Default)]
pub(crate) struct Pace {
    /// The average in nanoseconds; 0 while unknown.
    nanos: AtomicU64,
}

impl Pace {
    /// Counts one handler's run.
    pub(crate) fn record(&self, took: Duration) {
        let took = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX).max(1);
        // Load and store rather than a compare-and-swap loop: two runs recorded at once may
        // lose one of them, which an average over many runs does not notice.
        let old = self.nanos.load(Ordering::Relaxed);
        let new = if old == 0 {
            took
        } else {
            old - old / 8 + took / 8
        };
        self.nanos.store(new.max(1), Ordering::Relaxed);
    }

    /// How many handlers `slots` slots finish within [`WITHIN`] at this pace; `None`
    /// while the pace is unknown.
    pub(crate) fn fits(&self, slots: usize) -> Option<usize> {
        match self.nanos.load(Ordering::Relaxed) {
            0 => None,
            nanos => {
                let slots = u128::try_from(slots).unwrap_or(u128::MAX);
                let fit = WITHIN.as_nanos().saturating_mul(slots) / u128::from(nanos);
                Some(usize::try_from(fit).unwrap_or(usize::MAX))
            }
        }
    }
}

/// How many claimed messages a worker of `slots` slots may hold for a queue's jobs, to
/// start within [`WITHIN`]: at the slower of two paces, the queue's (its jobs take that
/// long once started) and the worker's over all its queues (its busy slots free at the
/// pace of whatever runs in them: a queue's fast jobs must not be buffered behind slots
/// held by another queue's slow ones). Nothing while either pace is unknown.
pub(crate) fn buffer_for(slots: usize, queue: &Pace, worker: &Pace) -> usize {
    match (queue.fits(slots), worker.fits(slots)) {
        (Some(queue), Some(worker)) => queue.min(worker),
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_until_a_run_is_recorded() {
        let pace = Pace::default();
        assert_eq!(pace.fits(8), None);
        pace.record(Duration::ZERO);
        assert!(pace.fits(8).is_some_and(|n| n > 1_000_000));
    }

    #[test]
    fn fast_handlers_fit_many_and_slow_ones_none() {
        let fast = Pace::default();
        fast.record(Duration::from_micros(10));
        assert_eq!(fast.fits(8), Some(8 * 5_000));
        let slow = Pace::default();
        slow.record(Duration::from_secs(3600));
        assert_eq!(slow.fits(8), Some(0));
        let medium = Pace::default();
        medium.record(Duration::from_millis(200));
        assert_eq!(medium.fits(8), Some(2), "eight slots free one every 25 ms");
    }

    #[test]
    fn a_buffer_follows_the_slower_of_the_queue_and_the_worker() {
        let (fast, slow, unknown) = (Pace::default(), Pace::default(), Pace::default());
        fast.record(Duration::from_micros(10));
        slow.record(Duration::from_secs(10));
        assert_eq!(buffer_for(8, &fast, &fast), 8 * 5_000);
        assert_eq!(buffer_for(8, &slow, &fast), 0, "a slow queue's jobs");
        assert_eq!(
            buffer_for(8, &fast, &slow),
            0,
            "fast jobs behind slots busy with slow ones"
        );
        assert_eq!(buffer_for(8, &unknown, &fast), 0, "a queue not run yet");
    }

    #[test]
    fn the_average_follows_a_change_of_pace() {
        let pace = Pace::default();
        pace.record(Duration::from_micros(10));
        for _ in 0..64 {
            pace.record(Duration::from_secs(10));
        }
        assert_eq!(
            pace.fits(8),
            Some(0),
            "slow runs outweigh the first fast one"
        );
    }
}
