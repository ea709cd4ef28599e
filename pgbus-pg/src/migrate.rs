//! Versioned schema migrations, applied in one transaction under an advisory lock so that
//! any number of processes may migrate at once.

use pgbus_core::{Error, Result};
use tokio_postgres::Client;

use tokio_postgres::error::SqlState;

use crate::error::{db, describe};
use crate::query::Typed;
use crate::sql;

/// One schema change.
struct Migration {
    version: i64,
    name: &'static str,
    sql: &'static str,
}

/// All migrations, in order. Append only: a released migration never changes.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "init",
        sql: include_str!("../migrations/0001_init.sql"),
    },
    Migration {
        version: 2,
        name: "processes",
        sql: include_str!("../migrations/0002_processes.sql"),
    },
    Migration {
        version: 3,
        name: "groups",
        sql: include_str!("../migrations/0003_groups.sql"),
    },
    Migration {
        version: 4,
        name: "group_leases",
        sql: include_str!("../migrations/0004_group_leases.sql"),
    },
    Migration {
        version: 5,
        name: "hot_leases",
        sql: include_str!("../migrations/0005_hot_leases.sql"),
    },
    Migration {
        version: 6,
        name: "streams",
        sql: include_str!("../migrations/0006_streams.sql"),
    },
    Migration {
        version: 7,
        name: "topics",
        sql: include_str!("../migrations/0007_topics.sql"),
    },
    Migration {
        version: 8,
        name: "unique",
        sql: include_str!("../migrations/0008_unique.sql"),
    },
    Migration {
        version: 9,
        name: "limits",
        sql: include_str!("../migrations/0009_limits.sql"),
    },
    Migration {
        version: 10,
        name: "breaker",
        sql: include_str!("../migrations/0010_breaker.sql"),
    },
    Migration {
        version: 11,
        name: "scheduler",
        sql: include_str!("../migrations/0011_scheduler.sql"),
    },
    Migration {
        version: 12,
        name: "batches",
        sql: include_str!("../migrations/0012_batches.sql"),
    },
    Migration {
        version: 13,
        name: "throughput",
        sql: include_str!("../migrations/0013_throughput.sql"),
    },
    Migration {
        version: 14,
        name: "claims",
        sql: include_str!("../migrations/0014_claims.sql"),
    },
    Migration {
        version: 15,
        name: "grants",
        sql: include_str!("../migrations/0015_grants.sql"),
    },
    Migration {
        version: 16,
        name: "sql_send",
        sql: include_str!("../migrations/0016_sql_send.sql"),
    },
    Migration {
        version: 17,
        name: "console",
        sql: include_str!("../migrations/0017_console.sql"),
    },
    Migration {
        version: 18,
        name: "hot_table_vacuum",
        sql: include_str!("../migrations/0018_hot_table_vacuum.sql"),
    },
    Migration {
        version: 19,
        name: "queue_check",
        sql: include_str!("../migrations/0019_queue_check.sql"),
    },
    Migration {
        version: 20,
        name: "session_leases",
        sql: include_str!("../migrations/0020_session_leases.sql"),
    },
    Migration {
        version: 21,
        name: "queue_drop_guards",
        sql: include_str!("../migrations/0021_queue_drop_guards.sql"),
    },
    Migration {
        version: 22,
        name: "queue_drop_lock_order",
        sql: include_str!("../migrations/0022_queue_drop_lock_order.sql"),
    },
    Migration {
        version: 23,
        name: "ack_without_lock",
        sql: include_str!("../migrations/0023_ack_without_lock.sql"),
    },
];

/// The schema version this build of pgbus needs.
pub const SCHEMA_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].version;

/// Applies every missing migration, then grants the roles in `grant` (and again every
/// role granted before, when a migration was applied); returns the versions applied
/// (empty when current). A schema that is current is not touched, so a role without
/// `CREATE` may run this as a check.
pub(crate) async fn migrate(client: &mut Client, grant: &[&str]) -> Result<Vec<i64>> {
    let tx = client
        .transaction()
        .await
        .map_err(|e| db("starting the migration transaction", e))?;
    tx.exec(sql::MIGRATION_LOCK, &[&sql::MIGRATION_LOCK_KEY])
        .await
        .map_err(|e| db("taking the migration lock", e))?;
    if grant.is_empty() && schema_version(&tx).await? == Some(SCHEMA_VERSION) {
        return Ok(Vec::new());
    }
    tx.batch_execute(sql::CREATE_MIGRATIONS_TABLE)
        .await
        .map_err(|e| lacking("creating the schema", e))?;
    let applied: Vec<i64> = tx
        .q(sql::APPLIED_VERSIONS, &[])
        .await
        .map_err(|e| db("reading applied migrations", e))?
        .iter()
        .map(|row| row.get(0))
        .collect();
    if let Some(&newest) = applied.last() {
        if newest > SCHEMA_VERSION {
            return Err(Error::SchemaMismatch {
                found: newest,
                expected: SCHEMA_VERSION,
            });
        }
    }
    let mut done = Vec::new();
    for m in MIGRATIONS.iter().filter(|m| !applied.contains(&m.version)) {
        tracing::info!(target: "pgbus::migrate", version = m.version, name = m.name, "applying migration");
        tx.batch_execute(m.sql)
            .await
            .map_err(|e| lacking(&format!("applying migration {} ({})", m.version, m.name), e))?;
        tx.exec(sql::RECORD_MIGRATION, &[&m.version, &m.name])
            .await
            .map_err(|e| db("recording a migration", e))?;
        done.push(m.version);
    }
    if !done.is_empty() {
        tx.exec(sql::APPLY_GRANTS, &[])
            .await
            .map_err(|e| lacking("granting the new objects to the recorded roles", e))?;
    }
    for role in grant {
        let row = tx
            .q_opt(sql::GRANTABLE_ROLE, &[role])
            .await
            .map_err(|e| db("looking up a role", e))?;
        let Some(row) = row else {
            return Err(Error::InvalidArgument(format!(
                "no role named {role:?} (CREATE ROLE it first)"
            )));
        };
        // Revoking the bookkeeping from the schema's owner would lock it out of the next
        // migration: --grant is for the roles that run pgbus, not for the one that owns it.
        if row.get::<_, bool>(0) {
            return Err(Error::InvalidArgument(format!(
                "{role:?} owns the pgbus schema (or is a member of its owner), which has every \
                 privilege already: --grant is for the roles that run workers and producers"
            )));
        }
        tx.exec(sql::RECORD_GRANT, &[role])
            .await
            .map_err(|e| lacking("recording a grant", e))?;
        tx.exec(sql::APPLY_GRANTS_TO, &[role])
            .await
            .map_err(|e| lacking(&format!("granting to {role:?}"), e))?;
    }
    tx.commit()
        .await
        .map_err(|e| db("committing migrations", e))?;
    Ok(done)
}

