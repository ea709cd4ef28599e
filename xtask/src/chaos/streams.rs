//! Scenario 5, streams under faults: an SSE client follows a durable stream served by `pgbus
//! serve` while the server is restarted (SIGTERM and SIGKILL), its `pgbus:stream`
//! listener connection is terminated, and PostgreSQL is restarted (`pg_ctl restart -m
//! fast`, own cluster only); it resumes with `Last-Event-ID` and must end up with every
//! published event exactly once, in order.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use pgbus_core::{StreamName, StreamStore};
use pgbus_pg::{PgBackend, ShutdownMode};
use pgbus_stream::parse::SseParser;
use pgbus_stream::Signer;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

use super::env::{Counting, Env, Procs, Side};
use super::record::now_ns;
use super::report::ScenarioReport;
use super::Plan;

const STREAM: &str = "chaos";
const SECRET: &str = "pgbus-chaos-stream-secret";

/// What the client has seen.
#[derive(Debug, Default)]
struct Seen {
    /// Event ids in arrival order, with when they arrived.
    events: Vec<(i64, u64)>,
    /// Successful (200) connections.
    connections: u32,
    /// `shutdown` events received.
    shutdowns: u32,
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// SIGTERM `pgbus serve`, start it again.
    Restart,
    /// SIGKILL `pgbus serve`, start it again.
    Kill,
    /// Terminate the streamer's `pgbus:stream` listener connection.
    Listener,
    /// `pg_ctl restart -m fast`: every connection of `pgbus serve` is lost at once.
    Postgres,
}

