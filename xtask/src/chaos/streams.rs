//! Scenario 5, streams under faults: an SSE client follows a durable stream served by `pgbus
//! serve` while the server is restarted (SIGTERM and SIGKILL) and its `pgbus:stream`
//! listener connection is terminated; it resumes with `Last-Event-ID` and must end up
//! with every published event exactly once, in order.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, TcpListener};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use pgbus_core::{StreamName, StreamStore};
use pgbus_stream::parse::SseParser;
use pgbus_stream::Signer;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::Rng;

use super::env::{Env, Procs};
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
}

pub(crate) async fn streams(
    env: &Env,
    plan: &Plan,
    rng: &mut StdRng,
) -> anyhow::Result<ScenarioReport> {
    let mut report = ScenarioReport::new(
        "streams",
        "SSE stream across server restarts and listener kills (Last-Event-ID resume)",
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
                let id = backend
                    .publish(&stream, "tick", &n.to_string())
                    .await
                    .with_context(|| format!("publishing event {n}"))?;
                published.lock().expect("published").push(id);
            }
            anyhow::Ok(())
        })
    };

    let mut faults: Vec<Fault> = std::iter::repeat_n(
        [Fault::Restart, Fault::Kill, Fault::Listener],
        plan.stream_fault_rounds,
    )
    .flatten()
    .collect();
    faults.shuffle(rng);
    let mut at: Vec<f64> = (0..faults.len())
        .map(|_| rng.random_range(0.1..0.8))
        .collect();
    at.sort_by(f64::total_cmp);
    let (mut restarts, mut kills, mut terminated) = (0, 0, 0);
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
                let id = db
                    .backend
                    .publish(&stream, "gap", "published while the listener was down")
                    .await?;
                published.lock().expect("published").push(id);
                let delivered = wait_until(Duration::from_secs(15), || {
                    seen.lock()
                        .expect("seen")
                        .events
                        .iter()
                        .any(|(seen, _)| *seen == id)
                })
                .await;
                let took = Duration::from_nanos(now_ns() - from);
                report.check(
                    format!("fault {}: an event published while the listener was down arrives with nothing published after it", i + 1),
                    delivered.is_ok(),
                    if delivered.is_ok() {
                        format!("event {id} after {} ms", took.as_millis())
                    } else {
                        format!("event {id} not within 15 s")
                    },
                );
                drop(quiet);
                format!("{n} pgbus:stream connection(s) terminated")
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
        if matches!(fault, Fault::Listener) {
            let back = wait_for_role(&db.side, "stream", Duration::from_secs(30)).await?;
            report.check(
                format!("fault {}: pgbus:stream listener reconnected", i + 1),
                back.is_some(),
                back.map_or("not within 30 s".to_owned(), |d| {
                    format!("after {} ms", d.as_millis())
                }),
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
    let unexpected = server.unexpected_exits();
    report.check(
        "pgbus serve never died by itself",
        unexpected.is_empty(),
        if unexpected.is_empty() {
            "none".to_owned()
        } else {
            unexpected.join("; ")
        },
    );
    report.check(
        "pgbus serve stops cleanly at the end",
        stop_problems.is_empty(),
        if stop_problems.is_empty() {
            "exited 0".to_owned()
        } else {
            stop_problems.join("; ")
        },
    );
    report.fault_summary = format!(
        "{restarts} SIGTERM + {kills} SIGKILL restarts, {terminated} pgbus:stream terminated"
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

/// How long until a `pgbus:<role>` connection exists again, if within `timeout`.
async fn wait_for_role(
    side: &super::env::Side,
    role: &str,
    timeout: Duration,
) -> anyhow::Result<Option<Duration>> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if !side.role_pids(role).await?.is_empty() {
            return Ok(Some(started.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(None)
}
