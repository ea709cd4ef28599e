//! The `pgbus` command: parse arguments, install logging, run, map errors to exit codes.
//!
//! `pgbus` manages queues, sends messages, runs workers whose handlers are a command
//! (`--exec`) or an HTTP endpoint (`--http`), and serves the dashboard, JSON API, SSE
//! streams and metrics (`pgbus serve`), on `--database-url` / `DATABASE_URL` or, with
//! neither, an embedded cluster it creates from the machine's PostgreSQL binaries.
//! Every command and option is described in `docs/cli.md`; `pgbus --help` lists them.

use std::process::ExitCode;

mod cli;
mod commands;
#[cfg(feature = "serve")]
mod server;
mod support;

fn main() -> ExitCode {
    let cli = cli::Cli::parse_checked();
    // Dropped last, after the runtime: flushes the traces.
    let _telemetry = match cli.install_logging() {
        Ok(telemetry) => telemetry,
        Err(err) => {
            support::output::error(format_args!("{err:#}"));
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            support::output::error(format_args!("could not start the async runtime: {err}"));
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(cli.run()) {
        Ok(code) => code,
        Err(err) => {
            // One clear line: the error and its causes.
            support::output::error(format_args!("{err:#}"));
            ExitCode::FAILURE
        }
    }
}
