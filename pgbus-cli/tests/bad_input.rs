//! Bad input through the `pgbus` command and `pgbus serve`, end to end with the real
//! binary and real Postgres: oversized payloads, invalid UTF-8 on standard input, SQL
//! metacharacters in every name, out-of-range delays and priorities, malformed HTTP.
//! Each is one clear error line (or a 4xx, or a closed connection for garbage), nothing
//! of a refused batch is stored, and the server keeps serving.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use reqwest::blocking::Client;
use reqwest::StatusCode;
use serde_json::json;

mod common;
use common::*;

const INJECTION: &str = "x'; drop table pgbus.messages; --";
const SECRET: [(&str, &str); 1] = [("PGBUS_STREAM_SECRET", "a-test-secret-of-enough-bytes")];
/// The payload limit of a CLI send (the backend's default: the CLI exposes none).
const LIMIT: usize = 1024 * 1024;

/// Asserts a failed command said one line naming `what`.
#[track_caller]
fn one_line_error(run: Run, what: &[&str]) -> String {
    let run = run.fails();
    let stderr = run.stderr.trim().to_owned();
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    for w in what {
        assert!(stderr.contains(w), "{w:?} not in: {stderr}");
    }
    stderr
}

/// Asserts a command refused its arguments the way clap does: exit 2, the first line
/// `error: ...` naming `what`.
#[track_caller]
fn usage_error(run: Run, what: &[&str]) {
    assert_eq!(run.status.code(), Some(2), "{run:?}");
    let first = run.stderr.lines().next().unwrap_or_default();
    assert!(first.starts_with("error: "), "{}", run.stderr);
    for w in what {
        assert!(first.contains(w), "{w:?} not in: {first}");
    }
}

/// Each table an injection would hit still exists and holds `rows` rows.
#[track_caller]
fn tables_hold(db: &Db, queue: &str, depth: u64, dead: usize) {
    assert_eq!(db.depth(queue), depth, "{:#}", db.stats());
    assert_eq!(db.dead(queue).len(), dead);
    let queues = db.ok(&["queue", "list", "--json"]).json();
    assert!(
        queues
            .as_array()
            .unwrap()
            .iter()
            .any(|q| q["name"] == queue),
        "{queues:#}"
    );
}

#[test]
fn oversized_payloads_and_invalid_utf8_are_refused_by_line() {
    let db = Db::new();
    db.ok(&["queue", "create", "q"]);

    // Exactly the limit is sent (a JSON string is its text plus two quotes).
    let at_limit = format!("\"{}\"\n", "x".repeat(LIMIT - 2));
    db.send_stdin(&["send", "q"], at_limit.clone()).ok();
    assert_eq!(db.depth("q"), 1);

    // One byte over, in the second batch: the first batch went out, nothing of the second.
    let over = format!("\"{}\"\n", "x".repeat(LIMIT - 1));
    let input = format!("1\n2\n3\n{over}4\n");
    let err = one_line_error(
        db.send_stdin(&["send", "q", "--batch", "2"], input),
        &[
            "line 4",
            "2 messages sent before it",
            "exceeds the limit of 1048576 bytes",
        ],
    );
    assert!(
        err.len() < 400,
        "the payload is not echoed: {} bytes",
        err.len()
    );
    assert_eq!(db.depth("q"), 3);

    // Invalid UTF-8 on line 3: named, and nothing of its batch (lines 3 and 4) sent.
    let mut input = b"{\"n\":1}\n{\"n\":2}\n{\"n\":\"caf".to_vec();
    input.extend_from_slice(b"\xe9\"}\n{\"n\":4}\n");
    let out = run(db.cmd(&["send", "q", "--batch", "2"]), Some(input), SHORT);
    one_line_error(
        out,
        &["line 3", "not valid UTF-8", "2 messages sent before it"],
    );
    assert_eq!(db.depth("q"), 5);

    // The same holds for events.
    db.ok(&["topic", "bind", "order.#", "q"]);
    let out = run(
        db.cmd(&["publish", "order.paid"]),
        Some(b"{}\n\xff\xfe\n".to_vec()),
        SHORT,
    );
    one_line_error(
        out,
        &["line 2", "not valid UTF-8", "0 events sent before it"],
    );
    let out = db.send_stdin(&["publish", "order.paid"], format!("{{}}\n{over}"));
    one_line_error(out, &["line 2", "exceeds the limit"]);
    assert_eq!(db.depth("q"), 5, "no event copy was delivered");
}

