//! `cargo xtask bench`: builds the benchmark harness (`pgbus-bench`, in `benches/`) in
//! release mode and runs it, streaming its output. The harness does the work; see the
//! `pgbus-benches` crate docs.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::Context;

use crate::deps::workspace_root;

/// Options of `cargo xtask bench`, passed on to the harness.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct BenchArgs {
    quick: bool,
    database_url: Option<String>,
    out: Option<PathBuf>,
    only: Option<String>,
}

/// Parses the arguments after `bench`.
pub(crate) fn parse(args: &[String]) -> Result<BenchArgs, String> {
    let mut parsed = BenchArgs::default();
    crate::flags::walk("bench", args, |flag, arg, inline, value| {
        match flag {
            "--quick" if !inline => parsed.quick = true,
            "--database-url" => parsed.database_url = Some(value()?),
            "--out" => parsed.out = Some(PathBuf::from(value()?)),
            "--only" => parsed.only = Some(value()?),
            _ => return Err(format!("`bench` does not take `{arg}`")),
        }
        Ok(())
    })?;
    Ok(parsed)
}

/// The harness's arguments; a relative `--out` is made absolute against `cwd`, because the
/// harness runs in the workspace root.
fn harness_args(args: &BenchArgs, cwd: &Path) -> Vec<OsString> {
    let mut out: Vec<OsString> = Vec::new();
    if args.quick {
        out.push("--quick".into());
    }
    if let Some(url) = &args.database_url {
        out.extend(["--database-url".into(), url.into()]);
    }
    if let Some(only) = &args.only {
        out.extend(["--only".into(), only.into()]);
    }
    if let Some(dir) = &args.out {
        out.extend(["--out".into(), cwd.join(dir).into_os_string()]);
    }
    out
}

/// The harness's cargo features: the full run also measures the peer (`peer_pgmq`, which
/// pulls in the `pgmq` crate and sqlx); the quick run, CI's, stays without it, quick to
/// build.
fn harness_features(args: &BenchArgs) -> &'static [&'static str] {
    if args.quick {
        &[]
    } else {
        &["--features", "peer"]
    }
}

/// Runs `cargo run --release -p pgbus-benches --bin pgbus-bench -- <args>` in the workspace
/// root with inherited stdio (with `--features peer` for the full run), and exits as it
/// did.
pub(crate) fn run(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let cwd = std::env::current_dir().context("could not read the current directory")?;
    let status = Command::new(&cargo)
        .current_dir(workspace_root())
        .args([
            "run",
            "--release",
            "--package",
            "pgbus-benches",
            "--bin",
            "pgbus-bench",
        ])
        .args(harness_features(args))
        .arg("--")
        .args(harness_args(args, &cwd))
        .status()
        .with_context(|| format!("could not run {}", Path::new(&cargo).display()))?;
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => {
            eprintln!("error: the benchmark harness failed ({status})");
            ExitCode::from(u8::try_from(code).unwrap_or(1))
        }
        None => {
            eprintln!("error: the benchmark harness was stopped ({status})");
            ExitCode::FAILURE
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|arg| (*arg).to_owned()).collect()
    }

    #[test]
    fn parses_bench_options() {
        assert_eq!(parse(&[]), Ok(BenchArgs::default()));
        assert_eq!(
            parse(&args(&[
                "--quick",
                "--database-url",
                "postgres://h/db",
                "--out=o",
                "--only",
                "publish_fanout"
            ])),
            Ok(BenchArgs {
                quick: true,
                database_url: Some("postgres://h/db".to_owned()),
                out: Some(PathBuf::from("o")),
                only: Some("publish_fanout".to_owned()),
            })
        );
        assert!(parse(&args(&["--out"])).is_err());
        assert!(parse(&args(&["--quick=1"])).is_err());
        assert!(parse(&args(&["--fast"])).is_err());
    }

    #[test]
    fn passes_options_on_with_an_absolute_out_dir() {
        let parsed = parse(&args(&[
            "--quick",
            "--database-url=u",
            "--out",
            "o",
            "--only=a,b",
        ]))
        .unwrap();
        let passed = harness_args(&parsed, Path::new("/work/here"));
        assert_eq!(
            passed,
            [
                "--quick",
                "--database-url",
                "u",
                "--only",
                "a,b",
                "--out",
                "/work/here/o"
            ]
            .map(OsString::from)
        );
        let absolute = parse(&args(&["--out", "/tmp/b"])).unwrap();
        assert_eq!(
            harness_args(&absolute, Path::new("/work/here")),
            ["--out", "/tmp/b"].map(OsString::from)
        );
        assert!(harness_args(&BenchArgs::default(), Path::new("/")).is_empty());
    }

    #[test]
    fn only_the_full_run_builds_the_peer() {
        assert_eq!(
            harness_features(&BenchArgs::default()),
            ["--features", "peer"]
        );
        assert!(harness_features(&parse(&args(&["--quick"])).unwrap()).is_empty());
    }
}
