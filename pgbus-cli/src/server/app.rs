//! What every handler of the server shares: the [`App`] state.

use std::sync::Arc;
use std::time::Instant;

use pgbus_pg::PgBackend;
use tokio_util::sync::CancellationToken;

use super::snapshot::Snapshots;

/// What every handler shares.
#[derive(Clone)]
pub(crate) struct App {
    pub(crate) backend: PgBackend,
    pub(crate) snapshots: Snapshots,
    pub(crate) readiness: Readiness,
    // Read by the dashboard API only.
    #[cfg_attr(not(feature = "dashboard"), allow(dead_code))]
    pub(crate) stop: CancellationToken,
}

/// The last readiness check and when it finished; the lock also makes concurrent probes
/// wait for one check instead of each running its own.
#[derive(Clone, Default)]
pub(crate) struct Readiness(pub(super) Arc<tokio::sync::Mutex<Option<(Instant, bool)>>>);