/// A migration error, saying what is lacking when the role may not create the schema.
fn lacking(context: &str, err: tokio_postgres::Error) -> Error {
    if err.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) {
        let detail = describe(&err);
        return Error::Backend {
            message: format!(
                "{context}: {detail}: pgbus migrate creates the schema `pgbus` and its tables, \
                 so it needs CREATE on the database (run it as the database owner); workers \
                 and producers need only what `pgbus migrate --grant ROLE` gives"
            ),
            transient: false,
            source: Some(Box::new(err)),
        };
    }
    db(context, err)
}

/// The schema version in the database, `None` when pgbus was never migrated there.
pub(crate) async fn schema_version(
    client: &(impl tokio_postgres::GenericClient + Sync),
) -> Result<Option<i64>> {
    let exists: bool = client
        .q_one(sql::MIGRATIONS_TABLE_EXISTS, &[])
        .await
        .map_err(|e| db("looking for the pgbus schema", e))?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let row = client
        .q_one(sql::SCHEMA_VERSION, &[])
        .await
        .map_err(|e| db("reading the schema version", e))?;
    Ok(row.get(0))
}

/// A registered process is live while its last heartbeat is younger than this: three of a
/// worker's default 10-second heartbeat intervals, after which workers prune it as stale.
pub(crate) const LIVE_WITHIN: std::time::Duration = std::time::Duration::from_secs(30);

/// What an uninstall dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Uninstalled {
    /// The schema version dropped; `None` when there was no `pgbus` schema (nothing was
    /// dropped).
    pub schema_version: Option<i64>,
    /// Queues dropped with it.
    pub queues: u64,
    /// Messages dropped with them (ready, in flight and scheduled; not dead letters).
    pub messages: u64,
    /// Registered worker processes (live or not) whose entries were dropped.
    pub processes: u64,
}

/// Drops the schema `pgbus` with everything in it, in one transaction under the migration
/// lock; unless `force`, refuses with [`Error::WorkersRegistered`] while live worker
/// processes are registered.
pub(crate) async fn uninstall(client: &mut Client, force: bool) -> Result<Uninstalled> {
    let tx = client
        .transaction()
        .await
        .map_err(|e| db("starting the uninstall transaction", e))?;
    tx.exec(sql::MIGRATION_LOCK, &[&sql::MIGRATION_LOCK_KEY])
        .await
        .map_err(|e| db("taking the migration lock", e))?;
    let mut dropped = Uninstalled {
        schema_version: None,
        queues: 0,
        messages: 0,
        processes: 0,
    };
    let exists: bool = tx
        .q_one(sql::SCHEMA_EXISTS, &[])
        .await
        .map_err(|e| db("looking for the pgbus schema", e))?
        .get(0);
    if !exists {
        return Ok(dropped);
    }
    // A schema created by a failed first migration has no version: it is dropped as 0.
    dropped.schema_version = Some(schema_version(&tx).await?.unwrap_or(0));
    let has = |table: &'static str| {
        let tx = &tx;
        async move {
            let row = tx
                .q_one(sql::TABLE_EXISTS, &[&table])
                .await
                .map_err(|e| db("looking for a pgbus table", e))?;
            Ok::<bool, Error>(row.get(0))
        }
    };
    if has("pgbus.processes").await? {
        tx.exec(sql::LOCK_PROCESSES, &[])
            .await
            .map_err(|e| db("locking the process registry", e))?;
        let row = tx
            .q_one(sql::COUNT_PROCESSES, &[&LIVE_WITHIN.as_secs_f64()])
            .await
            .map_err(|e| db("counting registered processes", e))?;
        let live = row.get::<_, i64>(0).unsigned_abs();
        if live > 0 && !force {
            return Err(Error::WorkersRegistered { count: live });
        }
        dropped.processes = row.get::<_, i64>(1).unsigned_abs();
    }
    if has("pgbus.queues").await? && has("pgbus.messages").await? {
        let row = tx
            .q_one(sql::COUNT_QUEUES_AND_MESSAGES, &[])
            .await
            .map_err(|e| db("counting queues and messages", e))?;
        dropped.queues = row.get::<_, i64>(0).unsigned_abs();
        dropped.messages = row.get::<_, i64>(1).unsigned_abs();
    }
    tx.batch_execute(sql::DROP_SCHEMA)
        .await
        .map_err(|e| db("dropping the pgbus schema (only its owner may)", e))?;
    tx.commit()
        .await
        .map_err(|e| db("committing the uninstall", e))?;
    tracing::info!(target: "pgbus::migrate", version = dropped.schema_version, "dropped the pgbus schema");
    Ok(dropped)
}
