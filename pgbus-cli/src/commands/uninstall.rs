//! `pgbus uninstall`: drop the pgbus schema and everything in it.

use std::process::ExitCode;

use anyhow::bail;
use clap::Args;
use pgbus_core::Error;

use crate::support::database::Database;

// No doc comment: the `Command` variant's is the command's about.
#[derive(Debug, Args)]
pub(crate) struct UninstallArgs {
    /// Confirm: every queue, message, dead letter, archived message, stream, topic,
    /// schedule and registered process in the database is deleted for good.
    #[arg(long)]
    pub(crate) yes: bool,
    /// Uninstall even while live workers are registered (their next statements fail:
    /// stop them first where you can).
    #[arg(long)]
    pub(crate) force: bool,
}

impl UninstallArgs {
    /// The rule clap cannot state with a message that names the fix: no uninstall without
    /// `--yes`.
    pub(crate) fn missing_argument(&self) -> Option<(&'static [&'static str], &'static str)> {
        (!self.yes).then_some((
            &["uninstall"],
            "give --yes: uninstalling deletes the pgbus schema with every queue and message in it",
        ))
    }
}

/// `pgbus uninstall`.
pub(crate) async fn run(args: UninstallArgs, db: &Database) -> anyhow::Result<ExitCode> {
    let dropped = if args.force {
        db.backend.force_uninstall().await
    } else {
        db.backend.uninstall().await
    };
    let dropped = match dropped {
        Ok(dropped) => dropped,
        Err(Error::WorkersRegistered { count }) => bail!(
            "{count} live worker process(es) are registered (`pgbus stats` lists them): stop \
             them before uninstalling, or give --force"
        ),
        Err(err) => return Err(err.into()),
    };
    match dropped.schema_version {
        None => println!("nothing to uninstall: the database has no pgbus schema"),
        Some(version) => println!(
            "dropped the pgbus schema (version {version}) with {} queue(s), {} message(s) and \
             {} registered process(es); `pgbus migrate` installs it again",
            dropped.queues, dropped.messages, dropped.processes
        ),
    }
    Ok(ExitCode::SUCCESS)
}
