//! End-to-end tests of the `pgbus` command: every test runs the real binary.
//!
//! Most tests get a fresh database on the shared throwaway cluster (`test_database`) and
//! pass it with `--database-url`, so they run in parallel; the embedded-default test uses
//! a fresh `$PGBUS_HOME` and stops the server it started, even when it fails.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

mod common;
use common::*;

// ---------------------------------------------------------------------------------------
// send + work --exec
// ---------------------------------------------------------------------------------------

#[test]
fn send_from_stdin_and_work_until_empty_with_exec() {
    let db = Db::new();
    db.ok(&["queue", "create", "jobs"]);
    db.ok(&["queue", "create", "other"]);

    let input = json_lines((0..2000).map(|n| json!({ "n": n })));
    let sent = db.send_stdin(&["send", "jobs"], input.clone()).ok();
    let ids: Vec<i64> = sent
        .stdout
        .lines()
        .map(|l| l.trim().parse().expect("send prints one id a line"))
        .collect();
    assert_eq!(ids.len(), 2000, "one id per message");
    assert_eq!(
        ids.iter().collect::<BTreeSet<_>>().len(),
        2000,
        "distinct ids"
    );

    // -q quiets standard error only: the ids are still the output (on another queue,
    // which `work jobs` leaves alone).
    let quiet = db.send_stdin(&["-q", "send", "other"], input).ok();
    assert_eq!(quiet.stdout.lines().count(), 2000);
    assert_eq!(quiet.stderr, "");
    assert_eq!(db.depth("jobs"), 2000);
    assert_eq!(db.depth("other"), 2000);

    let out = db.path("out.jsonl");
    let exec = format!("cat >> {}", sh_quote(&out));
    db.work(&[
        "jobs",
        "--until-empty",
        "--concurrency",
        "8",
        "--exec",
        &exec,
    ]);

    let ns = payload_ns(&out);
    assert_eq!(ns.len(), 2000, "one line per message");
    let distinct: BTreeSet<i64> = ns.iter().copied().collect();
    assert_eq!(distinct, (0..2000).collect(), "every payload once");

    let jobs = db.queue_stats("jobs");
    assert_eq!(jobs["depth"], 0, "{jobs:#}");
    assert_eq!(jobs["dead_lettered"], 0, "{jobs:#}");
    assert_eq!(db.depth("other"), 2000, "work touched only its queue");
    // The worker deregistered itself on the way out.
    assert_eq!(db.stats()["processes"], json!([]));
}

#[test]
fn threads_mode_with_json_logs() {
    let db = Db::new();
    db.ok(&["queue", "create", "jobs"]);
    db.send_stdin(
        &["-q", "send", "jobs"],
        json_lines((0..200).map(|n| json!({ "n": n }))),
    )
    .ok();
    let out = db.path("out.jsonl");
    let exec = format!("cat >> {}", sh_quote(&out));
    let worked = db
        .run(&[
            "--log-format",
            "json",
            "-v",
            "work",
            "jobs",
            "--execution-mode",
            "threads",
            "--concurrency",
            "4",
            "--until-empty",
            "--exec",
            &exec,
        ])
        .ok();
    let distinct: BTreeSet<i64> = payload_ns(&out).into_iter().collect();
    assert_eq!(distinct, (0..200).collect(), "every payload, on OS threads");
    // Every log line is one JSON object with a level; -v shows info lines.
    let logs: Vec<Value> = worked
        .stderr
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line:?}")))
        .collect();
    assert!(
        logs.iter().all(|l| l["level"].is_string()),
        "{}",
        worked.stderr
    );
    assert!(
        logs.iter().any(|l| l["level"] == "INFO"),
        "{}",
        worked.stderr
    );
}

#[test]
fn exec_exit_codes_decide_ack_retry_dead_letter() {
    let db = Db::new();
    db.ok(&["queue", "create", "tasks", "--max-attempts", "2"]);
    let ok1 = db.send("tasks", &json!({ "kind": "fine", "n": 1 }));
    let dead = db.send("tasks", &json!({ "kind": "dead" }));
    let fail = db.send("tasks", &json!({ "kind": "fail" }));
    let ok2 = db.send("tasks", &json!({ "kind": "fine", "n": 2 }));

    let env = db.path("env.txt");
    let script = format!(
        r#"read p; echo "$PGBUS_QUEUE $PGBUS_MESSAGE_ID $PGBUS_ATTEMPT" >> {env}
case "$p" in *dead*) echo bad >&2; exit 65;; *fail*) echo boom >&2; exit 1;; esac"#,
        env = sh_quote(&env)
    );
    db.work_until(
        &["tasks", "--exec", &script],
        Duration::from_secs(60),
        |db| db.dead("tasks").len() == 2,
    );

    let dlq = db.dead("tasks");
    assert_eq!(
        dlq.keys().copied().collect::<Vec<_>>(),
        vec![dead, fail],
        "{dlq:#?}"
    );
    assert_eq!(dlq[&dead]["attempts"], 1, "exit 65 dead-letters at once");
    let error = dlq[&dead]["error"].as_str().expect("an error text");
    assert!(error.starts_with("exit 65"), "{error}");
    assert!(error.contains("bad"), "the command's stderr: {error}");
    assert_eq!(dlq[&dead]["payload"], json!({ "kind": "dead" }));

    assert_eq!(
        dlq[&fail]["attempts"], 2,
        "exit 1 retries until max attempts"
    );
    let error = dlq[&fail]["error"].as_str().expect("an error text");
    assert!(error.starts_with("exit 1: "), "{error}");
    assert!(error.contains("boom"), "the command's stderr: {error}");

    let stats = db.queue_stats("tasks");
    assert_eq!(
        stats["depth"], 0,
        "the exit-0 messages were acked: {stats:#}"
    );
    assert_eq!(stats["dead_lettered"], 2, "{stats:#}");

    // Every run saw the queue, its message id and the attempt number.
    let mut attempts: BTreeMap<i64, Vec<u32>> = BTreeMap::new();
    for line in lines(&env) {
        let fields: Vec<&str> = line.split(' ').collect();
        assert_eq!(fields.len(), 3, "all three variables set: {line:?}");
        assert_eq!(fields[0], "tasks", "{line:?}");
        let id: i64 = fields[1].parse().expect("PGBUS_MESSAGE_ID is an id");
        let attempt: u32 = fields[2].parse().expect("PGBUS_ATTEMPT is a number");
        attempts.entry(id).or_default().push(attempt);
    }
    let expected: BTreeMap<i64, Vec<u32>> = [
        (ok1, vec![1]),
        (dead, vec![1]),
        (fail, vec![1, 2]),
        (ok2, vec![1]),
    ]
    .into_iter()
    .collect();
    assert_eq!(attempts, expected);
}

#[test]
fn exec_killed_by_a_signal_or_past_the_job_timeout_retries() {
    let db = Db::new();
    db.ok(&["queue", "create", "tasks", "--max-attempts", "2"]);
    let signalled = db.send("tasks", &json!({ "kind": "signal" }));
    let hung = db.send("tasks", &json!({ "kind": "hang" }));
    let script = r#"read p; case "$p" in *signal*) kill -9 $$;; *hang*) exec sleep 60;; esac"#;
    db.work_until(
        &["tasks", "--job-timeout", "1s", "--exec", script],
        Duration::from_secs(60),
        |db| db.dead("tasks").len() == 2,
    );
    let dlq = db.dead("tasks");
    assert_eq!(dlq[&signalled]["attempts"], 2, "{dlq:#?}");
    let error = dlq[&signalled]["error"].as_str().expect("an error text");
    assert!(error.starts_with("killed by a signal"), "{error}");
    assert_eq!(dlq[&hung]["attempts"], 2, "{dlq:#?}");
    let error = dlq[&hung]["error"].as_str().expect("an error text");
    assert!(error.contains("timed out after 1s"), "{error}");
}

