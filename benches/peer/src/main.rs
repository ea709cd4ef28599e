//! `pgbus-peer-bench`: the pgmq side of one `peer_pgmq` run of `pgbus-bench`, in a Cargo
//! project of its own so that the main workspace never builds pgmq and sqlx.
//!
//! `PGBUS_PEER_DATABASE_URL=URL pgbus-peer-bench --jobs N --readers R --read-size S` (the
//! URL in the environment, not on the command line, where any user's `ps` would see its
//! password), on a fresh
//! database that the harness made (and drops): installs pgmq's SQL from the crate itself
//! (no extension), sends `N` messages (`0..N` as JSON numbers) in one timed `send_batch`,
//! `VACUUM ANALYZE`s (as every drain of the harness starts), then times `R` readers that
//! each `read_batch` `S` messages and `delete_batch` them until a read finds nothing,
//! checks that every message was read exactly once and that the queue table is empty, and
//! prints one JSON line: `{"send_per_s": F, "drain_per_s": F}`.

use std::process::ExitCode;
use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use pgmq::PGMQueueExt;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};

/// The queue the peer uses (the harness's queue name).
const QUEUE: &str = "bench";
/// `application_name` of the peer's connections: the harness's own prefix, so that its
/// counts of pgbus connections (`pgbus:%`) do not see them.
const APPLICATION_NAME: &str = "pgbus-bench:pgmq";
/// Visibility timeout of a read, in seconds: far longer than a run, so a message is read
/// once unless something fails.
const VISIBILITY_TIMEOUT_S: i32 = 30;

/// The environment variable that carries the database URL.
const DATABASE_URL_ENV: &str = "PGBUS_PEER_DATABASE_URL";

const USAGE: &str =
    "usage: PGBUS_PEER_DATABASE_URL=URL pgbus-peer-bench --jobs N --readers R --read-size S";

/// What one run is asked to do.
#[derive(Debug, PartialEq, Eq)]
struct Args {
    database_url: String,
    jobs: usize,
    readers: usize,
    read_size: i32,
}

impl Args {
    /// Parses `--flag value` pairs beside the URL from the environment; every flag is
    /// required, counts must be positive.
    fn parse(
        mut args: impl Iterator<Item = String>,
        database_url: Option<String>,
    ) -> anyhow::Result<Self> {
        let (mut jobs, mut readers, mut read_size) = (None, None, None);
        while let Some(flag) = args.next() {
            let value = args
                .next()
                .with_context(|| format!("`{flag}` needs a value"))?;
            match flag.as_str() {
                "--jobs" => jobs = Some(positive(&flag, &value)?),
                "--readers" => readers = Some(positive(&flag, &value)?),
                "--read-size" => read_size = Some(positive(&flag, &value)?),
                _ => bail!("unknown argument `{flag}`"),
            }
        }
        Ok(Self {
            database_url: database_url
                .filter(|url| !url.is_empty())
                .with_context(|| format!("`{DATABASE_URL_ENV}` is required"))?,
            jobs: jobs.context("`--jobs` is required")?,
            readers: readers.context("`--readers` is required")?,
            read_size: read_size.context("`--read-size` is required")?,
        })
    }
}

/// A count above zero.
fn positive<T: FromStr + Default + PartialOrd>(flag: &str, value: &str) -> anyhow::Result<T> {
    match value.parse::<T>() {
        Ok(n) if n > T::default() => Ok(n),
        _ => bail!("`{flag}` takes a positive whole number, not `{value}`"),
    }
}

