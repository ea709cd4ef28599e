//! `pgbus work --metrics-listen`: the worker process's own metrics (the job, claim, lease,
//! pool and listener metrics of `docs/observability.md`) as Prometheus text at `/metrics`,
//! recorded through the `metrics` facade into `metrics-exporter-prometheus`. Access follows
//! `pgbus serve`'s rule: beyond loopback a token is required; without one, only requests
//! addressed to a loopback host name.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use axum::routing::get;
use axum::Router;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

use super::auth;

/// Scrapers are few: a small cap keeps the worker's files for its jobs.
const MAX_CONNECTIONS: usize = 16;

/// How often histogram samples are folded into the summaries when nobody scrapes, so
/// they do not pile up in memory.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// Installs the process's metrics recorder and serves it on `addr` until `stop`.
pub(crate) async fn start(
    addr: SocketAddr,
    token: Option<String>,
    stop: CancellationToken,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let token = auth::listen_token(addr, token, "--metrics-token or PGBUS_METRICS_TOKEN")?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr} for metrics"))?;
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .context("installing the metrics recorder")?;
    let addr = listener.local_addr()?;
    let mut router = Router::new().route(
        "/metrics",
        get({
            let handle = handle.clone();
            move || async move { render(&handle) }
        }),
    );
    router = match token {
        Some(token) => router.layer(axum::middleware::from_fn_with_state(token, auth::require)),
        None => router.layer(axum::middleware::from_fn(auth::loopback_host)),
    };
    let router = router.layer(axum::middleware::from_fn(super::response_headers));
    tracing::info!(target: "pgbus::cli", "metrics at http://{addr}/metrics");
    Ok(tokio::spawn(async move {
        let upkeep = tokio::spawn({
            let stop = stop.clone();
            async move {
                loop {
                    tokio::select! {
                        () = stop.cancelled() => return,
                        () = tokio::time::sleep(UPKEEP_EVERY) => handle.run_upkeep(),
                    }
                }
            }
        });
        super::connections::serve(listener, router, MAX_CONNECTIONS, stop.cancelled_owned()).await;
        let _ = upkeep.await;
    }))
}

fn render(handle: &PrometheusHandle) -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        handle.render(),
    )
}
