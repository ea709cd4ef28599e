//! Least privilege: a role that is not a superuser, owns nothing and has only what
//! `pgbus migrate --grant ROLE` gave it runs every run-time command of the real binary; a
//! role without the privilege to create the schema is told what it lacks in one line.

use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::json;

mod common;
use common::*;

const PASSWORD: &str = "least-privilege-pw";

/// A fresh login role (roles are per cluster: the name is unique per test process).
fn create_role(admin_url: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let role = format!(
        "pgbus_app_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    execute(
        admin_url,
        &format!(
            "CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}' NOSUPERUSER NOCREATEDB NOCREATEROLE"
        ),
    );
    role
}

/// `url` with its user and password replaced.
fn as_role(url: &str, role: &str) -> String {
    let (scheme, rest) = url.split_once("://").expect("a postgres:// URL");
    let host_and_rest = rest.split_once('@').map_or(rest, |(_, after)| after);
    format!("{scheme}://{role}:{PASSWORD}@{host_and_rest}")
}

#[test]
fn a_granted_role_that_owns_nothing_runs_every_runtime_command() {
    let admin = Db::unmigrated();
    let role = create_role(&admin.url);
    let granted = admin.ok(&["migrate", "--grant", &role]);
    assert!(
        granted.stdout.contains(&format!("granted {role}")),
        "{}",
        granted.stdout
    );

    let app = Db {
        url: as_role(&admin.url, &role),
        dir: tempfile::tempdir().expect("a temporary directory"),
    };
    // The role can check the schema (a current schema is not touched) but is nobody.
    app.ok(&["migrate", "--check"]);
    app.ok(&["migrate"]);
    let is_superuser = count(
        &app.url,
        "SELECT count(*) FROM pg_roles WHERE rolname = current_user AND rolsuper",
    );
    assert_eq!(is_superuser, 0);
    let owned = count(
        &app.url,
        "SELECT count(*) FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner
         WHERE r.rolname = current_user",
    );
    assert_eq!(owned, 0, "the role owns relations");
    // ... and may not change what it does not own.
    for forbidden in [
        "TRUNCATE pgbus.messages",
        "INSERT INTO pgbus.schema_migrations (version, name) VALUES (999, 'x')",
        "DELETE FROM pgbus.grants",
        "SELECT pgbus.apply_grants()",
        "CREATE TABLE pgbus.mine (id int)",
        "ALTER TABLE pgbus.messages ADD COLUMN mine int",
    ] {
        let denied = block_on(async {
            let client = pgbus_pg::connect(&app.url, "test")
                .await
                .expect("a connection");
            client.batch_execute(forbidden).await
        });
        let err = denied.expect_err(forbidden);
        assert!(
            err.as_db_error().is_some_and(
                |db| db.code().code() == "42501" || db.message().contains("must be owner")
            ),
            "{forbidden}: {err:?}"
        );
    }

    // Queues are rows: creating them needs no DDL.
    app.ok(&["queue", "create", "jobs", "--max-attempts", "1"]);
    for n in 0..20 {
        app.send("jobs", &json!({"n": n}));
    }
    let grouped: Vec<_> = (0..20).map(|n| json!({"n": n})).collect();
    app.send_stdin(
        &["send", "jobs", "--group", "customer-1"],
        json_lines(grouped),
    )
    .ok();
    // Plain and grouped workers; message 7 of each kind is dead-lettered (exit 65).
    let exec = r#"if grep -q '"n":7}'; then exit 65; fi"#;
    app.work(&[
        "jobs",
        "--exec",
        exec,
        "--until-empty",
        "--concurrency",
        "4",
    ]);
    assert_eq!(app.depth("jobs"), 0);
    let dead = app.dead("jobs");
    assert_eq!(dead.len(), 2, "{dead:?}");
    let retried = app.ok(&["dlq", "retry", "jobs", "--all"]);
    assert!(retried.stdout.contains('2'), "{}", retried.stdout);
    app.ok(&["dlq", "discard", "jobs", "--all"]);
    app.ok(&["queue", "purge", "jobs"]);
    let stats = app.queue_stats("jobs");
    assert_eq!(stats["ready"], 0, "{stats}");

    // The event bus and the relay.
    app.ok(&["topic", "bind", "order.*", "jobs"]);
    execute(
        &app.url,
        "INSERT INTO pgbus.outbox (routing_key, payload)
         SELECT 'order.paid', convert_to('{\"n\": 1}', 'UTF8')",
    );
    let (mut relay, relay_err) = app.spawn(&["relay", "--poll-interval", "200ms"]);
    eventually("the relay to publish the outbox row", LONG, || {
        app.depth("jobs") == 1
    });
    terminate(&relay.0);
    let status = wait_deadline(&mut relay.0, SHORT);
    relay.stop();
    let relay_err = relay_err.join().unwrap_or_default();
    assert!(status.is_some_and(|s| s.success()), "{relay_err}");

    // The scheduler.
    let config = app.path("cron.json");
    std::fs::write(
        &config,
        r#"[{"name": "tick", "queue": "jobs", "every_secs": 1, "payload": {"tick": true}}]"#,
    )
    .expect("writing the cron config");
    let (mut scheduler, scheduler_err) =
        app.spawn(&["cron", "run", "--config", config.to_str().expect("utf-8")]);
    eventually("a recurring job", LONG, || app.depth("jobs") >= 2);
    terminate(&scheduler.0);
    let status = wait_deadline(&mut scheduler.0, SHORT);
    scheduler.stop();
    let scheduler_err = scheduler_err.join().unwrap_or_default();
    assert!(status.is_some_and(|s| s.success()), "{scheduler_err}");

    // The dashboard and its API.
    let served = Served::start(&app, free_port(), &[], &[]);
    let api = reqwest::blocking::get(served.url("/api/overview")).expect("the API answers");
    assert!(api.status().is_success(), "{}", api.status());
    let ready = reqwest::blocking::get(served.url("/readyz")).expect("readyz answers");
    assert!(ready.status().is_success(), "{}", ready.status());
    served.stop();
}

