//! The chaos harness's surroundings: the binaries it runs, the cluster (or server) it
//! runs them against, one database per scenario, a side connection for inspecting and
//! faulting the server, and the worker processes it starts, kills and restarts.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use pgbus_pg::{LocalCluster, PgBackend, ShutdownMode};
use rustix::process::{kill_process, Pid, Signal};
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls, Row};

use super::check::Kill;
use super::record::{now_ns, SUBCOMMAND};
use super::report::ScenarioReport;
use crate::deps::{target_dir, workspace_root};

/// `application_name` of the harness's own pool (sends, publishes): `pgbus:chaos`, left
/// out of every count of pgbus connections.
pub(crate) const HARNESS_ROLE: &str = "chaos";
/// `application_name` of the side connection (not `pgbus:*`, so never counted or killed).
const SIDE_NAME: &str = "chaos-side";

/// The binaries and the server of one `cargo xtask chaos` run.
pub(crate) struct Env {
    /// The throwaway cluster, unless a URL was given.
    cluster: Option<LocalCluster>,
    admin_url: String,
    /// A private copy of the release `pgbus` binary (a rebuild cannot swap it mid-run).
    pub(crate) pgbus: PathBuf,
    /// A private copy of this binary, run as the handler of every message.
    handler: PathBuf,
    /// `target/chaos`.
    pub(crate) out: PathBuf,
}

impl Env {
    /// Builds `pgbus` in release mode (a no-op when it is current), copies the binaries
    /// into `out`, and starts a durable throwaway cluster unless `database_url` is given.
    pub(crate) fn prepare(out: &Path, database_url: Option<&str>) -> anyhow::Result<Env> {
        let bin = out.join("bin");
        std::fs::create_dir_all(&bin).with_context(|| format!("creating {}", bin.display()))?;
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let status = Command::new(&cargo)
            .current_dir(workspace_root())
            .args([
                "build",
                "--release",
                "--package",
                "pgbus-cli",
                "--bin",
                "pgbus",
            ])
            .status()
            .context("running cargo build")?;
        if !status.success() {
            bail!("cargo build --release --package pgbus-cli failed ({status})");
        }
        let target = target_dir();
        let pgbus = bin.join("pgbus");
        copy_executable(&target.join("release/pgbus"), &pgbus)?;
        let handler = bin.join("xtask-chaos-handler");
        copy_executable(&std::env::current_exe()?, &handler)?;

        let (cluster, admin_url) = match database_url {
            Some(url) => (None, url.to_owned()),
            None => {
                // Durable settings: an immediate restart must not lose acknowledged commits.
                let cluster = LocalCluster::builder()
                    .setting("max_connections", "400")
                    .start()
                    .context("starting a throwaway PostgreSQL cluster")?;
                let url = cluster.url();
                println!(
                    "chaos: PostgreSQL cluster on port {} (log {})",
                    cluster.port(),
                    cluster.log_file().display()
                );
                (Some(cluster), url)
            }
        };
        Ok(Env {
            cluster,
            admin_url,
            pgbus,
            handler,
            out: out.to_path_buf(),
        })
    }

    /// Whether the harness controls the server (it can restart it).
    pub(crate) fn owns_server(&self) -> bool {
        self.cluster.is_some()
    }

    /// Restarts the server, blocking this worker thread of the runtime meanwhile.
    pub(crate) fn restart(&self, mode: ShutdownMode) -> anyhow::Result<()> {
        let cluster = self
            .cluster
            .as_ref()
            .context("restarts need the harness's own cluster")?;
        tokio::task::block_in_place(|| cluster.restart(mode))
            .with_context(|| format!("pg_ctl restart -m {}", mode.as_pg_ctl()))
    }

    /// `SELECT version()`, cut after the version number.
    pub(crate) async fn postgres_version(&self) -> anyhow::Result<String> {
        let admin = connect(&self.admin_url, SIDE_NAME).await?;
        let version: String = admin.query_one("SELECT version()", &[]).await?.get(0);
        Ok(version.split(" on ").next().unwrap_or(&version).to_owned())
    }

