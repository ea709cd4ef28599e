//! The real binary where production databases are: a TLS-only server (`hostssl` and
//! scram only) reached with `sslmode=verify-full`, wrong TLS settings refused in one line
//! that names the cause, and a PgBouncer in transaction mode with a pool smaller than the
//! worker's concurrency.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::OnceLock;

use pgbus_pg::{LocalCluster, TestCa};
use serde_json::{json, Value};

mod common;
use common::*;

/// A TLS-only cluster whose certificate names `localhost` only, and its CA file.
struct TlsServer {
    cluster: LocalCluster,
    ca: PathBuf,
    /// Another CA's certificate, which did not sign the server's.
    other_ca: PathBuf,
    _certs: tempfile::TempDir,
}

fn tls_server() -> &'static TlsServer {
    static SERVER: OnceLock<TlsServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        let certs = tempfile::tempdir().expect("a temporary directory");
        let ca = TestCa::new("pgbus production test CA").expect("a CA");
        let server = ca
            .server_cert(certs.path(), "server", &["localhost"])
            .expect("a server certificate");
        let cluster = LocalCluster::builder()
            .fast(true)
            .tls(&server.cert, &server.key)
            .start()
            .expect("a TLS-only cluster");
        let ca_file = ca
            .write_cert(&certs.path().join("ca.crt"))
            .expect("the CA file");
        let other_ca = TestCa::new("somebody else's CA")
            .expect("a second CA")
            .write_cert(&certs.path().join("other-ca.crt"))
            .expect("the second CA file");
        TlsServer {
            cluster,
            ca: ca_file,
            other_ca,
            _certs: certs,
        }
    })
}

impl TlsServer {
    /// A URL of a fresh database on the server, with `query` appended, via `host`.
    fn fresh_url(&self, host: &str, query: &str) -> String {
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let db = format!(
            "tls_{}_{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        );
        let admin = self.url("localhost", "postgres", &self.verify_full());
        block_on(async {
            let client = pgbus_pg::connect(&admin, "test")
                .await
                .expect("an admin connection");
            client
                .batch_execute(&format!("CREATE DATABASE {db}"))
                .await
                .expect("CREATE DATABASE");
        });
        self.url(host, &db, query)
    }

    fn url(&self, host: &str, db: &str, query: &str) -> String {
        format!(
            "postgres://postgres:{}@{host}:{}/{db}?{query}",
            self.cluster.password(),
            self.cluster.port()
        )
    }

    fn verify_full(&self) -> String {
        format!("sslmode=verify-full&sslrootcert={}", self.ca.display())
    }
}

/// `(pgbus connections, of which without TLS, their roles)` on the server of `url`.
fn pgbus_backends(url: &str) -> (i64, i64, Vec<String>) {
    block_on(async {
        let client = pgbus_pg::connect(url, "test")
            .await
            .expect("a test connection");
        let row = client
            .query_one(
                "SELECT count(*), count(*) FILTER (WHERE NOT s.ssl),
                        coalesce(array_agg(DISTINCT a.application_name), '{}')
                 FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
                 WHERE a.application_name LIKE 'pgbus:%' AND a.application_name <> 'pgbus:test'",
                &[],
            )
            .await
            .expect("reading pg_stat_ssl");
        (row.get(0), row.get(1), row.get(2))
    })
}

#[test]
fn verify_full_runs_every_command_and_every_connection_is_encrypted() {
    let server = tls_server();
    let db = Db {
        url: server.fresh_url("localhost", &server.verify_full()),
        dir: tempfile::tempdir().expect("a temporary directory"),
    };
    db.ok(&["migrate"]);
    db.ok(&["queue", "create", "jobs"]);
    let lines = json_lines((0..200).map(|n| json!({"n": n})));
    db.send_stdin(&["send", "jobs"], lines).ok();
    db.send_stdin(
        &["send", "jobs", "--group", "customer-1"],
        json_lines((0..20).map(|n| json!({"g": n}))),
    )
    .ok();

    // A worker and the dashboard at once: sample their connections while they run.
    let (mut worker, worker_err) = db.spawn(&["work", "jobs", "--exec", "cat >/dev/null"]);
    let served = Served::start(&db, free_port(), &[], &[]);
    eventually("the queue to drain", LONG, || db.depth("jobs") == 0);
    let overview = reqwest::blocking::get(served.url("/api/overview")).expect("the API");
    assert!(overview.status().is_success());
    let mut roles = Vec::new();
    eventually("the worker's and server's connections", LONG, || {
        let (total, plain, seen) = pgbus_backends(&db.url);
        assert_eq!(
            plain, 0,
            "pgbus connections without TLS among {total}: {seen:?}"
        );
        roles = seen;
        ["pgbus:fetch", "pgbus:listen", "pgbus:pool", "pgbus:stream"]
            .iter()
            .all(|role| roles.iter().any(|seen| seen == role))
    });
    served.stop();
    terminate(&worker.0);
    let status = wait_deadline(&mut worker.0, SHORT);
    worker.stop();
    let worker_err = worker_err.join().unwrap_or_default();
    assert!(status.is_some_and(|s| s.success()), "{worker_err}");

    // `work --until-empty` over TLS too.
    db.send_stdin(
        &["send", "jobs"],
        json_lines((0..50).map(|n| json!({"n": n}))),
    )
    .ok();
    db.work(&["jobs", "--exec", "cat >/dev/null", "--until-empty"]);
    assert_eq!(db.depth("jobs"), 0);
}

/// Runs `pgbus migrate` on `url`, which must fail with one line; returns it.
fn refused(url: String) -> String {
    let db = Db {
        url,
        dir: tempfile::tempdir().expect("a temporary directory"),
    };
    let run = db.run(&["migrate"]).fails();
    let line = run.stderr.trim().to_owned();
    assert_eq!(line.lines().count(), 1, "not one line: {line}");
    assert!(
        !line.contains(server_password()),
        "the password leaked: {line}"
    );
    line
}

fn server_password() -> &'static str {
    tls_server().cluster.password()
}