/// Whether process `pid` is gone (no such process, or a zombie waiting to be reaped).
fn process_gone(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // "PID (COMM) STATE ...": the state follows the last ')'.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with(['Z', 'X'])),
    }
}

/// A command's background children go with it: killed with its process group when the job
/// times out, and when the command exits leaving them behind (which, holding its stderr,
/// used to keep the job waiting until its timeout too).
#[test]
fn exec_kills_the_commands_process_group_on_timeout_and_on_exit() {
    let db = Db::new();
    db.ok(&["queue", "create", "tasks", "--max-attempts", "1"]);
    let hang = db.send("tasks", &json!({ "kind": "hang" }));
    let leave = db.send("tasks", &json!({ "kind": "leave" }));
    let pids = db.path("pids");
    let script = format!(
        r#"read p; sleep 300 & echo $! >> {}; case "$p" in *hang*) wait;; esac"#,
        sh_quote(&pids)
    );
    db.work(&[
        "tasks",
        "--until-empty",
        "--job-timeout",
        "3s",
        "--exec",
        &script,
    ]);
    let dlq = db.dead("tasks");
    assert_eq!(
        dlq.keys().copied().collect::<Vec<_>>(),
        vec![hang],
        "{dlq:#?}"
    );
    assert!(
        dlq[&hang]["error"]
            .as_str()
            .is_some_and(|e| e.contains("timed out")),
        "{dlq:#?}"
    );
    assert!(!dlq.contains_key(&leave));
    let pids = lines(&pids);
    assert_eq!(pids.len(), 2, "{pids:?}");
    for pid in &pids {
        eventually(&format!("background child {pid} to die"), SHORT, || {
            process_gone(pid)
        });
    }
}

/// At shutdown, a job still running at the drain deadline is cut off with its whole process
/// group, background children included.
#[test]
fn exec_process_group_is_killed_when_a_stopping_worker_cuts_its_job_off() {
    let db = Db::new();
    db.ok(&["queue", "create", "tasks"]);
    db.send("tasks", &json!({}));
    let pids = db.path("pids");
    let script = format!("sleep 300 & echo $! >> {}; wait", sh_quote(&pids));
    let (mut worker, _stderr) =
        db.spawn(&["work", "tasks", "--drain-timeout", "1s", "--exec", &script]);
    eventually("the job to start its child", SHORT, || {
        lines(&pids).len() == 1
    });
    terminate(&worker.0);
    let status = wait_deadline(&mut worker.0, SHORT);
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    let pid = lines(&pids).remove(0);
    eventually(&format!("background child {pid} to die"), SHORT, || {
        process_gone(&pid)
    });
}

/// The payload is written while stderr is read: a command that writes 1 MiB to stderr
/// before reading its 1 MB payload completes instead of deadlocking on the pipes.
#[test]
fn exec_with_a_large_payload_and_early_stderr_completes() {
    let db = Db::new();
    db.ok(&["queue", "create", "big", "--max-attempts", "1"]);
    let payload = json!({ "data": "p".repeat(1_000_000) }).to_string();
    db.send_stdin(&["send", "big"], format!("{payload}\n")).ok();
    let out = db.path("out.json");
    let script = format!(
        "yes e | head -c 1048576 >&2; cat > {}; exit 3",
        sh_quote(&out)
    );
    db.work(&[
        "big",
        "--until-empty",
        "--job-timeout",
        "60s",
        "--exec",
        &script,
    ]);
    let dlq = db.dead("big");
    assert_eq!(dlq.len(), 1, "{dlq:#?}");
    let error = dlq.values().next().unwrap()["error"]
        .as_str()
        .expect("an error text")
        .to_owned();
    // Exit 3 (not the timeout), with the tail of the stderr it wrote.
    assert!(
        error.starts_with("exit 3: ") && error.ends_with("e\ne"),
        "{error:.200}"
    );
    assert!(error.len() <= 1100, "{} bytes kept", error.len());
    let written = std::fs::read_to_string(&out).expect("the command wrote its input");
    assert_eq!(written.trim_end(), payload);
}

/// `env` in a job shows none of pgbus's secrets unless passed with --pass-env.
#[test]
fn exec_environment_withholds_pgbus_secrets() {
    let db = Db::new();
    db.ok(&["queue", "create", "env"]);
    db.send("env", &json!({}));
    let out = db.path("env.txt");
    let script = format!("env > {}", sh_quote(&out));
    let mut cmd = db.cmd(&[
        "work",
        "env",
        "--until-empty",
        "--pass-env",
        "PGBUS_PASSED",
        "--exec",
        &script,
    ]);
    let secrets = [
        ("DATABASE_URL", "postgres://u:sekrit-database-url@h/d"),
        ("PGBUS_DATABASE_URL", "sekrit-pgbus-database-url"),
        ("PGBUS_TOKEN", "sekrit-token"),
        ("PGBUS_STREAM_SECRET", "sekrit-stream"),
        ("PGPASSWORD", "sekrit-pgpassword"),
        ("PGBUS_OUTBOX_URL", "sekrit-outbox"),
        ("OTEL_EXPORTER_OTLP_HEADERS", "authorization=sekrit-otlp"),
    ];
    for (name, value) in secrets {
        cmd.env(name, value);
    }
    cmd.env("PGBUS_PASSED", "passed-through")
        .env("JOB_SETTING", "inherited");
    run(cmd, None, LONG).ok();
    let env = std::fs::read_to_string(&out).expect("the job ran");
    assert!(!env.contains("sekrit"), "{env}");
    assert!(env.contains("JOB_SETTING=inherited"), "{env}");
    assert!(env.contains("PGBUS_PASSED=passed-through"), "{env}");
    assert!(env.contains("PGBUS_QUEUE=env"), "{env}");
}

#[test]
fn invalid_json_names_the_line_and_sends_nothing_of_that_batch() {
    let db = Db::new();
    db.ok(&["queue", "create", "q"]);
    let input = "{\"a\":1}\n{\"a\":2}\n{\"a\":3}\n{not json\n{\"a\":5}\n".to_owned();

    let out = db
        .send_stdin(&["send", "q", "--batch", "1000"], input.clone())
        .fails();
    let stderr = out.stderr.trim();
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("line 4"), "{stderr}");
    assert_eq!(out.stdout, "", "no ids printed");
    assert_eq!(db.depth("q"), 0, "nothing of the batch was sent");

    // With smaller batches the whole batches before the bad line are sent, and nothing of
    // the bad line's batch (lines 3 and 4).
    let out = db.send_stdin(&["send", "q", "--batch", "2"], input).fails();
    assert!(out.stderr.contains("line 4"), "{}", out.stderr);
    assert_eq!(out.stdout.lines().count(), 2, "{}", out.stdout);
    assert_eq!(db.depth("q"), 2);

    let out = db.run(&["queue", "create", "a;drop"]).fails();
    let stderr = out.stderr.trim();
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.contains("invalid queue name"), "{stderr}");
    assert!(stderr.contains("[a-z0-9_]"), "names the rule: {stderr}");
    let list = db.ok(&["queue", "list", "--json"]).json();
    assert_eq!(list.as_array().map(Vec::len), Some(1), "{list:#}");

    let out = db.run(&["send", "q", "{\"unterminated\""]).fails();
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);
    assert!(out.stderr.contains("not valid JSON"), "{}", out.stderr);
    assert_eq!(db.depth("q"), 2);
}

// ---------------------------------------------------------------------------------------
// dlq, queue management, migrate
// ---------------------------------------------------------------------------------------

