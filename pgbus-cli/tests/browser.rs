//! The dashboard and SSE streams in a real browser: headless Chromium driven through
//! ChromeDriver (Debian packages `chromium` and `chromium-driver`; `.ci/run` installs
//! them). Asserts what a user sees; screenshots go to `target/browser/`.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

mod common;
use common::*;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// Longest a page may take to show what a test waits for.
const VISIBLE: Duration = Duration::from_secs(30);

/// A headless Chromium session; calls are synchronous (each runs on the session's
/// runtime) so tests can interleave them with the CLI.
struct Browser {
    runtime: tokio::runtime::Runtime,
    client: Option<Client>,
    _driver: Background,
    _profile: tempfile::TempDir,
}

impl Browser {
    fn start() -> Browser {
        for binary in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                std::path::Path::new(binary).exists(),
                "{binary} is missing: install Debian's chromium and chromium-driver \
                 (apt-get install chromium chromium-driver), as .ci/run does"
            );
        }
        let port = free_port();
        let driver = Background(
            Command::new(CHROMEDRIVER)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("starting chromedriver"),
        );
        eventually("chromedriver to listen", VISIBLE, || listening(port));
        let profile = tempfile::tempdir().expect("a profile directory");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        let args = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1400,1200",
        ]
        .map(String::from)
        .into_iter()
        .chain([format!("--user-data-dir={}", profile.path().display())])
        .collect::<Vec<_>>();
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            json!({ "binary": CHROMIUM, "args": args }),
        );
        let client = runtime
            .block_on(
                ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                    .capabilities(caps)
                    .connect(&format!("http://127.0.0.1:{port}")),
            )
            .expect("a Chromium session");
        Browser {
            runtime,
            client: Some(client),
            _driver: driver,
            _profile: profile,
        }
    }

    fn client(&self) -> &Client {
        self.client.as_ref().expect("an open session")
    }

    fn goto(&self, url: &str) {
        self.runtime
            .block_on(self.client().goto(url))
            .unwrap_or_else(|e| panic!("opening {url}: {e}"));
    }

    /// Runs `script` in the page and returns its result.
    fn js(&self, script: &str) -> Value {
        self.runtime
            .block_on(self.client().execute(script, vec![]))
            .unwrap_or_else(|e| panic!("running {script}: {e}"))
    }

    /// The text of the first element matching `css`, if there is one.
    fn text(&self, css: &str) -> Option<String> {
        let script = format!(
            "const e = document.querySelector({}); return e ? e.textContent : null;",
            json!(css)
        );
        self.js(&script).as_str().map(str::to_owned)
    }

    /// Waits until `condition` holds for the page, polling it.
    fn wait(&self, what: &str, mut condition: impl FnMut(&Browser) -> bool) {
        let deadline = Instant::now() + VISIBLE;
        while !condition(self) {
            if Instant::now() >= deadline {
                self.screenshot(&format!("failed-{}", what.replace(' ', "-")));
                panic!("the page did not show {what} within {VISIBLE:?}");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn click(&self, css: &str) {
        self.runtime
            .block_on(async { self.client().find(Locator::Css(css)).await?.click().await })
            .unwrap_or_else(|e| panic!("clicking {css}: {e}"));
    }

    /// Saves a PNG of the page under `target/browser/`; returns its path.
    fn screenshot(&self, name: &str) -> PathBuf {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/browser");
        std::fs::create_dir_all(&dir).expect("creating target/browser");
        let path = dir.join(format!("{name}.png"));
        if let Ok(png) = self.runtime.block_on(self.client().screenshot()) {
            std::fs::write(&path, png).expect("writing a screenshot");
        }
        path
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            let _ = self.runtime.block_on(client.close());
        }
    }
}

#[test]
fn the_dashboard_shows_queues_live_and_retries_dead_letters() {
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

    // A dead letter, retried by a click.
    db.ok(&["queue", "create", "failing", "--max-attempts", "1"]);
    let id = db.send("failing", &json!({ "order": 42 }));
    db.work(&["failing", "--exec", "exit 65", "--until-empty"]);
    browser.wait("the failing queue in the dead-letter picker", |b| {
        b.js(r##"return Array.from(document.querySelectorAll("#dead-queue option"), o => o.value).includes("failing");"##)
            == json!(true)
    });
    browser.js(
        r##"const s = document.querySelector("#dead-queue"); s.value = "failing"; s.dispatchEvent(new Event("change")); return null;"##,
    );
    let row = format!(r#"#dead tr[data-id="{id}"]"#);
    browser.wait("the dead letter", |b| b.text(&row).is_some());
    let shown = browser.text(&row).unwrap();
    assert!(
        shown.contains(r#"{"order":42}"#),
        "the payload is shown: {shown}"
    );
    let dead = r#"tr[data-queue="failing"] td[data-field="dead_lettered"]"#;
    browser.wait("one dead letter in the queue table", |b| {
        b.text(dead).as_deref() == Some("1")
    });
    browser.screenshot("dashboard");
    browser.click(&format!("{row} button"));
    browser.wait("the retry confirmed", |b| {
        b.text("#message")
            .is_some_and(|m| m.contains("retried 1 in failing"))
    });
    browser.wait("the dead letter gone", |b| b.text(&row).is_none());
    browser.wait("the retried message ready again", |b| {
        b.text(r#"tr[data-queue="failing"] td[data-field="ready"]"#)
            .as_deref()
            == Some("1")
    });
    let stats = db.queue_stats("failing");
    assert_eq!(
        (stats["ready"].as_u64(), stats["dead_lettered"].as_u64()),
        (Some(1), Some(0))
    );
    browser.screenshot("dashboard-after-retry");

    // "discard listed" asks first, and discards only what the list showed: a dead letter
    // that arrives after the list was drawn is kept.
    db.work(&["failing", "--exec", "exit 65", "--until-empty"]);
    let second = db.send("failing", &json!({ "order": 43 }));
    db.work(&["failing", "--exec", "exit 65", "--until-empty"]);
    browser.js(
        r##"const s = document.querySelector("#dead-queue"); s.dispatchEvent(new Event("change")); return null;"##,
    );
    for listed in [id, second] {
        let row = format!(r#"#dead tr[data-id="{listed}"]"#);
        browser.wait("the dead letters listed", |b| b.text(&row).is_some());
    }
    // The list stays as drawn (the page redraws it every 5 s; a slow machine could
    // otherwise show the late one before the click).
    browser.js(
        r##"const real = window.fetch; window.fetch = (url, options) => String(url).includes("/dead?") ? new Promise(() => {}) : real(url, options); return null;"##,
    );
    let late = db.send("failing", &json!({ "order": 44 }));
    db.work(&["failing", "--exec", "exit 65", "--until-empty"]);
    assert_eq!(db.dead("failing").len(), 3);
    browser.js(
        r##"window.confirm = (question) => { window.asked = question; return true; }; return null;"##,
    );
    browser.click("#dead-discard-all");
    browser.wait("the discard confirmed", |b| {
        b.text("#message")
            .is_some_and(|m| m.contains("discarded 2 in failing"))
    });
    let asked = browser.js("return window.asked;");
    assert!(
        asked
            .as_str()
            .is_some_and(|q| q.contains("Discard the 2 dead letters")),
        "{asked}"
    );
    let kept: Vec<i64> = db.dead("failing").into_keys().collect();
    assert_eq!(kept, [late], "only the late dead letter is kept");
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