#[test]
fn wrong_tls_settings_fail_in_one_line_that_names_the_cause() {
    let server = tls_server();
    // The server accepts only TLS.
    let line = refused(server.fresh_url("localhost", "sslmode=disable"));
    assert!(line.contains("no pg_hba.conf entry"), "{line}");
    assert!(line.contains("no encryption"), "{line}");
    // The certificate names `localhost`, not 127.0.0.1: on the dedicated migrate
    // connection and on a worker's pool alike.
    let mismatch = server.fresh_url("127.0.0.1", &server.verify_full());
    let line = refused(mismatch.clone());
    assert!(line.contains("name mismatch"), "{line}");
    assert!(line.contains("127.0.0.1"), "{line}");
    let worker = Db {
        url: mismatch,
        dir: tempfile::tempdir().expect("a temporary directory"),
    }
    .run(&["work", "jobs", "--exec", "true", "--until-empty"])
    .fails();
    assert!(worker.stderr.contains("name mismatch"), "{}", worker.stderr);
    // A CA that did not sign it.
    let line = refused(server.fresh_url(
        "localhost",
        &format!(
            "sslmode=verify-ca&sslrootcert={}",
            server.other_ca.display()
        ),
    ));
    assert!(line.contains("not trusted"), "{line}");
    // verify-full without any root certificate to check against.
    let line = refused(server.fresh_url(
        "localhost",
        "sslmode=verify-full&sslrootcert=/nonexistent/ca.crt",
    ));
    assert!(line.contains("sslrootcert /nonexistent/ca.crt"), "{line}");
    // But `verify-ca` does not check the name, and `require` checks nothing.
    let db = Db {
        url: server.fresh_url(
            "127.0.0.1",
            &format!("sslmode=verify-ca&sslrootcert={}", server.ca.display()),
        ),
        dir: tempfile::tempdir().expect("a temporary directory"),
    };
    db.ok(&["migrate"]);
    let db = Db {
        url: server.fresh_url("127.0.0.1", "sslmode=require"),
        dir: tempfile::tempdir().expect("a temporary directory"),
    };
    db.ok(&["migrate"]);
}

#[test]
fn require_against_a_server_without_tls_says_so() {
    // The plain shared test cluster has ssl = off (unless this whole run is over TLS).
    let plain = Db::unmigrated();
    if plain.url.contains("sslmode=") {
        return;
    }
    let separator = if plain.url.contains('?') { '&' } else { '?' };
    let url = format!("{}{separator}sslmode=require", plain.url);
    let db = Db {
        url,
        dir: tempfile::tempdir().expect("a temporary directory"),
    };
    let run = db.run(&["migrate"]).fails();
    assert!(
        run.stderr.contains("the server does not support TLS"),
        "{}",
        run.stderr
    );
}

