//! `cargo xtask`: repository automation for pgbus.
//!
//! Subcommands:
//!
//! - `check-deps`: enforce the workspace dependency rules (see `deps.rs` and
//!   ARCHITECTURE.md).
//! - `help`: print usage.

mod deps;

use std::process::ExitCode;

const USAGE: &str = "\
Usage: cargo xtask <COMMAND>

Commands:
  check-deps  Check the dependency rules between workspace crates (see ARCHITECTURE.md)
  help        Print this help
";

/// A parsed command line.
#[derive(Debug, PartialEq, Eq)]
enum Cmd {
    CheckDeps,
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
        [cmd, ..] if matches!(cmd.as_str(), "help" | "--help" | "-h") => Ok(Cmd::Help),
        [cmd, ..] => Err(format!("unknown command `{cmd}`")),
        [] => Err("no command given".to_owned()),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match parse(&args) {
        Ok(Cmd::Help) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(Cmd::CheckDeps) => check_deps(),
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
    if violations.is_empty() {
        println!("dependency rules hold for {} workspace crates", graph.len());
        return Ok(ExitCode::SUCCESS);
    }
    for violation in &violations {
        eprintln!("{violation}");
    }
    eprintln!(
        "error: {} dependency rule violation(s) among {} workspace crates",
        violations.len(),
        graph.len()
    );
    Ok(ExitCode::FAILURE)
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
        assert_eq!(
            parse(&args(&["frobnicate"])),
            Err("unknown command `frobnicate`".to_owned())
        );
    }
}
