//! End-to-end tests of `pgbus uninstall` on the real binary: it wants --yes, refuses while
//! a live worker is registered unless --force, says what it dropped, and `pgbus migrate`
//! installs the schema again.

mod common;
use common::*;

use serde_json::json;

const SCHEMA: &str = "SELECT count(*) FROM pg_namespace WHERE nspname = 'pgbus'";

#[test]
fn uninstall_wants_yes_refuses_live_workers_unless_forced_and_migrate_reinstalls() {
    let db = Db::new();
    db.ok(&["queue", "create", "jobs"]);
    db.send("jobs", &json!({ "n": 1 }));

    let unconfirmed = db.run(&["uninstall"]).fails();
    assert_eq!(unconfirmed.status.code(), Some(2), "{}", unconfirmed.stderr);
    assert!(
        unconfirmed.stderr.contains("give --yes"),
        "{}",
        unconfirmed.stderr
    );
    assert_eq!(db.depth("jobs"), 1, "nothing was dropped");

    // A live worker, as `pgbus work` registers itself.
    execute(
        &db.url,
        "INSERT INTO pgbus.processes (hostname, pid, queues, mode, capacity)
         VALUES ('elsewhere', 1, '{jobs}', 'async', 4)",
    );
    let refused = db.run(&["uninstall", "--yes"]).fails();
    let line = refused.stderr.trim();
    assert!(
        line.contains("1 live worker process(es) are registered") && line.contains("--force"),
        "{line}"
    );
    assert_eq!(line.lines().count(), 1, "one line: {line}");
    assert_eq!(count(&db.url, SCHEMA), 1, "the schema is still there");

    let forced = db.ok(&["uninstall", "--yes", "--force"]);
    assert!(
        forced.stdout.contains("dropped the pgbus schema (version ")
            && forced
                .stdout
                .contains("with 1 queue(s), 1 message(s) and 1 registered process(es)"),
        "{}",
        forced.stdout
    );
    assert_eq!(count(&db.url, SCHEMA), 0, "the schema is gone");
    let again = db.ok(&["uninstall", "--yes"]);
    assert!(
        again.stdout.contains("nothing to uninstall"),
        "{}",
        again.stdout
    );

    assert!(db.ok(&["migrate"]).stdout.contains("applied migrations"));
    db.ok(&["queue", "create", "jobs"]);
    db.send("jobs", &json!({ "n": 2 }));
    assert_eq!(db.depth("jobs"), 1);
}
