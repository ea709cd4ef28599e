//! `pgbus job show|list|retry|cancel|...` end to end: the real binary on real Postgres, jobs
//! seeded through `pgbus send` and a real `pgbus work` whose command fails, so dead letters
//! carry an error history.

use std::collections::BTreeSet;

use serde_json::{json, Value};

mod common;
use common::*;

/// What [`seeded`] left, by state.
struct Seed {
    db: Db,
    /// Dead-lettered after two failed attempts, oldest first; the last one is grouped
    /// (`customer_9`).
    dead: Vec<i64>,
    /// Acked, in the archive (the queue keeps history).
    archived: Vec<i64>,
    /// Ready, oldest first: `n` 1 to 4; `customer.id` 42 for 1 and 3; priority 5 for 2
    /// and 3; group `customer_7` for 2.
    ready: Vec<i64>,
    /// Delayed by an hour.
    scheduled: i64,
}

/// Queue `tasks` (two attempts, history kept) with jobs in every state but in flight.
fn seeded() -> Seed {
    let db = Db::new();
    db.ok(&[
        "queue",
        "create",
        "tasks",
        "--max-attempts",
        "2",
        "--keep-history",
    ]);
    let mut dead = vec![
        db.send("tasks", &json!({ "kind": "fail", "n": 1 })),
        db.send("tasks", &json!({ "kind": "fail", "n": 2 })),
    ];
    let grouped = db.ok(&[
        "send",
        "tasks",
        "--group",
        "customer_9",
        r#"{"kind": "fail", "n": 3}"#,
    ]);
    dead.push(grouped.stdout.trim().parse().expect("send prints the id"));
    let archived = vec![
        db.send("tasks", &json!({ "kind": "fine", "n": 1 })),
        db.send("tasks", &json!({ "kind": "fine", "n": 2 })),
    ];
    // The error ends in a terminal escape, which tables must not pass on raw.
    let script = r#"read p; case "$p" in *fail*) printf 'Boom on %s\033[0m' "$PGBUS_ATTEMPT" >&2; exit 1;; esac"#;
    db.work_until(&["tasks", "--exec", script], LONG, |db| {
        db.dead("tasks").len() == 3 && db.depth("tasks") == 0
    });

    let send = |payload: Value, extra: &[&str]| -> i64 {
        let payload = payload.to_string();
        let mut args = vec!["send", "tasks"];
        args.extend_from_slice(extra);
        args.push(&payload);
        let out = db.ok(&args);
        out.stdout.trim().parse().expect("send prints the id")
    };
    let ready = vec![
        send(json!({ "customer": { "id": 42 }, "n": 1 }), &[]),
        send(
            json!({ "customer": { "id": 7 }, "n": 2 }),
            &["--priority", "5", "--group", "customer_7"],
        ),
        send(
            json!({ "customer": { "id": 42 }, "n": 3 }),
            &["--priority", "5"],
        ),
        send(json!({ "customer": { "id": 1 }, "n": 4 }), &[]),
    ];
    let scheduled = send(json!({ "n": 5 }), &["--delay", "1h"]);
    Seed {
        db,
        dead,
        archived,
        ready,
        scheduled,
    }
}

/// The ids of a `job list ... --json` page, in its order.
#[track_caller]
fn listed(db: &Db, args: &[&str]) -> Vec<i64> {
    let mut all = vec!["job", "list"];
    all.extend_from_slice(args);
    all.push("--json");
    let page = db.ok(&all).json();
    page["jobs"]
        .as_array()
        .unwrap_or_else(|| panic!("no jobs array: {page:#}"))
        .iter()
        .map(|j| j["id"].as_i64().expect("an id"))
        .collect()
}

fn rev(ids: &[i64]) -> Vec<i64> {
    ids.iter().rev().copied().collect()
}