    /// The `--exec` command that runs the recording handler.
    pub(crate) fn handler_command(&self, record: &Path, sleep_ms: u64) -> String {
        format!(
            "exec {} {SUBCOMMAND} {} {sleep_ms} \"$PPID\"",
            sh_quote(&self.handler),
            sh_quote(record)
        )
    }

    /// A fresh, migrated database `pgbus_chaos_<scenario>` and a directory for its files.
    pub(crate) async fn database(&self, scenario: &str) -> anyhow::Result<ScenarioDb> {
        let name = format!("pgbus_chaos_{scenario}");
        let admin = connect(&self.admin_url, SIDE_NAME).await?;
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await
            .with_context(|| format!("dropping an old {name}"))?;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .with_context(|| format!("creating {name} (the user needs CREATEDB)"))?;
        let url = with_database(&self.admin_url, &name)?;
        let backend = PgBackend::builder(&url)
            .role(HARNESS_ROLE)
            .max_connections(4)
            .build()?;
        backend.migrate().await?;
        let dir = self.out.join(scenario);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(ScenarioDb {
            side: Side::new(url.clone()),
            url,
            backend,
            dir,
        })
    }
}

/// One scenario's database.
pub(crate) struct ScenarioDb {
    pub(crate) url: String,
    /// The harness's pool (`pgbus:chaos`).
    pub(crate) backend: PgBackend,
    pub(crate) side: Side,
    /// `target/chaos/<scenario>`: the record and the process logs.
    pub(crate) dir: PathBuf,
}

/// A connection of the harness's own that reconnects after faults (restarts, kills): for
/// reading `pg_stat_activity`, terminating backends, taking locks and counting what is
/// left. Its `application_name` is not `pgbus:*`.
pub(crate) struct Side {
    url: String,
    client: tokio::sync::Mutex<Option<Client>>,
}

/// Which connections of a role [`Side::wait_for_role`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Counting {
    /// Every open one.
    Connected,
    /// Those whose last statement was a `LISTEN`: a listener that reconnected and listens
    /// again, not only connected.
    Listening,
}

/// How long a side query keeps retrying through a fault.
const SIDE_PATIENCE: Duration = Duration::from_secs(60);

impl Side {
    fn new(url: String) -> Self {
        Self {
            url,
            client: tokio::sync::Mutex::new(None),
        }
    }

    /// A dedicated connection of the side's kind, for holding a lock.
    pub(crate) async fn dedicated(&self) -> anyhow::Result<Client> {
        connect(&self.url, SIDE_NAME).await
    }

