//! The harness of the end-to-end tests: each test runs the real `pgbus` binary.
#![allow(dead_code, unreachable_pub)] // each test binary uses part of it

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

pub const PGBUS: &str = env!("CARGO_BIN_EXE_pgbus");
/// Longest a short command (send, stats, dlq, ...) may take.
pub const SHORT: Duration = Duration::from_secs(60);
/// Longest a `work --until-empty` run may take.
pub const LONG: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------------------

/// What a finished command left behind.
#[derive(Debug)]
pub struct Run {
    pub what: String,
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Asserts exit 0.
    #[track_caller]
    pub fn ok(self) -> Self {
        assert!(
            self.status.success(),
            "`{}` failed with {}\nstdout:\n{}\nstderr:\n{}",
            self.what,
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }

    /// Asserts a non-zero exit.
    #[track_caller]
    pub fn fails(self) -> Self {
        assert!(
            !self.status.success(),
            "`{}` should have failed\nstdout:\n{}\nstderr:\n{}",
            self.what,
            self.stdout,
            self.stderr
        );
        self
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|err| {
            panic!("`{}` printed no JSON ({err}):\n{}", self.what, self.stdout)
        })
    }
}

/// Waits for `child` to exit, at most `timeout`.
pub fn wait_deadline(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("waiting for a child") {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

pub fn read_all(pipe: Option<impl Read + Send + 'static>) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    })
}

/// Runs `cmd` to completion with `stdin` as its input, killing it after `timeout`.
pub fn run(mut cmd: Command, stdin: Option<Vec<u8>>, timeout: Duration) -> Run {
    let what = describe(&cmd);
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("starting `{what}`: {e}"));
    let writer = stdin.map(|data| {
        let mut pipe = child.stdin.take().expect("stdin is piped");
        // Closing the pipe (dropping it) is the end of input.
        thread::spawn(move || {
            let _ = pipe.write_all(&data);
        })
    });
    let stdout = read_all(child.stdout.take());
    let stderr = read_all(child.stderr.take());
    let status = match wait_deadline(&mut child, timeout) {
        Some(status) => status,
        None => {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`{what}` did not finish within {timeout:?}\nstdout:\n{}\nstderr:\n{}",
                stdout.join().unwrap_or_default(),
                stderr.join().unwrap_or_default()
            );
        }
    };
    if let Some(writer) = writer {
        writer.join().expect("stdin writer");
    }
    Run {
        what,
        status,
        stdout: stdout.join().expect("stdout reader"),
        stderr: stderr.join().expect("stderr reader"),
    }
}

pub fn describe(cmd: &Command) -> String {
    let args: Vec<String> = cmd
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    format!("pgbus {}", args.join(" "))
}

/// A base command with nothing from the environment that would pick a database or
/// change logging.
pub fn bare() -> Command {
    let mut cmd = Command::new(PGBUS);
    for var in ["DATABASE_URL", "PGBUS_LOG", "PGBUS_HOME", "PGBUS_TOKEN"] {
        cmd.env_remove(var);
    }
    cmd
}

/// Single-quotes `path` for `sh`.
pub fn sh_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

pub fn lines(path: &Path) -> Vec<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => text.lines().map(str::to_owned).collect(),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(err) => panic!("reading {}: {err}", path.display()),
    }
}

/// The `n` of each line of `path`; every line must be exactly one JSON payload.
#[track_caller]
pub fn payload_ns(path: &Path) -> Vec<i64> {
    let lines = lines(path);
    let parse = |line: &String| {
        serde_json::from_str::<Value>(line)
            .ok()
            .and_then(|v| v["n"].as_i64())
    };
    let bad: Vec<&String> = lines.iter().filter(|l| parse(l).is_none()).collect();
    assert!(
        bad.is_empty(),
        "{} of {} lines of {} are not one JSON payload each: {bad:?}",
        bad.len(),
        lines.len(),
        path.display()
    );
    lines.iter().filter_map(parse).collect()
}

