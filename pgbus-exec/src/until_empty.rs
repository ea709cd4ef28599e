//! `run_until_empty` of [`Worker`], [`GroupWorker`] and [`MixedWorker`] (their methods live
//! here, so the workers' files need nothing of this one): when a run-once worker is done,
//! and what it left.
//!
//! A run is done when, in the worker's queues, nothing is ready, nothing is in flight and
//! nothing is due within `wait_due`. In flight counts every lease, this process's or
//! another's: a lease ends in a settlement (perhaps a retry due soon) or runs out and leaves
//! its message ready, and only the backend sees a job between its end and its settlement. A
//! message behind an open circuit breaker is due when the breaker closes. A paused queue's
//! messages are never waited for, but a paused queue holding work the run would have done
//! (ready, or due within `wait_due`) is named by [`Left::paused`].

use std::fmt::Write as _;
use std::future::Future;
use std::time::Duration;

use pgbus_core::{Backend, Error, QueueName, QueueStats, Result};
use tokio_util::sync::CancellationToken;

use crate::group::GroupWorker;
use crate::mixed::MixedWorker;
use crate::report::WorkerReport;
use crate::worker::Worker;

/// How often the queues are read.
const CHECK_EVERY: Duration = Duration::from_millis(100);

/// What a `run_until_empty` did and left.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct UntilEmptyReport {
    /// What the worker did.
    pub worker: WorkerReport,
    /// What its queues held when the run was done; `None` when the caller's token stopped
    /// it first.
    pub left: Option<Left>,
}

impl UntilEmptyReport {
    /// The line naming the paused queues that hold work the run would have done (see
    /// [`Left::paused`]); `None` when there is none, or the run was stopped by its token.
    pub fn paused(&self) -> Option<String> {
        self.left.as_ref().and_then(Left::paused)
    }
}

impl<B: Backend> Worker<B> {
    /// Runs until the worker's queues are done (nothing ready, nothing in flight, nothing
    /// due within `wait_due`; see [`Left`]) or `stop` is cancelled, then drains as
    /// [`Worker::run`] does. The report says what the queues held at the end, including
    /// paused queues holding work the run could not do.
    pub async fn run_until_empty(
        self,
        wait_due: Duration,
        stop: CancellationToken,
    ) -> Result<UntilEmptyReport> {
        let (backend, queues) = (self.backend.clone(), self.shared.queues.clone());
        run_until_empty(backend, queues, wait_due, stop, |stop| self.run(stop)).await
    }
}

impl<B: Backend> GroupWorker<B> {
    /// [`Worker::run_until_empty`] for ordered groups.
    pub async fn run_until_empty(
        self,
        wait_due: Duration,
        stop: CancellationToken,
    ) -> Result<UntilEmptyReport> {
        let backend = self.worker.backend.clone();
        let queues = self.worker.shared.queues.clone();
        run_until_empty(backend, queues, wait_due, stop, |stop| self.run(stop)).await
    }
}

impl<B: Backend> MixedWorker<B> {
    /// [`Worker::run_until_empty`] for both kinds of message: done when the queues hold
    /// nothing either loop would run within `wait_due`.
    pub async fn run_until_empty(
        self,
        wait_due: Duration,
        stop: CancellationToken,
    ) -> Result<UntilEmptyReport> {
        let backend = self.plain.backend.clone();
        let queues = self.plain.shared.queues.clone();
        run_until_empty(backend, queues, wait_due, stop, |stop| self.run(stop)).await
    }
}

/// Runs a worker (`run`, given the token that stops it) until its `queues` are done, or
/// `stop` is cancelled: the one implementation behind every `run_until_empty`.
async fn run_until_empty<B, F, Fut>(
    backend: B,
    queues: Vec<QueueName>,
    wait_due: Duration,
    stop: CancellationToken,
    run: F,
) -> Result<UntilEmptyReport>
where
    B: Backend,
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = Result<WorkerReport>>,
{
    // Its own token: the run being done stops this worker, not the caller's other tasks.
    let worker_stop = stop.child_token();
    let worker = async {
        let report = run(worker_stop.clone()).await;
        // A worker that ended (by an error, say) ends the watch too.
        worker_stop.cancel();
        report
    };
    let (report, left) = tokio::join!(worker, watch(&backend, &queues, wait_due, &worker_stop));
    Ok(UntilEmptyReport {
        worker: report?,
        left,
    })
}