    /// Runs `sql`, reconnecting and retrying for up to a minute while the server is away.
    pub(crate) async fn query(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> anyhow::Result<Vec<Row>> {
        let deadline = Instant::now() + SIDE_PATIENCE;
        loop {
            let mut guard = self.client.lock().await;
            if guard.as_ref().is_none_or(Client::is_closed) {
                *guard = connect(&self.url, SIDE_NAME).await.ok();
            }
            let result = match guard.as_ref() {
                Some(client) => client.query(sql, params).await.map_err(anyhow::Error::from),
                None => Err(anyhow::anyhow!("could not connect")),
            };
            match result {
                Ok(rows) => return Ok(rows),
                // Expected while the server restarts: reconnect and try again.
                Err(_) if Instant::now() < deadline => {
                    *guard = None;
                    drop(guard);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(err) => return Err(err.context(format!("side query `{sql}`"))),
            }
        }
    }

    /// Backends of this database named `pgbus:<role>`.
    pub(crate) async fn role_pids(&self, role: &str) -> anyhow::Result<Vec<i32>> {
        self.pids(role, Counting::Connected).await
    }

    async fn pids(&self, role: &str, counting: Counting) -> anyhow::Result<Vec<i32>> {
        let name = format!("pgbus:{role}");
        let listening = matches!(counting, Counting::Listening);
        // `query` is the backend's last statement: a listener's is its `LISTEN` until the
        // next statement (a health check after 30 quiet seconds, an `UNLISTEN`).
        let rows = self
            .query(
                "SELECT pid FROM pg_stat_activity
                 WHERE datname = current_database() AND application_name = $1
                   AND (NOT $2 OR query LIKE 'LISTEN %')",
                &[&name, &listening],
            )
            .await?;
        Ok(rows.iter().map(|row| row.get(0)).collect())
    }

    /// How many `pgbus:<role>` connections there are (with [`Counting::Listening`]: that
    /// listen).
    pub(crate) async fn count(&self, role: &str, counting: Counting) -> anyhow::Result<usize> {
        Ok(self.pids(role, counting).await?.len())
    }

    /// Waits up to `timeout` until at least `count` `pgbus:<role>` connections are there
    /// (and, with [`Counting::Listening`], listening); returns how many there were last.
    pub(crate) async fn wait_for_role(
        &self,
        role: &str,
        counting: Counting,
        count: usize,
        timeout: Duration,
    ) -> anyhow::Result<usize> {
        let deadline = Instant::now() + timeout;
        loop {
            let now = self.count(role, counting).await?;
            if now >= count || Instant::now() >= deadline {
                return Ok(now);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Terminates the backends; returns how many were.
    pub(crate) async fn terminate(&self, pids: &[i32]) -> anyhow::Result<u64> {
        let rows = self
            .query(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))
                 FROM unnest($1::int[]) AS pid",
                &[&pids],
            )
            .await?;
        Ok(u64::try_from(rows[0].get::<_, i64>(0)).unwrap_or(0))
    }

    /// pgbus's connections to this database (every `pgbus:*` but the harness's own).
    pub(crate) async fn pgbus_connections(&self) -> anyhow::Result<u64> {
        let rows = self
            .query(
                "SELECT count(*) FROM pg_stat_activity
                 WHERE datname = current_database()
                   AND application_name LIKE 'pgbus:%' AND application_name <> $1",
                &[&format!("pgbus:{HARNESS_ROLE}")],
            )
            .await?;
        Ok(u64::try_from(rows[0].get::<_, i64>(0)).unwrap_or(0))
    }

    /// Messages of `queue` still in the hot table, and its dead letters.
    pub(crate) async fn left(&self, queue: &str) -> anyhow::Result<(u64, u64)> {
        let rows = self
            .query(
                "SELECT (SELECT count(*) FROM pgbus.messages WHERE queue = $1),
                        (SELECT count(*) FROM pgbus.dead_letters WHERE queue = $1)",
                &[&queue],
            )
            .await?;
        let count = |i| u64::try_from(rows[0].get::<_, i64>(i)).unwrap_or(0);
        Ok((count(0), count(1)))
    }
}

async fn connect(url: &str, name: &str) -> anyhow::Result<Client> {
    let mut config: tokio_postgres::Config = url.parse().context("parsing the database URL")?;
    config.application_name(name);
    config.connect_timeout(Duration::from_secs(5));
    let (client, connection) = config
        .connect(NoTls)
        .await
        .context("connecting to the database")?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// `url` with its database replaced by `db`: a `postgres://` URL or a key=value string.
pub(crate) fn with_database(url: &str, db: &str) -> anyhow::Result<String> {
    let url = url.trim();
    for scheme in ["postgres://", "postgresql://"] {
        if let Some(rest) = url.strip_prefix(scheme) {
            let (before_query, query) = rest.split_at(rest.find('?').unwrap_or(rest.len()));
            let authority = before_query.split('/').next().unwrap_or_default();
            return Ok(format!("{scheme}{authority}/{db}{query}"));
        }
    }
    if url.contains('=') {
        return Ok(format!("{url} dbname={db}"));
    }
    bail!("not a PostgreSQL URL or connection string: expected postgres://...")
}

fn copy_executable(from: &Path, to: &Path) -> anyhow::Result<()> {
    // Remove first: the old copy may still be running (a text file busy error otherwise).
    let _ = std::fs::remove_file(to);
    std::fs::copy(from, to)
        .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
    Ok(())
}

pub(crate) fn sh_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

/// The processes whose parent is `parent` (from `/proc/*/stat`).
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            // `pid (comm) state ppid ...`; comm may hold spaces and parentheses.
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                stat.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse::<u32>().ok())
                    == Some(parent)
            })
        })
        .collect()
}

