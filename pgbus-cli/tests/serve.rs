//! `pgbus serve` and `pgbus stream` end to end: the real binary, real HTTP, real
//! Postgres.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use reqwest::blocking::Client;
use reqwest::StatusCode;
use serde_json::{json, Value};

mod common;
use common::*;

fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("an HTTP client")
}

fn overview(served: &Served) -> Value {
    client()
        .get(served.url("/api/overview"))
        .send()
        .and_then(|r| r.error_for_status())
        .and_then(|r| r.json())
        .expect("the overview")
}

fn queue_in(overview: &Value, queue: &str) -> Option<Value> {
    overview["queues"]
        .as_array()?
        .iter()
        .find(|q| q["queue"] == queue)
        .cloned()
}

#[test]
fn a_non_loopback_address_needs_a_token() {
    let db = Db::new();
    let out = db.run(&["serve", "--listen", "0.0.0.0:0"]).fails();
    assert!(out.stderr.contains("needs --token"), "{}", out.stderr);
}

#[test]
fn without_a_token_only_loopback_host_names_are_served() {
    let db = Db::new();
    let served = Served::start(&db, free_port(), &[], &[]);
    let port = served.port;
    let status = |path: &str, host: &str| {
        client()
            .get(served.url(path))
            .header("host", host)
            .send()
            .expect("a response")
            .status()
    };
    // A page that rebinds its own name to 127.0.0.1 sends that name.
    for path in ["/", "/api/overview", "/metrics", "/livez"] {
        assert_eq!(
            status(path, &format!("evil.example:{port}")),
            StatusCode::MISDIRECTED_REQUEST,
            "{path}"
        );
    }
    // Nor may another site frame the dashboard.
    let page = client().get(served.url("/")).send().expect("the dashboard");
    assert_eq!(page.headers()["x-frame-options"], "DENY");
    assert_eq!(
        page.headers()["content-security-policy"],
        "frame-ancestors 'none'"
    );
    for host in [
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
    ] {
        assert_eq!(status("/api/overview", &host), StatusCode::OK, "{host}");
    }
    assert!(served.stop().success());
}

