//! `pgbus-bench`: the benchmark harness that `cargo xtask bench` runs (see the
//! `pgbus_benches` crate docs for the scenarios).

use std::process::ExitCode;

use pgbus_benches::{Command, Options, USAGE};

fn main() -> ExitCode {
    let command = match Options::parse(std::env::args().skip(1)) {
        Ok(Command::Help) => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Ok(command) => command,
        Err(message) => {
            eprint!("error: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // pgbus's own warnings (a failed claim, a lost connection) explain odd figures.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: could not start the tokio runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = match command {
        Command::Run(options) => runtime.block_on(pgbus_benches::run(&options)).map(drop),
        Command::Streamer => runtime.block_on(pgbus_benches::streamer()),
        Command::Help => Ok(()),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
