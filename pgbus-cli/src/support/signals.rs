//! How a long-running command learns it should stop.

use anyhow::Context;
use tokio_util::sync::CancellationToken;

/// Cancelled on SIGINT or SIGTERM.
pub(crate) fn stop_on_signals() -> anyhow::Result<CancellationToken> {
    let stop = CancellationToken::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let token = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!(target: "pgbus::cli", "stop requested: draining");
        token.cancel();
    });
    Ok(stop)
}