#[test]
fn dlq_retry_and_discard_by_id_and_all() {
    let db = Db::new();
    db.ok(&["queue", "create", "q", "--max-attempts", "1"]);
    let ids: Vec<i64> = (0..4).map(|n| db.send("q", &json!({ "n": n }))).collect();
    let dead_letter_all = ["q", "--until-empty", "--exec", "exit 65"];
    db.work(&dead_letter_all);
    assert_eq!(db.dead("q").keys().copied().collect::<Vec<_>>(), ids);
    assert_eq!(db.depth("q"), 0);

    let out = db.ok(&["dlq", "retry", "q", &ids[0].to_string()]);
    assert!(out.stdout.contains("retried 1 "), "{}", out.stdout);
    assert_eq!(db.depth("q"), 1);
    let out = db.ok(&["dlq", "discard", "q", &ids[1].to_string()]);
    assert!(out.stdout.contains("discarded 1 "), "{}", out.stdout);
    let left = db.dead("q");
    assert_eq!(
        left.keys().copied().collect::<Vec<_>>(),
        vec![ids[2], ids[3]]
    );
    assert_eq!(left[&ids[2]]["payload"], json!({ "n": 2 }));

    // An id that is not dead-lettered (any more) is an error naming it, and nothing of
    // the command is done, not even for the ids that are dead-lettered.
    let gone = ids[1].to_string();
    for verb in ["retry", "discard"] {
        let out = db
            .run(&["dlq", verb, "q", &ids[2].to_string(), &gone, "999999"])
            .fails();
        let line = out.stderr.trim();
        assert_eq!(line.lines().count(), 1, "one line: {line}");
        let named = line
            .split_once("not dead-lettered in queue q: ")
            .and_then(|(_, rest)| rest.split_once(" ("))
            .map(|(ids, _)| ids);
        assert_eq!(
            named,
            Some(format!("{gone}, 999999").as_str()),
            "names exactly the missing ids: {line}"
        );
        assert!(out.stdout.is_empty(), "{}", out.stdout);
    }
    assert_eq!(db.dead("q").len(), 2, "nothing changed");

    let out = db.ok(&["dlq", "retry", "q", "--all"]);
    assert!(out.stdout.contains("retried 2 "), "{}", out.stdout);
    assert!(db.dead("q").is_empty());
    assert_eq!(db.depth("q"), 3);

    // The retried messages run again: here they land in the dead-letter queue once more.
    db.work(&dead_letter_all);
    let again = db.dead("q");
    assert_eq!(
        again.keys().copied().collect::<Vec<_>>(),
        vec![ids[0], ids[2], ids[3]]
    );
    let out = db.ok(&["dlq", "discard", "q", "--all"]);
    assert!(out.stdout.contains("discarded 3 "), "{}", out.stdout);
    assert!(db.dead("q").is_empty());
    let stats = db.queue_stats("q");
    assert_eq!(stats["depth"], 0, "{stats:#}");
    assert_eq!(stats["dead_lettered"], 0, "{stats:#}");

    db.run(&["dlq", "retry", "q"]).fails();
}

