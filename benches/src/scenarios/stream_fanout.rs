//! `stream_fanout`: one streamer (`pgbus_stream::Instance` on `PgBackend` and a
//! `PgStreamListener`, served by its axum endpoint, in a child process: see
//! [`crate::streamer`]) with many SSE clients following one stream over real HTTP;
//! publish-to-parse latency, and the streamer's memory per connection.

use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context};
use futures_util::{StreamExt, TryStreamExt};
use pgbus_core::{StreamName, StreamStore};
use pgbus_pg::PgBackend;
use pgbus_stream::parse::SseParser;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout};
use tokio::task::JoinSet;

use super::{on_fresh_database, pgbus_backend};
use crate::options::Plan;
use crate::server::Server;
use crate::stats::{ms, percentiles};
use crate::streamer::{Orders, Reply};
use crate::system::{cpu_seconds, raise_open_files_limit};

/// The stream every client follows.
const STREAM: &str = "fanout";
/// The event type of the timed events; their data is the publish time ([`unix_nanos`]).
const EVENT: &str = "tick";
/// File descriptors a process keeps for everything but the clients' sockets (database
/// connections, the runtime, stdio).
pub(crate) const FD_RESERVE: u64 = 256;
/// Connections being opened at once (the server's accept backlog is not flooded).
const CONNECTING_AT_ONCE: usize = 64;
/// How long a client waits for its response, and then for each chunk of it.
const CLIENT_DEADLINE: Duration = Duration::from_secs(60);

/// How many clients a run connects: the plan's, or fewer when the open-files limit (raised
/// to the hard limit first; the streamer's process inherits it) does not fit them; with the
/// limit in force.
pub(crate) fn client_count(plan: &Plan) -> anyhow::Result<(usize, u64)> {
    let limit = raise_open_files_limit()?;
    let fits = usize::try_from(limit.saturating_sub(FD_RESERVE)).unwrap_or(usize::MAX);
    ensure!(
        fits > 0,
        "the open-files limit {limit} leaves no room for clients"
    );
    Ok((plan.stream_clients.min(fits), limit))
}

/// One run's figures.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Run {
    /// From the first connect to every client's `200` (each is registered by then).
    pub(crate) connect_ms: f64,
    /// Publish (just before the call) to the client's parse, over every event and client.
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
    /// The `publish` call itself (its commit).
    pub(crate) publish_p50: f64,
    pub(crate) publish_max: f64,
    /// Growth of the streamer process's RSS per client: once every client is registered,
    /// and after the events were delivered.
    pub(crate) kib_registered: f64,
    pub(crate) kib_delivered: f64,
    /// The streamer process's CPU time per delivered frame while the events were
    /// delivered, in µs.
    pub(crate) cpu_us_per_frame: f64,
    /// The same for the harness's process (the clients, and the publisher's thread).
    pub(crate) clients_cpu_us_per_frame: f64,
    /// Clients the streamer dropped as too slow.
    pub(crate) dropped_slow: u64,
}

/// On a fresh database: starts the streamer's process, connects `clients` clients to it,
/// then publishes `plan.stream_events` events `plan.stream_spacing_ms` apart from this
/// process, each carrying its publish time.
pub(crate) async fn run_once(server: &Server, plan: &Plan, clients: usize) -> anyhow::Result<Run> {
    on_fresh_database(server, |url| async move {
        // Migrates the database.
        pgbus_backend(&url, |b| b).await?;

        let mut streamer = StreamerProcess::spawn()?;
        streamer
            .send(&Orders {
                database_url: url.clone(),
                stream: STREAM.to_owned(),
                max_connections: clients,
            })
            .await?;
        let (stream_url, before) = match streamer.reply().await? {
            Reply::Listening { url, rss_kib } => (url, rss_kib),
            other => bail!("the streamer did not start: {other:?}"),
        };

        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .context("building the HTTP client")?;
        let started = Instant::now();
        let responses: Vec<reqwest::Response> = futures_util::stream::iter(0..clients)
            .map(|_| connect(&http, &stream_url))
            .buffer_unordered(CONNECTING_AT_ONCE)
            .try_collect()
            .await?;
        let connect_ms = ms(started.elapsed());
        let registered = streamer.status().await?;
        ensure!(
            registered.connections == clients as u64,
            "{clients} clients have their response but the streamer counts {}",
            registered.connections
        );

        let clients_cpu = cpu_seconds()?;
        let mut followers = JoinSet::new();
        for response in responses {
            followers.spawn(follow(response, plan.stream_events));
        }
        let publish_ms = publish_apart(&url, plan).await?;
        let mut latencies = Vec::with_capacity(clients * plan.stream_events);
        let mut open = Vec::with_capacity(clients);
        while let Some(joined) = followers.join_next().await {
            let (response, latency) = joined.context("a client panicked")??;
            latencies.extend(latency);
            open.push(response);
        }
        let clients_cpu = cpu_seconds()? - clients_cpu;
        let delivered = streamer.status().await?;
        drop(open);
        streamer.finish().await?;

        let [p50, p99, max] =
            percentiles(&latencies, [50.0, 99.0, 100.0]).context("no event arrived")?;
        let [publish_p50, publish_max] =
            percentiles(&publish_ms, [50.0, 100.0]).context("nothing was published")?;
        Ok(Run {
            connect_ms,
            p50,
            p99,
            max,
            publish_p50,
            publish_max,
            kib_registered: (registered.rss_kib - before) / clients as f64,
            kib_delivered: (delivered.rss_kib - before) / clients as f64,
            cpu_us_per_frame: (delivered.cpu_seconds - registered.cpu_seconds) * 1e6
                / latencies.len() as f64,
            clients_cpu_us_per_frame: clients_cpu * 1e6 / latencies.len() as f64,
            dropped_slow: delivered.dropped_slow,
        })
    })
    .await
}

