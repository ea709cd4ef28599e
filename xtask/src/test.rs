//! `cargo xtask test`: the whole test suite, then the TLS pass: the suites that cover every
//! kind of connection (the conformance suite, plain and grouped workers in both lock modes,
//! wake-ups, streams) once more against a TLS-only cluster reached with
//! `sslmode=verify-full` (`PGBUS_TEST_TLS=1`, see `pgbus_pg::test_database`).

use std::process::{Command, ExitCode};

use anyhow::Context;

/// The test targets run a second time over TLS (`conformance` names pgbus-pg's and
/// pgbus-core's, whose in-memory cases take no time).
const TLS_PASS: &[&str] = &[
    "conformance",
    "group_leases",
    "streams",
    "worker_pg",
    "groups_pg",
    "wakeups",
    "streams_pg",
];

/// Both passes select the whole workspace with every feature: Cargo unifies features over
/// the packages a command selects, so a pass over fewer packages would build the shared
/// crates again with other features (about two minutes of CI).
const SELECTION: [&str; 2] = ["--workspace", "--all-features"];

pub(crate) fn run() -> anyhow::Result<ExitCode> {
    let mut args = vec!["test"];
    args.extend(SELECTION);
    args.push("--no-fail-fast");
    if !cargo(&args, false)?.success() {
        return Ok(ExitCode::FAILURE);
    }
    let mut args = vec!["test"];
    args.extend(SELECTION);
    for target in TLS_PASS {
        args.extend(["--test", target]);
    }
    println!("TLS pass: cargo {}", args.join(" "));
    if !cargo(&args, true)?.success() {
        return Ok(ExitCode::FAILURE);
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
