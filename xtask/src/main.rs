//! `cargo xtask`: repository automation for pgbus.
//!
//! Subcommands:
//!
//! - `check-deps`: enforce the workspace dependency rules (see `deps.rs` and
//!   ARCHITECTURE.md) and find files of one crate that import each other in a circle
//!   (see `imports.rs`).
//! - `bench [--quick] [--only SCENARIO,...] [--database-url URL] [--out DIR]`: run the benchmark harness
//!   (`benches/`, binary `pgbus-bench`) in release mode; see `bench.rs`.
//! - `chaos [--quick] [--seed N] [--database-url URL] [--only SCENARIO,...] [--out DIR]`: run
//!   the release `pgbus` binary under injected faults and check its delivery promises; see
//!   `chaos.rs`.
//! - `test`: the whole test suite, then the suites that cover every kind of connection once
//!   more over TLS; see `test.rs`.
//! - `help`: print usage.

mod bench;
mod chaos;
mod deps;
mod flags;
mod imports;
mod test;

use std::process::ExitCode;

const USAGE: &str = "\
Usage: cargo xtask <COMMAND>

Commands:
  check-deps  Check the dependency rules between workspace crates (see ARCHITECTURE.md)
              and that no crate's files import each other in a circle
  bench       Run the benchmarks and write report.md, report.json and chart.svg
              [--quick] [--only SCENARIO,...] [--database-url URL] [--out DIR]
              (default: target/bench)
  chaos       Run pgbus under faults (worker, relay and scheduler kills, database
              restarts, terminated connections, locks) and check nothing is lost;
              writes report.md and report.json [--quick] [--seed N]
              [--database-url URL] [--only SCENARIO,...] [--out DIR]
              (default: target/chaos)
  test        Run every test (cargo test --workspace --all-features), then the
              conformance, worker, group, wake-up and stream suites again over TLS
  help        Print this help
";

/// A parsed command line.
#[derive(Debug, PartialEq, Eq)]
enum Cmd {
    CheckDeps,
    Bench(bench::BenchArgs),
    Chaos(chaos::ChaosArgs),
    Test,
    Help,
}

/// Parses the arguments after the program name; `Err` carries the message
/// for a usage error.
fn parse(args: &[String]) -> Result<Cmd, String> {
    match args {
        [cmd] if cmd == "check-deps" => Ok(Cmd::CheckDeps),
        [cmd, extra, ..] if cmd == "check-deps" => {
            Err(format!("`check-deps` takes no arguments, got `{extra}`"))
        }
        [cmd, rest @ ..] if cmd == "bench" => bench::parse(rest).map(Cmd::Bench),
        [cmd, rest @ ..] if cmd == "chaos" => chaos::parse(rest).map(Cmd::Chaos),
        [cmd] if cmd == "test" => Ok(Cmd::Test),
        [cmd, extra, ..] if cmd == "test" => {
            Err(format!("`test` takes no arguments, got `{extra}`"))
        }
        [cmd, ..] if matches!(cmd.as_str(), "help" | "--help" | "-h") => Ok(Cmd::Help),
        [cmd, ..] => Err(format!("unknown command `{cmd}`")),
        [] => Err("no command given".to_owned()),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    // The handler `pgbus work` runs for each chaos message: no parsing, no usage.
    if let [cmd, rest @ ..] = args.as_slice() {
        if cmd == chaos::HANDLER_SUBCOMMAND {
            return chaos::handler_main(rest);
        }
    }
    let result = match parse(&args) {
        Ok(Cmd::Help) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Cmd::CheckDeps) => check_deps(),
        Ok(Cmd::Bench(args)) => bench::run(&args),
        Ok(Cmd::Chaos(args)) => chaos::run(&args),
        Ok(Cmd::Test) => test::run(),
        Err(message) => {
            eprint!("error: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    result.unwrap_or_else(|error| {
        eprintln!("error: {error:#}");
        ExitCode::FAILURE
    })
}

fn check_deps() -> anyhow::Result<ExitCode> {
    let graph = deps::workspace_graph()?;
    let violations = deps::check(&graph);
    let mut failed = false;
    if violations.is_empty() {
        println!("dependency rules hold for {} workspace crates", graph.len());
    } else {
        for violation in &violations {
            eprintln!("{violation}");
        }
        eprintln!(
            "error: {} dependency rule violation(s) among {} workspace crates",
            violations.len(),
            graph.len()
        );
        failed = true;
    }

    let root = deps::workspace_root();
    for (krates, enforced) in [(imports::ENFORCED, true), (imports::REPORTED, false)] {
        for krate in krates {
            let circles = imports::circles_in(krate, &root.join(krate).join("src"))?;
            if circles.is_empty() {
                println!("{krate}: no import circles among its files");
                continue;
            }
            for circle in &circles {
                eprintln!("{circle}");
            }
            if enforced {
                eprintln!(
                    "error: {krate} has {} import circle(s): move what both sides need into a \
                     module they both import (see ARCHITECTURE.md)",
                    circles.len()
                );
                failed = true;
            } else {
                eprintln!(
                    "warning: {krate} has {} import circle(s) (reported, not yet enforced)",
                    circles.len()
                );
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|arg| (*arg).to_owned()).collect()
    }

    #[test]
    fn parses_commands() {
        assert_eq!(parse(&args(&["check-deps"])), Ok(Cmd::CheckDeps));
        assert_eq!(parse(&args(&["help"])), Ok(Cmd::Help));
        assert_eq!(parse(&args(&["--help"])), Ok(Cmd::Help));
        assert!(parse(&args(&[])).is_err());
        assert!(parse(&args(&["check-deps", "--fix"])).is_err());
        assert!(matches!(parse(&args(&["bench"])), Ok(Cmd::Bench(_))));
        assert!(matches!(
            parse(&args(&["bench", "--quick", "--out", "x"])),
            Ok(Cmd::Bench(_))
        ));
        assert!(parse(&args(&["bench", "--frobnicate"])).is_err());
        assert!(matches!(
            parse(&args(&["chaos", "--quick", "--seed", "7"])),
            Ok(Cmd::Chaos(_))
        ));
        assert!(parse(&args(&["chaos", "--frobnicate"])).is_err());
        assert_eq!(
            parse(&args(&["frobnicate"])),
            Err("unknown command `frobnicate`".to_owned())
        );
    }
}