/// Watches the queues and cancels `stop` once the run is done; returns what was left then,
/// or `None` when `stop` was cancelled otherwise.
async fn watch<B: Backend>(
    backend: &B,
    queues: &[QueueName],
    wait_due: Duration,
    stop: &CancellationToken,
) -> Option<Left> {
    let mut interval = tokio::time::interval(CHECK_EVERY);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut waiting = false;
    loop {
        tokio::select! {
            () = stop.cancelled() => return None,
            _ = interval.tick() => {}
        }
        let stats = match read(backend, queues).await {
            Ok(stats) => stats,
            Err(err) => {
                tracing::warn!(target: "pgbus::worker", error = %err.report(), "could not read queue stats");
                continue;
            }
        };
        let left = Left::new(&stats, wait_due);
        if left.done() {
            tracing::info!(target: "pgbus::worker", "{}", left.summary());
            stop.cancel();
            return Some(left);
        }
        // Said once each time the run comes to wait only for messages due later.
        let only_due = left.only_due();
        if only_due && !waiting {
            tracing::info!(target: "pgbus::worker", "{}", left.waiting_for());
        }
        waiting = only_due;
    }
}

/// The stats of each of `queues` (a queue dropped meanwhile is left out).
async fn read<B: Backend>(backend: &B, queues: &[QueueName]) -> Result<Vec<QueueStats>> {
    let mut stats = Vec::with_capacity(queues.len());
    for queue in queues {
        match backend.queue_stats(queue).await {
            Ok(s) => stats.push(s),
            Err(Error::QueueNotFound(_)) => {}
            Err(err) => return Err(err),
        }
    }
    Ok(stats)
}

/// What a run's queues held, at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Left {
    queues: Vec<QueueLeft>,
    wait_due: Duration,
}

/// What one queue held.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct QueueLeft {
    /// The queue.
    pub queue: QueueName,
    /// Ready messages.
    pub ready: u64,
    /// Leased messages.
    pub in_flight: u64,
    /// Messages visible later.
    pub scheduled: u64,
    /// When its first waiting message (scheduled, or ready behind the breaker) can run.
    pub due_in: Option<Duration>,
    /// When its first scheduled message is due.
    pub next_due_in: Option<Duration>,
    /// How long its open circuit breaker stays open.
    pub breaker_open_for: Option<Duration>,
    /// Whether it is paused.
    pub paused: bool,
}

impl QueueLeft {
    fn new(s: &QueueStats) -> Self {
        let behind_breaker = |due: Duration| s.breaker_open_for.map_or(due, |b| due.max(b));
        let ready_due = (s.ready > 0).then(|| behind_breaker(Duration::ZERO));
        let scheduled_due = s.next_due_in.map(behind_breaker);
        QueueLeft {
            queue: s.queue.clone(),
            ready: s.ready,
            in_flight: s.in_flight,
            scheduled: s.scheduled,
            due_in: ready_due.into_iter().chain(scheduled_due).min(),
            next_due_in: s.next_due_in,
            breaker_open_for: s.breaker_open_for,
            paused: s.paused,
        }
    }

    /// Its first message that can run does so within `wait_due` (never, when paused).
    fn due_within(&self, wait_due: Duration) -> bool {
        !self.paused && self.due_in.is_some_and(|due| due <= wait_due)
    }

    /// Paused, with work the run would have done: (ready, any scheduled due within
    /// `wait_due`).
    fn blocked(&self, wait_due: Duration) -> Option<(u64, bool)> {
        let due_soon = self.next_due_in.is_some_and(|due| due <= wait_due);
        (self.paused && (self.ready > 0 || due_soon)).then_some((self.ready, due_soon))
    }

