//! The console (`/console`) in a real browser (`common/browser.rs`): finding jobs, their
//! story, and acting on them, against the real binary and a real database, watching the
//! page follow the live feed. Each test leaves a screenshot in `target/browser/`.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

mod common;
use common::*;
#[path = "common/browser.rs"]
mod browser;
use browser::Browser;

/// A handler stopped by a cancellation: the worker sees the lease gone at its next lease
/// extension (a third of a 2 s lease), then the command's group gets SIGTERM.
const HANDLER_STOPS: Duration = Duration::from_secs(90);

/// `pgbus serve` and a browser on its console at `hash` (`queue=..&state=..`).
struct Page {
    served: Served,
    browser: Browser,
}

impl Page {
    fn open(db: &Db, hash: &str) -> Page {
        let served = Served::start(db, free_port(), &[], &[]);
        let browser = Browser::start();
        browser.goto(&served.url(&format!("/console#{hash}")));
        browser.wait("the live status", |b| {
            b.text("#status").is_some_and(|s| s.starts_with("live"))
        });
        // confirm() says yes and keeps the questions, in order.
        browser.js(
            "window.asked = []; window.confirm = (q) => { window.asked.push(q); return true; }; return null;",
        );
        // Set once: still there after an action means the page was not reloaded.
        browser.js("window.sameDocument = true; return null;");
        Page { served, browser }
    }

    /// The ids of the listing's rows, in order.
    fn rows(&self) -> Vec<i64> {
        let ids = self.browser.js(
            r##"return Array.from(document.querySelectorAll("#jobs tbody tr[data-id]"), r => Number(r.dataset.id));"##,
        );
        ids.as_array()
            .expect("an array")
            .iter()
            .filter_map(Value::as_i64)
            .collect()
    }

    fn wait_rows(&self, what: &str, expected: &[i64]) {
        self.browser.wait(what, |_| self.rows() == expected);
    }

    fn asked(&self) -> Vec<String> {
        let asked = self.browser.js("return window.asked;");
        asked
            .as_array()
            .expect("an array")
            .iter()
            .filter_map(|q| q.as_str().map(str::to_owned))
            .collect()
    }

    fn message(&self) -> String {
        self.browser.text("#message").unwrap_or_default()
    }

    fn not_reloaded(&self) {
        assert_eq!(
            self.browser.js("return window.sameDocument === true;"),
            json!(true),
            "the page was reloaded"
        );
    }

    fn close(self) {
        drop(self.browser);
        assert!(self.served.stop().success());
    }
}

/// Sends `payload` with extra `send` options; returns the id.
#[track_caller]
fn send(db: &Db, queue: &str, options: &[&str], payload: &Value) -> i64 {
    let text = payload.to_string();
    let mut args = vec!["send", queue];
    args.extend_from_slice(options);
    args.push(&text);
    let out = db.ok(&args);
    out.stdout
        .trim()
        .parse()
        .unwrap_or_else(|e| panic!("send printed {:?}: {e}", out.stdout))
}

/// Runs every ready job of `queue` once through a command that fails.
fn fail_all(db: &Db, queue: &str) {
    db.work(&[queue, "--exec", "exit 1", "--until-empty"]);
}