#[test]
fn the_overview_and_metrics_show_topics_schedules_and_open_breakers() {
    let db = Db::new();
    db.ok(&[
        "queue",
        "create",
        "billing",
        "--max-attempts",
        "100",
        "--breaker-failures",
        "1",
        "--breaker-backoff",
        "1h",
    ]);
    db.ok(&["topic", "bind", "order.*", "billing"]);
    db.ok(&["publish", "order.paid", r#"{"order":42}"#]);
    db.ok(&["publish", "invoice.sent", r#"{"invoice":7}"#]);
    // One failure opens the breaker; `--until-empty` then ends with the job left.
    db.work(&["billing", "--exec", "exit 1", "--until-empty"]);
    let config = db.path("tasks.json");
    std::fs::write(
        &config,
        json!([{"name": "nightly_report", "queue": "billing", "cron": "0 3 * * *",
                "payload": {"kind": "nightly"}}])
        .to_string(),
    )
    .unwrap();
    let (mut scheduler, _stderr) = db.spawn(&["cron", "run", "--config", config.to_str().unwrap()]);
    // Declared, then led: the leader records the next occurrence.
    eventually("the task declared and its next run recorded", SHORT, || {
        db.ok(&["cron", "list", "--json"])
            .json()
            .as_array()
            .and_then(|t| t.first().cloned())
            .is_some_and(|task| task["next_at"].is_string())
    });
    scheduler.stop();

    let served = Served::start(&db, free_port(), &[], &[]);
    eventually("topics and schedules in the overview", SHORT, || {
        let o = overview(&served);
        o["topics"].as_array().is_some_and(|t| t.len() == 2)
            && o["schedules"].as_array().is_some_and(|s| s.len() == 1)
    });
    let o = overview(&served);
    let topic = |key: &str| {
        o["topics"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["routing_key"] == key)
            .cloned()
            .unwrap_or_else(|| panic!("{key} in {}", o["topics"]))
    };
    assert_eq!(
        (
            topic("order.paid")["copies"].clone(),
            topic("order.paid")["unrouted"].clone()
        ),
        (json!(1), json!(0))
    );
    assert_eq!(topic("invoice.sent")["unrouted"], 1);
    assert_eq!(o["schedules"][0]["task"], "nightly_report");
    assert!(
        o["schedules"][0]["next_at"]
            .as_str()
            .is_some_and(|next| next.contains("T03:00:00")),
        "{}",
        o["schedules"]
    );
    let billing = queue_in(&o, "billing").expect("billing");
    assert!(
        billing["breaker_open_for_ms"]
            .as_u64()
            .is_some_and(|ms| ms > 0),
        "{billing}"
    );

    let metrics = client()
        .get(served.url("/metrics"))
        .send()
        .and_then(|r| r.text())
        .expect("the metrics");
    for sample in [
        r#"pgbus_queue_breaker_open{queue="billing"} 1"#,
        r#"pgbus_topic_unrouted{routing_key="invoice.sent"} 1"#,
        r#"pgbus_topic_unrouted{routing_key="order.paid"} 0"#,
        "pgbus_batches_open 0",
    ] {
        assert!(
            metrics.lines().any(|line| line == sample),
            "{sample} in\n{metrics}"
        );
    }
    assert!(served.stop().success());
}

#[test]
fn the_token_can_come_from_pgbus_token() {
    let db = Db::new();
    let served = Served::start(
        &db,
        free_port(),
        &[],
        &[("PGBUS_TOKEN", "from-the-env-1234")],
    );
    let status = |token: Option<&str>| {
        let mut request = client().get(served.url("/api/overview"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        request.send().expect("a response").status()
    };
    assert_eq!(status(None), StatusCode::UNAUTHORIZED);
    assert_eq!(status(Some("from-the-env-1234")), StatusCode::OK);
    assert!(served.stop().success());
}

#[test]
fn the_token_guards_everything_but_health_and_streams() {
    let db = Db::new();
    let served = Served::start(&db, free_port(), &["--token", "sesame-1234"], &[]);
    let http = client();
    let status = |path: &str, auth: Option<&str>| {
        let mut request = http.get(served.url(path));
        if let Some(token) = auth {
            request = request.bearer_auth(token);
        }
        request.send().expect("a response").status()
    };
    assert_eq!(status("/api/overview", None), StatusCode::UNAUTHORIZED);
    assert_eq!(status("/metrics", None), StatusCode::UNAUTHORIZED);
    assert_eq!(status("/", None), StatusCode::UNAUTHORIZED);
    assert_eq!(
        status("/api/overview", Some("wrong-token")),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(status("/api/overview", Some("sesame-1234")), StatusCode::OK);
    // With a token, the server may sit behind any name (a proxy, a LAN address).
    let behind_a_name = http
        .get(served.url("/api/overview"))
        .header("host", "pgbus.internal.example")
        .bearer_auth("sesame-1234")
        .send()
        .expect("a response");
    assert_eq!(behind_a_name.status(), StatusCode::OK);
    assert_eq!(status("/metrics", Some("sesame-1234")), StatusCode::OK);
    assert_eq!(status("/livez", None), StatusCode::OK);
    assert_eq!(status("/readyz", None), StatusCode::OK);
    // A stream URL is guarded by its signature instead: an unsigned one is 404, not 401.
    assert_eq!(
        status("/streams/orders.forged", None),
        StatusCode::NOT_FOUND
    );

    // A browser opens /?token=... once: a cookie, and the same path without the token.
    let response = http
        .get(served.url("/?token=sesame-1234"))
        .send()
        .expect("a response");
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(response.headers()["location"], "/");
    let cookie = response.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap();
    let page = http
        .get(served.url("/"))
        .header("cookie", pair)
        .send()
        .expect("a response");
    assert_eq!(page.status(), StatusCode::OK);
    assert!(page.text().unwrap().contains("<title>pgbus</title>"));
    assert!(served.stop().success());
}

#[test]
fn the_api_shows_queues_and_recovers_dead_letters() {
    let db = Db::new();
    db.ok(&["queue", "create", "billing", "--max-attempts", "1"]);
    let served = Served::start(&db, free_port(), &[], &[]);
    eventually("billing in the overview", SHORT, || {
        queue_in(&overview(&served), "billing").is_some()
    });
    db.send("billing", &json!({"n": 1}));
    db.send("billing", &json!({"n": 2}));
    eventually("a depth of 2", SHORT, || {
        queue_in(&overview(&served), "billing").is_some_and(|q| q["depth"] == 2)
    });
    db.work(&["billing", "--exec", "exit 65", "--until-empty"]);

    let http = client();
    let dead: Value = http
        .get(served.url("/api/queues/billing/dead"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let dead = dead.as_array().expect("a list is a bare array").clone();
    assert_eq!(dead.len(), 2, "{dead:?}");
    let ns: Vec<&Value> = dead.iter().map(|d| &d["payload"]["n"]).collect();
    assert!(
        ns.contains(&&json!(1)) && ns.contains(&&json!(2)),
        "{dead:?}"
    );
    let first = dead[0]["id"].as_i64().unwrap();

    // A POST that is not JSON is refused: a cross-site form cannot retry for the user.
    let refused = http
        .post(served.url("/api/queues/billing/dead/retry"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("all=true")
        .send()
        .unwrap();
    assert_eq!(refused.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    let bad = http
        .post(served.url("/api/queues/billing/dead/retry"))
        .json(&json!({"ids": [first], "all": true}))
        .send()
        .unwrap();
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let bad_name = http
        .post(served.url("/api/queues/Bad%20Name/pause"))
        .json(&json!({}))
        .send()
        .unwrap();
    assert_eq!(bad_name.status(), StatusCode::BAD_REQUEST);
    let missing = http
        .post(served.url("/api/queues/nosuchqueue/pause"))
        .json(&json!({}))
        .send()
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);

    let retried: Value = http
        .post(served.url("/api/queues/billing/dead/retry"))
        .json(&json!({"ids": [first]}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(retried["retry"], 1);
    let discarded: Value = http
        .post(served.url("/api/queues/billing/dead/discard"))
        .json(&json!({"all": true}))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(discarded["discard"], 1);
    let stats = db.queue_stats("billing");
    assert_eq!(
        (stats["depth"].as_u64(), stats["dead_lettered"].as_u64()),
        (Some(1), Some(0))
    );

    let paused = http
        .post(served.url("/api/queues/billing/pause"))
        .json(&json!({}))
        .send()
        .unwrap();
    assert_eq!(paused.status(), StatusCode::OK);
    assert_eq!(db.queue_stats("billing")["paused"], true);

    eventually("metrics for billing", SHORT, || {
        let text = http
            .get(served.url("/metrics"))
            .send()
            .unwrap()
            .text()
            .unwrap();
        text.contains("pgbus_queue_paused{queue=\"billing\"} 1")
            && text.contains("pgbus_queue_ready{queue=\"billing\"} 1")
            && text.contains("pgbus_up 1")
    });
    assert!(served.stop().success());
}

/// Reads SSE frames (as `field: value` lines, blank line ends a frame) until `n` frames
/// whose `event:` is not a comment have arrived.
fn read_frames(reader: &mut impl BufRead, n: usize) -> Vec<Vec<String>> {
    let mut frames = Vec::new();
    let mut frame = Vec::new();
    while frames.len() < n {
        let mut line = String::new();
        assert!(
            reader.read_line(&mut line).expect("reading the stream") > 0,
            "the stream ended after {frames:?}"
        );
        let line = line.trim_end_matches('\n').to_owned();
        if line.is_empty() {
            if frame.iter().any(|l: &String| l.starts_with("event:")) {
                frames.push(std::mem::take(&mut frame));
            } else {
                frame.clear();
            }
        } else if !line.starts_with(':') && !line.starts_with("retry:") {
            frame.push(line);
        }
    }
    frames
}

#[test]
fn stream_publish_reaches_a_follower_and_shutdown_tells_it() {
    let db = Db::new();
    let secret = [("PGBUS_STREAM_SECRET", "a-test-secret-of-enough-bytes")];
    let mut url = db.cmd(&["stream", "url", "orders"]);
    url.envs(secret);
    let path = run(url, None, SHORT).ok().stdout.trim().to_owned();
    assert!(path.starts_with("/streams/orders."), "{path}");

    let first = db.ok(&["stream", "publish", "orders", "before", "--event", "order"]);
    let first_id: i64 = first.stdout.trim().parse().expect("an event id");

    let served = Served::start(&db, free_port(), &[], &secret);
    // A tampered signature is refused.
    let tampered = format!("{}x", path);
    assert_eq!(
        client().get(served.url(&tampered)).send().unwrap().status(),
        StatusCode::NOT_FOUND
    );
    let response = client()
        .get(served.url(&path))
        .header("last-event-id", (first_id - 1).to_string())
        .timeout(Duration::from_secs(120))
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut reader = BufReader::new(response);
    let replayed = read_frames(&mut reader, 1);
    assert_eq!(
        replayed[0],
        vec![
            format!("id: {first_id}"),
            "event: order".into(),
            "data: before".into()
        ]
    );

    let second = db.ok(&[
        "stream",
        "publish",
        "orders",
        "line one\nid: 1",
        "--event",
        "order",
    ]);
    let second_id: i64 = second.stdout.trim().parse().unwrap();
    let ephemeral = db.ok(&[
        "stream",
        "publish",
        "orders",
        "typing",
        "--event",
        "presence",
        "--ephemeral",
    ]);
    assert_eq!(ephemeral.stdout.trim(), "broadcast");
    let live = read_frames(&mut reader, 2);
    assert_eq!(
        live[0],
        vec![
            format!("id: {second_id}"),
            "event: order".into(),
            "data: line one".into(),
            "data: id: 1".into()
        ],
        "a payload line cannot forge an id"
    );
    assert_eq!(
        live[1],
        vec!["event: presence".to_owned(), "data: typing".into()]
    );

    let process = &served.process.0;
    terminate(process);
    let sentinel = read_frames(&mut reader, 1);
    assert_eq!(
        sentinel[0],
        vec!["event: shutdown".to_owned(), "data: ".into()]
    );
    let mut rest = String::new();
    assert_eq!(
        std::io::Read::read_to_string(&mut reader, &mut rest).unwrap_or(0),
        0,
        "the response ends after the sentinel: {rest:?}"
    );
    assert!(served.stop().success());
}

/// `pgbus stream url` signs with an expiry (24 h unless `--ttl` or `--no-expiry`); an
/// expired path is refused with 403. `PGBUS_STREAM_SECRET` is a key ring: the first secret
/// signs, every one verifies, so paths signed before a rotation keep working until the old
/// secret is removed.
#[test]
fn stream_urls_expire_and_outlive_a_key_rotation_until_the_old_key_is_removed() {
    const OLD: &str = "the-old-secret-of-enough-bytes";
    const NEW: &str = "the-new-secret-of-enough-bytes";
    let db = Db::new();
    let sign = |secret: &str, extra: &[&str]| {
        let mut args = vec!["stream", "url", "orders"];
        args.extend_from_slice(extra);
        let mut cmd = db.cmd(&args);
        cmd.env("PGBUS_STREAM_SECRET", secret);
        run(cmd, None, SHORT).ok().stdout.trim().to_owned()
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let default = sign(OLD, &[]);
    let expiry: u64 = default
        .split('.')
        .nth(1)
        .unwrap()
        .parse()
        .expect("an expiry");
    assert!(
        (now + 23 * 3600..=now + 25 * 3600).contains(&expiry),
        "{default}: expires {expiry}, now {now}"
    );
    let short = sign(OLD, &["--ttl", "1s"]);
    let forever = sign(OLD, &["--no-expiry"]);
    assert_eq!(forever.matches('.').count(), 1, "{forever}");

    let ring = format!("{NEW},{OLD}");
    let served = Served::start(&db, free_port(), &[], &[("PGBUS_STREAM_SECRET", &ring)]);
    let status = |path: &str| client().get(served.url(path)).send().unwrap().status();
    assert_eq!(
        status(&forever),
        StatusCode::OK,
        "an old key still verifies"
    );
    assert_eq!(status(&default), StatusCode::OK);
    eventually("the 1 s path to expire", SHORT, || {
        status(&short) == StatusCode::FORBIDDEN
    });
    let refused = client().get(served.url(&short)).send().unwrap();
    assert!(refused.text().unwrap().contains("expired"));
    // Moving the expiry is a forgery.
    let moved = short.replacen(
        &format!(".{}.", short.split('.').nth(1).unwrap()),
        ".99999999999.",
        1,
    );
    assert_eq!(status(&moved), StatusCode::NOT_FOUND);
    assert!(served.stop().success());

    let rotated = Served::start(&db, free_port(), &[], &[("PGBUS_STREAM_SECRET", NEW)]);
    let status = |path: &str| client().get(rotated.url(path)).send().unwrap().status();
    assert_eq!(
        status(&forever),
        StatusCode::NOT_FOUND,
        "the old key was removed"
    );
    assert_eq!(
        status(&sign(&ring, &["--no-expiry"])),
        StatusCode::OK,
        "the ring signs with its first key"
    );
    assert!(rotated.stop().success());
}

/// Without `PGBUS_STREAM_SECRET`, the generated secret file is private; one that others
/// may read is refused in one line.
#[test]
fn the_generated_stream_secret_is_private_and_a_readable_one_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    let db = Db::new();
    let home = tempfile::tempdir().expect("a temporary directory");
    let url = || {
        let mut cmd = db.cmd(&["stream", "url", "orders"]);
        cmd.env("PGBUS_HOME", home.path())
            .env_remove("PGBUS_STREAM_SECRET");
        run(cmd, None, SHORT)
    };
    let first = url().ok().stdout;
    let file = home.path().join("stream-secret");
    let mode = std::fs::metadata(&file).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(url().ok().stdout.split('.').next(), first.split('.').next());
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let refused = url().fails();
    let line = refused.stderr.trim();
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(line.contains("chmod 600"), "{line}");
}

// ---------------------------------------------------------------------------------------
// Under abuse: held sockets, the open-files limit
// ---------------------------------------------------------------------------------------

/// How long `pgbus serve` waits for a request's header (and for the next request on an
/// idle kept-alive connection).
const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// Added to `HEADER_TIMEOUT` wherever the test waits on it: a loaded machine is slow, and
/// only a server that never frees its sockets should miss it.
const SLACK: Duration = Duration::from_secs(30);

/// Raises this test process's own soft open-files limit so that it can hold `needed`
/// sockets (a test that cannot hold them fails instead of passing without them).
fn allow_open_files(needed: u64) -> Option<u64> {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    assert!(
        limit.maximum.is_none_or(|hard| hard >= needed),
        "this test holds {needed} sockets; the hard open-files limit is {:?}",
        limit.maximum
    );
    if limit.current.is_some_and(|soft| soft < needed) {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            },
        )
        .expect("raising the open-files limit to the hard limit");
    }
    limit.maximum
}

/// `pgbus serve` started by `sh` after `limits` (`ulimit` commands), its standard error
/// passed on line by line.
struct LimitedServe {
    port: u16,
    process: Background,
    log: mpsc::Receiver<String>,
}

impl LimitedServe {
    fn start(db: &Db, limits: &str) -> LimitedServe {
        let port = free_port();
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("{limits} && exec \"$0\" \"$@\""))
            .arg(PGBUS)
            .args(["--database-url", &db.url, "serve", "--refresh", "200ms"])
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"));
        for var in ["DATABASE_URL", "PGBUS_LOG", "PGBUS_HOME", "PGBUS_TOKEN"] {
            cmd.env_remove(var);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut process = Background(cmd.spawn().expect("starting pgbus serve under sh"));
        let stderr = process.0.stderr.take().expect("stderr is piped");
        let (lines, log) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                eprintln!("pgbus serve: {line}");
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
        wait_listening(&mut process.0, port);
        LimitedServe { port, process, log }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Waits for a line of the log that contains `text`; returns it.
    #[track_caller]
    fn log_line(&self, text: &str) -> String {
        let deadline = Instant::now() + SHORT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.log.recv_timeout(left) {
                Ok(line) if line.contains(text) => return line,
                Ok(_) => {}
                Err(_) => panic!("no log line with {text:?} within {SHORT:?}"),
            }
        }
    }

    fn running(&mut self) -> bool {
        matches!(self.process.0.try_wait(), Ok(None))
    }

    /// SIGTERM, then the exit status.
    fn stop(mut self) -> ExitStatus {
        terminate(&self.process.0);
        let status = wait_deadline(&mut self.process.0, SHORT).expect("pgbus serve stopped");
        self.process.stop();
        status
    }
}

/// Reads from `socket` until the bytes end with `end` (or the connection closes).
fn read_until(socket: &mut TcpStream, end: &[u8]) -> Vec<u8> {
    let mut bytes = Vec::new();
    let mut buf = [0u8; 1024];
    while !bytes.ends_with(end) {
        match socket.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => bytes.extend_from_slice(&buf[..n]),
        }
    }
    bytes
}

/// With its open-files limit at 1,024 (soft and hard, so it cannot be raised), `pgbus
/// serve` is held by 1,100 sockets that send half a request line or nothing at all: it
/// keeps files for the database, times the held sockets out, and answers `/livez` again
/// within the header timeout while they are still open; an idle kept-alive connection
/// is closed too.
#[test]
fn held_half_open_sockets_do_not_lock_out_the_server() {
    const SOCKETS: usize = 1_100;
    allow_open_files(SOCKETS as u64 + 256);
    let db = Db::new();
    let mut served = LimitedServe::start(&db, "ulimit -n 1024");
    let port = served.port;

    // A kept-alive connection that got its answer and then stays idle.
    let mut idle = TcpStream::connect(("127.0.0.1", port)).expect("connecting");
    idle.write_all(format!("GET /livez HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").as_bytes())
        .unwrap();
    idle.set_read_timeout(Some(SHORT)).unwrap();
    let answer = read_until(&mut idle, b"ok\n");
    assert!(
        answer.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    // Half a request line on every other socket, nothing on the rest.
    let held: Vec<TcpStream> = (0..SOCKETS)
        .map(|i| {
            let mut socket = TcpStream::connect(("127.0.0.1", port))
                .unwrap_or_else(|e| panic!("connecting socket {i}: {e}"));
            if i % 2 == 0 {
                socket.write_all(b"GET /livez HT").unwrap();
            }
            socket
        })
        .collect();

    let asked = Instant::now();
    let livez = Client::builder()
        .timeout(HEADER_TIMEOUT + SLACK)
        .build()
        .unwrap()
        .get(served.url("/livez"))
        .send();
    let waited = asked.elapsed();
    let livez = livez.unwrap_or_else(|e| {
        panic!("/livez did not answer within {waited:?} while {SOCKETS} sockets were held: {e}")
    });
    assert_eq!(livez.status(), StatusCode::OK);
    assert!(served.running(), "pgbus serve exited");
    // The database still gets connections: /readyz opens one.
    assert_eq!(
        client().get(served.url("/readyz")).send().unwrap().status(),
        StatusCode::OK
    );
    // The kept-alive connection was idle far longer than the timeout: closed.
    idle.set_read_timeout(Some(SLACK)).unwrap();
    let mut rest = [0u8; 64];
    assert!(
        matches!(idle.read(&mut rest), Ok(0)),
        "the idle kept-alive connection is still open"
    );
    assert_eq!(held.len(), SOCKETS, "held until here");
    drop(held);
    // The limit did apply (1,024 less the files kept for the pool and the process).
    let line = served.log_line("open-files limit");
    assert!(
        line.contains("at most 952 connections") && line.contains("open-files limit 1024"),
        "{line}"
    );
    assert!(served.stop().success());
}

/// `pgbus serve` raises its soft open-files limit to the hard one and sizes its
/// connection cap from it.
#[test]
fn serve_raises_its_open_files_limit_to_the_hard_limit() {
    let hard = allow_open_files(0).expect("a finite hard open-files limit");
    let db = Db::new();
    let served = LimitedServe::start(&db, "ulimit -S -n 512");
    let line = served.log_line("open-files limit");
    assert!(line.contains(&format!("open-files limit {hard}")), "{line}");
    assert!(served.stop().success());
}