/// A 20 MB line is refused once twice the payload limit is read (not read whole), in one
/// line naming it, and nothing of its batch is sent.
#[test]
fn a_line_far_past_the_limit_is_refused_while_reading_it() {
    let db = Db::new();
    db.ok(&["queue", "create", "q"]);
    let huge = format!("1\n2\n\"{}\"\n3\n", "x".repeat(20_000_000));
    one_line_error(
        db.send_stdin(&["send", "q"], huge),
        &[
            "line 3 refused",
            "0 messages sent before it",
            "longer than 2097152 bytes",
        ],
    );
    assert_eq!(db.depth("q"), 0);
}

#[test]
fn sql_metacharacters_in_names_are_refused_and_keys_are_stored_verbatim() {
    let db = Db::new();
    db.ok(&["queue", "create", "victim"]);
    db.send("victim", &json!({"n": 1}));
    db.ok(&["send", "victim", "{}", "--group", INJECTION]);
    db.ok(&["topic", "bind", "order.*", "victim"]);
    db.ok(&["publish", "order.paid", "{}"]);

    let name_cases: Vec<Vec<&str>> = vec![
        vec!["queue", "create", INJECTION],
        vec!["queue", "pause", INJECTION],
        vec!["queue", "purge", INJECTION],
        vec!["queue", "drop", INJECTION],
        vec!["send", INJECTION, "{}"],
        vec!["dlq", "list", INJECTION],
        vec!["dlq", "retry", INJECTION, "--all"],
        vec!["work", INJECTION, "--exec", "true", "--until-empty"],
        vec!["topic", "bind", "order.*", INJECTION],
        vec!["topic", "bind", INJECTION, "victim"],
        vec!["topic", "unbind", INJECTION, "victim"],
        vec!["publish", INJECTION, "{}"],
        vec!["stream", "publish", INJECTION, "data"],
        vec!["stream", "url", INJECTION],
    ];
    for args in &name_cases {
        let err = one_line_error(db.run(args), &["invalid"]);
        assert!(
            err.contains("[a-z0-9_]") || err.contains("[A-Za-z0-9_-]"),
            "`{}` names the rule: {err}",
            args.join(" ")
        );
    }
    // Dead-letter ids are numbers: clap refuses anything else before a connection opens.
    for id in [
        "1; drop table pgbus.messages",
        "1'",
        "0x10",
        "99999999999999999999",
    ] {
        usage_error(db.run(&["dlq", "retry", "victim", id]), &["invalid value"]);
    }
    // Ids that do not exist (negative, zero, the largest) touch nothing, and are named.
    for id in ["-1", "0", "9223372036854775807"] {
        for verb in ["discard", "retry"] {
            let what = format!("not dead-lettered in queue victim: {id} (nothing");
            one_line_error(db.run(&["dlq", verb, "victim", "--", id]), &[&what]);
        }
    }
    tables_hold(&db, "victim", 3, 0);

    // A group key is free text, bound as a parameter: it comes back as sent.
    let seen = db.path("groups");
    db.work(&[
        "victim",
        "--exec",
        &format!("printf '%s\\n' \"$PGBUS_GROUP\" >> {}", sh_quote(&seen)),
        "--until-empty",
    ]);
    assert!(
        lines(&seen).iter().any(|l| l == INJECTION),
        "{:?}",
        lines(&seen)
    );
    tables_hold(&db, "victim", 0, 0);
}