#[test]
fn queue_create_names_what_differs_and_queue_alter_changes_options() {
    let db = Db::new();
    db.ok(&[
        "queue",
        "create",
        "q",
        "--max-attempts",
        "7",
        "--lease",
        "45s",
    ]);
    // The same options, or none: still an idempotent success.
    for same in [&["--max-attempts", "7"][..], &[], &["--lease", "45s"]] {
        let mut args = vec!["queue", "create", "q"];
        args.extend_from_slice(same);
        let out = db.ok(&args);
        assert!(out.stdout.contains("already exists"), "{}", out.stdout);
    }
    // Different options: an error naming each difference and the command that changes it.
    let out = db
        .run(&[
            "queue",
            "create",
            "q",
            "--max-attempts",
            "3",
            "--lease",
            "45s",
            "--keep-history",
        ])
        .fails();
    let line = out.stderr.trim();
    assert_eq!(line.lines().count(), 1, "one line: {line}");
    for part in [
        "--max-attempts 7 (not 3)",
        "--keep-history false (not true)",
        "pgbus queue alter q",
    ] {
        assert!(line.contains(part), "{part:?} not in: {line}");
    }
    assert!(!line.contains("--lease"), "the lease is the same: {line}");
    let list = db.ok(&["queue", "list", "--json"]).json();
    assert_eq!(list[0]["max_attempts"], 7, "unchanged: {list:#}");

    // `queue alter` changes what it is given and keeps the rest.
    let out = db.ok(&[
        "queue",
        "alter",
        "q",
        "--max-attempts",
        "3",
        "--keep-history",
        "--breaker-failures",
        "2",
        "--breaker-backoff",
        "10s",
    ]);
    assert!(out.stdout.contains("altered queue q"), "{}", out.stdout);
    let q = &db.ok(&["queue", "list", "--json"]).json()[0];
    assert_eq!(
        (
            &q["max_attempts"],
            &q["lease_ms"],
            &q["keep_history"],
            &q["breaker"]
        ),
        (
            &json!(3),
            &json!(45_000),
            &json!(true),
            &json!({"failures": 2, "backoff_ms": 10_000})
        ),
        "{q:#}"
    );
    db.ok(&[
        "queue",
        "alter",
        "q",
        "--lease",
        "1m",
        "--breaker-failures",
        "4",
    ]);
    db.ok(&[
        "queue",
        "create",
        "q",
        "--max-attempts",
        "3",
        "--keep-history",
    ]);
    let q = &db.ok(&["queue", "list", "--json"]).json()[0];
    assert_eq!(q["lease_ms"], 60_000, "{q:#}");
    assert_eq!(q["breaker"], json!({"failures": 4, "backoff_ms": 10_000}));
    db.ok(&["queue", "alter", "q", "--no-keep-history", "--no-breaker"]);
    let q = &db.ok(&["queue", "list", "--json"]).json()[0];
    assert_eq!(
        (&q["keep_history"], &q["breaker"]),
        (&json!(false), &Value::Null)
    );

    // Nothing to change, a queue that does not exist, half a new breaker: errors.
    let out = db.run(&["queue", "alter", "q"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = db
        .run(&["queue", "alter", "nope", "--max-attempts", "2"])
        .fails();
    assert!(out.stderr.contains("nope"), "{}", out.stderr);
    let out = db
        .run(&["queue", "alter", "q", "--breaker-failures", "2"])
        .fails();
    assert!(out.stderr.contains("--breaker-backoff"), "{}", out.stderr);
}

#[test]
fn sending_to_a_paused_queue_says_the_messages_wait_for_resume() {
    let db = Db::new();
    db.ok(&["queue", "create", "q"]);
    let out = db.ok(&["send", "q", "{}"]);
    assert!(out.stderr.is_empty(), "{}", out.stderr);
    db.ok(&["queue", "pause", "q"]);
    for out in [
        db.ok(&["send", "q", "{}"]),
        db.send_stdin(
            &["send", "q"],
            json_lines((0..3).map(|n| json!({ "n": n }))),
        )
        .ok(),
    ] {
        let note = out.stderr.trim();
        assert_eq!(note.lines().count(), 1, "said once: {note}");
        assert!(
            note.contains("paused") && note.contains("pgbus queue resume q"),
            "{note}"
        );
        assert!(!out.stdout.trim().is_empty(), "the ids are still printed");
    }
    // -q: errors only.
    let out = db.ok(&["-q", "send", "q", "{}"]);
    assert!(out.stderr.is_empty(), "{}", out.stderr);
    assert_eq!(db.depth("q"), 6);
}

#[test]
fn queue_pause_resume_purge_drop() {
    let db = Db::new();
    let out = db.ok(&[
        "queue",
        "create",
        "q",
        "--max-attempts",
        "7",
        "--lease",
        "45s",
    ]);
    assert!(out.stdout.contains("created queue q"), "{}", out.stdout);
    let out = db.ok(&["queue", "create", "q"]);
    assert!(out.stdout.contains("already exists"), "{}", out.stdout);
    let list = db.ok(&["queue", "list", "--json"]).json();
    assert_eq!(list[0]["name"], "q");
    assert_eq!(list[0]["max_attempts"], 7);
    assert_eq!(list[0]["lease_ms"], 45_000);
    assert_eq!(list[0]["paused"], false);
    assert_eq!(list[0]["keep_history"], false);
    db.ok(&["queue", "create", "kept", "--keep-history"]);
    let list = db.ok(&["queue", "list", "--json"]).json();
    assert_eq!(list[0]["name"], "kept", "listed by name");
    assert_eq!(list[0]["keep_history"], true);
    db.ok(&["queue", "drop", "kept"]);

    for n in 0..3 {
        db.send("q", &json!({ "n": n }));
    }
    db.ok(&["queue", "pause", "q"]);
    assert_eq!(
        db.ok(&["queue", "list", "--json"]).json()[0]["paused"],
        true
    );
    assert_eq!(db.queue_stats("q")["paused"], true);

    // A worker on the paused queue gets nothing (watched for a few poll intervals).
    let out = db.path("out.jsonl");
    let exec = format!("cat >> {}", sh_quote(&out));
    let (mut worker, _stderr) =
        db.spawn(&["work", "q", "--poll-interval", "200ms", "--exec", &exec]);
    let watched = Instant::now();
    eventually("the worker to register", SHORT, || {
        db.stats()["processes"]
            .as_array()
            .is_some_and(|p| !p.is_empty())
    });
    while watched.elapsed() < Duration::from_secs(2) {
        assert!(
            lines(&out).is_empty(),
            "a paused queue handed out a message"
        );
        thread::sleep(Duration::from_millis(100));
    }
    terminate(&worker.0);
    let status = wait_deadline(&mut worker.0, Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert!(lines(&out).is_empty());
    assert_eq!(db.depth("q"), 3);

    db.ok(&["queue", "resume", "q"]);
    assert_eq!(db.queue_stats("q")["paused"], false);
    db.work(&["q", "--until-empty", "--exec", &exec]);
    assert_eq!(lines(&out).len(), 3);
    assert_eq!(db.depth("q"), 0);

    for n in 0..5 {
        db.send("q", &json!({ "n": n }));
    }
    let out = db.ok(&["queue", "purge", "q"]);
    assert!(out.stdout.contains("purged 5 "), "{}", out.stdout);
    assert_eq!(db.depth("q"), 0);

    let out = db.ok(&["queue", "drop", "q"]);
    assert!(out.stdout.contains("dropped queue q"), "{}", out.stdout);
    assert_eq!(db.ok(&["queue", "list", "--json"]).json(), json!([]));
    let out = db.run(&["queue", "drop", "q"]).fails();
    assert_eq!(out.stderr.trim().lines().count(), 1, "{}", out.stderr);
    db.run(&["send", "q", "{}"]).fails();
}

#[test]
fn migrate_check_reports_pending_and_current() {
    let db = Db::unmigrated();
    let out = db.run(&["migrate", "--check"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("pgbus migrate"), "{}", out.stderr);
    // A database of the user's is not changed behind their back.
    let out = db.run(&["queue", "create", "q"]).fails();
    assert!(out.stderr.contains("pgbus migrate"), "{}", out.stderr);

    let out = db.ok(&["migrate"]);
    assert!(out.stdout.contains("applied migrations"), "{}", out.stdout);
    let out = db.ok(&["migrate", "--check"]);
    assert!(out.stdout.contains("schema is current"), "{}", out.stdout);
    let out = db.ok(&["migrate"]);
    assert!(out.stdout.contains("schema is current"), "{}", out.stdout);
    db.ok(&["queue", "create", "q"]);
}

// ---------------------------------------------------------------------------------------
// The embedded default
// ---------------------------------------------------------------------------------------

/// A fresh `$PGBUS_HOME`; dropping it runs `pgbus db stop` so that no server outlives the
/// test, whatever happened.
struct Home {
    dir: tempfile::TempDir,
}

impl Home {
    fn new() -> Home {
        let dir = tempfile::tempdir().expect("a temporary directory");
        // As root the server runs as `postgres`, who must be able to enter the home.
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .expect("chmod the home");
        Home { dir }
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = bare();
        cmd.env("PGBUS_HOME", self.dir.path()).args(args);
        cmd
    }

    fn run(&self, args: &[&str]) -> Run {
        // The first command creates the cluster (initdb): allow for a slow machine.
        run(self.cmd(args), None, LONG)
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        let out = run(self.cmd(&["db", "stop"]), None, SHORT);
        if !out.status.success() && !thread::panicking() {
            panic!("`pgbus db stop` failed: {}", out.stderr);
        }
    }
}

/// The README's first command: `pgbus demo` on a fresh home with no database configured
/// serves the dashboard, processes jobs, and stops cleanly on Ctrl-C (SIGINT).
#[test]
fn demo_runs_on_the_embedded_default_and_stops_on_ctrl_c() {
    let home = Home::new();
    let mut demo = home.cmd(&["demo", "--listen", &format!("127.0.0.1:{}", free_port())]);
    let mut child = Background(
        demo.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting the demo"),
    );
    let (tx, lines) = std::sync::mpsc::channel();
    let stdout = BufReader::new(child.0.stdout.take().expect("stdout"));
    thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let stderr = read_all(child.0.stderr.take());
    let next_line = || lines.recv_timeout(LONG).expect("the demo said more");
    let url = loop {
        let line = next_line();
        if let Some(url) = line.strip_prefix("pgbus demo: dashboard at ") {
            break url.trim().to_owned();
        }
    };
    let page = reqwest::blocking::get(&url).expect("the dashboard");
    assert!(page.status().is_success(), "{}", page.status());
    // Progress lines until jobs were acked and some failed into the dead-letter queue.
    loop {
        let line = next_line();
        if line.starts_with("queue demo:")
            && !line.contains("dead-lettered 0")
            && !line.contains(" sent 0,")
        {
            break;
        }
    }
    let interrupt = Command::new("kill")
        .args(["-INT", &child.0.id().to_string()])
        .status()
        .expect("running kill");
    assert!(interrupt.success());
    let status = wait_deadline(&mut child.0, LONG).expect("the demo stopped after Ctrl-C");
    // What it printed last, up to its summary (the reader thread may not have passed
    // every line on yet when the process has exited).
    let mut rest = Vec::new();
    while let Ok(line) = lines.recv_timeout(SHORT) {
        let summary = line.starts_with("pgbus demo: stopped after sending");
        rest.push(line);
        if summary {
            break;
        }
    }
    let stderr = stderr.join().unwrap();
    assert!(status.success(), "{status:?}: {stderr}");
    let summary = rest
        .iter()
        .find(|l| l.starts_with("pgbus demo: stopped after sending"))
        .unwrap_or_else(|| panic!("a summary in {rest:?}"));
    let acked: u64 = summary
        .split("; ")
        .nth(1)
        .and_then(|part| part.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("acked count in {summary}"));
    assert!(acked > 0, "{summary}");
    assert!(stderr.contains("embedded PostgreSQL"), "{stderr}");
}

/// The port in "... on port N ..." of an embedded-database notice.
fn port_in(notice: &str) -> u16 {
    let rest = notice
        .split("on port ")
        .nth(1)
        .unwrap_or_else(|| panic!("no port in {notice:?}"));
    rest.split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {notice:?}"))
}

/// Pids of processes whose command line mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(needle) {
                found.push(format!("{name}: {cmdline}"));
            }
        }
    }
    found
}

