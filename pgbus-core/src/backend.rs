//! The whole backend: every capability a worker, a producer and an operator use, in one
//! trait. It sits above the capability traits' modules (the queue contract, wake-ups and
//! fetchers, group sessions, the process registry), which know nothing of it.

use crate::group::OpenGroupSession;
use crate::process::ProcessRegistry;
use crate::queue::{Consumer, DeadLetters, Producer, QueueAdmin, Stats};
use crate::wakeup::OpenFetcher;

/// Everything a worker, a producer and an operator need from a backend.
pub trait Backend:
    QueueAdmin
    + Producer
    + Consumer
    + DeadLetters
    + Stats
    + ProcessRegistry
    + OpenFetcher
    + OpenGroupSession
    + Clone
    + 'static
{
}

impl<T> Backend for T where
    T: QueueAdmin
        + Producer
        + Consumer
        + DeadLetters
        + Stats
        + ProcessRegistry
        + OpenFetcher
        + OpenGroupSession
        + Clone
        + 'static
{
}
