//! End-to-end tests of `pgbus work`: when `--until-empty` stops, what a failed attempt
//! logs and keeps, and what an `--exec` command or an `--http` endpoint learns about its
//! message. Every test runs the real binary on a fresh database of its own.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::thread;

use serde_json::{json, Value};

mod common;
use common::*;

/// Sends one message with extra `send` options (`--delay 2s`, `--group g`); returns its id.
#[track_caller]
fn send_with(db: &Db, queue: &str, payload: &Value, options: &[&str]) -> i64 {
    let payload = payload.to_string();
    let mut args = vec!["send", queue, &payload];
    args.extend_from_slice(options);
    let out = db.ok(&args);
    out.stdout
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("send printed {:?}: {e}", out.stdout))
}

/// Every stderr line of a `--log-format json` run, parsed.
#[track_caller]
fn json_logs(run: &Run) -> Vec<Value> {
    run.stderr
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}")))
        .collect()
}

/// The fields of the log events with this level and message.
fn logged<'a>(logs: &'a [Value], level: &str, message: &str) -> Vec<&'a Value> {
    logs.iter()
        .filter(|l| l["level"] == level && l["fields"]["message"] == message)
        .map(|l| &l["fields"])
        .collect()
}

/// An HTTP/1.1 server on a port of its own for `--http`: answers each request with
/// `respond(request)` (a status line such as "200 OK", and a body) and records every
/// request. It runs until the test process ends.
fn http_server(
    respond: impl Fn(&Request) -> (&'static str, String) + Send + Sync + 'static,
) -> (String, Arc<Mutex<Vec<Request>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding the test server");
    let url = format!(
        "http://{}/hook",
        listener.local_addr().expect("its address")
    );
    let log = Arc::new(Mutex::new(Vec::new()));
    let respond = Arc::new(respond);
    {
        let log = Arc::clone(&log);
        thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let (log, respond) = (Arc::clone(&log), Arc::clone(&respond));
                thread::spawn(move || {
                    let Ok(request) = read_request(&stream) else {
                        return;
                    };
                    let (status, body) = respond(&request);
                    log.lock().unwrap().push(request);
                    let _ = write!(
                        stream,
                        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    let _ = stream.flush();
                });
            }
        });
    }
    (url, log)
}

// ---------------------------------------------------------------------------------------
// --until-empty
// ---------------------------------------------------------------------------------------

/// `--until-empty` stops once nothing is ready, in flight or due within `--wait-due`: a job
/// that fails twice and then succeeds, one that fails until it is dead-lettered and a
/// message delayed by a few seconds are all done in one run. A message due later is left,
/// and the line the run ends with says so.
#[test]
fn until_empty_waits_for_retries_and_messages_due_soon() {
    let db = Db::new();
    // Default retry policy: the first retries come after about 1 s and 2 s.
    db.ok(&["queue", "create", "jobs"]);
    db.ok(&["queue", "create", "doomed", "--max-attempts", "3"]);
    let flaky = db.send("jobs", &json!({ "kind": "flaky" }));
    let soon = send_with(&db, "jobs", &json!({ "kind": "soon" }), &["--delay", "2s"]);
    let later = send_with(&db, "jobs", &json!({ "kind": "later" }), &["--delay", "1h"]);
    let doomed = db.send("doomed", &json!({ "kind": "doomed" }));

    let done = db.path("done.txt");
    let script = format!(
        r#"read p
case "$p" in
  *flaky*) [ "$PGBUS_ATTEMPT" -ge 3 ] || {{ echo "not yet" >&2; exit 1; }};;
  *doomed*) echo "never" >&2; exit 1;;
esac
echo "$PGBUS_MESSAGE_ID $PGBUS_ATTEMPT" >> {done}"#,
        done = sh_quote(&done)
    );
    let run = db.work(&["jobs", "doomed", "--until-empty", "--exec", &script]);

    let mut finished = lines(&done);
    finished.sort();
    let mut expected = vec![format!("{flaky} 3"), format!("{soon} 1")];
    expected.sort();
    assert_eq!(finished, expected, "stderr:\n{}", run.stderr);
    let dlq = db.dead("doomed");
    assert_eq!(
        dlq.get(&doomed).map(|d| d["attempts"].clone()),
        Some(json!(3)),
        "dead-lettered after its third attempt, in the same run: {dlq:#?}\nstderr:\n{}",
        run.stderr
    );
    let stats = db.queue_stats("jobs");
    assert_eq!(
        (stats["depth"].clone(), stats["scheduled"].clone()),
        (json!(1), json!(1)),
        "message {later} (due in 1 h) is left: {stats:#}"
    );
    let last = run
        .stderr
        .lines()
        .find(|line| line.contains("not waited for"))
        .unwrap_or_else(|| panic!("no line says what was left:\n{}", run.stderr));
    assert!(
        last.contains("0 ready") && last.contains("1 scheduled") && last.contains("jobs"),
        "{last}"
    );
}