fn main() -> ExitCode {
    let args = match Args::parse(
        std::env::args().skip(1),
        std::env::var(DATABASE_URL_ENV).ok(),
    ) {
        Ok(args) => args,
        Err(err) => {
            eprintln!("error: {err:#}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: could not start the tokio runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&args)) {
        Ok((send_per_s, drain_per_s)) => {
            println!(
                "{}",
                serde_json::json!({ "send_per_s": send_per_s, "drain_per_s": drain_per_s })
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// One run; returns the messages per second of the send and of the drain.
async fn run(args: &Args) -> anyhow::Result<(f64, f64)> {
    let n = args.jobs;
    // The pool `PGMQueueExt::new` makes (sqlx's defaults, acquire timeout 10 s, as many
    // connections as readers).
    let options = PgConnectOptions::from_str(&args.database_url)
        .context("invalid database URL")?
        .application_name(APPLICATION_NAME);
    let pool = PgPoolOptions::new()
        .acquire_timeout(Duration::from_secs(10))
        .max_connections(u32::try_from(args.readers).context("too many readers")?)
        .connect_with(options)
        .await
        .context("connecting pgmq's pool")?;
    let pgmq = PGMQueueExt::new_with_pool(pool.clone()).await;
    pgmq.install_sql_from_embedded()
        .await
        .context("installing pgmq's SQL")?;
    pgmq.create(QUEUE)
        .await
        .context("creating the pgmq queue")?;

    let payloads: Vec<u64> = (0..n as u64).collect();
    let started = Instant::now();
    let sent = pgmq.send_batch(QUEUE, &payloads).await?;
    let send_per_s = rate(sent.len(), started.elapsed());
    ensure!(sent.len() == n, "pgmq sent {} of {n} messages", sent.len());
    sqlx::query("VACUUM ANALYZE")
        .execute(&pool)
        .await
        .context("VACUUM ANALYZE")?;

    let started = Instant::now();
    let loops: Vec<_> = (0..args.readers)
        .map(|_| {
            let pgmq = pgmq.clone();
            let read_size = args.read_size;
            tokio::spawn(async move {
                let mut read = Vec::new();
                loop {
                    let batch = pgmq
                        .read_batch::<u64>(QUEUE, VISIBILITY_TIMEOUT_S, read_size)
                        .await?;
                    if batch.is_empty() {
                        return Ok::<_, anyhow::Error>(read);
                    }
                    let ids: Vec<i64> = batch.iter().map(|m| m.msg_id).collect();
                    // A no-op job: nothing to run between the read and the delete.
                    let deleted = pgmq.delete_batch(QUEUE, &ids).await?;
                    ensure!(
                        deleted == ids.len(),
                        "pgmq deleted {deleted} of {}",
                        ids.len()
                    );
                    read.extend(batch.into_iter().map(|m| m.message));
                }
            })
        })
        .collect();
    let mut read = Vec::with_capacity(n);
    for handle in loops {
        read.extend(handle.await??);
    }
    let drain_per_s = rate(read.len(), started.elapsed());
    exactly_once(&mut read, n)?;
    let left: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM pgmq.q_{QUEUE}"))
        .fetch_one(&pool)
        .await
        .context("counting what is left in the queue")?;
    ensure!(left == 0, "{left} pgmq messages left after the drain");
    pool.close().await;
    Ok((send_per_s, drain_per_s))
}

/// Items per second.
fn rate(n: usize, elapsed: Duration) -> f64 {
    n as f64 / elapsed.as_secs_f64()
}

/// Checks that the payloads read are `0..n`, each once.
fn exactly_once(read: &mut [u64], n: usize) -> anyhow::Result<()> {
    read.sort_unstable();
    let expected = (0..n as u64).collect::<Vec<_>>();
    if read == expected.as_slice() {
        return Ok(());
    }
    let duplicates = read.windows(2).filter(|w| w[0] == w[1]).count();
    bail!(
        "pgmq delivered {} messages for {n} sent ({duplicates} duplicates)",
        read.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings<'a>(list: &'a [&'a str]) -> impl Iterator<Item = String> + 'a {
        list.iter().map(|s| (*s).to_owned())
    }

    #[test]
    fn exactly_once_refuses_losses_and_duplicates() {
        assert!(exactly_once(&mut [2, 0, 1], 3).is_ok());
        assert!(exactly_once(&mut [0, 1], 3).is_err());
        assert!(exactly_once(&mut [0, 1, 1], 3).is_err());
        assert!(exactly_once(&mut [0, 1, 2, 2], 3).is_err());
    }

    #[test]
    fn parses_every_required_argument_and_refuses_bad_ones() {
        let url = || Some("postgres://h/db".to_owned());
        let parsed = Args::parse(
            strings(&["--jobs", "10", "--readers", "2", "--read-size", "100"]),
            url(),
        )
        .unwrap();
        assert_eq!(
            parsed,
            Args {
                database_url: "postgres://h/db".to_owned(),
                jobs: 10,
                readers: 2,
                read_size: 100,
            }
        );
        let all = ["--jobs", "10", "--readers", "2", "--read-size", "100"];
        assert!(Args::parse(strings(&all), None).is_err());
        assert!(Args::parse(strings(&all), Some(String::new())).is_err());
        assert!(Args::parse(strings(&["--jobs", "10"]), url()).is_err());
        assert!(Args::parse(strings(&["--jobs", "0"]), url()).is_err());
        assert!(Args::parse(strings(&["--readers", "-1"]), url()).is_err());
        assert!(Args::parse(strings(&["--jobs"]), url()).is_err());
        assert!(Args::parse(strings(&["--fast", "1"]), url()).is_err());
        assert!(Args::parse(strings(&["--database-url", "x"]), url()).is_err());
    }
}
