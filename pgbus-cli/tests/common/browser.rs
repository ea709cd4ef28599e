//! A headless Chromium session driven through ChromeDriver (Debian packages `chromium` and
//! `chromium-driver`; `.ci/run` installs them), for the tests of the pages
//! (`browser.rs`, `console_browser.rs`: `#[path = "common/browser.rs"] mod browser;`, so
//! only they build it). Screenshots go to `target/browser/`.
#![allow(dead_code, unreachable_pub)] // each test binary uses part of it

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

use crate::common::{eventually, free_port, listening, Background};

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
/// Longest a page may take to show what a test waits for.
pub const VISIBLE: Duration = Duration::from_secs(30);

/// A headless Chromium session; calls are synchronous (each runs on the session's
/// runtime) so tests can interleave them with the CLI.
pub struct Browser {
    runtime: tokio::runtime::Runtime,
    client: Option<Client>,
    _driver: Background,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub fn start() -> Browser {
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

    pub fn client(&self) -> &Client {
        self.client.as_ref().expect("an open session")
    }

    pub fn goto(&self, url: &str) {
        self.runtime
            .block_on(self.client().goto(url))
            .unwrap_or_else(|e| panic!("opening {url}: {e}"));
    }

    /// Runs `script` in the page and returns its result.
    pub fn js(&self, script: &str) -> Value {
        self.runtime
            .block_on(self.client().execute(script, vec![]))
            .unwrap_or_else(|e| panic!("running {script}: {e}"))
    }

    /// The text of the first element matching `css`, if there is one.
    pub fn text(&self, css: &str) -> Option<String> {
        let script = format!(
            "const e = document.querySelector({}); return e ? e.textContent : null;",
            json!(css)
        );
        self.js(&script).as_str().map(str::to_owned)
    }

    /// Waits until `condition` holds for the page, polling it.
    pub fn wait(&self, what: &str, mut condition: impl FnMut(&Browser) -> bool) {
        let deadline = Instant::now() + VISIBLE;
        while !condition(self) {
            if Instant::now() >= deadline {
                self.screenshot(&format!("failed-{}", what.replace(' ', "-")));
                panic!("the page did not show {what} within {VISIBLE:?}");
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Clicks the element matching `css`; found again when the page redrew it between
    /// the finding and the click.
    pub fn click(&self, css: &str) {
        let deadline = Instant::now() + VISIBLE;
        loop {
            let clicked = self
                .runtime
                .block_on(async { self.client().find(Locator::Css(css)).await?.click().await });
            match clicked {
                Ok(()) => return,
                Err(e) if e.to_string().contains("stale element") && Instant::now() < deadline => {}
                Err(e) => panic!("clicking {css}: {e}"),
            }
        }
    }

    /// Types `text` into the input matching `css` (after what it holds).
    pub fn type_text(&self, css: &str, text: &str) {
        self.runtime
            .block_on(async {
                self.client()
                    .find(Locator::Css(css))
                    .await?
                    .send_keys(text)
                    .await
            })
            .unwrap_or_else(|e| panic!("typing into {css}: {e}"));
    }

    /// How many elements match `css`.
    pub fn count(&self, css: &str) -> usize {
        let script = format!("return document.querySelectorAll({}).length;", json!(css));
        self.js(&script).as_u64().unwrap_or(0) as usize
    }

    /// Saves a PNG of the page under `target/browser/`; returns its path.
    pub fn screenshot(&self, name: &str) -> PathBuf {
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
