//! `cargo xtask bench`: builds the benchmark harness (`pgbus-bench`, in `benches/`) in
//! release mode and runs it, streaming its output. The harness does the work; see the
//! `pgbus-benches` crate docs. For the full run it first builds the pgmq peer
//! (`pgbus-peer-bench`, `benches/peer/`, a Cargo project outside the workspace) and names
//! it to the harness in `PGBUS_PEER_BENCH`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::Context;

use crate::deps::{target_dir, workspace_root};

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

/// The peer's scenario, and the variable that names its binary to the harness.
const PEER_SCENARIO: &str = "peer_pgmq";
const PEER_BENCH_ENV: &str = "PGBUS_PEER_BENCH";
/// The peer's Cargo project, from the workspace root, and the binary it builds.
const PEER_MANIFEST: &str = "benches/peer/Cargo.toml";
const PEER_BIN: &str = "pgbus-peer-bench";

/// Whether the run measures the peer (`peer_pgmq`, which builds the `pgmq` crate and
/// sqlx): the full run does, unless `--only` leaves it out; the quick run, CI's, does
/// not, to stay quick to build.
fn measures_peer(args: &BenchArgs) -> bool {
    !args.quick
        && args
            .only
            .as_deref()
            .is_none_or(|only| only.split(',').any(|name| name.trim() == PEER_SCENARIO))
}

/// `cargo` arguments that build the peer in release mode into `target`.
fn peer_build_args(root: &Path, target: &Path) -> Vec<OsString> {
    vec![
        "build".into(),
        "--release".into(),
        "--manifest-path".into(),
        root.join(PEER_MANIFEST).into_os_string(),
        "--target-dir".into(),
        target.as_os_str().to_owned(),
    ]
}

/// Builds the peer into the workspace's target directory; returns its binary.
fn build_peer(cargo: &OsString) -> anyhow::Result<PathBuf> {
    let target = target_dir();
    let status = Command::new(cargo)
        .current_dir(workspace_root())
        .args(peer_build_args(&workspace_root(), &target))
        .status()
        .with_context(|| format!("could not run {}", Path::new(cargo).display()))?;
    anyhow::ensure!(
        status.success(),
        "building the pgmq peer ({PEER_MANIFEST}) failed ({status})"
    );
    Ok(target
        .join("release")
        .join(format!("{PEER_BIN}{}", std::env::consts::EXE_SUFFIX)))
}

/// Builds the peer when the run measures it, then runs `cargo run --release -p
/// pgbus-benches --bin pgbus-bench -- <args>` in the workspace root with inherited stdio
/// (and `PGBUS_PEER_BENCH` naming the peer), and exits as it did.
pub(crate) fn run(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let cwd = std::env::current_dir().context("could not read the current directory")?;
    let mut harness = Command::new(&cargo);
    if measures_peer(args) {
        harness.env(PEER_BENCH_ENV, build_peer(&cargo)?);
    } else {
        // A quick run does not measure the peer, even if the caller's environment names one.
        harness.env_remove(PEER_BENCH_ENV);
    }
    let status = harness
        .current_dir(workspace_root())
        .args([
            "run",
            "--release",
            "--package",
            "pgbus-benches",
            "--bin",
            "pgbus-bench",
        ])
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
        assert!(measures_peer(&BenchArgs::default()));
        assert!(!measures_peer(&parse(&args(&["--quick"])).unwrap()));
        assert!(measures_peer(
            &parse(&args(&["--only", "drain, peer_pgmq"])).unwrap()
        ));
        assert!(!measures_peer(&parse(&args(&["--only", "drain"])).unwrap()));
        assert!(!measures_peer(
            &parse(&args(&["--quick", "--only", "peer_pgmq"])).unwrap()
        ));
    }

    #[test]
    fn builds_the_peer_outside_the_workspace_into_its_target_dir() {
        assert_eq!(
            peer_build_args(Path::new("/repo"), Path::new("/t")),
            [
                "build",
                "--release",
                "--manifest-path",
                "/repo/benches/peer/Cargo.toml",
                "--target-dir",
                "/t"
            ]
            .map(OsString::from)
        );
    }
}