/// Sends `signal` to `pid`; a process that is already gone is fine.
fn signal(pid: u32, signal: Signal) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        let _ = kill_process(pid, signal);
    }
}

/// A set of child processes of one kind (`pgbus work` workers, a `pgbus serve`), one per
/// slot: killed and restarted by the harness, restarted after a second when they die by
/// themselves (which is recorded: pgbus processes must not crash).
pub(crate) struct Procs {
    name: String,
    /// Whether the processes are supervisors whose children (the workers) are watched.
    track_children: bool,
    dir: PathBuf,
    command: Box<dyn Fn() -> Command + Send + Sync>,
    state: Mutex<ProcsState>,
}

#[derive(Default)]
struct ProcsState {
    slots: Vec<Slot>,
    spawned: usize,
    kills: Vec<Kill>,
    /// Every pid ever started (and, with child tracking, every child seen).
    pids: Vec<u32>,
    /// Processes that exited without being asked: `slot pid status log`.
    unexpected: Vec<String>,
    /// With child tracking: the children of the running processes, and when each was
    /// first seen.
    children: HashMap<u32, Instant>,
    /// Set while stopping: children leaving then are expected to.
    stopping: bool,
}

#[derive(Default)]
struct Slot {
    running: Option<(Child, u32)>,
    /// When a process that died by itself is started again.
    restart_at: Option<Instant>,
    /// The log of the slot's latest process.
    log: Option<PathBuf>,
}

impl Procs {
    /// Starts `count` processes made by `command`; their output goes to
    /// `dir/<name>-<slot>-<n>.log`.
    pub(crate) fn start(
        name: &str,
        dir: &Path,
        count: usize,
        command: impl Fn() -> Command + Send + Sync + 'static,
    ) -> anyhow::Result<Arc<Procs>> {
        Self::start_tracking(name, dir, count, false, command)
    }