/// A message due after `--wait-due` is not waited for, however short the wait.
#[test]
fn until_empty_does_not_wait_past_wait_due() {
    let db = Db::new();
    db.ok(&["queue", "create", "jobs"]);
    send_with(&db, "jobs", &json!({ "n": 1 }), &["--delay", "1h"]);
    let run = db.work(&[
        "jobs",
        "--until-empty",
        "--wait-due",
        "5m",
        "--exec",
        "true",
    ]);
    assert!(
        run.stderr
            .lines()
            .any(|l| l.contains("1 scheduled") && l.contains("not waited for")),
        "{}",
        run.stderr
    );
    assert_eq!(db.depth("jobs"), 1);
    let bad = db
        .run(&[
            "work",
            "jobs",
            "--until-empty",
            "--wait-due",
            "soon",
            "--exec",
            "true",
        ])
        .fails();
    assert!(bad.stderr.contains("--wait-due"), "{}", bad.stderr);
}

/// A paused queue's ready messages are work `--until-empty` cannot do: the other queues are
/// worked, then the run names the paused queue, how to continue it, and exits non-zero
/// (75, EX_TEMPFAIL: try again once it is resumed).
#[test]
fn until_empty_names_a_paused_queue_with_ready_messages_and_fails() {
    let db = Db::new();
    db.ok(&["queue", "create", "held"]);
    db.ok(&["queue", "create", "open"]);
    db.send("held", &json!({ "n": 1 }));
    db.send("held", &json!({ "n": 2 }));
    db.send("open", &json!({ "n": 3 }));
    db.ok(&["queue", "pause", "held"]);

    let out = db.path("out.jsonl");
    let exec = format!("cat >> {}", sh_quote(&out));
    let worked = run(
        db.cmd(&["work", "held", "open", "--until-empty", "--exec", &exec]),
        None,
        LONG,
    )
    .fails();
    assert_eq!(worked.status.code(), Some(75), "{}", worked.stderr);
    assert_eq!(payload_ns(&out), vec![3], "the open queue was worked");
    assert_eq!(db.depth("held"), 2);
    let line = worked
        .stderr
        .lines()
        .find(|l| l.contains("pgbus queue resume held"))
        .unwrap_or_else(|| panic!("no line says how to continue:\n{}", worked.stderr));
    assert!(
        line.contains("paused") && line.contains("held") && line.contains("2 ready"),
        "{line}"
    );

    // Under a supervisor too, which does not restart a worker that ended so.
    db.send("open", &json!({ "n": 4 }));
    let supervised = run(
        db.cmd(&[
            "work",
            "held",
            "open",
            "--until-empty",
            "--processes",
            "2",
            "--exec",
            &exec,
        ]),
        None,
        LONG,
    )
    .fails();
    assert_eq!(supervised.status.code(), Some(75), "{}", supervised.stderr);
    assert!(
        !supervised.stderr.contains("restarting"),
        "{}",
        supervised.stderr
    );
    assert_eq!(payload_ns(&out), vec![3, 4]);
    assert_eq!(db.depth("held"), 2);
}

// ---------------------------------------------------------------------------------------
// Failed attempts: logged with their cause, kept as the message's error
// ---------------------------------------------------------------------------------------

/// Every failed attempt of an `--exec` job is a WARN line with the queue, message id,
/// attempt, retry delay and the end of the command's stderr (escaped onto the one line),
/// and that end of stderr is the error the dead letter keeps. A job past its timeout keeps
/// what it wrote before it was killed.
#[test]
fn exec_failures_are_logged_with_their_stderr_and_kept_as_the_error() {
    let db = Db::new();
    db.ok(&["queue", "create", "tasks", "--max-attempts", "2"]);
    db.ok(&["queue", "create", "slow", "--max-attempts", "1"]);
    let failing = db.send("tasks", &json!({ "kind": "fail" }));
    let hung = db.send("slow", &json!({ "kind": "hang" }));
    let script = r#"case "$PGBUS_QUEUE" in
  tasks) echo "first line" >&2; echo "disk full: /var/spool/x" >&2; exit 3;;
  slow) echo "started the upload" >&2; exec sleep 60;;