#[test]
fn delays_and_priorities_out_of_range_are_refused() {
    let db = Db::new();
    db.ok(&["queue", "create", "q"]);
    for priority in ["99999", "-40000", "32768", "-32769", "1.5", "high"] {
        usage_error(
            db.run(&["send", "q", "{}", "--priority", priority]),
            &["invalid value", "--priority"],
        );
    }
    for priority in ["32767", "-32768"] {
        db.ok(&["send", "q", "{}", "--priority", priority]);
    }
    for delay in ["-5s", "abc", "99999999999999999999s", "5"] {
        let flag = format!("--delay={delay}");
        usage_error(db.run(&["send", "q", "{}", &flag]), &["--delay"]);
    }
    // Beyond 100 years is refused by the same rule as the library's, by line on stdin.
    one_line_error(
        db.run(&["send", "q", "{}", "--delay", "101years"]),
        &["longer than the limit", "100 years"],
    );
    one_line_error(
        db.send_stdin(&["send", "q", "--delay", "1000years"], "{}\n{}\n".into()),
        &["line 1", "longer than the limit"],
    );
    db.ok(&["send", "q", "{}", "--delay", "100years"]);
    let stats = db.queue_stats("q");
    assert_eq!(
        (stats["ready"].as_u64(), stats["scheduled"].as_u64()),
        (Some(2), Some(1)),
        "{stats:#}"
    );
}

#[test]
fn argument_errors_name_the_fix() {
    let db = Db::new();
    db.ok(&["queue", "create", "q"]);
    let config = db.path("tasks.json");
    std::fs::write(&config, "[]").unwrap();
    let config = config.to_str().unwrap();
    // A negative duration is one, not a flag to pass after `--`.
    for args in [
        &["send", "q", "{}", "--delay", "-5s"][..],
        &["work", "q", "--exec", "true", "--job-timeout", "-1m"],
    ] {
        let run = db.run(args);
        assert!(!run.stderr.contains("-- -"), "{}", run.stderr);
        usage_error(run, &["negative durations are not allowed"]);
    }
    // Zero where zero makes no sense.
    for args in [
        &["queue", "create", "z", "--lease", "0s"][..],
        &[
            "queue",
            "create",
            "z",
            "--breaker-failures",
            "1",
            "--breaker-backoff",
            "0ms",
        ],
        &["cron", "run", "--config", config, "--lease", "0s"],
        &["work", "q", "--exec", "true", "--poll-interval", "0s"],
        &["work", "q", "--exec", "true", "--job-timeout", "0s"],
        &["relay", "--poll-interval", "0s"],
        &["serve", "--refresh", "0s"],
    ] {
        usage_error(db.run(args), &["must be more than zero"]);
    }
    assert_eq!(
        db.ok(&["queue", "list", "--json"])
            .json()
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    // Either of two arguments: the error names both.
    usage_error(db.run(&["dlq", "retry", "q"]), &["message ids or --all"]);
    usage_error(db.run(&["dlq", "discard", "q"]), &["message ids or --all"]);
    usage_error(db.run(&["work", "q"]), &["--exec", "--http"]);
    // An address without a port says what one looks like.
    for listen in ["localhost", "127.0.0.1", "nowhere:80", "[::1]"] {
        usage_error(
            db.run(&["serve", "--listen", listen]),
            &[
                "--listen",
                "expected IP:PORT or localhost:PORT, e.g. 127.0.0.1:8080",
            ],
        );
    }
    // localhost:PORT is 127.0.0.1:PORT.
    let port = free_port();
    let listen = format!("localhost:{port}");
    let (mut served, _stderr) = db.spawn(&["serve", "--listen", &listen]);
    eventually("`serve --listen localhost:PORT` to listen", SHORT, || {
        listening(port)
    });
    served.stop();
}

#[test]
fn a_command_whose_error_output_holds_nul_still_dead_letters() {
    let db = Db::new();
    db.ok(&["queue", "create", "q", "--max-attempts", "1"]);
    let id = db.send("q", &json!({"n": 1}));
    db.work(&[
        "q",
        "--exec",
        "printf 'bad\\000output' >&2; exit 1",
        "--until-empty",
    ]);
    let dead = db.dead("q");
    let error = dead[&id]["error"].as_str().unwrap_or_default().to_owned();
    assert!(error.contains("bad\u{fffd}output"), "{dead:#?}");
}

// ---------------------------------------------------------------------------------------
// pgbus serve
// ---------------------------------------------------------------------------------------

fn client() -> Client {
    Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("an HTTP client")
}

/// Writes `request` on a fresh connection; returns the response's status code, or `None`
/// when the server closed the connection without one.
fn raw(port: u16, request: &[u8]) -> Option<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connecting");
    stream.set_read_timeout(Some(SHORT)).unwrap();
    stream.set_write_timeout(Some(SHORT)).unwrap();
    // The server may answer and close before it read everything (a huge header).
    let _ = stream.write_all(request);
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n") {
        match stream.read(&mut byte) {
            Ok(1) => head.push(byte[0]),
            _ => break,
        }
    }
    let line = String::from_utf8_lossy(&head);
    if line.is_empty() {
        return None;
    }
    let status = line.split(' ').nth(1).and_then(|s| s.parse().ok());
    assert!(status.is_some(), "not a status line: {line:?}");
    status
}