#[test]
fn embedded_default_from_a_fresh_home() {
    let home = Home::new();
    let data_dir = home.data_dir();

    let created = home.run(&["queue", "create", "q"]).ok();
    assert!(
        created.stdout.contains("created queue q"),
        "{}",
        created.stdout
    );
    let notice = created.stderr.trim();
    assert!(
        notice.contains("started the embedded PostgreSQL"),
        "{notice}"
    );
    assert!(
        notice.contains(&data_dir.display().to_string()),
        "says where it lives: {notice}"
    );
    let port = port_in(notice);
    assert!(
        data_dir.join("PG_VERSION").exists(),
        "a cluster in {data_dir:?}"
    );

    // The server outlived the command and is reused, without a word: the notice is for
    // the command that started it.
    let sent = home.run(&["send", "q", r#"{"x":1}"#]).ok();
    assert!(sent.stdout.trim().parse::<i64>().is_ok(), "{}", sent.stdout);
    assert_eq!(
        sent.stderr, "",
        "nothing on stderr when the server was running"
    );
    let url = home.run(&["db", "url"]).ok();
    assert!(
        url.stdout.contains(&format!(":{port}/")),
        "the same server: {}",
        url.stdout
    );

    let stats = home.run(&["stats", "--json"]).ok();
    assert_eq!(stats.stderr, "");
    let stats = stats.json();
    assert_eq!(stats["queues"][0]["queue"], "q", "{stats:#}");
    assert_eq!(stats["queues"][0]["depth"], 1, "{stats:#}");

    let url = home.run(&["-q", "db", "start"]).ok();
    assert!(url.stdout.contains(&format!(":{port}/")), "{}", url.stdout);

    let stopped = home.run(&["db", "stop"]).ok();
    assert!(
        stopped.stdout.contains("stopped the embedded PostgreSQL"),
        "{}",
        stopped.stdout
    );
    assert!(
        TcpStream::connect_timeout(&SocketAddr::from(([127, 0, 0, 1], port)), SHORT).is_err(),
        "the server on port {port} is gone"
    );
    let left = processes_mentioning(&data_dir.display().to_string());
    assert!(left.is_empty(), "processes left running: {left:#?}");
    let again = home.run(&["db", "stop"]).ok();
    assert!(again.stdout.contains("was not running"), "{}", again.stdout);
}

// ---------------------------------------------------------------------------------------
// work --http
// ---------------------------------------------------------------------------------------

/// Answers by payload: "ok" 200, "gone" 404, "flaky" 503 with `Retry-After` the first
/// time and 200 afterwards. Every request is recorded.
fn serve_http(listener: TcpListener, log: Arc<Mutex<Vec<Request>>>, retry_after_secs: u64) {
    // Kinds that failed once already and now succeed.
    let failed_once = Arc::new(Mutex::new(BTreeSet::new()));
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let (log, failed_once) = (Arc::clone(&log), Arc::clone(&failed_once));
        thread::spawn(move || {
            let Ok(request) = read_request(&stream) else {
                return;
            };
            let kind = request.body["kind"].as_str().unwrap_or_default().to_owned();
            log.lock().unwrap().push(request);
            let first = failed_once.lock().unwrap().insert(kind.clone());
            let (status, extra, body) = match kind.as_str() {
                "ok" => ("200 OK", String::new(), "done"),
                "gone" => ("404 Not Found", String::new(), "no such thing"),
                "flaky" if first => (
                    "503 Service Unavailable",
                    format!("Retry-After: {retry_after_secs}\r\n"),
                    "busy",
                ),
                "slow" if first => ("408 Request Timeout", String::new(), "too slow"),
                "limited" if first => ("429 Too Many Requests", String::new(), "slow down"),
                "flaky" | "slow" | "limited" => ("200 OK", String::new(), "done at last"),
                _ => ("400 Bad Request", String::new(), "unexpected payload"),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes());
            let _ = stream.flush();
        });
    }
}

#[test]
fn work_http_posts_and_maps_status_codes() {
    // Longer than the first retry's backoff (at most 1 s by default), so that honouring
    // the header shows.
    const RETRY_AFTER: u64 = 2;
    let db = Db::new();
    db.ok(&["queue", "create", "hooks"]);
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding the test server");
    let url = format!(
        "http://{}/hook",
        listener.local_addr().expect("its address")
    );
    let log = Arc::new(Mutex::new(Vec::new()));
    {
        let log = Arc::clone(&log);
        thread::spawn(move || serve_http(listener, log, RETRY_AFTER));
    }

    let ok1 = db.send("hooks", &json!({ "kind": "ok", "n": 1 }));
    let gone = db.send("hooks", &json!({ "kind": "gone" }));
    let flaky = db.send("hooks", &json!({ "kind": "flaky" }));
    let ok2 = db.send("hooks", &json!({ "kind": "ok", "n": 2 }));
    let slow = db.send("hooks", &json!({ "kind": "slow" }));
    let limited = db.send("hooks", &json!({ "kind": "limited" }));

    db.work_until(&["hooks", "--http", &url], Duration::from_secs(60), |db| {
        db.depth("hooks") == 0
    });

    let dlq = db.dead("hooks");
    assert_eq!(
        dlq.keys().copied().collect::<Vec<_>>(),
        vec![gone],
        "{dlq:#?}"
    );
    let error = dlq[&gone]["error"].as_str().expect("an error text");
    assert!(error.starts_with("HTTP 404"), "{error}");
    assert!(
        error.contains("no such thing"),
        "the response body: {error}"
    );
    assert_eq!(dlq[&gone]["attempts"], 1);

    let requests = log.lock().unwrap().clone();
    let mut attempts: BTreeMap<i64, Vec<String>> = BTreeMap::new();
    for r in &requests {
        assert_eq!(r.headers[":method"], "POST", "{r:?}");
        assert_eq!(r.path, "/hook", "{r:?}");
        assert_eq!(r.headers["pgbus-queue"], "hooks", "{r:?}");
        assert!(
            r.headers["content-type"].starts_with("application/json"),
            "{r:?}"
        );
        let id: i64 = r.headers["pgbus-message-id"].parse().expect("an id");
        attempts
            .entry(id)
            .or_default()
            .push(r.headers["pgbus-attempt"].clone());
    }
    let expected: BTreeMap<i64, Vec<String>> = [
        (ok1, vec!["1".to_owned()]),
        (gone, vec!["1".to_owned()]),
        (flaky, vec!["1".to_owned(), "2".to_owned()]),
        (ok2, vec!["1".to_owned()]),
        // 408 and 429 are retried, not dead-lettered like other 4xx.
        (slow, vec!["1".to_owned(), "2".to_owned()]),
        (limited, vec!["1".to_owned(), "2".to_owned()]),
    ]
    .into_iter()
    .collect();
    assert_eq!(attempts, expected, "{requests:#?}");
    let bodies: Vec<&Value> = requests.iter().map(|r| &r.body).collect();
    assert!(
        bodies.contains(&&json!({ "kind": "ok", "n": 2 })),
        "{bodies:?}"
    );

    let flaky_at: Vec<Instant> = requests
        .iter()
        .filter(|r| r.body["kind"] == "flaky")
        .map(|r| r.at)
        .collect();
    let waited = flaky_at[1] - flaky_at[0];
    assert!(
        waited >= Duration::from_millis(RETRY_AFTER * 1000 - 100),
        "Retry-After: {RETRY_AFTER} honoured, but the retry came after {waited:?}"
    );
}

/// Answers by payload: "moved" 302 to /elsewhere (which answers 200 to anything); "far"
/// 503 with a `Retry-After` of about 95 years the first time, 200 afterwards; "endless" 400
/// with a body that starts "endless body" and never ends (the connection stays open until
/// the client closes it). Every request is recorded.
fn serve_hostile_http(listener: TcpListener, log: Arc<Mutex<Vec<Request>>>) {
    let failed_once = Arc::new(Mutex::new(BTreeSet::new()));
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let (log, failed_once) = (Arc::clone(&log), Arc::clone(&failed_once));
        thread::spawn(move || {
            let Ok(request) = read_request(&stream) else {
                return;
            };
            let kind = request.body["kind"].as_str().unwrap_or_default().to_owned();
            let elsewhere = request.path == "/elsewhere";
            log.lock().unwrap().push(request);
            let first = failed_once.lock().unwrap().insert(kind.clone());
            let head = match kind.as_str() {
                _ if elsewhere => "200 OK\r\nContent-Length: 0".to_owned(),
                "moved" => "302 Found\r\nLocation: /elsewhere\r\nContent-Length: 0".to_owned(),
                "far" if first => {
                    "503 Service Unavailable\r\nRetry-After: 3000000000\r\nContent-Length: 0"
                        .to_owned()
                }
                "far" => "200 OK\r\nContent-Length: 0".to_owned(),
                "endless" => {
                    let _ = write!(
                        stream,
                        "HTTP/1.1 400 Bad Request\r\nContent-Length: 1000000000\r\n\r\nendless body "
                    );
                    let chunk = vec![b'x'; 64 * 1024];
                    for _ in 0..4 {
                        let _ = stream.write_all(&chunk);
                    }
                    let _ = stream.flush();
                    // Hold the connection until the client hangs up (or a generous bound).
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(300)));
                    let _ = stream.read(&mut [0; 1]);
                    return;
                }
                _ => "400 Bad Request\r\nContent-Length: 0".to_owned(),
            };
            let _ = write!(stream, "HTTP/1.1 {head}\r\nConnection: close\r\n\r\n");
            let _ = stream.flush();
        });
    }
}

