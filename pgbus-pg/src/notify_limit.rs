//! Coalesced wake-ups for the backend's own sends (River's notify limiter). Postgres
//! serialises the commits of notifying transactions, so concurrent single sends that each
//! `pg_notify` run at a fraction of the plain insert rate. Within a window after this
//! process notified a queue, further sends to it skip the notify; the first skipped send
//! to commit schedules one trailing notify at the end of the window (one pending timer per
//! queue), so a message whose notify was skipped still wakes an idle worker within the
//! window.
//!
//! Only sends that commit on their own (the pooled [`Producer`](pgbus_core::Producer)
//! methods) are coalesced: the trailing notify is scheduled after the skipped send has
//! committed, so it can never reach a worker before the message is visible. A send in the
//! caller's transaction always notifies, since pgbus cannot see when that commits.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bb8::Pool;
use pgbus_core::QueueName;
use tokio::time::Instant;

use crate::pool::Manager;
use crate::query::Typed;
use crate::sql;

/// The notify state of the queues this process sends to.
#[derive(Debug)]
pub(crate) struct NotifyLimiter {
    window: Duration,
    queues: Mutex<HashMap<QueueName, QueueState>>,
    skipped: AtomicU64,
}

#[derive(Debug)]
struct QueueState {
    /// When this process last decided to notify the queue.
    last: Instant,
    /// Whether a trailing notify is scheduled and not yet taken.
    trailing: bool,
}

impl NotifyLimiter {
    /// A limiter coalescing notifies within `window`; a zero window notifies every send.
    pub(crate) fn new(window: Duration) -> Self {
        Self {
            window,
            queues: Mutex::default(),
            skipped: AtomicU64::new(0),
        }
    }

    /// Committed sends whose notify was skipped so far.
    pub(crate) fn skipped(&self) -> u64 {
        self.skipped.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<QueueName, QueueState>> {
        self.queues
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether a send to `queue` starting now should notify. `false` means it was
    /// coalesced: once it has committed, the caller must call [`skipped_committed`].
    ///
    /// [`skipped_committed`]: Self::skipped_committed
    pub(crate) fn should_notify(&self, queue: &QueueName) -> bool {
        if self.window.is_zero() {
            return true;
        }
        let now = Instant::now();
        let mut queues = self.lock();
        match queues.get_mut(queue) {
            Some(state) if now.duration_since(state.last) < self.window => false,
            Some(state) => {
                state.last = now;
                true
            }
            None => {
                queues.insert(
                    queue.clone(),
                    QueueState {
                        last: now,
                        trailing: false,
                    },
                );
                true
            }
        }
    }

    /// A send whose notify was skipped has committed: makes sure one trailing notify
    /// follows at the end of the queue's window (at once if the window is over).
    pub(crate) fn skipped_committed(self: &Arc<Self>, queue: &QueueName, pool: &Pool<Manager>) {
        self.skipped.fetch_add(1, Ordering::Relaxed);
        let due = {
            let mut queues = self.lock();
            let Some(state) = queues.get_mut(queue) else {
                return;
            };
            if state.trailing {
                // The pending notify is sent after it is taken, so after this commit.
                return;
            }
            state.trailing = true;
            state.last + self.window
        };
        let limiter = Arc::clone(self);
        let queue = queue.clone();
        let pool = pool.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(due).await;
            if let Some(state) = limiter.lock().get_mut(&queue) {
                // Taken before the notify: a skipped send committing from now on
                // schedules the next one; this notify covers every commit before.
                state.trailing = false;
                state.last = Instant::now();
            }
            let sent = match pool.get().await {
                Ok(conn) => conn
                    .exec(sql::NOTIFY_WAKEUP, &[&queue.as_str()])
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            if let Err(err) = sent {
                // Workers still find the message at their next poll.
                tracing::warn!(
                    target: "pgbus::send",
                    error = %err,
                    queue.name = %queue,
                    "the trailing wake-up of coalesced sends failed"
                );
            }
        });
    }
}