    /// [`start`](Self::start), and with `track_children` also watches the children of each
    /// process (`pgbus work --processes N` supervisors): they count as workers, and one
    /// that vanishes without being killed by the harness died by itself.
    pub(crate) fn start_tracking(
        name: &str,
        dir: &Path,
        count: usize,
        track_children: bool,
        command: impl Fn() -> Command + Send + Sync + 'static,
    ) -> anyhow::Result<Arc<Procs>> {
        let procs = Arc::new(Procs {
            track_children,
            name: name.to_owned(),
            dir: dir.to_path_buf(),
            command: Box::new(command),
            state: Mutex::new(ProcsState::default()),
        });
        {
            let mut state = procs.state.lock().expect("procs");
            for slot in 0..count {
                state.slots.push(Slot::default());
                procs.spawn(&mut state, slot)?;
            }
        }
        let watched = Arc::downgrade(&procs);
        tokio::spawn(async move {
            while let Some(procs) = watched.upgrade() {
                procs.watch();
                drop(procs);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        Ok(procs)
    }

    fn spawn(&self, state: &mut ProcsState, slot: usize) -> anyhow::Result<u32> {
        state.spawned += 1;
        let log_path = self
            .dir
            .join(format!("{}-{slot}-{}.log", self.name, state.spawned));
        let log =
            File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let child = (self.command)()
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting a {} process", self.name))?;
        let pid = child.id();
        state.pids.push(pid);
        state.slots[slot] = Slot {
            running: Some((child, pid)),
            restart_at: None,
            log: Some(log_path),
        };
        Ok(pid)
    }

    /// Notices processes that died by themselves, and restarts them a second later.
    fn watch(&self) {
        let mut state = self.state.lock().expect("procs");
        let now = Instant::now();
        for slot in 0..state.slots.len() {
            if let Some((child, pid)) = &mut state.slots[slot].running {
                if let Ok(Some(status)) = child.try_wait() {
                    let line = format!(
                        "{} slot {slot} (pid {pid}) exited by itself: {status}",
                        self.name
                    );
                    println!("chaos:   ! {line}");
                    state.unexpected.push(line);
                    state.slots[slot].running = None;
                    state.slots[slot].restart_at = Some(now + Duration::from_secs(1));
                }
            } else if state.slots[slot].restart_at.is_some_and(|at| at <= now) {
                if let Err(err) = self.spawn(&mut state, slot) {
                    state.unexpected.push(format!(
                        "could not restart {} slot {slot}: {err:#}",
                        self.name
                    ));
                    state.slots[slot].restart_at = Some(now + Duration::from_secs(1));
                }
            }
        }
        if self.track_children {
            let parents: Vec<u32> = state
                .slots
                .iter()
                .filter_map(|s| s.running.as_ref().map(|(_, pid)| *pid))
                .collect();
            let current: HashSet<u32> = parents.iter().flat_map(|p| children_of(*p)).collect();
            for pid in &current {
                if !state.children.contains_key(pid) {
                    state.children.insert(*pid, now);
                    state.pids.push(*pid);
                }
            }
            let gone: Vec<u32> = state
                .children
                .keys()
                .filter(|pid| !current.contains(pid))
                .copied()
                .collect();
            for pid in gone {
                state.children.remove(&pid);
                let killed = state.kills.iter().any(|k| k.worker == pid);
                if !killed && !state.stopping {
                    let line = format!("{} child {pid} exited by itself", self.name);
                    println!("chaos:   ! {line}");
                    state.unexpected.push(line);
                }
            }
        }
    }

    /// The tracked children now, each with how long ago it was first seen, oldest first.
    pub(crate) fn children(&self) -> Vec<(u32, Duration)> {
        let state = self.state.lock().expect("procs");
        let mut children: Vec<(u32, Duration)> = state
            .children
            .iter()
            .map(|(pid, seen)| (*pid, seen.elapsed()))
            .collect();
        children.sort_by_key(|(pid, up)| (std::cmp::Reverse(*up), *pid));
        children
    }

    /// SIGKILLs a tracked child (its parent reaps it).
    pub(crate) fn kill_child(&self, pid: u32) -> Kill {
        let mut state = self.state.lock().expect("procs");
        let kill = Kill {
            worker: pid,
            at: now_ns(),
        };
        signal(pid, Signal::KILL);
        state.kills.push(kill);
        kill
    }

    /// SIGKILLs the process in `slot` and reaps it; `None` when the slot had none.
    pub(crate) fn kill(&self, slot: usize) -> Option<Kill> {
        let mut state = self.state.lock().expect("procs");
        let (mut child, pid) = state.slots.get_mut(slot)?.running.take()?;
        let at = now_ns();
        let _ = child.kill();
        let _ = child.wait();
        let kill = Kill { worker: pid, at };
        state.kills.push(kill);
        Some(kill)
    }

    /// Starts a process in an empty `slot` (after [`kill`](Self::kill) or
    /// [`stop_slot`](Self::stop_slot)).
    pub(crate) fn restart(&self, slot: usize) -> anyhow::Result<u32> {
        let mut state = self.state.lock().expect("procs");
        if state.slots[slot].running.is_some() {
            bail!("{} slot {slot} is running", self.name);
        }
        self.spawn(&mut state, slot)
    }

    /// SIGTERMs the process in `slot` and waits for it to exit (SIGKILL after `patience`);
    /// returns its status.
    pub(crate) async fn stop_slot(&self, slot: usize, patience: Duration) -> Option<ExitStatus> {
        let (mut child, pid) = {
            let mut state = self.state.lock().expect("procs");
            state.slots.get_mut(slot)?.running.take()?
        };
        signal(pid, Signal::TERM);
        let deadline = Instant::now() + patience;
        loop {
            match child.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                _ => {
                    let _ = child.kill();
                    return child.wait().ok();
                }
            }
        }
    }

    /// Stops every process gracefully; returns a problem line for each that did not exit 0.
    pub(crate) async fn stop_all(&self, patience: Duration) -> Vec<String> {
        let slots = {
            let mut state = self.state.lock().expect("procs");
            state.stopping = true;
            state.slots.len()
        };
        let mut problems = Vec::new();
        for slot in 0..slots {
            if let Some(status) = self.stop_slot(slot, patience).await {
                if !status.success() {
                    problems.push(format!(
                        "{} slot {slot} did not stop cleanly on SIGTERM: {status}",
                        self.name
                    ));
                }
            }
        }
        problems
    }

    /// Adds the checks every pgbus process must pass: none exited without being asked to,
    /// and each stopped cleanly when asked to at the end ([`stop_all`](Self::stop_all)'s
    /// `stop_problems`). `what` names the processes in the checks.
    pub(crate) fn check_exits(
        &self,
        report: &mut ScenarioReport,
        what: &str,
        stop_problems: &[String],
    ) {
        let unexpected = self.unexpected_exits();
        report.check(
            format!("no {what} process died by itself"),
            unexpected.is_empty(),
            if unexpected.is_empty() {
                "none".to_owned()
            } else {
                unexpected.join("; ")
            },
        );
        report.check(
            format!("every {what} process stops cleanly on SIGTERM"),
            stop_problems.is_empty(),
            if stop_problems.is_empty() {
                format!("{} exited 0", self.slots())
            } else {
                stop_problems.join("; ")
            },
        );
    }

    /// Pids of the running processes.
    pub(crate) fn pids(&self) -> Vec<u32> {
        let state = self.state.lock().expect("procs");
        state
            .slots
            .iter()
            .filter_map(|s| s.running.as_ref().map(|(_, pid)| *pid))
            .collect()
    }

    /// The slot whose running process wrote `text` to its log (stdout and stderr), if one
    /// did.
    pub(crate) fn slot_logging(&self, text: &str) -> Option<usize> {
        let state = self.state.lock().expect("procs");
        state.slots.iter().position(|slot| {
            slot.running.is_some()
                && slot
                    .log
                    .as_ref()
                    .and_then(|log| std::fs::read_to_string(log).ok())
                    .is_some_and(|log| log.contains(text))
        })
    }

    pub(crate) fn slots(&self) -> usize {
        self.state.lock().expect("procs").slots.len()
    }

    /// Every pid ever started, killed or not.
    pub(crate) fn all_pids(&self) -> Vec<u32> {
        self.state.lock().expect("procs").pids.clone()
    }

    pub(crate) fn kills(&self) -> Vec<Kill> {
        self.state.lock().expect("procs").kills.clone()
    }

    /// Processes that exited without being asked to.
    fn unexpected_exits(&self) -> Vec<String> {
        self.state.lock().expect("procs").unexpected.clone()
    }
}

impl Drop for Procs {
    fn drop(&mut self) {
        let state = self.state.get_mut().expect("procs");
        for slot in &mut state.slots {
            if let Some((mut child, _)) = slot.running.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_is_replaced_in_urls() {
        assert_eq!(
            with_database("postgres://u:p@h:5432/postgres?sslmode=disable", "c").unwrap(),
            "postgres://u:p@h:5432/c?sslmode=disable"
        );
        assert_eq!(
            with_database("postgresql://u@h", "c").unwrap(),
            "postgresql://u@h/c"
        );
        assert_eq!(
            with_database("host=h user=u", "c").unwrap(),
            "host=h user=u dbname=c"
        );
        assert!(with_database("mysql", "c").is_err());
    }
}
