//! The dispatcher's mailbox: what it handles ([`Msg`]), and the two ends every other part
//! of the streamer uses to reach it.
//!
//! The mailbox stays small however fast a stream is published to: a stream's `Published`
//! signals are coalesced (at most one waits per stream, and it is taken off before the
//! dispatcher reads, so a commit signalled during that read queues the next one), and
//! ephemeral broadcasts beyond a bound are dropped and counted. Every other message is
//! bounded by the connections (one `Connect`, at most one `Ready` and one `Gone` each).

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use pgbus_core::{Result, StreamName, StreamSignal};
use tokio::sync::{mpsc, oneshot};

use crate::cursor::Start;

/// Identifies one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct ConnId(pub(crate) u64);

impl ConnId {
    /// The id of a connection that was never registered.
    pub(crate) const NONE: ConnId = ConnId(0);
}

/// Shared between a connection's stream and the dispatcher.
#[derive(Debug, Default)]
pub(crate) struct Flow {
    /// Set by the dispatcher when the queue was full and the connection fell behind its
    /// stream; cleared by the stream, which then asks for the rest.
    pub(crate) lagging: AtomicBool,
}

/// What the dispatcher handles, one at a time.
pub(crate) enum Msg {
    /// A new connection; its stream is already listened to.
    Connect {
        stream: StreamName,
        start: Start,
        id: ConnId,
        frames: mpsc::Sender<Bytes>,
        flow: Arc<Flow>,
        reply: oneshot::Sender<Result<()>>,
    },
    /// From the listener.
    Signal(StreamSignal),
    /// A lagging connection drained its queue and wants the rest.
    Ready(ConnId),
    /// The connection's client went away.
    Gone(ConnId),
    /// From the heartbeat.
    Tick,
    /// Report each stream's connection count.
    Census(oneshot::Sender<Vec<(StreamName, usize)>>),
    /// Say goodbye to every client and stop.
    Shutdown(oneshot::Sender<()>),
}

/// What the two ends share about the listener's signals waiting in the mailbox.
#[derive(Debug)]
struct Waiting {
    /// Streams with a `Published` signal in the mailbox.
    published: Mutex<HashSet<StreamName>>,
    /// Broadcasts in the mailbox.
    broadcasts: AtomicUsize,
    max_broadcasts: usize,
    dropped_broadcasts: AtomicU64,
}

impl Waiting {
    fn published(&self) -> std::sync::MutexGuard<'_, HashSet<StreamName>> {
        // The set holds no invariant a panicking holder could break.
        self.published
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The sending end, cloned by the instance, the listener callback, the heartbeat and every
/// [`EventStream`](crate::EventStream).
#[derive(Debug, Clone)]
pub(crate) struct Mailbox {
    sender: mpsc::UnboundedSender<Msg>,
    waiting: Arc<Waiting>,
}

/// The dispatcher's end.
#[derive(Debug)]
pub(crate) struct Inbox {
    receiver: mpsc::UnboundedReceiver<Msg>,
    waiting: Arc<Waiting>,
}

/// A mailbox holding at most `max_broadcasts` broadcasts at a time.
pub(crate) fn mailbox(max_broadcasts: usize) -> (Mailbox, Inbox) {
    let (sender, receiver) = mpsc::unbounded_channel();
    let waiting = Arc::new(Waiting {
        published: Mutex::default(),
        broadcasts: AtomicUsize::new(0),
        max_broadcasts,
        dropped_broadcasts: AtomicU64::new(0),
    });
    let inbox = Inbox {
        receiver,
        waiting: waiting.clone(),
    };
    (Mailbox { sender, waiting }, inbox)
}

/// The dispatcher has stopped.
#[derive(Debug)]
pub(crate) struct Closed;

impl Mailbox {
    /// Queues `msg`.
    pub(crate) fn send(&self, msg: Msg) -> Result<(), Closed> {
        self.sender.send(msg).map_err(|_| Closed)
    }

    /// Queues a listener signal, unless the same stream's `Published` already waits, or
    /// it is a broadcast and the mailbox holds its maximum of them (dropped and counted:
    /// broadcasts are best effort, like a lagging client's).
    pub(crate) fn signal(&self, signal: StreamSignal) {
        match &signal {
            StreamSignal::Published(stream) => {
                if !self.waiting.published().insert(stream.clone()) {
                    return;
                }
            }
            StreamSignal::Broadcast { .. } => {
                let waiting = &self.waiting;
                let admitted = waiting
                    .broadcasts
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                        (n < waiting.max_broadcasts).then_some(n + 1)
                    })
                    .is_ok();
                if !admitted {
                    waiting.dropped_broadcasts.fetch_add(1, Ordering::Relaxed);
                    return;
                }
            }
            StreamSignal::Reconnected => {}
        }
        let _ = self.sender.send(Msg::Signal(signal));
    }

    /// Broadcasts dropped because the mailbox held its maximum.
    pub(crate) fn dropped_broadcasts(&self) -> u64 {
        self.waiting.dropped_broadcasts.load(Ordering::Relaxed)
    }
}

impl Inbox {
    /// The next message. A signal stops counting as waiting here, before the dispatcher
    /// reads: a commit signalled from now on queues a new one.
    pub(crate) async fn recv(&mut self) -> Option<Msg> {
        let msg = self.receiver.recv().await?;
        match &msg {
            Msg::Signal(StreamSignal::Published(stream)) => {
                self.waiting.published().remove(stream);
            }
            Msg::Signal(StreamSignal::Broadcast { .. }) => {
                self.waiting.broadcasts.fetch_sub(1, Ordering::SeqCst);
            }
            _ => {}
        }
        Some(msg)
    }
}
