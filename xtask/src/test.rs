//! `cargo xtask test`: the whole test suite, then the TLS pass: the suites that cover every
//! kind of connection (the conformance suite, plain and grouped workers in both lock modes,
//! wake-ups, streams) once more against a TLS-only cluster reached with
//! `sslmode=verify-full` (`PGBUS_TEST_TLS=1`, see `pgbus_pg::test_database`).

use std::process::{Command, ExitCode};

use anyhow::Context;

/// `(package, test targets)` run a second time over TLS.
const TLS_PASS: &[(&str, &[&str])] = &[
    ("pgbus-pg", &["conformance", "group_leases", "streams"]),
    (
        "pgbus-tests",
        &["worker_pg", "groups_pg", "wakeups", "streams_pg"],
    ),
];

pub(crate) fn run() -> anyhow::Result<ExitCode> {
    let all = cargo(
        &["test", "--workspace", "--all-features", "--no-fail-fast"],
        false,
    )?;
    if !all.success() {
        return Ok(ExitCode::FAILURE);
    }
    for (package, targets) in TLS_PASS {
        let mut args = vec!["test", "--all-features", "-p", package];
        for target in *targets {
            args.extend(["--test", target]);
        }
        println!("TLS pass: {}", args.join(" "));
        if !cargo(&args, true)?.success() {
            return Ok(ExitCode::FAILURE);
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn cargo(args: &[&str], tls: bool) -> anyhow::Result<std::process::ExitStatus> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let mut command = Command::new(cargo);
    command.args(args);
    if tls {
        command.env("PGBUS_TEST_TLS", "1");
    } else {
        command.env_remove("PGBUS_TEST_TLS");
    }
    command
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))
}