esac"#;
    let run = db
        .run(&[
            "--log-format",
            "json",
            "work",
            "tasks",
            "slow",
            "--until-empty",
            "--job-timeout",
            "1s",
            "--exec",
            script,
        ])
        .ok();
    let logs = json_logs(&run);
    let stderr_tail = r"first line\ndisk full: /var/spool/x";

    let retries = logged(&logs, "WARN", "job failed; retrying");
    assert_eq!(retries.len(), 1, "{}", run.stderr);
    let retry = retries[0];
    assert_eq!(retry["queue.name"], "tasks", "{retry}");
    assert_eq!(retry["job.id"], failing, "{retry}");
    assert_eq!(retry["attempt"], 1, "{retry}");
    assert!(
        retry["retry_in"].as_str().is_some_and(|d| !d.is_empty()),
        "{retry}"
    );
    let error = retry["error"].as_str().expect("an error field");
    assert_eq!(error, format!("exit 3: {stderr_tail}"), "{retry}");

    let used_up = logged(&logs, "WARN", "attempts used up: dead-lettering");
    let errors: BTreeMap<i64, &str> = used_up
        .iter()
        .map(|f| {
            (
                f["job.id"].as_i64().expect("a job id"),
                f["error"].as_str().expect("an error field"),
            )
        })
        .collect();
    assert_eq!(
        errors.get(&failing).copied(),
        Some(format!("exit 3: {stderr_tail}").as_str()),
        "{}",
        run.stderr
    );
    let timed_out = errors.get(&hung).copied().unwrap_or_default();
    assert!(
        timed_out.contains("timed out after 1s") && timed_out.contains("started the upload"),
        "{}",
        run.stderr
    );

    let dlq = db.dead("tasks");
    let kept = dlq[&failing]["error"].as_str().expect("an error text");
    assert_eq!(kept, "exit 3: first line\ndisk full: /var/spool/x");
    let dlq = db.dead("slow");
    let kept = dlq[&hung]["error"].as_str().expect("an error text");
    assert!(
        kept.contains("timed out after 1s") && kept.contains("started the upload"),
        "{kept}"
    );
}

/// A failed `--http` delivery is logged like a failed command: status and the start of the
/// response body, on one line.
#[test]
fn http_failures_are_logged_with_status_and_body() {
    let db = Db::new();
    db.ok(&["queue", "create", "hooks"]);
    let id = db.send("hooks", &json!({ "n": 1 }));
    let calls = Arc::new(Mutex::new(0u32));
    let (url, _log) = http_server(move |_| {
        let mut calls = calls.lock().unwrap();
        *calls += 1;
        if *calls == 1 {
            (
                "503 Service Unavailable",
                "upstream down\nretry later".into(),
            )
        } else {
            ("200 OK", "done".into())
        }
    });
    let run = db
        .run(&[
            "--log-format",
            "json",
            "work",
            "hooks",
            "--until-empty",
            "--http",
            &url,
        ])
        .ok();
    let logs = json_logs(&run);
    let retries = logged(&logs, "WARN", "job failed; retrying");
    assert_eq!(retries.len(), 1, "{}", run.stderr);
    assert_eq!(retries[0]["job.id"], id);
    assert_eq!(
        retries[0]["error"], r"HTTP 503: upstream down\nretry later",
        "{}",
        run.stderr
    );
    assert_eq!(db.depth("hooks"), 0, "acked on the second attempt");
}

// ---------------------------------------------------------------------------------------
// The envelope: what a command or an endpoint learns about its message
// ---------------------------------------------------------------------------------------