/// A redirect is not followed and dead-letters naming its Location; a `Retry-After` of
/// decades is shortened to `--max-retry-after`; an endless error body is read only as far
/// as the error text keeps.
#[test]
fn work_http_refuses_redirects_caps_retry_after_and_bounds_error_bodies() {
    let db = Db::new();
    db.ok(&["queue", "create", "hooks"]);
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding the test server");
    let url = format!(
        "http://{}/hook",
        listener.local_addr().expect("its address")
    );
    let log = Arc::new(Mutex::new(Vec::new()));
    {
        let log = Arc::clone(&log);
        thread::spawn(move || serve_hostile_http(listener, log));
    }
    let moved = db.send("hooks", &json!({ "kind": "moved" }));
    let far = db.send("hooks", &json!({ "kind": "far" }));
    let endless = db.send("hooks", &json!({ "kind": "endless" }));

    db.work_until(
        &["hooks", "--http", &url, "--max-retry-after", "1s"],
        Duration::from_secs(60),
        |db| db.depth("hooks") == 0,
    );

    let dlq = db.dead("hooks");
    assert_eq!(
        dlq.keys().copied().collect::<Vec<_>>(),
        vec![moved, endless],
        "{dlq:#?}"
    );
    let error = dlq[&moved]["error"].as_str().expect("an error text");
    assert!(
        error.starts_with("HTTP 302") && error.contains("Location /elsewhere"),
        "{error}"
    );
    assert_eq!(dlq[&moved]["attempts"], 1);
    let error = dlq[&endless]["error"].as_str().expect("an error text");
    assert!(error.starts_with("HTTP 400: endless body xxx"), "{error}");
    assert!(error.len() < 1100, "{} bytes kept", error.len());

    let requests = log.lock().unwrap().clone();
    assert!(
        requests.iter().all(|r| r.path == "/hook"),
        "a redirect was followed: {requests:#?}"
    );
    let far_attempts = requests
        .iter()
        .filter(|r| r.headers["pgbus-message-id"] == far.to_string())
        .count();
    assert_eq!(far_attempts, 2, "{requests:#?}");
}

// ---------------------------------------------------------------------------------------
// Signals and the supervisor
// ---------------------------------------------------------------------------------------

#[test]
fn work_stops_gracefully_on_sigterm() {
    const SENT: usize = 50;
    let db = Db::new();
    db.ok(&["queue", "create", "q"]);
    db.send_stdin(
        &["send", "q"],
        json_lines((0..SENT).map(|n| json!({ "n": n }))),
    )
    .ok();

    let out = db.path("acked.jsonl");
    // The line is written once the job's work is done, just before it exits 0.
    let exec = format!("sleep 0.2; cat >> {}", sh_quote(&out));
    let (mut worker, stderr) = db.spawn(&["work", "q", "--concurrency", "2", "--exec", &exec]);
    eventually("a first message to be processed", LONG, || {
        !lines(&out).is_empty()
    });
    terminate(&worker.0);
    let status = wait_deadline(&mut worker.0, Duration::from_secs(30));
    if status.is_none() {
        worker.stop();
    }
    let stderr = stderr.join().unwrap_or_default();
    let status = status
        .unwrap_or_else(|| panic!("the worker did not stop within 30 s of SIGTERM:\n{stderr}"));
    assert!(status.success(), "{status}\n{stderr}");

    let acked = payload_ns(&out);
    let distinct: BTreeSet<i64> = acked.iter().copied().collect();
    assert_eq!(distinct.len(), acked.len(), "nothing handled twice");
    let stats = db.queue_stats("q");
    let depth = stats["depth"].as_u64().expect("depth") as usize;
    assert!(depth > 0, "stopped before the queue was done: {stats:#}");
    assert_eq!(depth + acked.len(), SENT, "nothing lost: {stats:#}");
    assert_eq!(
        stats["in_flight"], 0,
        "the drain left nothing leased: {stats:#}"
    );
    assert_eq!(stats["dead_lettered"], 0, "{stats:#}");

    // What is left is handled by the next worker.
    db.work(&["q", "--until-empty", "--concurrency", "8", "--exec", &exec]);
    let all: BTreeSet<i64> = payload_ns(&out).into_iter().collect();
    assert_eq!(all.len(), SENT);
}

#[test]
fn processes_supervisor_runs_several_workers() {
    const SENT: usize = 500;
    let db = Db::new();
    db.ok(&["queue", "create", "q"]);
    db.send_stdin(
        &["send", "q"],
        json_lines((0..SENT).map(|n| json!({ "n": n }))),
    )
    .ok();

    let out = db.path("out.jsonl");
    let pids = db.path("pids.txt");
    // $PPID of the `sh -c` is the worker process that ran it.
    let exec = format!(
        "echo $PPID >> {}; cat >> {}",
        sh_quote(&pids),
        sh_quote(&out)
    );
    let supervisor = db.work(&["q", "--until-empty", "--processes", "2", "--exec", &exec]);

    let ns = payload_ns(&out);
    assert_eq!(ns.len(), SENT, "{}", supervisor.stderr);
    let distinct: BTreeSet<i64> = ns.iter().copied().collect();
    assert_eq!(distinct.len(), SENT, "{SENT} distinct lines");
    let workers: BTreeSet<String> = lines(&pids).into_iter().collect();
    assert_eq!(
        workers.len(),
        2,
        "two worker processes ran jobs: {workers:?}"
    );
    assert_eq!(db.depth("q"), 0);
    assert_eq!(
        db.stats()["processes"],
        json!([]),
        "all workers deregistered"
    );
}

