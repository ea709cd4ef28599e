//! `pgbus migrate`: apply the schema migrations, or check that none is pending.

use std::process::ExitCode;

use clap::Args;
use pgbus_core::Error;

use crate::support::database::Database;
use crate::support::output;

// No doc comment: clap would take it as the command's about, which the `Command` variant
// gives.
#[derive(Debug, Args)]
pub(crate) struct MigrateArgs {
    /// Only check; exit 1 when migrations are pending.
    #[arg(long, conflicts_with = "grant")]
    pub(crate) check: bool,
    /// Also grant ROLE what workers, producers, the dashboard and the relay need at run
    /// time (schema usage, rows of the tables, sequences, functions; no ownership, no
    /// DDL), now and after every later migration. Repeatable.
    #[arg(long, value_name = "ROLE")]
    pub(crate) grant: Vec<String>,
}

/// `pgbus migrate`.
pub(crate) async fn run(args: MigrateArgs, db: &Database) -> anyhow::Result<ExitCode> {
    let MigrateArgs { check, grant } = args;
    if check {
        return Ok(match db.backend.check_schema().await {
            Ok(()) => {
                println!("schema is current (version {})", pgbus_pg::SCHEMA_VERSION);
                ExitCode::SUCCESS
            }
            Err(err @ Error::SchemaMismatch { .. }) => {
                output::error(err);
                ExitCode::FAILURE
            }
            Err(err) => return Err(err.into()),
        });
    }
    let roles: Vec<&str> = grant.iter().map(String::as_str).collect();
    let applied = db.backend.migrate_and_grant(&roles).await?;
    match applied.as_slice() {
        [] => println!("schema is current (version {})", pgbus_pg::SCHEMA_VERSION),
        versions => println!("applied migrations {versions:?}"),
    }
    for role in &roles {
        println!("granted {role} what pgbus needs at run time");
    }
    Ok(ExitCode::SUCCESS)
}