/// Publishes one event to `billing` (bound to `order.*`) and sends one plain message with
/// headers of its own (set the way a library producer would, with names `send` does not
/// take); returns (event id, plain message id).
fn event_and_plain_message(db: &Db) -> (String, i64) {
    db.ok(&["queue", "create", "billing"]);
    db.ok(&["topic", "bind", "order.*", "billing"]);
    let published = db.ok(&["publish", "order.paid", r#"{"n": 1}"#]);
    let event_id = published
        .stdout
        .split_whitespace()
        .next()
        .expect("publish prints the event id")
        .to_owned();
    let plain = send_with(
        db,
        "billing",
        &json!({ "n": 2 }),
        &["--group", "customer_7"],
    );
    execute(
        &db.url,
        &format!(
            r#"UPDATE pgbus.messages
               SET headers = '{{"Trace-Id": "t-42", "x.y z": "v", "pgbus-queue": "forged"}}'
               WHERE id = {plain}"#
        ),
    );
    (event_id, plain)
}

/// An `--exec` command of a topic's copy gets the routing key, event id and publish time;
/// every message's own headers come as `PGBUS_HEADER_<NAME>`, which cannot replace the
/// variables pgbus sets.
#[test]
fn exec_commands_get_the_event_envelope_and_headers_in_their_environment() {
    let db = Db::new();
    let (event_id, plain) = event_and_plain_message(&db);
    let dir = db.path("env");
    std::fs::create_dir(&dir).expect("a directory for the environments");
    let exec = format!("env > {}/$PGBUS_MESSAGE_ID", sh_quote(&dir));
    db.work(&["billing", "--until-empty", "--exec", &exec]);

    let mut envs: BTreeMap<i64, BTreeMap<String, String>> = BTreeMap::new();
    for entry in std::fs::read_dir(&dir).expect("reading the environments") {
        let path = entry.expect("a directory entry").path();
        let id: i64 = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse().ok())
            .expect("files named by message id");
        let vars = lines(&path)
            .into_iter()
            .filter_map(|l| l.split_once('=').map(|(n, v)| (n.to_owned(), v.to_owned())))
            .filter(|(name, _)| name.starts_with("PGBUS_"))
            .collect();
        envs.insert(id, vars);
    }
    assert_eq!(envs.len(), 2, "{envs:#?}");
    let plain_env = &envs[&plain];
    let (_, event_env) = envs
        .iter()
        .find(|(id, _)| **id != plain)
        .expect("the event's copy ran");

    assert_eq!(event_env["PGBUS_QUEUE"], "billing");
    assert_eq!(event_env["PGBUS_ROUTING_KEY"], "order.paid");
    assert_eq!(event_env["PGBUS_EVENT_ID"], event_id);
    assert!(
        event_env["PGBUS_PUBLISHED_AT"]
            .parse::<u64>()
            .is_ok_and(|micros| micros > 0),
        "{event_env:#?}"
    );
    assert!(
        !event_env.keys().any(|k| k.starts_with("PGBUS_HEADER_")),
        "the envelope headers are not repeated as PGBUS_HEADER_*: {event_env:#?}"
    );

    assert_eq!(plain_env["PGBUS_QUEUE"], "billing", "{plain_env:#?}");
    assert_eq!(plain_env["PGBUS_GROUP"], "customer_7");
    assert_eq!(plain_env["PGBUS_HEADER_TRACE_ID"], "t-42");
    assert_eq!(plain_env["PGBUS_HEADER_X_Y_Z"], "v");
    assert_eq!(plain_env["PGBUS_HEADER_PGBUS_QUEUE"], "forged");
    for absent in ["PGBUS_ROUTING_KEY", "PGBUS_EVENT_ID", "PGBUS_PUBLISHED_AT"] {
        assert!(!plain_env.contains_key(absent), "{absent}: {plain_env:#?}");
    }
}

/// An `--http` endpoint gets the same as `Pgbus-*` request headers.
#[test]
fn http_endpoints_get_the_event_envelope_and_headers() {
    let db = Db::new();
    let (event_id, plain) = event_and_plain_message(&db);
    let (url, log) = http_server(|_| ("200 OK", String::new()));
    db.work(&["billing", "--until-empty", "--http", &url]);

    let requests = log.lock().unwrap().clone();
    assert_eq!(requests.len(), 2, "{requests:#?}");
    let by_id = |want: bool| {
        requests
            .iter()
            .find(|r| (r.headers["pgbus-message-id"] == plain.to_string()) == want)
            .expect("a request")
    };
    let (plain_request, event_request) = (by_id(true), by_id(false));

    let event = &event_request.headers;
    assert_eq!(event["pgbus-queue"], "billing");
    assert_eq!(event["pgbus-routing-key"], "order.paid", "{event:#?}");
    assert_eq!(event["pgbus-event-id"], event_id);
    assert!(
        event["pgbus-published-at"].parse::<u64>().is_ok(),
        "{event:#?}"
    );
    assert!(!event.contains_key("pgbus-group"), "{event:#?}");

    let headers = &plain_request.headers;
    assert_eq!(headers["pgbus-queue"], "billing", "{headers:#?}");
    assert_eq!(headers["pgbus-group"], "customer_7");
    assert_eq!(headers["pgbus-header-trace-id"], "t-42");
    assert_eq!(headers["pgbus-header-x-y-z"], "v");
    assert_eq!(headers["pgbus-header-pgbus-queue"], "forged");
    assert!(!headers.contains_key("pgbus-routing-key"), "{headers:#?}");
}

// ---------------------------------------------------------------------------------------
// One process, one limit: --concurrency and the connection budget
// ---------------------------------------------------------------------------------------

/// The most jobs a record of `start NS` / `end NS` lines (one pair per job, on the clock
/// `date +%s%N` reads) shows running at once. A job's recorded span lies inside the span
/// it really ran, so the count is never more than really ran at once.
fn peak_overlap(record: &[String]) -> usize {
    let mut events: Vec<(i64, i32)> = record
        .iter()
        .map(|line| {
            let (what, at) = line
                .split_once(' ')
                .unwrap_or_else(|| panic!("a record line {line:?}"));
            let at: i64 = at.parse().unwrap_or_else(|e| panic!("{line:?}: {e}"));
            // Ends sort before starts at the same instant.
            (at, if what == "start" { 1 } else { -1 })
        })
        .collect();
    events.sort_unstable();
    let (mut running, mut peak) = (0i32, 0i32);
    for (_, step) in events {
        running += step;
        peak = peak.max(running);
    }
    usize::try_from(peak).expect("never negative")
}

/// An `--exec` command that records its start and end in `record` and runs `seconds`.
fn recording_job(record: &std::path::Path, seconds: &str) -> String {
    let record = sh_quote(record);
    format!(
        "echo \"start $(date +%s%N)\" >> {record}; sleep {seconds}; echo \"end $(date +%s%N)\" >> {record}"
    )
}

/// `--concurrency 2` is the process's limit across plain and grouped messages: a mix of
/// both never has more than two jobs running, and the process has one registry row with
/// two slots. (Before, the plain and the group worker had two slots each: four ran at once,
/// and `stats` showed two rows per process.)
#[test]
fn concurrency_is_one_limit_across_plain_and_grouped_messages() {
    let db = Db::new();
    db.ok(&["queue", "create", "mix"]);
    let plain: Vec<Value> = (0..8).map(|n| json!({ "n": n })).collect();
    db.send_stdin(&["send", "mix"], json_lines(plain)).ok();
    for group in ["a", "b", "c", "d"] {
        let grouped = (0..2).map(|n| json!({ "group": group, "n": n }));
        db.send_stdin(&["send", "mix", "--group", group], json_lines(grouped))
            .ok();
    }

    let record = db.path("record.txt");
    let job = recording_job(&record, "0.4");
    let (mut worker, _stderr) = db.spawn(&[
        "work",
        "mix",
        "--concurrency",
        "2",
        "--poll-interval",
        "200ms",
        "--exec",
        &job,
    ]);
    eventually("all 16 jobs to end", LONG, || {
        lines(&record)
            .iter()
            .filter(|l| l.starts_with("end "))
            .count()
            == 16
    });
    let processes = db.stats()["processes"].clone();
    terminate(&worker.0);
    let status = wait_deadline(&mut worker.0, SHORT);
    assert!(status.is_some_and(|s| s.success()), "{status:?}");

    let record = lines(&record);
    let peak = peak_overlap(&record);
    assert_eq!(
        record.iter().filter(|l| l.starts_with("start ")).count(),
        16,
        "every message ran once: {record:?}"
    );
    // 16 jobs of 0.4 s on two slots: the slots are used, and never more of them.
    assert_eq!(
        peak, 2,
        "jobs running at once with --concurrency 2: {record:?}"
    );
    assert_eq!(db.depth("mix"), 0);

    let rows = processes.as_array().expect("a processes array");
    let pid = u64::from(worker.0.id());
    let ours: Vec<&Value> = rows.iter().filter(|p| p["pid"] == pid).collect();
    assert_eq!(
        ours.len(),
        1,
        "one registry row for the process: {processes:#}"
    );
    assert_eq!(ours[0]["capacity"], 2, "{processes:#}");
}

/// What `pg_stat_activity` showed of the pgbus connections to one database while a
/// [`Sampler`] ran.
#[derive(Debug, Default)]
struct Samples {
    samples: usize,
    /// The most pgbus connections seen at once.
    peak: i64,
    /// Connections per `application_name` when the peak was seen.
    at_peak: BTreeMap<String, i64>,
    /// The most seen at once per `application_name`.
    peak_by_role: BTreeMap<String, i64>,
}

/// Counts the pgbus connections (`application_name` `pgbus:<role>`) to the test's
/// database, its own observer connection left out, again and again until stopped.
struct Sampler {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: thread::JoinHandle<Samples>,
}

impl Sampler {
    fn start(url: &str) -> Sampler {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (started_tx, started_rx) = std::sync::mpsc::channel();
        let thread = thread::spawn({
            let (url, stop) = (url.to_owned(), Arc::clone(&stop));
            move || {
                block_on(async move {
                    let observer = pgbus_pg::connect(&url, "observer")
                        .await
                        .expect("an observer connection");
                    let _ = started_tx.send(());
                    let mut samples = Samples::default();
                    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                        let rows = observer
                            .query(
                                "SELECT application_name, count(*) FROM pg_stat_activity
                                 WHERE datname = current_database()
                                   AND application_name LIKE 'pgbus:%'
                                   AND pid <> pg_backend_pid()
                                 GROUP BY application_name",
                                &[],
                            )
                            .await
                            .expect("reading pg_stat_activity");
                        let by_role: BTreeMap<String, i64> =
                            rows.iter().map(|r| (r.get(0), r.get(1))).collect();
                        let total: i64 = by_role.values().sum();
                        samples.samples += 1;
                        for (role, n) in &by_role {
                            let peak = samples.peak_by_role.entry(role.clone()).or_default();
                            *peak = (*peak).max(*n);
                        }
                        if total > samples.peak {
                            samples.peak = total;
                            samples.at_peak = by_role;
                        }
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    }
                    samples
                })
            }
        });
        started_rx.recv().expect("the sampler started");
        Sampler { stop, thread }
    }

    fn finish(self) -> Samples {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.join().expect("the sampler thread")
    }
}