/// Whether process `pid` runs (a zombie does not).
fn running(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // `PID (COMM) STATE ...`: the state follows the last parenthesis.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[test]
fn a_job_is_found_by_its_id() {
    let db = Db::new();
    db.ok(&["queue", "create", "orders"]);
    let ids: Vec<i64> = (0..3)
        .map(|n| db.send("orders", &json!({ "order": n, "note": "find me" })))
        .collect();
    let page = Page::open(&db, "queue=orders&state=ready");
    page.wait_rows("the three orders, newest first", &[ids[2], ids[1], ids[0]]);

    // The box in the header opens any job, wherever it is.
    page.browser.type_text("#find-id", &ids[1].to_string());
    page.browser.click("#find button");
    let title = format!("Job {}", ids[1]);
    page.browser.wait("the job's detail", |b| {
        b.text("#detail-title").as_deref() == Some(title.as_str())
    });
    let fields = page.browser.text("#detail-fields").unwrap_or_default();
    assert!(fields.contains("orders"), "the queue is shown: {fields}");
    assert!(fields.contains("application/json"), "{fields}");
    let payload = page.browser.text("#detail-payload").unwrap_or_default();
    assert!(
        payload.contains("\"order\": 1"),
        "the payload, pretty: {payload}"
    );
    assert_eq!(page.browser.text("#detail-state").as_deref(), Some("ready"));
    // The id filter narrows the listing to it.
    page.browser.type_text("#f-id", &ids[1].to_string());
    page.browser.click("#filters button[type=submit]");
    page.wait_rows("only the job found", &[ids[1]]);
    assert!(
        page.browser
            .js("return location.hash;")
            .as_str()
            .is_some_and(
                |h| h.contains(&format!("id={}", ids[1])) && h.contains(&format!("job={}", ids[1]))
            ),
        "the view is in the address, to link"
    );
    page.browser.screenshot("console-find-by-id");

    // A large payload: its start is shown, the whole is a download.
    let big = db.send("orders", &json!({ "blob": "x".repeat(100 * 1024) }));
    page.browser
        .js(r##"document.querySelector("#find-id").value = ""; return null;"##);
    page.browser.type_text("#find-id", &big.to_string());
    page.browser.click("#find button");
    page.browser.wait("the download link", |b| {
        b.js(r##"return document.querySelector("#detail-download").checkVisibility();"##)
            == json!(true)
    });
    let href = page
        .browser
        .js(r##"return document.querySelector("#detail-download").getAttribute("href");"##);
    assert_eq!(href, json!(format!("/api/jobs/{big}/payload")));
    assert!(
        page.browser
            .text("#detail-payload-note")
            .is_some_and(|n| n.contains("the first part of")),
        "the cut is said"
    );
    page.close();
}

#[test]
fn jobs_are_filtered_by_group_and_state_and_the_queue_paused_from_the_page() {
    let db = Db::new();
    db.ok(&["queue", "create", "shop"]);
    let mine: Vec<i64> = (0..2)
        .map(|n| send(&db, "shop", &["--group", "customer_42"], &json!({ "n": n })))
        .collect();
    for n in 0..2 {
        send(&db, "shop", &["--group", "customer_7"], &json!({ "n": n }));
    }
    let later = send(
        &db,
        "shop",
        &["--group", "customer_42", "--delay", "1h"],
        &json!({ "n": "later" }),
    );
    let page = Page::open(&db, "queue=shop&state=ready&order=oldest");
    page.browser
        .wait("four ready jobs", |_| page.rows().len() == 4);
    let tab = |state: &str| {
        page.browser
            .text(&format!("#tabs button[data-state={state}] .count"))
            .unwrap_or_default()
    };
    assert_eq!((tab("ready"), tab("scheduled")), ("4".into(), "1".into()));

    page.browser.type_text("#f-group", "customer_42");
    page.browser.click("#filters button[type=submit]");
    page.wait_rows("customer 42's ready jobs, oldest first", &mine);
    page.browser.click("#tabs button[data-state=scheduled]");
    page.wait_rows("customer 42's scheduled job", &[later]);
    assert_eq!(
        page.browser.text("#at-heading").as_deref(),
        Some("visible at")
    );
    page.browser.screenshot("console-filter-group-state");

    // Pause and resume, each confirmed and in the audit log.
    page.browser.click("#queue-toggle");
    page.browser.wait("the queue paused", |b| {
        b.js(r##"return document.querySelector("#queue-paused").checkVisibility();"##)
            == json!(true)
    });
    assert_eq!(db.queue_stats("shop")["paused"], json!(true));
    page.browser.click("#queue-toggle");
    page.browser.wait("the queue resumed", |b| {
        b.js(r##"return document.querySelector("#queue-paused").checkVisibility();"##)
            == json!(false)
    });
    assert_eq!(db.queue_stats("shop")["paused"], json!(false));
    assert_eq!(page.asked(), ["pause queue shop?", "resume queue shop?"]);
    page.browser.wait("both in the audit log", |b| {
        b.text("#audit tbody")
            .is_some_and(|t| t.contains("pause") && t.contains("resume"))
    });
    let audit = page.browser.text("#audit tbody").unwrap_or_default();
    assert!(audit.contains("loopback"), "who: {audit}");
    page.close();
}

#[test]
fn a_job_shows_its_error_history() {
    let db = Db::new();
    db.ok(&["queue", "create", "flaky", "--max-attempts", "3"]);
    let id = db.send("flaky", &json!({ "invoice": 7 }));
    // Each attempt fails with its own error text: its attempt number.
    db.work(&[
        "flaky",
        "--exec",
        "echo \"boom on attempt $PGBUS_ATTEMPT\" >&2; exit 1",
        "--until-empty",
    ]);
    assert!(db.dead("flaky").contains_key(&id), "dead after 3 attempts");

    let page = Page::open(&db, &format!("queue=flaky&state=dead&job={id}"));
    page.wait_rows("the dead job", &[id]);
    page.browser.wait("three errors in the history", |b| {
        b.count("#detail-errors tbody tr") == 3
            && b.text("#detail-errors tbody")
                .is_some_and(|t| t.contains("boom"))
    });
    let history = page.browser.js(
        r##"return Array.from(document.querySelectorAll("#detail-errors tbody tr"), r => [r.cells[0].textContent, r.cells[2].textContent]);"##,
    );
    let history: Vec<(String, String)> =
        serde_json::from_value(history).expect("attempt and error pairs");
    for (n, (attempt, error)) in history.iter().enumerate() {
        assert_eq!(attempt, &(n + 1).to_string(), "{history:?}");
        assert!(
            error.contains(&format!("boom on attempt {}", n + 1)),
            "{history:?}"
        );
    }
    let fields = page.browser.text("#detail-fields").unwrap_or_default();
    assert!(fields.contains("3 of 3"), "attempts of max: {fields}");
    page.browser.screenshot("console-job-error-history");
    page.close();
}

#[test]
fn a_retried_dead_job_leaves_the_dead_list_live() {
    let db = Db::new();
    db.ok(&["queue", "create", "billing", "--max-attempts", "1"]);
    let first = db.send("billing", &json!({ "bill": 1 }));
    let second = db.send("billing", &json!({ "bill": 2 }));
    fail_all(&db, "billing");
    let page = Page::open(&db, "queue=billing&state=dead");
    page.wait_rows("both dead letters", &[second, first]);

    // Selecting text holds the updates too, until the selection is gone.
    let note_shown =
        |b: &Browser| b.js(r##"return document.querySelector("#paused-note").checkVisibility();"##);
    page.browser.js(
        r##"getSelection().selectAllChildren(document.querySelector("#jobs tbody")); return null;"##,
    );
    page.browser
        .wait("the paused note", |b| note_shown(b) == json!(true));
    page.browser
        .js("getSelection().removeAllRanges(); return null;");
    page.browser
        .wait("the paused note gone", |b| note_shown(b) == json!(false));

    // Ticked: the live updates wait, and say so.
    page.browser.click(&format!(
        r#"#jobs tr[data-id="{first}"] input[type=checkbox]"#
    ));
    page.browser
        .wait("the paused note", |b| note_shown(b) == json!(true));
    page.browser
        .click(r#"#bulk-actions button[data-action="retry"]"#);
    page.wait_rows("the retried one gone", &[second]);
    assert_eq!(page.asked(), ["retry now the 1 selected job?"]);
    assert!(
        page.message().contains("retried 1 job"),
        "{}",
        page.message()
    );
    page.browser.wait("ready counted", |b| {
        b.text("#tabs button[data-state=ready] .count").as_deref() == Some("1")
    });

    // Retried elsewhere (the command line): the page follows the live feed.
    db.ok(&["dlq", "retry", "billing", &second.to_string()]);
    page.wait_rows("the dead list empty", &[]);
    page.not_reloaded();
    let kept: Vec<i64> = db.dead("billing").into_keys().collect();
    assert!(kept.is_empty(), "{kept:?}");
    assert_eq!(db.queue_stats("billing")["ready"], json!(2));
    page.browser.screenshot("console-retry-dead-live");
    page.close();
}

#[test]
fn a_cancelled_running_job_stops_its_handler() {
    let db = Db::new();
    db.ok(&["queue", "create", "slow", "--lease", "2s"]);
    let pid_file = db.path("handler.pid");
    let command = format!("echo $$ > {}; exec sleep 600", sh_quote(&pid_file));
    let (mut worker, _) = db.spawn(&["work", "slow", "--exec", &command]);
    // Registered first, so its claim names it as the holder.
    eventually("the worker registered", SHORT, || {
        db.stats()["processes"]
            .as_array()
            .is_some_and(|p| !p.is_empty())
    });
    let id = db.send("slow", &json!({ "report": "yearly" }));
    let pid = read_pid(&pid_file);
    assert!(running(pid));

    let page = Page::open(&db, &format!("queue=slow&state=in_flight&job={id}"));
    page.wait_rows("the running job", &[id]);
    let holder = format!("pid {})", worker.0.id());
    page.browser.wait("its holder", |b| {
        b.text("#detail-fields")
            .is_some_and(|t| t.contains(&holder))
    });
    page.browser.screenshot("console-cancel-running-before");
    page.browser
        .click(r#"#detail-actions button[data-action="cancel"]"#);
    assert_eq!(page.asked(), [format!("cancel job {id}?")]);
    page.wait_rows("the job gone from the page", &[]);
    page.browser.wait("the detail saying it is gone", |b| {
        b.text("#detail-state").as_deref() == Some("gone")
    });
    eventually("the handler stopped", HANDLER_STOPS, || !running(pid));
    page.not_reloaded();
    page.browser.wait("the cancel in the audit log", |b| {
        b.text("#audit tbody").is_some_and(|t| t.contains("cancel"))
    });
    page.browser.screenshot("console-cancel-running");
    assert!(
        matches!(worker.0.try_wait(), Ok(None)),
        "the worker lives on"
    );
    terminate(&worker.0);
    wait_deadline(&mut worker.0, SHORT);
    worker.stop();
    assert_eq!(db.depth("slow"), 0, "nothing left to run");
    page.close();
}

/// The pid a handler wrote to `path`.
fn read_pid(path: &Path) -> i32 {
    let mut pid = None;
    eventually("the handler's pid", SHORT, || {
        pid = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| t.trim().parse().ok());
        pid.is_some()
    });
    pid.expect("a pid")
}

#[test]
fn a_bulk_retry_by_filter_leaves_a_dead_letter_that_arrived_after_the_listing() {
    let db = Db::new();
    db.ok(&["queue", "create", "mail", "--max-attempts", "1"]);
    let listed: Vec<i64> = (0..3)
        .map(|n| send(&db, "mail", &["--group", "g1"], &json!({ "n": n })))
        .collect();
    let other = send(&db, "mail", &["--group", "g2"], &json!({ "n": "other" }));
    fail_all(&db, "mail");
    let page = Page::open(&db, "queue=mail&state=dead&group=g1");
    page.wait_rows(
        "group g1's dead letters",
        &[listed[2], listed[1], listed[0]],
    );

    page.browser.click("#select-matching");
    page.browser.wait("all matching selected", |b| {
        b.text("#selection")
            .is_some_and(|t| t.contains("all dead jobs of mail matching group=g1"))
    });
    // A dead letter of the same filter arrives after the list was drawn...
    let late = send(&db, "mail", &["--group", "g1"], &json!({ "n": "late" }));
    fail_all(&db, "mail");
    page.browser
        .click(r#"#bulk-actions button[data-action="retry"]"#);
    page.browser.wait("the retry done", |_| {
        page.message().contains("retried 3 matching jobs")
    });
    let asked = page.asked();
    assert_eq!(asked.len(), 1, "{asked:?}");
    assert!(
        asked[0].starts_with("retry now all dead jobs of mail matching group=g1, as listed at")
            && asked[0].contains("Jobs that arrived since are not touched"),
        "{asked:?}"
    );
    // ... and is still dead, as is the other group's.
    let dead: Vec<i64> = db.dead("mail").into_keys().collect();
    assert_eq!(dead, [other, late]);
    assert_eq!(db.queue_stats("mail")["ready"], json!(3));
    page.wait_rows("only the late one listed", &[late]);
    page.browser.wait("the retry in the audit log", |b| {
        b.text("#audit tbody tr")
            .is_some_and(|t| t.contains("retry") && t.contains("loopback"))
    });
    page.not_reloaded();
    page.browser.screenshot("console-bulk-retry-by-filter");
    page.close();
}