#[test]
fn a_role_that_may_not_create_the_schema_is_told_what_it_lacks() {
    let admin = Db::unmigrated();
    let role = create_role(&admin.url);
    // PostgreSQL 15 lets only the owner create in `public`, and a new role may not CREATE
    // schemas in the database.
    let app = Db {
        url: as_role(&admin.url, &role),
        dir: tempfile::tempdir().expect("a temporary directory"),
    };
    let refused = app.run(&["migrate"]).fails();
    let line = refused.stderr.trim();
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(line.contains("permission denied"), "{line}");
    assert!(line.contains("needs CREATE on the database"), "{line}");
    assert!(line.contains("--grant"), "{line}");
    // An unknown role is refused by name, and nothing is granted.
    let unknown = admin.run(&["migrate", "--grant", "no_such_role"]).fails();
    assert!(
        unknown.stderr.contains("no role named \"no_such_role\""),
        "{}",
        unknown.stderr
    );
}

/// `/readyz` is unauthenticated: a failing check answers a bare "not ready" (the cause,
/// here the role's name, goes to the log only), and a flood of probes runs at most about
/// one check a second.
#[test]
fn readyz_says_only_not_ready_and_checks_at_most_once_a_second() {
    let admin = Db::unmigrated();
    let role = create_role(&admin.url);
    admin.ok(&["migrate", "--grant", &role]);
    let app = Db {
        url: as_role(&admin.url, &role),
        dir: tempfile::tempdir().expect("a temporary directory"),
    };
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let (mut served, log) = app.spawn(&["serve", "--listen", &listen]);
    eventually("pgbus serve to listen", SHORT, || listening(port));
    let url = format!("http://{listen}/readyz");
    let ready = reqwest::blocking::get(&url).expect("readyz answers");
    assert_eq!(ready.status(), reqwest::StatusCode::OK);

    // New connections of the role are refused from now on; the pool's stay.
    execute(&admin.url, &format!("ALTER ROLE {role} NOLOGIN"));
    let started = std::time::Instant::now();
    // The "ready" of a moment ago is answered for up to a second.
    eventually("readyz to fail", SHORT, || {
        reqwest::blocking::get(&url).is_ok_and(|r| r.status() != reqwest::StatusCode::OK)
    });
    let probes: Vec<_> = (0..4)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                (0..50)
                    .map(|_| {
                        let response = reqwest::blocking::get(&url).expect("readyz answers");
                        (response.status(), response.text().expect("a body"))
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut answers = Vec::new();
    for probe in probes {
        answers.extend(probe.join().expect("probing"));
    }
    let elapsed = started.elapsed();
    for (status, body) in &answers {
        assert_eq!(*status, reqwest::StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body, "not ready\n");
    }
    terminate(&served.0);
    wait_deadline(&mut served.0, SHORT);
    served.stop();
    let log = log.join().unwrap_or_default();
    let checks = log.matches("readiness check failed").count();
    assert!(log.contains(&role), "the cause is logged: {log}");
    assert!(
        checks as u64 <= elapsed.as_secs() + 2,
        "{checks} failed checks for 200 probes in {elapsed:?}"
    );
}