/// Publishes the timed events at a steady pace, from a thread and a runtime of its own
/// (so the publisher does not queue behind the clients' tasks in the harness's runtime);
/// returns each `publish` call's duration in ms.
async fn publish_apart(url: &str, plan: &Plan) -> anyhow::Result<Vec<f64>> {
    let (url, events) = (url.to_owned(), plan.stream_events);
    let spacing = Duration::from_millis(plan.stream_spacing_ms);
    tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        runtime.block_on(async {
            let backend = PgBackend::builder(&url).build()?;
            let stream = StreamName::new(STREAM)?;
            // Opens the pooled connection.
            backend.latest(&stream).await?;
            let mut publish_ms = Vec::with_capacity(events);
            let mut ticks = tokio::time::interval(spacing);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for _ in 0..events {
                ticks.tick().await;
                let started = Instant::now();
                backend
                    .publish(&stream, EVENT, &unix_nanos().to_string())
                    .await?;
                publish_ms.push(ms(started.elapsed()));
            }
            Ok(publish_ms)
        })
    })
    .await
    .context("the publisher panicked")?
}

/// Now as nanoseconds since the Unix epoch.
fn unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

async fn connect(http: &reqwest::Client, url: &str) -> anyhow::Result<reqwest::Response> {
    let response = tokio::time::timeout(CLIENT_DEADLINE, http.get(url).send())
        .await
        .context("no response in time")?
        .context("connecting")?;
    ensure!(
        response.status() == reqwest::StatusCode::OK,
        "the stream answered {}",
        response.status()
    );
    Ok(response)
}

/// Reads the response until `events` timed events arrived; returns it (still open) with
/// each event's latency from its publish to the moment its chunk was parsed, in ms.
async fn follow(
    mut response: reqwest::Response,
    events: usize,
) -> anyhow::Result<(reqwest::Response, Vec<f64>)> {
    let mut parser = SseParser::default();
    let mut latencies = Vec::with_capacity(events);
    while latencies.len() < events {
        let chunk = tokio::time::timeout(CLIENT_DEADLINE, response.chunk())
            .await
            .context("no frame in time")?
            .context("reading the stream")?;
        let Some(chunk) = chunk else {
            bail!(
                "the stream ended after {} of {events} events",
                latencies.len()
            );
        };
        let frames = parser.feed(&chunk);
        let parsed = unix_nanos();
        for frame in frames.iter().filter(|f| f.event.as_deref() == Some(EVENT)) {
            let published: u64 = frame.data.parse().context("a timed event's data")?;
            latencies.push(parsed.saturating_sub(published) as f64 / 1e6);
        }
    }
    Ok((response, latencies))
}

/// What the streamer reports of itself ([`Reply::Status`]).
struct Status {
    rss_kib: f64,
    cpu_seconds: f64,
    connections: u64,
    dropped_slow: u64,
}

/// The streamer's child process: this executable with `--streamer`.
struct StreamerProcess {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Lines<BufReader<ChildStdout>>,
}

impl StreamerProcess {
    fn spawn() -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("locating the harness's executable")?;
        let mut child = tokio::process::Command::new(exe)
            .arg("--streamer")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .context("starting the streamer's process")?;
        let stdin = child.stdin.take().context("the child's stdin")?;
        let stdout = child.stdout.take().context("the child's stdout")?;
        Ok(StreamerProcess {
            child,
            stdin: Some(stdin),
            stdout: BufReader::new(stdout).lines(),
        })
    }

    async fn send(&mut self, orders: &Orders) -> anyhow::Result<()> {
        let mut line = serde_json::to_vec(orders)?;
        line.push(b'\n');
        self.write(&line).await
    }

    async fn write(&mut self, line: &[u8]) -> anyhow::Result<()> {
        let stdin = self.stdin.as_mut().context("the child's stdin is closed")?;
        stdin.write_all(line).await?;
        stdin.flush().await?;
        Ok(())
    }

    async fn reply(&mut self) -> anyhow::Result<Reply> {
        match self.stdout.next_line().await? {
            Some(line) => match serde_json::from_str(&line)? {
                Reply::Failed { error } => bail!("the streamer failed: {error}"),
                reply => Ok(reply),
            },
            None => {
                let status = self.child.wait().await?;
                bail!("the streamer's process ended ({status}) without answering")
            }
        }
    }

    async fn status(&mut self) -> anyhow::Result<Status> {
        self.write(b"status\n").await?;
        match self.reply().await? {
            Reply::Status {
                rss_kib,
                cpu_seconds,
                connections,
                dropped_slow,
            } => Ok(Status {
                rss_kib,
                cpu_seconds,
                connections,
                dropped_slow,
            }),
            other => bail!("expected the streamer's status, got {other:?}"),
        }
    }

    /// Closes the child's stdin, which shuts the streamer down, and waits for its exit.
    async fn finish(mut self) -> anyhow::Result<()> {
        drop(self.stdin.take());
        let status = self.child.wait().await?;
        ensure!(
            status.success(),
            "the streamer's process exited with {status}"
        );
        Ok(())
    }
}
