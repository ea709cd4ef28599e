//! End-to-end tests of `pgbus relay`: the real binary publishes rows written to
//! `pgbus.outbox` with plain SQL (as a producer in any language would), in the same
//! database or in another one, and exits 0 on SIGTERM; bad settings and an outbox
//! database it cannot use are one-line errors. And `pgbus work` prunes what the event bus
//! leaves behind (dedup records, the event log) and the archive.

use std::collections::BTreeSet;
use std::process::{Child, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

mod common;
use common::*;

/// Writes outbox rows `order.paid` with payloads `{"n": first..=last}`.
fn write_outbox(url: &str, first: i64, last: i64) {
    execute(
        url,
        &format!(
            "INSERT INTO pgbus.outbox (routing_key, payload)
             SELECT 'order.paid', convert_to(json_build_object('n', i)::text, 'UTF8')
             FROM generate_series({first}, {last}) i"
        ),
    );
}

fn copies_in(url: &str, queue: &str) -> i64 {
    count(
        url,
        &format!("SELECT count(*) FROM pgbus.messages WHERE queue = '{queue}'"),
    )
}

/// `(published, pending)` outbox rows.
fn outbox_rows(url: &str) -> (i64, i64) {
    let published = count(
        url,
        "SELECT count(*) FROM pgbus.outbox WHERE published_at IS NOT NULL",
    );
    let pending = count(
        url,
        "SELECT count(*) FROM pgbus.outbox WHERE published_at IS NULL",
    );
    (published, pending)
}

/// A `pgbus relay` in the background, its output collected.
struct Relay {
    process: Background,
    stdout: JoinHandle<String>,
    stderr: JoinHandle<String>,
}

impl Relay {
    fn start(db: &Db, extra: &[&str]) -> Relay {
        let mut args = vec!["relay", "--poll-interval", "200ms"];
        args.extend_from_slice(extra);
        let mut process = Background(
            db.cmd(&args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("starting pgbus relay"),
        );
        let stdout = read_all(process.0.stdout.take());
        let stderr = read_all(process.0.stderr.take());
        Relay {
            process,
            stdout,
            stderr,
        }
    }

    fn child(&mut self) -> &mut Child {
        &mut self.process.0
    }

    /// SIGTERM, then the exit; asserts exit 0 and returns what it printed on stdout and
    /// stderr.
    fn stop(mut self) -> (String, String) {
        terminate(self.child());
        let status = wait_deadline(self.child(), SHORT);
        self.process.stop();
        let stdout = self.stdout.join().unwrap_or_default();
        let stderr = self.stderr.join().unwrap_or_default();
        let status = status
            .unwrap_or_else(|| panic!("pgbus relay ignored SIGTERM for {SHORT:?}:\n{stderr}"));
        assert!(status.success(), "pgbus relay exited {status}:\n{stderr}");
        (stdout, stderr)
    }
}

/// Waits until `queue` of `url` holds `n` messages, failing early if the relay died.
fn wait_for_copies(relay: &mut Relay, url: &str, queue: &str, n: i64) {
    eventually(&format!("{n} messages in {queue}"), LONG, || {
        if let Ok(Some(status)) = relay.child().try_wait() {
            panic!("pgbus relay exited early with {status}");
        }
        copies_in(url, queue) == n
    });
}

/// The `n`s of the payloads in `queue`, handled (and so decoded) by a real worker.
fn delivered(db: &Db, queue: &str) -> BTreeSet<i64> {
    let out = db.path(&format!("{queue}.jsonl"));
    db.work(&[
        queue,
        "--until-empty",
        "--exec",
        &format!("cat >> {}", sh_quote(&out)),
    ]);
    payload_ns(&out).into_iter().collect()
}

#[test]
fn relays_outbox_rows_written_with_plain_sql_until_sigterm() {
    let db = Db::new();
    db.ok(&["queue", "create", "billing"]);
    db.ok(&["topic", "bind", "order.*", "billing"]);
    write_outbox(&db.url, 1, 25); // before the relay starts

    let mut relay = Relay::start(&db, &["--batch", "10"]);
    wait_for_copies(&mut relay, &db.url, "billing", 25);
    write_outbox(&db.url, 26, 30); // while it runs: the insert notification wakes it
    wait_for_copies(&mut relay, &db.url, "billing", 30);
    let (stdout, stderr) = relay.stop();

    assert_eq!(stdout, "", "no data on standard output");
    let notes: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("pgbus: relaying"))
        .collect();
    assert_eq!(notes.len(), 1, "one note on start: {stderr}");
    let database = db.url.rsplit('/').next().expect("a database name");
    assert!(
        notes[0].contains("relaying pgbus.outbox of") && notes[0].contains(database),
        "names where it relays from: {stderr}"
    );
    assert_eq!(outbox_rows(&db.url), (30, 0), "every row marked published");
    assert_eq!(delivered(&db, "billing"), (1..=30).collect());
}

#[test]
fn relays_the_outbox_of_another_database() {
    let bus = Db::new();
    let producer = Db::new(); // `pgbus migrate` there creates its pgbus.outbox
    bus.ok(&["queue", "create", "billing"]);
    bus.ok(&["topic", "bind", "order.#", "billing"]);
    write_outbox(&producer.url, 1, 12);

    let mut relay = Relay::start(&bus, &["--outbox-url", &producer.url, "--batch", "5"]);
    wait_for_copies(&mut relay, &bus.url, "billing", 12);
    let (_, stderr) = relay.stop();

    let producer_db = producer.url.rsplit('/').next().expect("a database name");
    assert!(
        stderr.contains(producer_db),
        "names the outbox's database: {stderr}"
    );
    assert_eq!(
        outbox_rows(&producer.url),
        (12, 0),
        "marked where they were written"
    );
    assert_eq!(
        copies_in(&producer.url, "billing"),
        0,
        "published to the bus only"
    );
    assert_eq!(delivered(&bus, "billing"), (1..=12).collect());
}

/// Asserts a failed command said one line naming each of `what`.
#[track_caller]
fn one_line_error(run: Run, what: &[&str]) {
    let run = run.fails();
    assert_ne!(run.status.code(), Some(2), "not a usage error: {run:?}");
    let stderr = run.stderr.trim();
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.starts_with("pgbus: "), "{stderr}");
    for w in what {
        assert!(stderr.contains(w), "{w:?} not in: {stderr}");
    }
}