/// `pgbus work` on a plain queue with 300 async jobs running at once holds at most 5 pgbus
/// connections (fetch, listen, a pool of 3), sampled from `pg_stat_activity` for the whole
/// run, and never opens a group connection: the group side opens its connections only
/// when grouped messages are seen. (Before: 7, with a second fetch and a recovery
/// connection for a group worker that had nothing to do.)
#[test]
fn plain_work_at_300_async_jobs_holds_five_connections() {
    let db = Db::new();
    db.ok(&["queue", "create", "plain"]);
    let messages: Vec<Value> = (0..600).map(|n| json!({ "n": n })).collect();
    db.send_stdin(&["send", "plain"], json_lines(messages)).ok();

    let ran = db.path("ran.txt");
    let job = format!("echo x >> {}; sleep 1", sh_quote(&ran));
    let sampler = Sampler::start(&db.url);
    let run = db.work(&[
        "plain",
        "--concurrency",
        "300",
        "--execution-mode",
        "async",
        "--until-empty",
        "--exec",
        &job,
    ]);
    let samples = sampler.finish();
    println!("plain, 300 async jobs: {samples:?}");
    assert_eq!(lines(&ran).len(), 600, "stderr:\n{}", run.stderr);
    assert_eq!(db.depth("plain"), 0);
    assert!(
        samples.peak_by_role.contains_key("pgbus:fetch"),
        "the sampler saw the run: {samples:?}"
    );
    assert!(
        samples.peak <= 5,
        "pgbus connections peaked at {} > 5: {:?}",
        samples.peak,
        samples.at_peak
    );
    for role in ["pgbus:recovery", "pgbus:group"] {
        assert!(
            !samples.peak_by_role.contains_key(role),
            "{role} opened without a grouped message: {samples:?}"
        );
    }
}