#[test]
fn cron_run_schedules_a_config_file_and_cron_list_shows_it() {
    let db = Db::new();
    db.ok(&["queue", "create", "reports"]);
    db.ok(&["queue", "create", "ticks"]);
    let empty = db.ok(&["cron", "list", "--json"]).json();
    assert_eq!(empty, json!([]));
    let config = db.path("tasks.json");
    std::fs::write(
        &config,
        json!([
            {"name": "nightly_report", "queue": "reports", "cron": "0 3 * * *",
             "payload": {"kind": "nightly"}, "catch_up": 3},
            {"name": "tick", "queue": "ticks", "every_secs": 0.2, "payload": {"n": 1}}
        ])
        .to_string(),
    )
    .unwrap();
    let bad = db.path("bad.json");
    std::fs::write(&bad, r#"[{"name": "x", "queue": "ticks", "payload": 1}]"#).unwrap();
    let refused = db
        .run(&["cron", "run", "--config", bad.to_str().unwrap()])
        .fails();
    assert!(refused.stderr.contains("cron"), "{}", refused.stderr);

    let (mut scheduler, stderr) = db.spawn(&[
        "cron",
        "run",
        "--config",
        config.to_str().unwrap(),
        "--lease",
        "3s",
    ]);
    eventually("recurring jobs to be enqueued", LONG, || {
        db.depth("ticks") >= 3
    });
    terminate(&scheduler.0);
    let status = wait_deadline(&mut scheduler.0, Duration::from_secs(30));
    if status.is_none() {
        scheduler.stop();
    }
    let stderr = stderr.join().unwrap_or_default();
    assert!(status.is_some_and(|s| s.success()), "{stderr}");

    let listed = db.ok(&["cron", "list", "--json"]).json();
    let nightly = &listed[0];
    assert_eq!(nightly["task"], "nightly_report");
    assert_eq!(nightly["queue"], "reports");
    assert_eq!(nightly["schedule"], "cron 0 3 * * *");
    assert_eq!(nightly["missed"], "catch-up 3");
    let next = nightly["next_at"].as_str().unwrap();
    assert!(next.contains("T03:00:00"), "{nightly}");
    assert_eq!(listed[1]["schedule"], "every 200ms");
    assert_eq!(listed[1]["missed"], "skip");
    let table = db.ok(&["cron", "list"]).stdout;
    assert!(
        table.contains("nightly_report") && table.contains(next),
        "{table}"
    );
}

/// Whether an RFC 3339 time from `cron list` is a whole second (`...:05.000Z`), and its
/// second of the minute.
fn whole_second(time: &str) -> Option<u32> {
    let seconds = time.strip_suffix(".000Z")?.rsplit(':').next()?;
    seconds.parse().ok()
}

#[test]
fn cron_with_a_seconds_step_fires_on_the_step_and_cron_list_shows_whole_seconds() {
    let db = Db::new();
    db.ok(&["queue", "create", "ticks"]);
    db.ok(&["queue", "create", "reports"]);
    let config = db.path("tasks.json");
    std::fs::write(
        &config,
        json!([
            {"name": "every_5s", "queue": "ticks", "cron": "*/5 * * * * *", "payload": {}},
            {"name": "nightly", "queue": "reports", "cron": "0 3 * * *", "payload": {}}
        ])
        .to_string(),
    )
    .unwrap();
    let started = Instant::now();
    let (mut scheduler, stderr) = db.spawn(&["cron", "run", "--config", config.to_str().unwrap()]);
    // Long enough for several ticks of the scheduler (one a second) per occurrence, and
    // for at least two occurrences.
    let observe = Duration::from_secs(12);
    eventually("two occurrences and the observed span", LONG, || {
        started.elapsed() >= observe && db.depth("ticks") >= 2
    });
    terminate(&scheduler.0);
    let status = wait_deadline(&mut scheduler.0, Duration::from_secs(30));
    let span = started.elapsed();
    if status.is_none() {
        scheduler.stop();
    }
    let stderr = stderr.join().unwrap_or_default();
    assert!(status.is_some_and(|s| s.success()), "{stderr}");

    // At most one job per 5 s of the span the scheduler ran (plus slack for the edges).
    let enqueued = db.depth("ticks");
    let most = span.as_secs() / 5 + 2;
    assert!(
        (2..=most).contains(&enqueued),
        "{enqueued} jobs in {span:?} from */5 (at most {most})"
    );
    assert_eq!(
        count(
            &db.url,
            "SELECT count(*) FROM pgbus.schedule_runs \
             WHERE extract(microseconds FROM scheduled_at)::bigint % 5000000 <> 0"
        ),
        0,
        "every occurrence on a whole multiple of 5 s"
    );

    let listed = db.ok(&["cron", "list", "--json"]).json();
    let tasks = listed.as_array().expect("an array of tasks");
    let task = |name: &str| {
        tasks
            .iter()
            .find(|t| t["task"] == name)
            .unwrap_or_else(|| panic!("{name} missing: {listed:#}"))
    };
    let fast = task("every_5s");
    for field in ["last_at", "next_at"] {
        let time = fast[field].as_str().unwrap_or_default();
        assert!(
            whole_second(time).is_some_and(|s| s % 5 == 0),
            "{field} of */5 is a whole multiple of 5 s: {fast}"
        );
    }
    let nightly = task("nightly");
    assert_eq!(nightly["last_at"], Value::Null, "never ran: {nightly}");
    let next = nightly["next_at"].as_str().unwrap_or_default();
    assert!(next.ends_with("T03:00:00.000Z"), "whole seconds: {nightly}");

    let table = db.ok(&["cron", "list"]).stdout;
    let row = table
        .lines()
        .find(|l| l.starts_with("nightly "))
        .unwrap_or_else(|| panic!("no nightly row:\n{table}"));
    let columns: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        columns[columns.len() - 2..],
        ["never", next],
        "LAST never, NEXT whole seconds:\n{table}"
    );
}

#[test]
fn a_queue_with_a_circuit_breaker_pauses_itself_visibly_in_stats() {
    let db = Db::new();
    db.ok(&[
        "queue",
        "create",
        "fragile",
        "--max-attempts",
        "100",
        "--breaker-failures",
        "2",
        "--breaker-backoff",
        "1h",
    ]);
    let listed = db.ok(&["queue", "list", "--json"]).json();
    assert_eq!(
        listed[0]["breaker"],
        json!({"failures": 2, "backoff_ms": 3_600_000})
    );
    let refused = db
        .run(&["queue", "create", "half", "--breaker-failures", "2"])
        .fails();
    assert!(
        refused.stderr.contains("breaker-backoff"),
        "{}",
        refused.stderr
    );
    for n in 0..3 {
        db.send("fragile", &json!({ "n": n }));
    }
    // Every job fails: after two in a row the breaker opens, and the queue hands out
    // nothing more, so `--until-empty` ends with jobs left.
    db.work(&[
        "fragile",
        "--concurrency",
        "1",
        "--exec",
        "exit 1",
        "--until-empty",
    ]);
    let stats = db.queue_stats("fragile");
    assert!(
        stats["breaker_open_for_ms"].as_u64().unwrap() > 0,
        "{stats:#}"
    );
    assert_eq!(stats["depth"], 3, "{stats:#}");
    let table = db.ok(&["stats"]).stdout;
    assert!(table.contains("fragile (breaker"), "{table}");
}

// ---------------------------------------------------------------------------------------
// topic bind|list, publish, topics in stats
// ---------------------------------------------------------------------------------------