#[test]
fn bad_settings_and_an_outbox_it_cannot_use_are_one_line_errors() {
    let db = Db::new();

    // Flags clap refuses: exit 2 and a usage message naming the flag.
    let bad = db.run(&["relay", "--retention", "soon"]).fails();
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert!(bad.stderr.contains("--retention"), "{}", bad.stderr);

    one_line_error(db.run(&["relay", "--batch", "0"]), &["batch"]);
    let zero = db.run(&["relay", "--prune-interval", "0s"]).fails();
    assert_eq!(zero.status.code(), Some(2), "a usage error: {zero:?}");
    assert!(
        zero.stderr.contains("must be more than zero"),
        "{}",
        zero.stderr
    );

    // Nothing listens there: refused at once rather than retried for ever.
    let nowhere = format!("postgres://postgres@127.0.0.1:{}/nowhere", free_port());
    let started = std::time::Instant::now();
    one_line_error(
        db.run(&["relay", "--outbox-url", &nowhere]),
        &["outbox database", "nowhere"],
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "an unreachable outbox fails fast, not after retries"
    );

    // A database without the pgbus schema has no outbox to relay.
    let bare = Db::unmigrated();
    one_line_error(
        db.run(&["relay", "--outbox-url", &bare.url]),
        &["outbox database", "migrate"],
    );
}

/// `(archive, dedup records, event log)` rows.
fn retained(url: &str) -> (i64, i64, i64) {
    (
        count(url, "SELECT count(*) FROM pgbus.archive"),
        count(url, "SELECT count(*) FROM pgbus.event_dedup"),
        count(url, "SELECT count(*) FROM pgbus.events"),
    )
}

#[test]
fn work_prunes_the_archive_dedup_records_and_event_log_past_their_retention() {
    let db = Db::new();
    db.ok(&["queue", "create", "kept", "--keep-history"]);
    db.send_stdin(
        &["send", "kept"],
        json_lines((1..=3).map(|n| serde_json::json!({ "n": n }))),
    )
    .ok();
    db.work(&["kept", "--until-empty", "--exec", "true"]);
    db.send_stdin(
        &["publish", "order.paid"],
        json_lines((1..=3).map(|n| serde_json::json!({ "n": n }))),
    )
    .ok();
    // Two of each older than what is kept (the queue's archive: the default 7 days).
    execute(
        &db.url,
        "UPDATE pgbus.archive SET acked_at = now() - interval '8 days'
         WHERE id IN (SELECT id FROM pgbus.archive ORDER BY id LIMIT 2);
         UPDATE pgbus.events SET published_at = now() - interval '2 hours'
         WHERE seq IN (SELECT seq FROM pgbus.events ORDER BY seq LIMIT 2);
         INSERT INTO pgbus.event_dedup (subscriber, event_id, state, message_id, attempt,
                                        updated_at)
         SELECT 'kept', gen_random_uuid(), 'completed', i, 1, now() - i * interval '1 hour'
         FROM generate_series(0, 2) i;",
    );
    assert_eq!(retained(&db.url), (3, 3, 3));

    let (mut worker, stderr) = db.spawn(&[
        "work",
        "kept",
        "--exec",
        "true",
        "--dedup-retention",
        "30m",
        "--event-retention",
        "1h",
    ]);
    eventually("the worker to prune", LONG, || {
        retained(&db.url) == (1, 1, 1)
    });
    terminate(&worker.0);
    let status = wait_deadline(&mut worker.0, SHORT).expect("the worker stopped");
    let stderr = stderr.join().unwrap_or_default();
    assert!(status.success(), "{status}\n{stderr}");
    assert!(
        stderr.contains("pruned"),
        "a pass that pruned is logged: {stderr}"
    );
    assert_eq!(
        count(
            &db.url,
            "SELECT count(*) FROM pgbus.event_dedup WHERE message_id = 0"
        ),
        1,
        "the fresh dedup record is kept"
    );
}