/// On a grouped queue at `--concurrency 8`, `pgbus work` holds at most 8 + 6 pgbus
/// connections: one per running group (at most 8), a recovery connection, and the 5 of the
/// plain side (fetch, listen, a pool of 3), which the group side shares its fetch
/// connection with. (Before: 15, and up to 8 pooled connections.)
#[test]
fn grouped_work_at_concurrency_8_stays_within_its_budget() {
    let db = Db::new();
    db.ok(&["queue", "create", "grouped"]);
    for g in 0..40 {
        let group = format!("g{g}");
        let messages = (0..3).map(|n| json!({ "group": group, "n": n }));
        db.send_stdin(
            &["send", "grouped", "--group", &group],
            json_lines(messages),
        )
        .ok();
    }

    let ran = db.path("ran.txt");
    let job = format!("echo x >> {}; sleep 0.2", sh_quote(&ran));
    let sampler = Sampler::start(&db.url);
    let run = db.work(&[
        "grouped",
        "--concurrency",
        "8",
        "--until-empty",
        "--exec",
        &job,
    ]);
    let samples = sampler.finish();
    println!("grouped, concurrency 8: {samples:?}");
    assert_eq!(lines(&ran).len(), 120, "stderr:\n{}", run.stderr);
    assert_eq!(db.depth("grouped"), 0);
    let peak_of = |role: &str| samples.peak_by_role.get(role).copied().unwrap_or(0);
    let groups = peak_of("pgbus:group");
    assert!(
        (1..=8).contains(&groups),
        "group connections peaked at {groups}: {samples:?}"
    );
    assert_eq!(
        peak_of("pgbus:fetch"),
        1,
        "one fetch connection: {samples:?}"
    );
    assert!(peak_of("pgbus:pool") <= 3, "{samples:?}");
    assert!(peak_of("pgbus:recovery") <= 1, "{samples:?}");
    assert!(
        samples.peak <= 8 + 6,
        "pgbus connections peaked at {} > 8 + 6: {:?}",
        samples.peak,
        samples.at_peak
    );
}