pub(crate) async fn streams(
    env: &Env,
    plan: &Plan,
    rng: &mut StdRng,
) -> anyhow::Result<ScenarioReport> {
    let mut report = ScenarioReport::new(
        "streams",
        "SSE stream across server and PostgreSQL restarts and listener kills (Last-Event-ID resume)",
    );
    let started = Instant::now();
    let db = env.database(report.name).await?;
    let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()?
        .port();
    let base = format!("http://127.0.0.1:{port}");
    let (pgbus, url) = (env.pgbus.clone(), db.url.clone());
    let server = Procs::start("serve", &db.dir, 1, move || {
        let mut command = std::process::Command::new(&pgbus);
        command
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--refresh",
                "1s",
            ])
            .env("DATABASE_URL", &url)
            .env("PGBUS_STREAM_SECRET", SECRET)
            .env("PGBUS_LOG", "warn,pgbus=info");
        command
    })?;
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(2))
        .build()?;
    wait_live(&http, &base).await?;

    let stream = StreamName::new(STREAM)?;
    let path = Signer::new(SECRET)?.url_path(&stream);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let client = tokio::spawn(follow(
        http.clone(),
        format!("{base}{path}"),
        Arc::clone(&seen),
    ));
    // The first connection replays from the start, but wait for it anyway so that the
    // first faults hit a live follower.
    wait_until(Duration::from_secs(30), || {
        seen.lock().expect("seen").connections > 0
    })
    .await?;

    let published: Arc<Mutex<Vec<i64>>> = Arc::default();
    // Held by a fault to keep the publisher quiet.
    let gate = Arc::new(tokio::sync::Mutex::new(()));
    let publisher = {
        let (backend, published) = (db.backend.clone(), Arc::clone(&published));
        let (events, every) = (plan.stream_events, plan.stream_interval);
        let (stream, gate) = (stream.clone(), Arc::clone(&gate));
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(every);
            for n in 0..events {
                ticker.tick().await;
                let _open = gate.lock().await;
                let id = publish(&backend, &stream, "tick", &n.to_string())
                    .await
                    .with_context(|| format!("publishing event {n}"))?;
                published.lock().expect("published").push(id);
            }
            anyhow::Ok(())
        })
    };

    let mut round = vec![Fault::Restart, Fault::Kill, Fault::Listener];
    if env.owns_server() {
        round.push(Fault::Postgres);
    } else {
        report.notes.push(
            "no PostgreSQL restarts: they need the harness's own cluster (run without \
             --database-url)"
                .to_owned(),
        );
    }
    let mut faults: Vec<Fault> = std::iter::repeat_n(round, plan.stream_fault_rounds)
        .flatten()
        .collect();
    faults.shuffle(rng);
    let mut at: Vec<f64> = (0..faults.len())
        .map(|_| rng.random_range(0.1..0.8))
        .collect();
    at.sort_by(f64::total_cmp);
    let (mut restarts, mut kills, mut terminated, mut pg_restarts) = (0, 0, 0, 0);
    for (i, (fault, point)) in faults.iter().zip(at).enumerate() {
        let target = (point * plan.stream_events as f64) as usize;
        wait_until(Duration::from_secs(120), || {
            published.lock().expect("published").len() >= target
        })
        .await?;
        let from = now_ns();
        let label = match fault {
            Fault::Restart => {
                restarts += 1;
                let status = server.stop_slot(0, Duration::from_secs(20)).await;
                report.check(
                    format!("fault {}: pgbus serve stops cleanly on SIGTERM", i + 1),
                    status.is_some_and(|s| s.success()),
                    format!("{status:?}"),
                );
                server.restart(0)?;
                wait_live(&http, &base).await?;
                "pgbus serve restarted (SIGTERM)".to_owned()
            }
            Fault::Kill => {
                kills += 1;
                server.kill(0);
                server.restart(0)?;
                wait_live(&http, &base).await?;
                "pgbus serve restarted (SIGKILL)".to_owned()
            }
            Fault::Listener => {
                // One event is published while the listener is away and nothing after it
                // until it arrives: only the re-read after reconnecting can deliver it.
                let quiet = gate.lock().await;
                let pids = db.side.role_pids("stream").await?;
                let n = db.side.terminate(&pids).await?;
                terminated += n;
                report.check(
                    format!("fault {}: a pgbus:stream connection to terminate", i + 1),
                    n > 0,
                    format!("{n} terminated"),
                );
                let check = format!("fault {}: an event published while the listener was down arrives with nothing published after it", i + 1);
                lone_event(&db.backend, &db.side, &stream, &published, &seen, from)
                    .await?
                    .check(&mut report, check);
                drop(quiet);
                format!("{n} pgbus:stream connection(s) terminated")
            }
            Fault::Postgres => {
                // Nothing is published while the server is down; one event as soon as it
                // is back (while the streamer's listener backs off before reconnecting)
                // and nothing after it until it arrives.
                pg_restarts += 1;
                let quiet = gate.lock().await;
                env.restart(ShutdownMode::Fast)?;
                let check = format!("fault {}: an event published right after the PostgreSQL restart arrives with nothing published after it", i + 1);
                lone_event(&db.backend, &db.side, &stream, &published, &seen, from)
                    .await?
                    .check(&mut report, check);
                drop(quiet);
                "PostgreSQL restarted (pg_ctl restart -m fast)".to_owned()
            }
        };
        report.faults += 1;
        let to = now_ns();
        // Recovered once an event arrives that was published after the fault ended.
        let first_after = published.lock().expect("published").len();
        let resumed = wait_until(Duration::from_secs(30), || {
            let published = published.lock().expect("published");
            let Some(&next) = published.get(first_after) else {
                return false;
            };
            seen.lock()
                .expect("seen")
                .events
                .iter()
                .any(|(id, _)| *id >= next)
        })
        .await;
        let took = Duration::from_nanos(now_ns().saturating_sub(from));
        println!(
            "chaos:   fault {}: {label} after {} events ({} ms); events flowing again {} ms after the fault began",
            i + 1,
            first_after,
            (to - from) / 1_000_000,
            took.as_millis()
        );
        match resumed {
            Ok(()) => report.recovered(format!("fault {}: {label}", i + 1), took),
            Err(_) => report.check(
                format!("fault {}: events flow again after {label}", i + 1),
                false,
                "no new event within 30 s",
            ),
        }
        if matches!(fault, Fault::Listener | Fault::Postgres) {
            let listening = db
                .side
                .wait_for_role("stream", Counting::Listening, 1, Duration::from_secs(30))
                .await?;
            let took = Duration::from_nanos(now_ns() - from);
            report.check(
                format!("fault {}: pgbus:stream listener LISTENs again", i + 1),
                listening > 0,
                if listening > 0 {
                    format!("{} ms after the fault began", took.as_millis())
                } else {
                    "not within 30 s".to_owned()
                },
            );
        }
    }
    publisher.await??;
    let published: Vec<i64> = published.lock().expect("published").clone();
    let all: BTreeSet<i64> = published.iter().copied().collect();
    let _ = wait_until(Duration::from_secs(30), || {
        let seen = seen.lock().expect("seen");
        let got: BTreeSet<i64> = seen.events.iter().map(|(id, _)| *id).collect();
        all.is_subset(&got)
    })
    .await;
    client.abort();
    let _ = client.await;
    let stop_problems = server.stop_all(Duration::from_secs(20)).await;

    let seen = seen.lock().expect("seen");
    let ids: Vec<i64> = seen.events.iter().map(|(id, _)| *id).collect();
    let distinct: BTreeSet<i64> = ids.iter().copied().collect();
    let lost: Vec<i64> = all.difference(&distinct).copied().collect();
    let out_of_order = ids.windows(2).filter(|w| w[1] <= w[0]).count();
    let foreign = distinct.difference(&all).count();
    report.sent = published.len() as u64;
    report.processed = distinct.intersection(&all).count() as u64;
    report.duplicates = (ids.len() - distinct.len()) as u64;
    report.lost = lost.len() as u64;
    report.check(
        "every published event received",
        lost.is_empty(),
        match lost.len() {
            0 => format!("{} of {}", report.processed, published.len()),
            n => format!("{n} missing, e.g. {:?}", &lost[..n.min(10)]),
        },
    );
    report.check(
        "no event received twice",
        report.duplicates == 0,
        format!("{} duplicates", report.duplicates),
    );
    report.check(
        "events arrive in id order across reconnects",
        out_of_order == 0,
        format!("{out_of_order} out of order"),
    );
    report.check(
        "nothing but published events",
        foreign == 0,
        format!("{foreign} unknown ids"),
    );
    report.check(
        "the client reconnected after every restart",
        seen.connections as u64 > restarts + kills,
        format!(
            "{} connections, {} shutdown events, {} restarts",
            seen.connections,
            seen.shutdowns,
            restarts + kills
        ),
    );
    server.check_exits(&mut report, "pgbus serve", &stop_problems);
    report.fault_summary = format!(
        "{restarts} SIGTERM + {kills} SIGKILL restarts, {terminated} pgbus:stream terminated, \
         {pg_restarts} PostgreSQL restarts"
    );
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Follows the stream until aborted, reconnecting with `Last-Event-ID` whenever the
/// response ends.
async fn follow(http: reqwest::Client, url: String, seen: Arc<Mutex<Seen>>) {
    let mut last_id: i64 = 0;
    let mut backoff = Duration::from_millis(50);
    loop {
        let response = http
            .get(&url)
            .header("last-event-id", last_id.to_string())
            .send()
            .await;
        let mut response = match response {
            Ok(r) if r.status().is_success() => r,
            _ => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        seen.lock().expect("seen").connections += 1;
        let mut parser = SseParser::default();
        'read: loop {
            // Heartbeat comments arrive every 15 s; silence for longer is a dead socket.
            let chunk = match tokio::time::timeout(Duration::from_secs(20), response.chunk()).await
            {
                Ok(Ok(Some(chunk))) => chunk,
                _ => break,
            };
            for frame in parser.feed(&chunk) {
                if frame.event.as_deref() == Some("shutdown") {
                    seen.lock().expect("seen").shutdowns += 1;
                    break 'read;
                }
                if let Some(id) = frame.event_id() {
                    last_id = id;
                    seen.lock().expect("seen").events.push((id, now_ns()));
                }
            }
        }
    }
}

