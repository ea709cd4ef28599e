//! End-to-end tests of `pgbus work`: when `--until-empty` stops. Every test runs the real
//! binary on a fresh database of its own.

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
