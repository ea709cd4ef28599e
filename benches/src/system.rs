//! The conditions a run happened under: machine, server, settings.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;

use crate::scenarios::on_fresh_database;
use crate::server::{connect, Server};
use crate::stats::percentile;

/// Single-row inserts timed by [`commit_latency`].
const PROBE_COMMITS: usize = 200;

/// Machine and server facts for the report.
pub(crate) async fn conditions(server: &Server) -> anyhow::Result<Vec<(String, String)>> {
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut add = |name: &str, value: String| rows.push((name.to_owned(), value));
    add("date (UTC)", utc_now());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    add("CPU cores", cores.to_string());
    if let Some(model) = proc_field("/proc/cpuinfo", "model name") {
        add("CPU", model);
    }
    if let Some(mem) = proc_field("/proc/meminfo", "MemTotal") {
        add("memory", mem);
    }
    if let Ok(kernel) = std::fs::read_to_string("/proc/sys/kernel/osrelease") {
        add("Linux kernel", kernel.trim().to_owned());
    }
    add("server", server.describe());
    let admin = server.admin().await?;
    let version: String = admin.query_one("SHOW server_version", &[]).await?.get(0);
    add("PostgreSQL", version);
    let mut settings = Vec::new();
    for name in [
        "fsync",
        "synchronous_commit",
        "full_page_writes",
        "wal_sync_method",
        "shared_buffers",
        "max_connections",
    ] {
        let value: String = admin.query_one(&format!("SHOW {name}"), &[]).await?.get(0);
        settings.push(format!("{name}={value}"));
    }
    add("server settings", settings.join(", "));
    add(
        "harness",
        format!(
            "{} build; one tokio multi-thread runtime with {cores} worker threads; client and \
             server on the same machine",
            if cfg!(debug_assertions) {
                "debug (figures not representative)"
            } else {
                "release"
            }
        ),
    );
    Ok(rows)
}

/// The median time of a plain single-row `INSERT` in its own (durable) transaction, in ms:
/// how fast the machine commits right now. Measured before and after the scenarios, since
/// the disk of a shared machine can change speed during a run.
pub(crate) async fn commit_latency(server: &Server) -> anyhow::Result<f64> {
    on_fresh_database(server, |url| async move {
        let client = connect(&url).await?;
        client
            .batch_execute("CREATE TABLE probe (id bigserial PRIMARY KEY, v int NOT NULL)")
            .await?;
        let insert = client.prepare("INSERT INTO probe (v) VALUES ($1)").await?;
        let mut times = Vec::with_capacity(PROBE_COMMITS);
        for i in 0..PROBE_COMMITS as i32 {
            let started = Instant::now();
            client.execute(&insert, &[&i]).await?;
            times.push(started.elapsed().as_secs_f64() * 1_000.0);
        }
        Ok(percentile(&times, 50.0).unwrap_or(f64::NAN))
    })
    .await
}

/// This process's resident set size (`VmRSS` of `/proc/self/status`), in KiB.
pub(crate) fn rss_kib() -> anyhow::Result<f64> {
    let field = proc_field("/proc/self/status", "VmRSS")
        .context("no VmRSS in /proc/self/status (not Linux?)")?;
    let kib = field
        .strip_suffix(" kB")
        .and_then(|n| n.trim().parse::<f64>().ok());
    kib.with_context(|| format!("unexpected VmRSS `{field}`"))
}

/// The machine's 1-minute load average (`/proc/loadavg`).
pub(crate) fn load_average() -> anyhow::Result<f64> {
    let text = std::fs::read_to_string("/proc/loadavg").context("reading /proc/loadavg")?;
    text.split_whitespace()
        .next()
        .and_then(|load| load.parse().ok())
        .with_context(|| format!("unexpected /proc/loadavg `{}`", text.trim()))
}

