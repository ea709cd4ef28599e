//! How `pgbus serve` takes connections: the open-files limit, the connection cap, the
//! header timeout, and the accept loop with its graceful shutdown.
//!
//! `axum::serve` has no header-read timeout and no limit on open connections: a client
//! that opens sockets and sends half a request (or nothing) holds them for ever, and
//! about a thousand of them take every file a process with the common limit of 1,024 may
//! open, locking out every other client and the database pool. This loop serves the same
//! router over HTTP/1.1 with hyper directly:
//!
//! - A request's header must arrive whole within [`HEADER_READ_TIMEOUT`], and a kept-alive
//!   connection whose next request has not arrived within it is closed (hyper starts the
//!   same timer when a connection goes idle). HTTP/1 only, as `axum::serve` served it
//!   without its `http2` feature: hyper-util's `auto` builder reads the first bytes to
//!   tell HTTP/2 from HTTP/1 before the HTTP/1 timer starts, so a client that sends
//!   nothing would escape the timeout there.
//! - At most [`Capacity::connections`] connections are open at once: a permit is taken
//!   before a connection is accepted. When none is left the loop stops accepting, and new
//!   clients wait in the kernel's listen backlog (first come, first served) until a held
//!   connection closes or times out; nothing is accepted only to be closed, which a
//!   client would see as an error and could only retry blindly.
//! - The cap is sized from the open-files limit, which is first raised to the hard limit,
//!   so the pool's database connections, the LISTEN connection and the files the process
//!   opens always have descriptors left.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::serve::Listener;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::sync::Semaphore;

/// How long a client has to send a request's whole header, and how long a kept-alive
/// connection may wait idle for its next request.
pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Open files kept out of the connection cap besides the pool's connections: standard
/// streams, the runtime's descriptors, the listening socket, the LISTEN and readiness
/// connections, files read at start (certificates, the stream secret).
const RESERVED_FILES: u64 = 64;
/// The cap when the open-files limit leaves less.
const MIN_CONNECTIONS: usize = 16;
/// The cap however high the limit: each connection costs buffers too.
const MAX_CONNECTIONS: usize = 65_536;
/// How often "all connections taken" is logged while it lasts.
const FULL_WARNING_EVERY: Duration = Duration::from_secs(60);

/// How many connections the server holds at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Capacity {
    /// The soft open-files limit the cap was sized from (`None`: unlimited).
    pub(crate) open_files: Option<u64>,
    /// Connections open at once, of every kind.
    pub(crate) connections: usize,
}

impl Capacity {
    /// Raises this process's open-files limit to the hard limit and sizes the cap from it,
    /// leaving room for `pool` database connections.
    pub(crate) fn for_this_process(pool: u32) -> Capacity {
        Capacity::sized(raise_open_files_limit(), pool)
    }

    fn sized(open_files: Option<u64>, pool: u32) -> Capacity {
        let spare = open_files.map_or(u64::MAX, |limit| {
            limit.saturating_sub(RESERVED_FILES + u64::from(pool))
        });
        let connections = usize::try_from(spare)
            .unwrap_or(usize::MAX)
            .clamp(MIN_CONNECTIONS, MAX_CONNECTIONS);
        Capacity {
            open_files,
            connections,
        }
    }

    /// How many of the connections event streams may hold: seven eighths, so that the
    /// dashboard, the probes and the 503 that refuses a stream beyond its limit always
    /// have connections left.
    #[cfg_attr(not(feature = "stream"), allow(dead_code))]
    pub(crate) fn streams(&self) -> usize {
        self.connections - self.connections / 8
    }
}

/// Raises the soft open-files limit to the hard one, as servers do at start (the soft
/// default, often 1,024, suits programs that use `select`; tokio uses epoll). Returns the
/// soft limit in effect (`None`: unlimited). An unlimited hard limit is left alone: the
/// kernel's own ceiling is lower and differs between systems.
fn raise_open_files_limit() -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    let (Some(soft), Some(hard)) = (limit.current, limit.maximum) else {
        return limit.current;
    };
    if soft >= hard {
        return Some(soft);
    }
    let raised = Rlimit {
        current: Some(hard),
        maximum: Some(hard),
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => Some(hard),
        Err(err) => {
            tracing::warn!(
                target: "pgbus::serve",
                error = %err,
                "could not raise the open-files limit from {soft} to the hard limit {hard}"
            );
            Some(soft)
        }
    }
}

/// Serves `router` on `listener`, at most `max_connections` connections at once, until
/// `shutdown` completes; then stops accepting and waits for the open connections to end
/// (an idle one closes at once, a request in progress is answered, a client still
/// sending its header has the header timeout).
pub(crate) async fn serve<L: Listener>(
    mut listener: L,
    router: Router,
    max_connections: usize,
    shutdown: impl Future<Output = ()>,
) {
    let permits = Arc::new(Semaphore::new(max_connections));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT);
    let mut shutdown = std::pin::pin!(shutdown);
    let mut warned_full: Option<Instant> = None;
    loop {
        let next = async {
            let permit = match Arc::clone(&permits).try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    if warned_full.is_none_or(|at| at.elapsed() >= FULL_WARNING_EVERY) {
                        warned_full = Some(Instant::now());
                        tracing::warn!(
                            target: "pgbus::serve",
                            "all {max_connections} connections are open: new clients wait \
                             until one closes"
                        );
                    }
                    Arc::clone(&permits)
                        .acquire_owned()
                        .await
                        .expect("the connection semaphore is never closed")
                }
            };
            // Errors (a client gone before it was accepted, out of files) are handled,
            // logged and retried by the listener.
            let (io, _addr) = listener.accept().await;
            (permit, io)
        };
        let (permit, io) = tokio::select! {
            () = &mut shutdown => break,
            accepted = next => accepted,
        };
        let service = TowerToHyperService::new(router.clone());
        let connection = graceful.watch(http.serve_connection(TokioIo::new(io), service));
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(target: "pgbus::serve", error = %err, "connection ended");
            }
            drop(permit);
        });
    }
    // Clients still waiting in the backlog are refused from here.
    drop(listener);
    graceful.shutdown().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_files_for_the_pool_and_the_process() {
        let capacity = Capacity::sized(Some(1024), 8);
        assert_eq!(capacity.connections, 1024 - 64 - 8);
        assert_eq!(capacity.streams(), 952 - 952 / 8);
        assert!(capacity.streams() < capacity.connections);
    }

    #[test]
    fn the_cap_has_a_floor_and_a_ceiling() {
        assert_eq!(Capacity::sized(Some(50), 8).connections, MIN_CONNECTIONS);
        assert_eq!(Capacity::sized(Some(0), 8).connections, MIN_CONNECTIONS);
        assert_eq!(
            Capacity::sized(Some(1 << 20), 8).connections,
            MAX_CONNECTIONS
        );
        assert_eq!(Capacity::sized(None, 8).connections, MAX_CONNECTIONS);
        let floor = Capacity::sized(Some(0), 8);
        assert!(floor.streams() > 0 && floor.streams() < floor.connections);
    }
}