/// Every line of `path` as JSON.
fn json_file(path: &std::path::Path) -> Vec<Value> {
    lines(path)
        .iter()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line:?}: {e}")))
        .collect()
}

#[test]
fn behind_pgbouncer_in_transaction_mode_every_job_runs_once_and_groups_in_order() {
    // A pool of 4 server connections under a worker of concurrency 8.
    let (database, bouncer) = block_on(pgbus_pg::test_database_behind_pgbouncer(4));
    let direct = database.url().to_owned();
    let pooled = Db {
        url: bouncer.url_for(database.name()),
        dir: tempfile::tempdir().expect("a temporary directory"),
    };
    // Every command through the pooler says so.
    let through = |args: &[&str]| {
        let mut all = vec!["--pooler", "transaction"];
        all.extend_from_slice(args);
        pooled.cmd(&all)
    };
    run(through(&["migrate"]), None, SHORT).ok();
    run(through(&["queue", "create", "jobs"]), None, SHORT).ok();
    let plain_jobs = json_lines((0..2000).map(|n| json!({"n": n})));
    run(
        through(&["send", "jobs"]),
        Some(plain_jobs.into_bytes()),
        SHORT,
    )
    .ok();
    for g in 0..10 {
        let group = format!("g{g}");
        let jobs = json_lines((0..20).map(|i| json!({"g": g, "i": i})));
        run(
            through(&["send", "jobs", "--group", &group]),
            Some(jobs.into_bytes()),
            SHORT,
        )
        .ok();
    }

    let out = pooled.path("out");
    // One write per job (printf), so concurrent jobs never interleave within a line.
    let exec = format!("printf '%s\\n' \"$(cat)\" >> {}", sh_quote(&out));
    let worked = run(
        pooled.cmd(&[
            "--pooler",
            "transaction",
            "--listen-url",
            &direct,
            "work",
            "jobs",
            "--exec",
            &exec,
            "--until-empty",
            "--concurrency",
            "8",
        ]),
        None,
        LONG,
    )
    .ok();
    for bad in ["prepared statement", "protocol", "portal"] {
        assert!(
            !worked.stderr.contains(bad),
            "{bad:?} in:\n{}",
            worked.stderr
        );
    }

    let done = json_file(&out);
    let mut plain: BTreeMap<i64, usize> = BTreeMap::new();
    let mut groups: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
    for job in &done {
        match (job.get("n"), job.get("g"), job.get("i")) {
            (Some(n), None, None) => *plain.entry(n.as_i64().expect("n")).or_default() += 1,
            (None, Some(g), Some(i)) => groups
                .entry(g.as_i64().expect("g"))
                .or_default()
                .push(i.as_i64().expect("i")),
            _ => panic!("unexpected job {job}"),
        }
    }
    assert_eq!(plain.len(), 2000, "plain jobs missing");
    assert!(
        plain.values().all(|&runs| runs == 1),
        "a plain job ran twice"
    );
    assert_eq!(groups.len(), 10);
    for (g, order) in &groups {
        assert_eq!(
            *order,
            (0..20).collect::<Vec<_>>(),
            "group {g} out of order or repeated"
        );
    }
    assert_eq!(pooled.depth("jobs"), 0);
}

#[test]
fn behind_a_transaction_pooler_without_listen_url_workers_poll_and_say_so() {
    let (database, bouncer) = block_on(pgbus_pg::test_database_behind_pgbouncer(2));
    let pooled = Db {
        url: bouncer.url_for(database.name()),
        dir: tempfile::tempdir().expect("a temporary directory"),
    };
    pooled.ok(&["--pooler", "transaction", "migrate"]);
    pooled.ok(&["--pooler", "transaction", "queue", "create", "jobs"]);
    // The environment variable says it as well as the option.
    let mut send = pooled.cmd(&["send", "jobs"]);
    send.env("PGBUS_POOLER", "transaction");
    let jobs = json_lines((0..20).map(|n| json!({"n": n})));
    run(send, Some(jobs.into_bytes()), SHORT).ok();
    let worked = run(
        pooled.cmd(&[
            "--pooler",
            "transaction",
            "work",
            "jobs",
            "--exec",
            "cat >/dev/null",
            "--until-empty",
        ]),
        None,
        LONG,
    )
    .ok();
    assert!(
        worked
            .stderr
            .contains("without --listen-url: no LISTEN, workers poll"),
        "{}",
        worked.stderr
    );
    assert_eq!(pooled.depth("jobs"), 0);
}