/// CPU time this process has used so far (user and system, all threads), in seconds, from
/// `/proc/self/stat` (in clock ticks of 1/100 s: Linux's fixed `USER_HZ`).
pub(crate) fn cpu_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").context("reading /proc/self/stat")?;
    // Fields after the command name (which may hold spaces) in parentheses; utime and
    // stime are fields 14 and 15, the 12th and 13th after it.
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks = tick_fields(after_name, 11, 2, "/proc/self/stat")?;
    Ok((ticks[0] + ticks[1]) as f64 / TICKS_PER_SECOND)
}

/// CPU time the whole machine has spent busy so far (every process and the kernel, all
/// cores: the `cpu` line of `/proc/stat` less its idle and iowait), in seconds.
pub(crate) fn machine_busy_seconds() -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
    let line = stat
        .lines()
        .find(|line| line.starts_with("cpu "))
        .context("no cpu line in /proc/stat")?;
    // user nice system idle iowait irq softirq steal (guest time is counted in user).
    let ticks = tick_fields(line, 1, 8, "/proc/stat")?;
    let busy: u64 = ticks.iter().sum::<u64>() - ticks[3] - ticks[4];
    Ok(busy as f64 / TICKS_PER_SECOND)
}

/// Clock ticks per second in `/proc`'s CPU times: Linux's fixed `USER_HZ`.
const TICKS_PER_SECOND: f64 = 100.0;

/// The `count` whitespace-separated tick counts of `text` after its first `skip` fields.
fn tick_fields(text: &str, skip: usize, count: usize, source: &str) -> anyhow::Result<Vec<u64>> {
    let ticks: Vec<u64> = text
        .split_whitespace()
        .skip(skip)
        .take(count)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .with_context(|| format!("unexpected {source}"))?;
    anyhow::ensure!(ticks.len() == count, "unexpected {source}");
    Ok(ticks)
}

/// CPU time used while `work` runs: this process's and the rest of the machine's (on a
/// machine that runs nothing else, the database server's), in seconds.
pub(crate) async fn cpu_split<T>(
    work: impl std::future::Future<Output = T>,
) -> anyhow::Result<(T, CpuSplit)> {
    let (own, machine) = (cpu_seconds()?, machine_busy_seconds()?);
    let out = work.await;
    let own = cpu_seconds()? - own;
    let machine = machine_busy_seconds()? - machine;
    Ok((
        out,
        CpuSplit {
            harness: own,
            rest: (machine - own).max(0.0),
        },
    ))
}

/// CPU seconds spent during a measured stretch (see [`cpu_split`]).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CpuSplit {
    /// This process: the pgbus client side (workers, settlers, pools) and the harness.
    pub(crate) harness: f64,
    /// Everything else on the machine: the database server, on a quiet machine.
    pub(crate) rest: f64,
}

/// Raises this process's soft limit of open files to its hard limit (children inherit
/// it); returns the limit now in force.
pub(crate) fn raise_open_files_limit() -> anyhow::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX).context("could not raise the open-files limit")
}

/// The value of the first `field: value` line of a `/proc` file.
fn proc_field(path: &str, field: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        (name.trim() == field).then(|| value.trim().to_owned())
    })
}

/// `YYYY-MM-DD HH:MM` in UTC.
fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}",
        rest / 3600,
        rest % 3600 / 60
    )
}

/// Howard Hinnant's days-to-civil-date algorithm.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::civil_from_days;

    #[test]
    fn reads_its_own_resident_set_and_cpu_time() {
        let kib = super::rss_kib().unwrap();
        assert!(kib > 0.0, "{kib}");
        assert!(super::load_average().unwrap() >= 0.0);
        let before = super::cpu_seconds().unwrap();
        let spin = std::time::Instant::now();
        while spin.elapsed() < std::time::Duration::from_millis(50) {
            std::hint::black_box(spin.elapsed());
        }
        let used = super::cpu_seconds().unwrap() - before;
        assert!((0.0..10.0).contains(&used), "{used}");
    }

    #[test]
    fn converts_days_to_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11_017), (2000, 3, 1));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }
}