#[track_caller]
fn client_error_or_closed(what: &str, status: Option<u16>) {
    if let Some(status) = status {
        assert!((400..500).contains(&status), "{what}: {status}");
    }
}

#[test]
fn malformed_requests_get_4xx_and_the_server_keeps_serving() {
    let db = Db::new();
    let mut url = db.cmd(&["stream", "url", "orders"]);
    url.envs(SECRET);
    let path = run(url, None, SHORT).ok().stdout.trim().to_owned();
    assert!(path.starts_with("/streams/orders."), "{path}");
    let served = Served::start(&db, free_port(), &[], &SECRET);
    let port = served.port;

    // Garbage instead of a request.
    for garbage in [
        &b"GARBAGE\r\n\r\n"[..],
        b"\x00\x01\x02\xff\xfe\r\n\r\n",
        b"GET\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET /livez HTTP/1.1\r\nHost: localhost\r\nContent-Length: -1\r\n\r\n",
        b"GET /livez HTTP/1.1\r\nno colon here\r\n\r\n",
        b"GET /livez HTTP/1.1\r\nBad Name: x\r\n\r\n",
        b"GET /livez HTTP/1.1\r\nX-Control: a\x01b\r\n\r\n",
    ] {
        client_error_or_closed(&format!("{garbage:?}"), raw(port, garbage));
    }
    // A 1 MiB header.
    let huge = format!(
        "GET /livez HTTP/1.1\r\nHost: localhost\r\nX-Huge: {}\r\n\r\n",
        "a".repeat(1024 * 1024)
    );
    client_error_or_closed("a 1 MiB header", raw(port, huge.as_bytes()));

    // A Last-Event-ID that is not text, and cursors that are not event ids.
    let mut request =
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nLast-Event-ID: ")
            .into_bytes();
    request.extend_from_slice(b"\xff\xfe\r\n\r\n");
    assert_eq!(raw(port, &request), Some(400), "Last-Event-ID as raw bytes");

    let stream = |since: Option<&str>, last_event_id: Option<&str>| {
        let mut url = served.url(&path);
        if let Some(since) = since {
            url = format!("{url}?since={since}");
        }
        let mut request = client().get(url);
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        request.send().expect("a response")
    };
    for bad in [
        "abc",
        "-1",
        "+1",
        "1.5",
        "9223372036854775808",
        "99999999999999999999",
    ] {
        let response = stream(None, Some(bad));
        assert_eq!(
            response.status(),
            StatusCode::BAD_REQUEST,
            "Last-Event-ID {bad:?}"
        );
        assert!(response.text().unwrap().contains("invalid cursor"));
        let response = stream(Some(bad), None);
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "?since={bad}");
    }
    // A bad header is not rescued by a good `?since=`.
    assert_eq!(
        stream(Some("1"), Some("x")).status(),
        StatusCode::BAD_REQUEST
    );

    // Names that are not signed by this server, injections included.
    for name in [
        "orders",
        "orders.",
        "orders.AAAA",
        "x%27%3B%20drop%20table%20pgbus.messages%3B%20--",
        "..%2F..%2Fetc%2Fpasswd",
    ] {
        let response = client()
            .get(served.url(&format!("/streams/{name}")))
            .send()
            .unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{name}");
    }

    // Still serving: health, and a well-formed stream request.
    let livez = client().get(served.url("/livez")).send().unwrap();
    assert_eq!(livez.status(), StatusCode::OK);
    let response = stream(Some("0"), None);
    assert_eq!(response.status(), StatusCode::OK);
    drop(response);
    assert!(served.stop().success());
}
