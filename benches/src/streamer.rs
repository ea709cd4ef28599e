//! The streamer of `stream_fanout`, in a child process (`pgbus-bench --streamer`).
//!
//! A fresh process per run, like a web process that serves streams: an [`Instance`] on
//! `PgBackend` and a `PgStreamListener`, served by its axum endpoint on 127.0.0.1. Its own
//! process, so that its memory growth is the server's half of the connections alone (the
//! harness holds the clients) and no run inherits the allocator's pages of an earlier one;
//! and each process needs one file descriptor per client rather than two.
//!
//! The harness and the child exchange one JSON object per line. The harness writes
//! [`Orders`]; the child starts, answers [`Reply::Listening`], and then answers each
//! further line (any text) with [`Reply::Status`]. When its stdin closes it shuts the
//! instance down (every client gets `event: shutdown`) and exits. A failure is
//! [`Reply::Failed`] and a non-zero exit.

use std::future::IntoFuture as _;
use std::io::Write as _;
use std::time::Duration;

use anyhow::{bail, Context};
use pgbus_core::{StreamName, StreamStore};
use pgbus_pg::{PgBackend, PgStreamListener};
use pgbus_stream::http::Streams;
use pgbus_stream::{Config, Instance, Signer};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, BufReader, Lines, Stdin};
use tokio_util::sync::CancellationToken;

use crate::scenarios::wait_stream_listener_live;
use crate::system::{cpu_seconds, raise_open_files_limit, rss_kib};

/// How long the endpoint's connections may take to close after the shutdown.
const CLOSE_WITHIN: Duration = Duration::from_secs(10);

/// What the harness asks of the child.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Orders {
    /// The (migrated) database.
    pub(crate) database_url: String,
    /// The stream the clients will follow.
    pub(crate) stream: String,
    /// The instance's connection limit.
    pub(crate) max_connections: usize,
}

/// What the child tells the harness.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Reply {
    /// Serving; `url` is the stream's (signed path included).
    Listening { url: String, rss_kib: f64 },
    /// The process's RSS and CPU time used so far, and the instance's counters.
    Status {
        rss_kib: f64,
        cpu_seconds: f64,
        connections: u64,
        dropped_slow: u64,
    },
    /// The child gave up.
    Failed { error: String },
}

/// The child's side: reads its orders from stdin and serves until stdin closes.
pub(crate) async fn run() -> anyhow::Result<()> {
    let mut stdin = BufReader::new(tokio::io::stdin()).lines();
    let outcome = async {
        let line = stdin.next_line().await?.context("no orders on stdin")?;
        let orders: Orders = serde_json::from_str(&line).context("unreadable orders")?;
        serve(&orders, &mut stdin).await
    }
    .await;
    if let Err(err) = &outcome {
        reply(&Reply::Failed {
            error: format!("{err:#}"),
        })?;
    }
    outcome
}

async fn serve(orders: &Orders, stdin: &mut Lines<BufReader<Stdin>>) -> anyhow::Result<()> {
    let limit = raise_open_files_limit()?;
    if orders.max_connections as u64 > limit {
        bail!(
            "{} connections do not fit the open-files limit of {limit}",
            orders.max_connections
        );
    }
    let backend = PgBackend::builder(&orders.database_url).build()?;
    let stream = StreamName::new(orders.stream.as_str())?;
    // Opens the pooled connection before the baseline is taken.
    backend.latest(&stream).await?;
    let mut config = Config::default();
    config.max_connections = orders.max_connections;
    let listener = PgStreamListener::new(&orders.database_url)?;
    let instance = Instance::new(backend, listener, config);
    instance.start()?;
    wait_stream_listener_live(instance.listener()).await?;
    let signer = Signer::new("the secret of the stream_fanout benchmark")?;
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}{}", tcp.local_addr()?, signer.url_path(&stream));
    let stop = CancellationToken::new();
    let app = Streams::new(instance.clone(), signer).router();
    let serving = tokio::spawn(
        axum::serve(tcp, app)
            .with_graceful_shutdown(stop.clone().cancelled_owned())
            .into_future(),
    );
    reply(&Reply::Listening {
        url,
        rss_kib: rss_kib()?,
    })?;
    while stdin.next_line().await?.is_some() {
        let stats = instance.stats();
        reply(&Reply::Status {
            rss_kib: rss_kib()?,
            cpu_seconds: cpu_seconds()?,
            connections: stats.connections,
            dropped_slow: stats.dropped_slow,
        })?;
    }
    instance.shutdown().await;
    stop.cancel();
    match tokio::time::timeout(CLOSE_WITHIN, serving).await {
        Ok(served) => Ok(served.context("the endpoint panicked")??),
        Err(_) => bail!("the endpoint's connections did not close within {CLOSE_WITHIN:?}"),
    }
}

fn reply(reply: &Reply) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer(&mut out, reply)?;
    writeln!(out)?;
    out.flush()?;
    Ok(())
}
