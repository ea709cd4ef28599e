//! The receiving end of one connection: what the HTTP response body streams.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::Stream;
use tokio::sync::mpsc;

use crate::mailbox::{ConnId, Flow, Mailbox, Msg};

/// The frames of one followed stream, as SSE bytes, ending when the dispatcher drops the
/// connection (shutdown, slow reader, idle timeout).
///
/// Dropping it (the client went away) unregisters the connection.
#[derive(Debug)]
pub struct EventStream {
    frames: mpsc::Receiver<Bytes>,
    capacity: usize,
    id: ConnId,
    flow: Arc<Flow>,
    mailbox: Option<Mailbox>,
    _slot: Option<Slot>,
}

/// One counted connection; frees its place in the connection limit when dropped.
#[derive(Debug)]
pub(crate) struct Slot(pub(crate) Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl EventStream {
    pub(crate) fn new(
        frames: mpsc::Receiver<Bytes>,
        capacity: usize,
        id: ConnId,
        flow: Arc<Flow>,
        mailbox: Mailbox,
        slot: Slot,
    ) -> Self {
        Self {
            frames,
            capacity,
            id,
            flow,
            mailbox: Some(mailbox),
            _slot: Some(slot),
        }
    }

    /// A stream with these frames only, already closed: what a connection gets once the
    /// instance is shutting down.
    pub(crate) fn closed(frames: &[Bytes]) -> Self {
        let (tx, rx) = mpsc::channel(frames.len().max(1));
        for frame in frames {
            let _ = tx.try_send(frame.clone());
        }
        Self {
            frames: rx,
            capacity: 1,
            id: ConnId::NONE,
            flow: Arc::default(),
            mailbox: None,
            _slot: None,
        }
    }
}

impl Stream for EventStream {
    type Item = Bytes;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        let polled = self.frames.poll_recv(cx);
        if let Poll::Ready(Some(_)) = &polled {
            // Once half the queue is free, a lagging connection asks for what it missed.
            if self.frames.len() <= self.capacity / 2
                && self.flow.lagging.swap(false, Ordering::SeqCst)
            {
                if let Some(mailbox) = &self.mailbox {
                    let _ = mailbox.send(Msg::Ready(self.id));
                }
            }
        }
        polled
    }
}

impl Drop for EventStream {
    fn drop(&mut self) {
        if let Some(mailbox) = &self.mailbox {
            let _ = mailbox.send(Msg::Gone(self.id));
        }
    }
}