#[test]
fn topic_bind_publish_and_stats() {
    let db = Db::new();
    db.ok(&["queue", "create", "billing"]);
    db.ok(&["queue", "create", "audit"]);
    db.ok(&["topic", "bind", "order.*", "billing"]);
    db.ok(&["topic", "bind", "order.#", "audit"]);
    let again = db.ok(&["topic", "bind", "order.*", "billing"]);
    assert!(again.stdout.contains("already bound"), "{}", again.stdout);
    let bad = db.run(&["topic", "bind", "order..paid", "billing"]).fails();
    assert!(bad.stderr.contains("empty segments"), "{}", bad.stderr);
    assert_eq!(
        db.ok(&["topic", "list", "--json"]).json(),
        json!([
            { "pattern": "order.#", "queue": "audit" },
            { "pattern": "order.*", "queue": "billing" },
        ])
    );

    // One event as an argument: its id and its number of copies.
    let one = db.ok(&["publish", "order.paid", r#"{"n": 0}"#]);
    let fields: Vec<&str> = one.stdout.split_whitespace().collect();
    assert_eq!(fields.len(), 2, "{}", one.stdout);
    assert_eq!(fields[0].len(), 36, "a UUID: {}", fields[0]);
    assert_eq!(fields[1], "2");
    // Lines on stdin, in bulk.
    let input = json_lines((1..=100).map(|n| json!({ "n": n })));
    let many = db.send_stdin(&["publish", "order.paid"], input).ok();
    assert_eq!(many.stdout.lines().count(), 100);
    assert!(
        many.stdout.lines().all(|l| l.ends_with(" 2")),
        "{}",
        many.stdout
    );
    let bad_line = db
        .send_stdin(&["publish", "order.paid"], "{\"n\": 1}\nnot json\n".into())
        .fails();
    assert!(bad_line.stderr.contains("line 2"), "{}", bad_line.stderr);
    // A key no pattern matches is reported, not silently dropped.
    let unrouted = db.ok(&["publish", "invoice.sent", r#"{"n": -1}"#]);
    assert!(
        unrouted.stdout.trim().ends_with(" 0"),
        "{}",
        unrouted.stdout
    );
    assert!(
        unrouted.stderr.contains("matched no binding"),
        "{}",
        unrouted.stderr
    );
    // ... and a subscription created later with a start position receives it.
    let late = db.ok(&["topic", "bind", "invoice.*", "audit", "--earliest"]);
    assert!(late.stdout.contains("1 events replayed"), "{}", late.stdout);

    assert_eq!(db.depth("billing"), 101);
    assert_eq!(db.depth("audit"), 102);
    let mut topics = db.stats()["topics"].clone();
    for topic in topics.as_array_mut().expect("a topics array") {
        let at = topic
            .as_object_mut()
            .and_then(|t| t.remove("last_published_at"));
        assert!(at.is_some_and(|t| t.is_string()), "a publish time: {topic}");
    }
    assert_eq!(
        topics,
        json!([
            { "routing_key": "invoice.sent", "published": 1, "unrouted": 1, "copies": 0 },
            { "routing_key": "order.paid", "published": 101, "unrouted": 0, "copies": 202 },
        ])
    );
    let table = db.ok(&["stats"]).stdout;
    assert!(
        table.contains("TOPIC") && table.contains("order.paid"),
        "{table}"
    );

    // The copies are ordinary messages: a worker hands each payload to its command.
    let out = db.path("billing.jsonl");
    db.work(&[
        "billing",
        "--until-empty",
        "--exec",
        &format!("cat >> {}", sh_quote(&out)),
    ]);
    let ns: BTreeSet<i64> = payload_ns(&out).into_iter().collect();
    assert_eq!(ns, (0..=100).collect());
}

// ---------------------------------------------------------------------------------------
// --help
// ---------------------------------------------------------------------------------------

/// The lines of the section of `help` under `heading` (up to the next blank line).
fn help_section<'a>(help: &'a str, heading: &str) -> Vec<&'a str> {
    help.lines()
        .skip_while(|l| *l != heading)
        .skip(1)
        .take_while(|l| !l.is_empty())
        .collect()
}

/// The options every command takes, listed under "Global options" in every help.
const GLOBAL: [&str; 6] = [
    "--database-url",
    "--pooler",
    "--listen-url",
    "--log-format",
    "--verbose",
    "--quiet",
];

#[test]
fn every_help_lists_global_options_apart_and_describes_every_argument() {
    let mut pending = vec![Vec::<String>::new()];
    let mut seen = 0;
    while let Some(path) = pending.pop() {
        let mut cmd = bare();
        cmd.args(&path).arg("-h");
        let help = run(cmd, None, SHORT).ok().stdout;
        let what = format!("pgbus {} -h", path.join(" "));
        seen += 1;
        // The flag column of a section: `-v, --verbose...` of `  -v, --verbose...  More`.
        let flags = |heading: &str| -> Vec<String> {
            help_section(&help, heading)
                .iter()
                .filter_map(|l| l.trim_start().split("  ").next())
                .flat_map(|f| f.split([',', ' ', '.']))
                .filter(|f| f.starts_with("--"))
                .map(str::to_owned)
                .collect()
        };
        let own = flags("Options:");
        let global = flags("Global options:");
        for flag in GLOBAL {
            let flag = flag.to_owned();
            assert!(
                global.contains(&flag) && !own.contains(&flag),
                "{what}: {flag} belongs under \"Global options:\"\n{help}"
            );
        }
        for line in help_section(&help, "Arguments:") {
            let line = line.trim();
            if line.starts_with('<') || line.starts_with('[') {
                let described = line
                    .split_once("  ")
                    .is_some_and(|(_, d)| !d.trim().is_empty());
                assert!(
                    described,
                    "{what}: argument without a description: {line:?}"
                );
            }
        }
        for line in help_section(&help, "Commands:") {
            let name = line.split_whitespace().next().unwrap_or_default();
            if name != "help" {
                let mut sub = path.clone();
                sub.push(name.to_owned());
                pending.push(sub);
            }
        }
    }
    assert!(seen > 30, "walked only {seen} commands");
}

/// One output discipline: `-q` quiets standard error and leaves standard output alone,
/// `--log-format json` makes every standard-error line a JSON object (notes and the
/// final error too), no ANSI colour when standard error is not a terminal, and tables as
/// wide as their content.
#[test]
fn output_follows_one_discipline_across_commands() {
    let db = Db::new();
    db.ok(&["queue", "create", "a_rather_long_queue_name_for_a_table"]);
    db.ok(&["queue", "create", "q"]);
    db.ok(&["queue", "pause", "q"]);

    // A note (sending to a paused queue) in text, in JSON, and not at all with -q.
    let text = db.ok(&["send", "q", "{}"]);
    assert!(
        text.stderr.starts_with("pgbus: queue q is paused"),
        "{}",
        text.stderr
    );
    let json = db.ok(&["--log-format", "json", "send", "q", "{}"]);
    let quiet = db.ok(&["-q", "send", "q", "{}"]);
    assert_eq!(quiet.stderr, "");
    for out in [&text, &json, &quiet] {
        assert!(
            out.stdout.trim().parse::<i64>().is_ok(),
            "the id: {}",
            out.stdout
        );
    }
    // An error, and a worker's logs, in JSON: every line parses.
    let failed = db
        .run(&["--log-format", "json", "queue", "create", "Bad Name"])
        .fails();
    db.ok(&["queue", "resume", "q"]);
    let worked = db.ok(&[
        "--log-format",
        "json",
        "work",
        "q",
        "--exec",
        "cat >/dev/null",
        "--until-empty",
    ]);
    for stderr in [&json.stderr, &failed.stderr, &worked.stderr] {
        assert!(!stderr.trim().is_empty());
        for line in stderr.lines() {
            let value: Value =
                serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            assert!(
                value["level"].is_string() && value["fields"]["message"].is_string(),
                "{line}"
            );
        }
    }
    assert!(
        failed.stderr.contains(r#""level":"ERROR""#),
        "{}",
        failed.stderr
    );

    // Logs in text on a pipe carry no colour codes.
    let plain = db.ok(&["work", "q", "--exec", "cat >/dev/null", "--until-empty"]);
    assert!(!plain.stderr.is_empty());
    assert!(
        !plain.stderr.contains('\u{1b}'),
        "ANSI escapes: {:?}",
        plain.stderr
    );

    // Columns as wide as their widest cell: every row's second column starts together.
    let table = db.ok(&["queue", "list"]).stdout;
    let starts: Vec<usize> = table
        .lines()
        .map(|line| {
            line.find(" true")
                .or_else(|| line.find(" false"))
                .or_else(|| line.find(" PAUSED"))
                .unwrap_or(0)
        })
        .collect();
    assert_eq!(starts.len(), 3, "{table}");
    assert!(starts.iter().all(|s| *s == starts[0]), "{table}");
    assert_eq!(
        starts[0],
        "a_rather_long_queue_name_for_a_table".len() + 1,
        "{table}"
    );
}

/// `work --help` states the process's one limit and its connection budget.
#[test]
fn work_help_states_the_connection_budget() {
    let mut cmd = bare();
    cmd.args(["work", "--help"]);
    let help = run(cmd, None, SHORT).ok().stdout;
    // The text as one line, wrapped however the terminal wraps it.
    let text = help.split_whitespace().collect::<Vec<_>>().join(" ");
    for said in [
        "plain and grouped messages together",
        "one pgbus:fetch, one pgbus:listen",
        "at most 3 pgbus:pool, 5 in all",
        "one pgbus:recovery and one pgbus:group per running group (at most N): N + 6 in all",
        "close after 30 s unused",
    ] {
        assert!(
            text.contains(said),
            "work --help does not say {said:?}:\n{help}"
        );
    }
    // The short help keeps to one line per option.
    let mut cmd = bare();
    cmd.args(["work", "-h"]);
    let short = run(cmd, None, SHORT).ok().stdout;
    assert!(!short.contains("pgbus:recovery"), "{short}");
}