/// `pgbus ARGS` as user `tester` (the audit log's `cli:tester`).
fn as_tester(db: &Db, args: &[&str]) -> Run {
    let mut cmd = db.cmd(args);
    cmd.env("USER", "tester");
    run(cmd, None, SHORT)
}

/// Asserts a failed command said one line (exit `code`) naming `what`.
#[track_caller]
fn one_line_error(run: Run, code: i32, what: &[&str]) {
    assert_eq!(run.status.code(), Some(code), "{run:?}");
    let stderr = run.stderr.trim();
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    for w in what {
        assert!(stderr.contains(w), "{w:?} not in: {stderr}");
    }
}

#[test]
fn list_shows_each_state_and_filter_in_json_and_in_a_table() {
    let Seed {
        db,
        dead,
        archived,
        ready,
        scheduled,
    } = seeded();

    // Every state, newest first unless --oldest.
    assert_eq!(listed(&db, &["tasks"]), rev(&ready));
    assert_eq!(listed(&db, &["tasks", "--oldest"]), ready);
    assert_eq!(
        listed(&db, &["tasks", "--state", "scheduled"]),
        vec![scheduled]
    );
    assert_eq!(listed(&db, &["tasks", "--state", "dead"]), rev(&dead));
    assert_eq!(
        listed(&db, &["tasks", "--state", "archived", "--oldest"]),
        archived
    );
    assert_eq!(
        listed(&db, &["tasks", "--state", "in_flight"]),
        Vec::<i64>::new()
    );
    let archived_note = db
        .ok(&["job", "list", "tasks", "--state", "archived"])
        .stderr;
    assert!(
        !archived_note.contains("keeps no history"),
        "{archived_note}"
    );

    // Each filter.
    assert_eq!(
        listed(&db, &["tasks", "--id", &ready[2].to_string()]),
        vec![ready[2]]
    );
    assert_eq!(
        listed(&db, &["tasks", "--group", "customer_7"]),
        vec![ready[1]]
    );
    assert_eq!(
        listed(&db, &["tasks", "--state", "dead", "--group", "customer_9"]),
        vec![dead[2]]
    );
    assert_eq!(
        listed(&db, &["tasks", "--priority", "5"]),
        vec![ready[2], ready[1]]
    );
    assert_eq!(
        listed(&db, &["tasks", "--payload", "customer.id=42"]),
        vec![ready[2], ready[0]]
    );
    assert_eq!(
        listed(
            &db,
            &[
                "tasks",
                "--state",
                "dead",
                "--payload",
                "kind=fail",
                "--oldest"
            ]
        ),
        dead
    );
    assert_eq!(
        listed(&db, &["tasks", "--state", "dead", "--error", "BOOM ON 2"]),
        rev(&dead),
        "the error filter ignores case and reads the last error"
    );
    assert_eq!(
        listed(&db, &["tasks", "--state", "dead", "--error", "boom on 1"]),
        Vec::<i64>::new()
    );
    assert_eq!(
        listed(&db, &["tasks", "--state", "dead", "--min-attempts", "2"]),
        rev(&dead)
    );
    assert_eq!(
        listed(&db, &["tasks", "--state", "dead", "--min-attempts", "3"]),
        Vec::<i64>::new()
    );

    // The JSON page: the API's shape, with the queue's counts.
    let page = db
        .ok(&["job", "list", "tasks", "--state", "dead", "--json"])
        .json();
    assert!(page["next"].is_null(), "{page:#}");
    assert!(page["bound"].is_string(), "{page:#}");
    let first = &page["jobs"][0];
    assert_eq!(first["id"], dead[2]);
    assert_eq!(first["state"], "dead");
    assert_eq!(first["group"], "customer_9");
    assert_eq!(first["attempts"], 2);
    assert!(
        first["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("Boom on 2")),
        "{first:#}"
    );
    assert!(
        first["payload_preview"]
            .as_str()
            .is_some_and(|p| p.contains("fail")),
        "{first:#}"
    );
    let exact = |n: usize| json!({ "n": n, "exact": true });
    assert_eq!(
        page["counts"],
        json!({
            "ready": exact(4),
            "scheduled": exact(1),
            "in_flight": exact(0),
            "dead": exact(3),
            "archived": exact(2),
        })
    );

    // The table: a header, one line per job, then the counts.
    let table = db.ok(&["job", "list", "tasks", "--state", "dead"]);
    let lines: Vec<&str> = table.stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{}", table.stdout);
    let header: Vec<&str> = lines[0].split_whitespace().collect();
    assert_eq!(
        header,
        [
            "ID",
            "STATE",
            "PRIORITY",
            "GROUP",
            "ATTEMPTS",
            "FAILED_AT",
            "LAST_ERROR",
            "PAYLOAD"
        ]
    );
    for (line, id) in lines[1..4].iter().zip(rev(&dead)) {
        let cells: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(cells[0], id.to_string(), "{line}");
        assert_eq!(cells[1], "dead", "{line}");
        assert!(line.contains("exit 1: Boom on 2"), "{line}");
    }
    assert!(lines[1].contains("customer_9"), "{}", lines[1]);
    assert!(
        !table.stdout.contains('\u{1b}') && table.stdout.contains("Boom on 2\\u{1b}[0m"),
        "the escape is shown escaped: {}",
        table.stdout
    );
    assert_eq!(
        lines[4],
        "ready 4 · scheduled 1 · in_flight 0 · dead 3 · archived 2"
    );
    assert!(
        !table.stderr.contains("more:"),
        "one page holds them all: {}",
        table.stderr
    );
}

#[test]
fn a_running_job_is_shown_with_its_holder_and_cancelled_where_it_runs() {
    let db = Db::new();
    // A short lease: the worker extends it often, and learns of the cancel at once.
    db.ok(&["queue", "create", "slow", "--lease", "2s"]);
    let nothing = db.ok(&["job", "list", "slow", "--state", "archived"]);
    assert!(
        nothing.stderr.contains("queue slow keeps no history"),
        "{}",
        nothing.stderr
    );
    let pid_file = db.path("handler.pid");
    let script = format!("echo $$ > {}; exec sleep 600", sh_quote(&pid_file));
    let (mut worker, _) = db.spawn(&["work", "slow", "--exec", &script]);
    // Sent once the worker is registered: a claim names the process it registered as.
    eventually("the worker registered", SHORT, || {
        db.stats()["processes"]
            .as_array()
            .is_some_and(|p| !p.is_empty())
    });
    let id = db.send("slow", &json!({ "sleep": true }));
    eventually("the job in flight", SHORT, || {
        listed(&db, &["slow", "--state", "in_flight"]) == vec![id]
    });
    assert_eq!(listed(&db, &["slow"]), Vec::<i64>::new());
    let job = db.ok(&["job", "show", &id.to_string(), "--json"]).json();
    assert_eq!(job["state"], "in_flight");
    assert_eq!(job["attempts"], 1);
    assert!(job["lease_until"].is_string(), "{job:#}");
    assert_eq!(
        job["held_by"]["pid"],
        worker.0.id(),
        "the holder is the worker process: {job:#}"
    );
    let shown = db.ok(&["job", "show", &id.to_string()]).stdout;
    for expected in [
        "in_flight",
        "lease_until",
        "held_by",
        &format!("pid {}", worker.0.id()),
    ] {
        assert!(shown.contains(expected), "{expected:?} not in:\n{shown}");
    }

    // Cancelled: the handler's process ends, the job is gone, the worker goes on.
    eventually("the handler started", SHORT, || {
        lines(&pid_file)
            .first()
            .is_some_and(|l| l.trim().parse::<u32>().is_ok())
    });
    let handler = lines(&pid_file)[0].trim().to_owned();
    let out = db.ok(&["job", "cancel", &id.to_string()]);
    assert_eq!(out.stdout, "cancelled 1 of 1\n");
    eventually("the handler stopped", LONG, || {
        !std::path::Path::new(&format!("/proc/{handler}")).exists()
    });
    assert_eq!(
        listed(&db, &["slow", "--state", "in_flight"]),
        Vec::<i64>::new()
    );
    assert_eq!(listed(&db, &["slow", "--state", "dead"]), Vec::<i64>::new());
    one_line_error(db.run(&["job", "show", &id.to_string()]), 1, &["no job"]);
    assert!(
        matches!(worker.0.try_wait(), Ok(None)),
        "the worker runs on"
    );
    terminate(&worker.0);
    assert!(
        wait_deadline(&mut worker.0, SHORT).is_some_and(|s| s.success()),
        "nothing left to drain"
    );
}

#[test]
fn pages_followed_by_cursor_cover_every_job_exactly_once() {
    let db = Db::new();
    db.ok(&["queue", "create", "many"]);
    let input = json_lines((0..23).map(|n| json!({ "n": n })));
    let sent: Vec<i64> = db
        .send_stdin(&["send", "many"], input)
        .ok()
        .stdout
        .lines()
        .map(|l| l.trim().parse().expect("send prints one id a line"))
        .collect();
    assert_eq!(sent.len(), 23);

    for (order, expected) in [(None, rev(&sent)), (Some("--oldest"), sent.clone())] {
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        let mut pages = 0;
        loop {
            let mut args = vec!["job", "list", "many", "--limit", "5", "--json"];
            args.extend(order);
            if let Some(c) = &cursor {
                args.extend(["--cursor", c.as_str()]);
            }
            let page = db.ok(&args).json();
            let jobs = page["jobs"].as_array().expect("a jobs array");
            assert!(jobs.len() <= 5, "{page:#}");
            seen.extend(jobs.iter().map(|j| j["id"].as_i64().expect("an id")));
            pages += 1;
            assert!(pages <= 10, "the cursors do not end: {seen:?}");
            match page["next"].as_str() {
                Some(next) => cursor = Some(next.to_owned()),
                None => break,
            }
        }
        assert_eq!(seen, expected, "{order:?}: each job once, in order");
        assert_eq!(
            seen.iter().collect::<BTreeSet<_>>().len(),
            seen.len(),
            "no job twice"
        );
    }

    // For people: the table's note on stderr names the cursor, which continues the list.
    let first = db.ok(&["job", "list", "many", "--limit", "20"]);
    let cursor = first
        .stderr
        .lines()
        .find_map(|l| l.strip_prefix("pgbus: more: --cursor "))
        .unwrap_or_else(|| panic!("no cursor note: {}", first.stderr))
        .trim()
        .to_owned();
    assert_eq!(first.stdout.lines().count(), 22, "{}", first.stdout);
    let rest = listed(&db, &["many", "--limit", "20", "--cursor", &cursor]);
    assert_eq!(rest, rev(&sent[..3]));
    // `-q` keeps the note off standard error; the data is unchanged.
    let quiet = db.ok(&["-q", "job", "list", "many", "--limit", "20"]);
    assert_eq!(quiet.stderr, "");
    assert_eq!(quiet.stdout, first.stdout);
}

#[test]
fn show_tells_a_dead_jobs_whole_story_in_text_and_json() {
    let Seed { db, dead, .. } = seeded();
    let id = dead[2];

    let job = db.ok(&["job", "show", &id.to_string(), "--json"]).json();
    assert_eq!(job["id"], id);
    assert_eq!(job["queue"], "tasks");
    assert_eq!(job["state"], "dead");
    assert_eq!(job["group"], "customer_9");
    assert_eq!(job["attempts"], 2);
    assert_eq!(job["max_attempts"], 2);
    assert_eq!(job["content_type"], "application/json");
    assert_eq!(job["payload_truncated"], false);
    let payload: Value =
        serde_json::from_str(job["payload"].as_str().expect("the payload as text"))
            .expect("the payload pretty-printed JSON");
    assert_eq!(payload, json!({ "kind": "fail", "n": 3 }));
    let errors = job["errors"].as_array().expect("an error history");
    let attempts: Vec<&Value> = errors.iter().map(|e| &e["attempt"]).collect();
    assert_eq!(attempts, [1, 2], "{job:#}");
    for (e, n) in errors.iter().zip(1..) {
        let text = e["error"].as_str().expect("an error text");
        assert!(text.starts_with("exit 1: "), "{text}");
        assert!(
            text.contains(&format!("Boom on {n}\u{1b}[0m")),
            "kept whole: {text}"
        );
        assert!(e["at"].is_string(), "{e:#}");
    }

    let text = db.ok(&["job", "show", &id.to_string()]).stdout;
    for expected in [
        &format!("job {id}"),
        "queue",
        "dead",
        "customer_9",
        "2 of 2",
        "failed_at",
        "application/json",
        "\"kind\": \"fail\"",
        "ATTEMPT",
    ] {
        assert!(text.contains(expected), "{expected:?} not in:\n{text}");
    }
    let history: Vec<&str> = text
        .lines()
        .skip_while(|l| !l.starts_with("ATTEMPT"))
        .skip(1)
        .collect();
    assert_eq!(history.len(), 2, "{text}");
    assert!(history[0].trim_start().starts_with("1 "), "{text}");
    assert!(history[0].contains("Boom on 1"), "{text}");
    assert!(history[1].contains("Boom on 2"), "{text}");
    assert!(!text.contains('\u{1b}'), "escaped: {text}");
    assert!(text.contains("Boom on 1\\u{1b}[0m"), "{text}");

    // The payload whole, as stored.
    let raw = db.ok(&["job", "show", &id.to_string(), "--payload"]).stdout;
    assert_eq!(
        serde_json::from_str::<Value>(&raw).expect("the stored JSON"),
        json!({ "kind": "fail", "n": 3 })
    );

    // An id that is no job: one line, exit 1, as other lookups fail.
    one_line_error(db.run(&["job", "show", "987654"]), 1, &["no job 987654"]);
    one_line_error(
        db.run(&["job", "show", "987654", "--payload"]),
        1,
        &["no job 987654"],
    );
}

#[test]
fn actions_change_what_the_lists_show_and_are_audited() {
    let Seed {
        db,
        dead,
        archived,
        ready,
        scheduled,
    } = seeded();
    let id = |n: i64| n.to_string();

    // Retry: a dead job back in the queue, ready now, its history kept.
    let out = as_tester(&db, &["job", "retry", &id(dead[0])]).ok();
    assert_eq!(out.stdout, "retried 1 of 1\n");
    assert!(listed(&db, &["tasks", "--state", "ready"]).contains(&dead[0]));
    assert!(!listed(&db, &["tasks", "--state", "dead"]).contains(&dead[0]));
    let job = db.ok(&["job", "show", &id(dead[0]), "--json"]).json();
    assert_eq!(job["state"], "ready");
    assert_eq!(job["errors"].as_array().map(Vec::len), Some(2), "{job:#}");

    // Cancel: a ready job gone from every list; an id given twice counts once.
    let out = as_tester(&db, &["job", "cancel", &id(ready[0]), &id(ready[0])]).ok();
    assert_eq!(out.stdout, "cancelled 1 of 1\n");
    assert!(!listed(&db, &["tasks"]).contains(&ready[0]));
    one_line_error(db.run(&["job", "show", &id(ready[0])]), 1, &["no job"]);

    // Not every id changed: the count, then exit 1 and one line saying why.
    let out = as_tester(
        &db,
        &["job", "cancel", &id(ready[0]), &id(dead[1]), &id(ready[3])],
    );
    assert_eq!(out.stdout, "cancelled 1 of 3\n");
    one_line_error(
        out,
        1,
        &["2 of 3 jobs not cancelled", "ready, scheduled or in flight"],
    );
    assert!(!listed(&db, &["tasks"]).contains(&ready[3]));
    assert!(listed(&db, &["tasks", "--state", "dead"]).contains(&dead[1]));

    // The cheaper ones on the same path: priority, reschedule, dead-letter, discard.
    let out = as_tester(&db, &["job", "priority", "--to", "-3", &id(ready[1])]).ok();
    assert_eq!(out.stdout, "reprioritised 1 of 1\n");
    assert_eq!(listed(&db, &["tasks", "--priority", "-3"]), vec![ready[1]]);
    let out = as_tester(&db, &["job", "reschedule", "--in", "2h", &id(ready[2])]).ok();
    assert_eq!(out.stdout, "rescheduled 1 of 1\n");
    assert_eq!(
        listed(&db, &["tasks", "--state", "scheduled", "--oldest"]),
        vec![ready[2], scheduled]
    );
    let out = as_tester(&db, &["job", "dead-letter", &id(scheduled)]).ok();
    assert_eq!(out.stdout, "dead-lettered 1 of 1\n");
    let job = db.ok(&["job", "show", &id(scheduled), "--json"]).json();
    assert_eq!(job["state"], "dead");
    assert!(
        job["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("cli:tester")),
        "the reason names who: {job:#}"
    );
    let out = as_tester(&db, &["job", "discard", &id(scheduled), &id(archived[0])]).ok();
    assert_eq!(out.stdout, "discarded 2 of 2\n");
    assert_eq!(
        listed(&db, &["tasks", "--state", "archived"]),
        vec![archived[1]]
    );

    // Every action is in the audit log, as `cli:<user>`, with how many it changed.
    let rows = |action: &str| {
        count(
            &db.url,
            &format!(
                "SELECT count(*) FROM pgbus.audit_log \
                 WHERE actor = 'cli:tester' AND action = '{action}'"
            ),
        )
    };
    for action in ["retry", "priority", "reschedule", "dead_letter", "discard"] {
        assert_eq!(rows(action), 1, "{action}");
    }
    assert_eq!(rows("cancel"), 2);
    assert_eq!(
        count(
            &db.url,
            "SELECT coalesce(sum(count), 0)::bigint FROM pgbus.audit_log WHERE action = 'cancel'"
        ),
        2,
        "the counts are what changed"
    );
    let audit = db.ok(&["job", "audit", "--json"]).json();
    let entries = audit.as_array().expect("a list");
    assert_eq!(entries.len(), 7, "{audit:#}");
    assert_eq!(entries[0]["action"], "discard", "newest first");
    assert_eq!(entries[0]["actor"], "cli:tester");
    assert_eq!(entries[0]["count"], 2);
    let table = db.ok(&["job", "audit", "--limit", "2"]).stdout;
    assert_eq!(table.lines().count(), 3, "{table}");
    assert!(table.contains("cli:tester"), "{table}");

    // Without $USER the actor is still named.
    let mut cmd = db.cmd(&["job", "retry", &id(dead[1])]);
    cmd.env_remove("USER");
    run(cmd, None, SHORT).ok();
    assert_eq!(
        count(
            &db.url,
            "SELECT count(*) FROM pgbus.audit_log WHERE actor = 'cli:unknown' AND action = 'retry'"
        ),
        1
    );

    // Changes made outside `pgbus job` are in the log too: a queue's pause and resume, and
    // `pgbus dlq`'s retry and discard, with what they changed.
    let before = count(&db.url, "SELECT count(*) FROM pgbus.audit_log");
    as_tester(&db, &["queue", "pause", "tasks"]).ok();
    as_tester(&db, &["queue", "resume", "tasks"]).ok();
    as_tester(&db, &["dlq", "discard", "tasks", "--all"]).ok();
    assert_eq!(
        count(&db.url, "SELECT count(*) FROM pgbus.audit_log") - before,
        3
    );
    let audit = db.ok(&["job", "audit", "--json", "--limit", "3"]).json();
    let entries: Vec<(&str, &str, &Value)> = audit
        .as_array()
        .expect("a list")
        .iter()
        .map(|e| {
            (
                e["actor"].as_str().unwrap_or_default(),
                e["action"].as_str().unwrap_or_default(),
                &e["detail"],
            )
        })
        .collect();
    assert_eq!(
        entries,
        [
            ("cli:tester", "discard", &json!({ "all": true })),
            ("cli:tester", "resume", &json!({})),
            ("cli:tester", "pause", &json!({})),
        ],
        "newest first"
    );
}

#[test]
fn bad_input_is_one_line_and_changes_nothing() {
    let db = Db::new();
    db.ok(&["queue", "create", "q"]);
    let kept = db.send("q", &json!({ "n": 1 }));

    // What clap refuses: a usage error, exit 2.
    for (args, what) in [
        (&["job", "retry", "abc"][..], "'abc'"),
        (&["job", "cancel", "0"], "'0'"),
        (&["job", "cancel"], "<IDS>"),
        (&["job", "show", "-5"], "-5"),
        (
            &["job", "list", "q", "--state", "finished"],
            "unknown job state",
        ),
        (
            &["job", "list", "q", "--payload", "no-equals"],
            "PATH=VALUE",
        ),
        (&["job", "list", "q", "--payload", "a..b=1"], "empty part"),
        (&["job", "list", "q", "--limit", "0"], "--limit"),
        (&["job", "list", "q", "--limit", "501"], "--limit"),
        (&["job", "reschedule", "1"], "--at"),
        (&["job", "reschedule", "--at", "tomorrow", "1"], "UTC time"),
        (&["job", "reschedule", "--in", "-5m", "1"], "negative"),
        (&["job", "priority", "--to", "99999", "1"], "99999"),
    ] {
        let run = db.run(args);
        assert_eq!(run.status.code(), Some(2), "{args:?}: {run:?}");
        let first = run.stderr.lines().next().unwrap_or_default();
        assert!(first.starts_with("error: "), "{args:?}: {}", run.stderr);
        assert!(
            run.stderr.contains(what),
            "{args:?}: {what:?} not in {}",
            run.stderr
        );
    }

    // What the console refuses: one line, exit 1.
    one_line_error(
        db.run(&["job", "list", "q", "--cursor", "not-a-cursor"]),
        1,
        &["cursor"],
    );
    db.send("q", &json!({ "n": 2 }));
    let first = db
        .ok(&["job", "list", "q", "--limit", "1", "--json"])
        .json();
    let cursor = first["next"].as_str().expect("a next page").to_owned();
    one_line_error(
        db.run(&["job", "list", "q", "--state", "dead", "--cursor", &cursor]),
        1,
        &["cursor"],
    );
    one_line_error(
        db.run(&["job", "list", "No Such Queue"]),
        1,
        &["No Such Queue"],
    );
    one_line_error(
        db.run(&["job", "list", "no_such_queue"]),
        1,
        &["queue no_such_queue does not exist"],
    );
    let too_many: Vec<String> = (1..=10_001).map(|n| n.to_string()).collect();
    let mut args = vec!["job", "cancel"];
    args.extend(too_many.iter().map(String::as_str));
    one_line_error(db.run(&args), 1, &["ids"]);

    // Nothing was touched.
    let listed_now = listed(&db, &["q", "--oldest"]);
    assert_eq!(listed_now.len(), 2);
    assert_eq!(listed_now[0], kept);
    assert_eq!(
        count(&db.url, "SELECT count(*) FROM pgbus.audit_log"),
        0,
        "no refused action was logged"
    );
}