async fn wait_live(http: &reqwest::Client, base: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(response) = http.get(format!("{base}/livez")).send().await {
            if response.status().is_success() {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            anyhow::bail!("pgbus serve did not answer /livez within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !condition() {
        if Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Publishes an event, retrying while the harness's pool reconnects after a PostgreSQL
/// restart. A failed attempt stored nothing: the publisher is held quiet while the server
/// restarts, so no publish is in flight when the connections are lost.
async fn publish(
    backend: &PgBackend,
    stream: &StreamName,
    event: &str,
    data: &str,
) -> anyhow::Result<i64> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match backend.publish(stream, event, data).await {
            Ok(id) => return Ok(id),
            Err(err) if err.is_transient() && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(err) => return Err(err.into()),
        }
    }
}

/// How long a lone event may take to arrive after a fault.
const LONE_EVENT_WITHIN: Duration = Duration::from_secs(15);

/// A lone event: its id, whether the streamer was not listening yet once it was
/// committed (so it missed its notification), and when it arrived (ns after the fault
/// began), if it did.
struct Lone {
    id: i64,
    missed: bool,
    after: Option<u64>,
}

impl Lone {
    fn check(&self, report: &mut ScenarioReport, name: String) {
        let listener = if self.missed {
            "committed before the listener listened again"
        } else {
            "committed after the listener was back"
        };
        let detail = match self.after {
            Some(ns) => format!(
                "event {} ({listener}) {} ms after the fault began",
                self.id,
                ns / 1_000_000
            ),
            None => format!(
                "event {} ({listener}) not within {} s",
                self.id,
                LONE_EVENT_WITHIN.as_secs()
            ),
        };
        report.check(name, self.after.is_some(), detail);
    }
}

/// Publishes one event while the publisher is held quiet and waits for the client to
/// receive it: with nothing published after it, only the streamer's re-read after its
/// listener reconnected can deliver it.
async fn lone_event(
    backend: &PgBackend,
    side: &Side,
    stream: &StreamName,
    published: &Mutex<Vec<i64>>,
    seen: &Mutex<Seen>,
    fault_began: u64,
) -> anyhow::Result<Lone> {
    let id = publish(backend, stream, "lone", "published with nothing after it").await?;
    published.lock().expect("published").push(id);
    let missed = side.count("stream", Counting::Listening).await? == 0;
    let arrived = wait_until(LONE_EVENT_WITHIN, || {
        seen.lock()
            .expect("seen")
            .events
            .iter()
            .any(|(seen, _)| *seen == id)
    })
    .await;
    Ok(Lone {
        id,
        missed,
        after: arrived.ok().map(|()| now_ns() - fault_began),
    })
}