/// The value of one series (`name{labels}` as rendered) in a Prometheus scrape; 0 when
/// it is absent.
fn series(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .map_or(0.0, |value| value.parse().expect("a number"))
}

/// `--metrics-listen` serves the worker's own metrics: 100 jobs, 10 of which fail on both
/// of their attempts, are counted exactly; the token is required when one is set, and a
/// non-loopback address without one is refused.
#[cfg(feature = "metrics")]
#[test]
fn work_serves_its_own_metrics() {
    let db = Db::new();
    db.ok(&["queue", "create", "metered", "--max-attempts", "2"]);
    db.send_stdin(&["send", "metered"], json_lines((0..100).map(|n| json!(n))))
        .ok();
    let out = db.run(&[
        "work",
        "metered",
        "--exec",
        "true",
        "--metrics-listen",
        "0.0.0.0:0",
    ]);
    let out = out.fails();
    assert!(out.stderr.contains("--metrics-token"), "{}", out.stderr);

    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let (mut worker, _stderr) = db.spawn(&[
        "work",
        "metered",
        "--exec",
        "n=$(cat); [ $((n % 10)) -ne 5 ]",
        "--metrics-listen",
        &listen,
        "--metrics-token",
        "s3cret-token",
    ]);
    wait_listening(&mut worker.0, port);
    let client = reqwest::blocking::Client::new();
    let url = format!("http://{listen}/metrics");
    let refused = client.get(&url).send().unwrap();
    assert_eq!(refused.status(), 401);
    let scrape = || {
        let response = client.get(&url).bearer_auth("s3cret-token").send().unwrap();
        assert_eq!(response.status(), 200);
        response.text().unwrap()
    };
    let finished = |text: &str, outcome: &str| {
        series(
            text,
            &format!(r#"pgbus_jobs_finished_total{{queue="metered",outcome="{outcome}"}}"#),
        )
    };
    eventually("every job is finished", LONG, || {
        finished(&scrape(), "dead_letter") == 10.0
    });
    let text = scrape();
    assert_eq!(
        series(&text, r#"pgbus_jobs_started_total{queue="metered"}"#),
        110.0,
        "{text}"
    );
    assert_eq!(finished(&text, "ack"), 90.0, "{text}");
    assert_eq!(finished(&text, "retry"), 10.0, "{text}");
    assert_eq!(
        series(
            &text,
            r#"pgbus_job_duration_seconds_count{queue="metered"}"#
        ),
        110.0,
        "{text}"
    );
    assert_eq!(series(&text, "pgbus_claim_batch_size_sum"), 110.0, "{text}");
    assert!(
        series(&text, r#"pgbus_connections{role="pool"}"#) >= 1.0,
        "{text}"
    );
    worker.stop();
}

/// `--otlp-endpoint`: `pgbus send` and the `pgbus work` that runs the job export their
/// spans over OTLP (HTTP/protobuf, flushed at exit), in one trace: the message carries the
/// send's `traceparent`, and both exports hold that trace id.
#[cfg(feature = "otel")]
#[test]
fn a_send_and_its_job_are_one_trace_exported_over_otlp() {
    let collector = TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", collector.local_addr().unwrap());
    let received = Arc::new(Mutex::new(Vec::<Request>::new()));
    thread::spawn({
        let received = Arc::clone(&received);
        move || {
            for stream in collector.incoming() {
                let Ok(mut stream) = stream else { continue };
                // One request per connection is enough for the exporter's few posts.
                if let Ok(request) = read_request(&stream) {
                    received.lock().unwrap().push(request);
                }
                let _ = stream.write_all(
                    b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                );
            }
        }
    });
    let db = Db::new();
    db.ok(&["queue", "create", "traced", "--keep-history"]);
    db.ok(&["send", "traced", "1", "--otlp-endpoint", &endpoint]);
    db.work(&[
        "traced",
        "--exec",
        "true",
        "--until-empty",
        "--otlp-endpoint",
        &endpoint,
    ]);

    let traceparent = block_on(async {
        let client = pgbus_pg::connect(&db.url, "test").await.unwrap();
        let row = client
            .query_one("SELECT headers ->> 'traceparent' FROM pgbus.archive", &[])
            .await
            .unwrap();
        row.get::<_, Option<String>>(0)
    })
    .expect("the message carries the send's traceparent");
    let trace_hex = traceparent.split('-').nth(1).expect("a W3C traceparent");
    let trace_id: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&trace_hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();

    let received = received.lock().unwrap();
    assert!(!received.is_empty(), "nothing was exported");
    for request in received.iter() {
        assert_eq!(request.path, "/v1/traces");
        assert_eq!(
            request.headers.get("content-type").map(String::as_str),
            Some("application/x-protobuf")
        );
    }
    let holding = |name: &[u8]| {
        received
            .iter()
            .find(|r| r.raw.windows(name.len()).any(|w| w == name))
            .unwrap_or_else(|| panic!("no export holds {}", String::from_utf8_lossy(name)))
    };
    for span in [&b"traced publish"[..], b"traced process"] {
        let export = holding(span);
        assert!(
            export.raw.windows(16).any(|w| w == trace_id),
            "the span {} is not in trace {trace_hex}",
            String::from_utf8_lossy(span)
        );
    }
}

// ---------------------------------------------------------------------------------------
// Cancelling a running job
// ---------------------------------------------------------------------------------------

/// Whether process `pid` runs (a zombie, exited but not yet reaped, does not).
fn running(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses.
    let state = stat.rsplit_once(')').map(|(_, rest)| rest.trim_start());
    !state.is_some_and(|s| s.starts_with('Z'))
}

/// Deleting a running job's message (what the console's "cancel" does) cancels the job: the
/// worker's next lease extension finds the lease gone and says so, and the `--exec`
/// command's process group is killed, a process it started in the background included.
/// Nothing is written back for the job.
#[test]
fn a_deleted_running_job_has_its_command_killed() {
    let db = Db::new();
    db.ok(&["queue", "create", "slow", "--lease", "1s"]);
    let id = db.send("slow", &json!({ "n": 1 }));
    let pids = db.path("pids");
    let written = db.path("pids.tmp");
    let script = format!(
        "sleep 300 & echo $$ $! > {tmp}; mv {tmp} {pids}; wait",
        tmp = sh_quote(&written),
        pids = sh_quote(&pids)
    );
    let (mut worker, stderr) = db.spawn(&["work", "slow", "--exec", &script]);
    eventually("the command to start", LONG, || pids.exists());
    let started: Vec<u32> = std::fs::read_to_string(&pids)
        .expect("the pids file")
        .split_whitespace()
        .map(|pid| pid.parse().expect("a pid"))
        .collect();
    assert_eq!(started.len(), 2, "the command and its background process");
    assert!(started.iter().all(|&pid| running(pid)), "{started:?}");

    execute(
        &db.url,
        &format!("DELETE FROM pgbus.messages WHERE id = {id}"),
    );
    eventually("the command's processes to be gone", LONG, || {
        started.iter().all(|&pid| !running(pid))
    });
    terminate(&worker.0);
    let status = wait_deadline(&mut worker.0, SHORT);
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let stderr = stderr.join().expect("the worker's stderr");
    assert!(
        stderr.contains(&format!("lease lost: job {id} cancelled")),
        "{stderr}"
    );
    assert_eq!(db.depth("slow"), 0);
    assert!(db.dead("slow").is_empty(), "nothing written back");
}

/// `--claim-ahead 0` turns the claim-ahead buffer off: while the one slot runs a job that
/// waits, the messages behind it stay unclaimed (by default, once a job has shown the
/// pace, the claim that takes the waiting job would also lease the next ones).
#[test]
fn claim_ahead_zero_claims_only_for_free_slots() {
    let db = Db::new();
    db.ok(&["queue", "create", "q"]);
    let messages: Vec<Value> = (0..4).map(|n| json!({ "n": n })).collect();
    db.send_stdin(&["send", "q"], json_lines(messages)).ok();
    let (started, go) = (db.path("started"), db.path("go"));
    // Message 1 waits for `go`; the others end at once (message 0 sets the pace).
    let script = format!(
        "case \"$(cat)\" in *'\"n\":1'*) touch {started}; \
         while [ ! -e {go} ]; do sleep 0.05; done;; esac",
        started = sh_quote(&started),
        go = sh_quote(&go)
    );
    let (mut worker, _stderr) = db.spawn(&[
        "work",
        "q",
        "--concurrency",
        "1",
        "--claim-ahead",
        "0",
        "--exec",
        &script,
    ]);
    eventually("the waiting job to start", LONG, || started.exists());
    // The claim that took message 1 is committed: what it leased is leased now.
    let leased = count(
        &db.url,
        "SELECT count(*) FROM pgbus.messages WHERE lease_until > now()",
    );
    assert_eq!(leased, 1, "only the running job's message is leased");

    std::fs::write(&go, b"").expect("the go file");
    eventually("every job to end", LONG, || db.depth("q") == 0);
    terminate(&worker.0);
    let status = wait_deadline(&mut worker.0, SHORT);
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
}