/// Polls `condition` every 50 ms until it holds; panics with `what` after `timeout`.
pub fn eventually(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// A command running in the background, killed if the test ends before it did.
pub struct Background(pub Child);

impl Background {
    pub fn stop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `future` to completion on a runtime of its own.
pub fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(future)
}

/// Plain SQL on a fresh connection to `url`, for what the command line does not do.
pub fn execute(url: &str, statements: &str) {
    block_on(async {
        let client = pgbus_pg::connect(url, "test")
            .await
            .expect("a test connection");
        client.batch_execute(statements).await.expect(statements);
    });
}

/// The `bigint` a one-row, one-column query returns.
pub fn count(url: &str, query: &str) -> i64 {
    block_on(async {
        let client = pgbus_pg::connect(url, "test")
            .await
            .expect("a test connection");
        client.query_one(query, &[]).await.expect(query).get(0)
    })
}

/// A fresh database of its own, migrated unless asked otherwise.
pub struct Db {
    pub url: String,
    pub dir: tempfile::TempDir,
}

impl Db {
    pub fn unmigrated() -> Db {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let database = runtime.block_on(pgbus_pg::test_database());
        Db {
            url: database.url().to_owned(),
            dir: tempfile::tempdir().expect("a temporary directory"),
        }
    }

    pub fn new() -> Db {
        let db = Db::unmigrated();
        let out = db.ok(&["migrate"]);
        assert!(out.stdout.contains("applied migrations"), "{}", out.stdout);
        db
    }

    /// A file path in this test's temporary directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = bare();
        cmd.arg("--database-url").arg(&self.url).args(args);
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Run {
        run(self.cmd(args), None, SHORT)
    }

    /// Starts `pgbus ARGS` in the background (no stdin, stdout discarded); returns it with
    /// a reader of its standard error.
    pub fn spawn(&self, args: &[&str]) -> (Background, thread::JoinHandle<String>) {
        let mut process = Background(
            self.cmd(args)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap_or_else(|e| panic!("starting pgbus {}: {e}", args.join(" "))),
        );
        let stderr = read_all(process.0.stderr.take());
        (process, stderr)
    }

    #[track_caller]
    pub fn ok(&self, args: &[&str]) -> Run {
        self.run(args).ok()
    }

    #[track_caller]
    pub fn send_stdin(&self, args: &[&str], input: String) -> Run {
        run(self.cmd(args), Some(input.into_bytes()), SHORT)
    }

    /// Sends one message; returns its id.
    #[track_caller]
    pub fn send(&self, queue: &str, payload: &Value) -> i64 {
        let out = self.ok(&["send", queue, &payload.to_string()]);
        out.stdout
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("send printed {:?}: {e}", out.stdout))
    }

    #[track_caller]
    pub fn work(&self, args: &[&str]) -> Run {
        let mut all = vec!["work"];
        all.extend_from_slice(args);
        run(self.cmd(&all), None, LONG).ok()
    }

    /// Runs `work ARGS --until-empty` again and again (a run leaves what is due after
    /// `--wait-due`) until `done` holds.
    #[track_caller]
    pub fn work_until(&self, args: &[&str], timeout: Duration, mut done: impl FnMut(&Db) -> bool) {
        let deadline = Instant::now() + timeout;
        let mut all = args.to_vec();
        all.push("--until-empty");
        loop {
            self.work(&all);
            if done(self) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "`work {}` did not get there within {timeout:?}; stats: {:#}",
                all.join(" "),
                self.stats()
            );
            thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn stats(&self) -> Value {
        self.ok(&["stats", "--json"]).json()
    }

    /// The `stats --json` entry of `queue`.
    #[track_caller]
    pub fn queue_stats(&self, queue: &str) -> Value {
        let stats = self.stats();
        stats["queues"]
            .as_array()
            .expect("a queues array")
            .iter()
            .find(|q| q["queue"] == queue)
            .unwrap_or_else(|| panic!("queue {queue} missing from stats: {stats:#}"))
            .clone()
    }

    #[track_caller]
    pub fn depth(&self, queue: &str) -> u64 {
        self.queue_stats(queue)["depth"]
            .as_u64()
            .expect("depth is a number")
    }

    /// `dlq list --json`, keyed by message id.
    #[track_caller]
    pub fn dead(&self, queue: &str) -> BTreeMap<i64, Value> {
        let list = self.ok(&["dlq", "list", queue, "--json"]).json();
        list.as_array()
            .expect("dlq list --json is an array")
            .iter()
            .map(|d| (d["id"].as_i64().expect("an id"), d.clone()))
            .collect()
    }
}

pub fn json_lines(values: impl IntoIterator<Item = Value>) -> String {
    values.into_iter().map(|v| format!("{v}\n")).collect()
}

/// Sends SIGTERM to `child`.
pub fn terminate(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("running kill");
    assert!(status.success(), "kill -TERM {}", child.id());
}

/// A port nothing listens on now (the OS picks it; it is free again once dropped).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Whether something accepts connections on `port`.
pub fn listening(port: u16) -> bool {
    std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// A `pgbus serve` running in the background on its own port.
/// Waits until `pgbus serve` (`child`) listens on `port`; panics if it exits first or
/// takes longer than [`SHORT`].
pub fn wait_listening(child: &mut Child, port: u16) {
    let deadline = Instant::now() + SHORT;
    while !listening(port) {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("pgbus serve exited with {status} before listening");
        }
        assert!(
            Instant::now() < deadline,
            "pgbus serve did not listen within {SHORT:?}"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

pub struct Served {
    pub port: u16,
    pub process: Background,
}

impl Served {
    /// Starts `pgbus serve --listen 127.0.0.1:PORT EXTRA...` and waits until it answers.
    pub fn start(db: &Db, port: u16, extra: &[&str], env: &[(&str, &str)]) -> Served {
        let listen = format!("127.0.0.1:{port}");
        let mut args = vec!["serve", "--listen", &listen, "--refresh", "200ms"];
        args.extend_from_slice(extra);
        let mut cmd = db.cmd(&args);
        cmd.envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let mut process = Background(cmd.spawn().expect("starting pgbus serve"));
        wait_listening(&mut process.0, port);
        Served { port, process }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// SIGTERM (unless it already exited), then waits for the exit; returns its status.
    pub fn stop(mut self) -> ExitStatus {
        if matches!(self.process.0.try_wait(), Ok(None)) {
            terminate(&self.process.0);
        }
        let status = wait_deadline(&mut self.process.0, SHORT).expect("pgbus serve stopped");
        self.process.stop();
        status
    }
}

/// A request the test server received.
#[derive(Debug, Clone)]
pub struct Request {
    pub at: Instant,
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: Value,
    /// The body as sent (`body` is its JSON, `Null` when it is not JSON).
    pub raw: Vec<u8>,
}

/// Reads one HTTP/1.1 request (headers and a Content-Length body).
pub fn read_request(stream: &TcpStream) -> std::io::Result<Request> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let path = line.split(' ').nth(1).unwrap_or_default().to_owned();
    let method = line.split(' ').next().unwrap_or_default().to_owned();
    let mut headers = HashMap::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
        }
    }
    headers.insert(":method".into(), method);
    let length: usize = headers
        .get("content-length")
        .and_then(|l| l.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body)?;
    Ok(Request {
        at: Instant::now(),
        path,
        headers,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        raw: body,
    })
}
