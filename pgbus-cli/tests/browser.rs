//! The dashboard and SSE streams in a real browser (`common/browser.rs`). Asserts what a
//! user sees; screenshots go to `target/browser/`.

use serde_json::json;

mod common;
use common::*;
#[path = "common/browser.rs"]
mod browser;
use browser::Browser;

#[test]
fn the_dashboard_shows_queues_live_and_opens_their_jobs_in_the_console() {
    let db = Db::new();
    let served = Served::start(&db, free_port(), &[], &[]);
    let browser = Browser::start();
    browser.goto(&served.url("/"));
    browser.wait("the live status", |b| {
        b.text("#status").is_some_and(|s| s.starts_with("live"))
    });

    // A queue created from the command line appears without a reload...
    db.ok(&["queue", "create", "shop"]);
    let depth = r#"tr[data-queue="shop"] td[data-field="depth"]"#;
    browser.wait("the shop queue", |b| b.text(depth).is_some());
    assert_eq!(browser.text(depth).as_deref(), Some("0"));
    // ... and its depth follows the sends.
    for n in 0..3 {
        db.send("shop", &json!({ "n": n }));
    }
    browser.wait("a depth of 3", |b| b.text(depth).as_deref() == Some("3"));
    // Worked off: the depth drops and the throughput chart gets a line for the queue.
    db.work(&["shop", "--exec", "cat >/dev/null", "--until-empty"]);
    browser.wait("a depth of 0", |b| b.text(depth).as_deref() == Some("0"));
    browser.wait("the shop queue charted", |b| {
        b.text("#chart .legend").is_some_and(|l| l.contains("shop"))
            && b.js(r##"return document.querySelectorAll("#chart polyline").length;"##) == json!(1)
    });
    let done = r#"tr[data-queue="shop"] td[data-field="processed_per_minute"]"#;
    assert_eq!(
        browser.text(done).as_deref(),
        Some("3"),
        "3 jobs done in the last minute"
    );

    // A dead letter is counted, and its count opens the dead jobs in the console.
    db.ok(&["queue", "create", "failing", "--max-attempts", "1"]);
    let id = db.send("failing", &json!({ "order": 42 }));
    db.work(&["failing", "--exec", "exit 65", "--until-empty"]);
    let dead = r#"tr[data-queue="failing"] td[data-field="dead_lettered"]"#;
    browser.wait("one dead letter in the queue table", |b| {
        b.text(dead).as_deref() == Some("1")
    });
    browser.screenshot("dashboard");
    browser.click(&format!("{dead} a"));
    browser.wait("the console", |b| {
        b.js("return location.pathname + location.hash;")
            == json!("/console#queue=failing&state=dead")
    });
    let row = format!(r#"#jobs tr[data-id="{id}"]"#);
    browser.wait("the dead letter in the console", |b| b.text(&row).is_some());
    let shown = browser.text(&row).unwrap_or_default();
    assert!(
        shown.contains(r#"{"order":42}"#) && shown.contains("exit 65"),
        "the payload and the error are shown: {shown}"
    );
    drop(browser);
    assert!(served.stop().success());
}

#[test]
fn an_event_source_resumes_from_its_last_id_after_a_server_restart() {
    let db = Db::new();
    let env = [("PGBUS_STREAM_SECRET", "browser-test-secret-0123456789")];
    let publish = |n: usize| {
        let mut cmd = db.cmd(&[
            "stream",
            "publish",
            "ticks",
            &json!({ "n": n }).to_string(),
            "--event",
            "tick",
        ]);
        cmd.envs(env);
        run(cmd, None, SHORT).ok();
    };
    let mut url = db.cmd(&["stream", "url", "ticks"]);
    url.envs(env);
    let path = run(url, None, SHORT).ok().stdout.trim().to_owned();

    let port = free_port();
    let served = Served::start(&db, port, &[], &env);
    let browser = Browser::start();
    // Any page of the server's origin; the EventSource is the browser's own.
    browser.goto(&served.url("/livez"));
    browser.js(&format!(
        r#"window.got = []; window.opened = 0;
           const source = new EventSource({});
           source.onopen = () => window.opened++;
           source.addEventListener("tick", e => window.got.push([e.lastEventId, JSON.parse(e.data).n]));
           return null;"#,
        json!(path)
    ));
    browser.wait("the stream open", |b| {
        b.js("return window.opened;") == json!(1)
    });
    let received = |b: &Browser| b.js("return window.got.length;").as_u64().unwrap_or(0);
    for n in 0..5 {
        publish(n);
    }
    browser.wait("five events", |b| received(b) == 5);

    // The server goes away (every client told `shutdown`); events published meanwhile
    // are stored, and the browser reconnects with Last-Event-ID once it is back.
    assert!(served.stop().success());
    for n in 5..10 {
        publish(n);
    }
    let served = Served::start(&db, port, &[], &env);
    browser.wait("the stream reopened", |b| {
        b.js("return window.opened;") == json!(2)
    });
    for n in 10..12 {
        publish(n);
    }
    browser.wait("all twelve events", |b| received(b) >= 12);
    let got = browser.js("return window.got;");
    let got: Vec<(i64, i64)> = got
        .as_array()
        .expect("an array")
        .iter()
        .map(|pair| {
            (
                pair[0]
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .expect("an event id"),
                pair[1].as_i64().expect("n"),
            )
        })
        .collect();
    let ns: Vec<i64> = got.iter().map(|(_, n)| *n).collect();
    assert_eq!(
        ns,
        (0..12).collect::<Vec<_>>(),
        "every event once, in order: {got:?}"
    );
    assert!(
        got.windows(2).all(|w| w[0].0 < w[1].0),
        "ids increase: {got:?}"
    );
    browser.screenshot("event-source");
    drop(browser);
    assert!(served.stop().success());
}