    /// "jobs: 0 ready, 2 scheduled, the first due in 4s".
    fn describe(&self) -> String {
        let mut text = format!(
            "{}: {} ready, {} scheduled",
            self.queue, self.ready, self.scheduled
        );
        if self.paused {
            text.push_str(", paused");
        } else if let Some(open) = self.breaker_open_for {
            let _ = write!(text, ", circuit breaker open for {}", seconds(open));
        } else if let Some(due) = self.due_in {
            let _ = write!(text, ", the first due in {}", seconds(due));
        }
        text
    }
}

impl Left {
    /// The queues in `stats`, against a wait of `wait_due`.
    fn new(stats: &[QueueStats], wait_due: Duration) -> Self {
        Left {
            queues: stats.iter().map(QueueLeft::new).collect(),
            wait_due,
        }
    }

    /// Each queue of the run (a queue dropped during the run is not among them).
    pub fn queues(&self) -> &[QueueLeft] {
        &self.queues
    }

    /// Nothing ready, in flight, or due within the wait.
    pub fn done(&self) -> bool {
        self.queues
            .iter()
            .all(|q| q.in_flight == 0 && !q.due_within(self.wait_due))
    }

    /// Only messages due later (within the wait) keep the run going.
    fn only_due(&self) -> bool {
        !self.done()
            && self.queues.iter().all(|q| {
                q.in_flight == 0 && !(q.ready > 0 && !q.paused && q.breaker_open_for.is_none())
            })
    }

    /// The earliest due time of the queues that are not paused.
    fn first_due(&self) -> Option<Duration> {
        self.queues
            .iter()
            .filter(|q| !q.paused)
            .filter_map(|q| q.due_in)
            .min()
    }

    /// "waiting for the next scheduled message, due in 4s (--wait-due 30s)".
    fn waiting_for(&self) -> String {
        let due = self.first_due().unwrap_or_default();
        format!(
            "waiting for the next scheduled message, due in {} (--wait-due {})",
            seconds(due),
            seconds(self.wait_due)
        )
    }

    /// The line a finished run ends with: "queues are empty: stopping", or what is left
    /// ("stopping: 0 ready, 3 scheduled, the first due in 1m 30s (not waited for,
    /// --wait-due 30s); jobs: ...").
    pub fn summary(&self) -> String {
        let ready: u64 = self.queues.iter().map(|q| q.ready).sum();
        let scheduled: u64 = self.queues.iter().map(|q| q.scheduled).sum();
        if ready + scheduled == 0 {
            return "queues are empty: stopping".to_owned();
        }
        let mut text = format!("stopping: {ready} ready, {scheduled} scheduled");
        if let Some(due) = self.first_due() {
            let _ = write!(text, ", the first due in {}", seconds(due));
        }
        let details: Vec<String> = self
            .queues
            .iter()
            .filter(|q| q.ready + q.scheduled > 0)
            .map(QueueLeft::describe)
            .collect();
        let _ = write!(
            text,
            " (not waited for, --wait-due {}); {}",
            seconds(self.wait_due),
            details.join("; ")
        );
        text
    }

    /// The line that says which paused queues hold work the run would have done, and how
    /// to continue them; `None` when none does.
    pub fn paused(&self) -> Option<String> {
        let blocked: Vec<(&QueueName, String)> = self
            .queues
            .iter()
            .filter_map(|q| {
                let (ready, due_soon) = q.blocked(self.wait_due)?;
                let mut what = Vec::new();
                if ready > 0 {
                    what.push(format!("{ready} ready {}", plural(ready)));
                }
                if due_soon {
                    what.push(format!("messages due within {}", seconds(self.wait_due)));
                }
                Some((&q.queue, format!("{} ({})", q.queue, what.join(" and "))))
            })
            .collect();
        match blocked.as_slice() {
            [] => None,
            [(queue, what)] => Some(format!(
                "queue {what} is paused: `pgbus queue resume {queue}` continues it"
            )),
            _ => {
                let all: Vec<&str> = blocked.iter().map(|(_, what)| what.as_str()).collect();
                Some(format!(
                    "queues {} are paused: `pgbus queue resume NAME` continues each",
                    all.join(", ")
                ))
            }
        }
    }
}

fn plural(n: u64) -> &'static str {
    if n == 1 {
        "message"
    } else {
        "messages"
    }
}

/// A duration in whole seconds, rounded up ("4s", "59m 59s"): a wait shown as "0s" would
/// read as none.
fn seconds(duration: Duration) -> humantime::FormattedDuration {
    let whole = duration.as_secs() + u64::from(duration.subsec_nanos() > 0);
    humantime::format_duration(Duration::from_secs(whole))
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_secs(30);

    fn queue(name: &str) -> QueueStats {
        QueueStats::new(QueueName::new(name).unwrap())
    }

    fn left(stats: &[QueueStats]) -> Left {
        Left::new(stats, WAIT)
    }

    #[test]
    fn empty_queues_are_done() {
        let left = left(&[queue("a"), queue("b")]);
        assert!(left.done());
        assert_eq!(left.summary(), "queues are empty: stopping");
        assert_eq!(left.paused(), None);
    }

    #[test]
    fn ready_in_flight_and_soon_due_messages_keep_the_run_going() {
        let mut ready = queue("a");
        ready.ready = 1;
        assert!(!left(&[ready]).done());
        let mut leased = queue("a");
        leased.in_flight = 1;
        assert!(!left(&[leased]).done());
        let mut soon = queue("a");
        soon.scheduled = 2;
        soon.next_due_in = Some(Duration::from_millis(3500));
        let waiting = left(&[soon]);
        assert!(!waiting.done());
        assert!(waiting.only_due());
        assert_eq!(
            waiting.waiting_for(),
            "waiting for the next scheduled message, due in 4s (--wait-due 30s)"
        );
    }

    #[test]
    fn messages_due_after_the_wait_are_left_and_named() {
        let mut later = queue("jobs");
        later.scheduled = 2;
        later.next_due_in = Some(Duration::from_secs(3599) + Duration::from_millis(1));
        let mut other = queue("other");
        other.scheduled = 1;
        other.next_due_in = Some(Duration::from_secs(90));
        let left = left(&[later, other, queue("empty")]);
        assert!(left.done());
        assert_eq!(
            left.summary(),
            "stopping: 0 ready, 3 scheduled, the first due in 1m 30s (not waited for, \
             --wait-due 30s); jobs: 0 ready, 2 scheduled, the first due in 1h; \
             other: 0 ready, 1 scheduled, the first due in 1m 30s"
        );
        assert_eq!(left.paused(), None);
    }

    #[test]
    fn an_open_circuit_breaker_makes_its_messages_due_when_it_closes() {
        let mut fragile = queue("fragile");
        fragile.ready = 3;
        fragile.scheduled = 1;
        fragile.next_due_in = Some(Duration::from_secs(1));
        fragile.breaker_open_for = Some(Duration::from_secs(3600));
        let left = left(&[fragile.clone()]);
        assert!(left.done(), "an hour is past the wait");
        assert!(left
            .summary()
            .ends_with("fragile: 3 ready, 1 scheduled, circuit breaker open for 1h"));
        fragile.breaker_open_for = Some(Duration::from_secs(5));
        assert!(!self::left(&[fragile]).done(), "closes within the wait");
    }

    #[test]
    fn a_paused_queue_is_not_waited_for_but_named_when_it_holds_work() {
        let mut held = queue("held");
        held.paused = true;
        held.ready = 2;
        let mut open = queue("open");
        open.ready = 1;
        assert!(
            !left(&[held.clone(), open]).done(),
            "the open queue is worked"
        );
        let alone = left(&[held.clone()]);
        assert!(alone.done());
        assert_eq!(
            alone.paused().as_deref(),
            Some("queue held (2 ready messages) is paused: `pgbus queue resume held` continues it")
        );
        assert!(alone
            .summary()
            .ends_with("held: 2 ready, 0 scheduled, paused"));

        let mut later = queue("later");
        later.paused = true;
        later.scheduled = 1;
        later.next_due_in = Some(Duration::from_secs(3600));
        assert_eq!(
            left(&[later.clone()]).paused(),
            None,
            "nothing due within the wait"
        );
        later.next_due_in = Some(Duration::from_secs(1));
        assert_eq!(
            left(&[held, later]).paused().as_deref(),
            Some(
                "queues held (2 ready messages), later (messages due within 30s) are paused: \
                 `pgbus queue resume NAME` continues each"
            )
        );
    }
}
