//! The console's sample data set: what the `EXPLAIN` test (`tests/tests/console_pg.rs`) and
//! the `console` bench scenario run on, written by one function so both measure the same
//! tables.

use pgbus_core::{Error, Result};

use super::stmt::Stmt;
use crate::backend::PgBackend;
use crate::error::db;

/// The sample's queues, `q0` to `q19`; message `i` (from 1) is in queue `q{i % 20}`.
pub const SAMPLE_QUEUES: i64 = 20;

/// Ids of dead letters and archived jobs start above this (the sample's messages take the
/// identity's first ids), so the three tables' ids never meet.
const DEAD_IDS: i64 = 10_000_000;
const ARCHIVE_IDS: i64 = 20_000_000;

/// How many rows each table of the sample gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Sample {
    /// Messages in the hot table (at most 10,000,000).
    pub messages: i64,
    /// Dead letters (at most 10,000,000).
    pub dead_letters: i64,
    /// Archived jobs.
    pub archived: i64,
    /// Audit log entries.
    pub audit: i64,
}

impl Sample {
    /// The data set: 2,000,000 messages, 100,000 dead letters, 100,000 archived
    /// jobs, 10,000 audit entries.
    pub const FULL: Sample = Sample {
        messages: 2_000_000,
        dead_letters: 100_000,
        archived: 100_000,
        audit: 10_000,
    };

    /// [`Sample::FULL`] with every count divided by `divisor` (at least 1 row each).
    pub fn scaled_down(divisor: i64) -> Sample {
        let part = |n: i64| (n / divisor.max(1)).max(1);
        let full = Sample::FULL;
        Sample {
            messages: part(full.messages),
            dead_letters: part(full.dead_letters),
            archived: part(full.archived),
            audit: part(full.audit),
        }
    }
}

/// The queues, all keeping history.
const QUEUES: &str = "
INSERT INTO pgbus.queues (name, max_attempts, retry_base_ms, retry_cap_ms, retry_jitter,
                          lease_ms, keep_history, archive_retention_ms)
SELECT 'q' || i, 5, 1000, 60000, 0.1, 30000, true, 604800000
FROM generate_series(0, $1 - 1) i";

/// `$1` messages. Within each queue, runs of ten: six ready, three scheduled (an hour
/// ahead), one in flight (leased for an hour, attempt 1), so every state is spread over the
/// whole queue; a seventh of them in one of 500 groups (`g0` to `g499`); one in thirteen
/// with a last error `boom <i>`; JSON payloads `{"n": <i>}`.
const MESSAGES: &str = "
INSERT INTO pgbus.messages (queue, priority, visible_at, lease_until, attempts,
                            content_type, group_key, last_error, payload)
SELECT 'q' || (i % $2), (i % 3)::smallint,
       CASE WHEN i / $2 % 10 BETWEEN 6 AND 8 THEN now() + interval '1 hour'
            ELSE now() - interval '1 minute' END,
       CASE WHEN i / $2 % 10 = 9 THEN now() + interval '1 hour' END,
       CASE WHEN i / $2 % 10 = 9 THEN 1 ELSE 0 END,
       'application/json',
       CASE WHEN i % 7 = 0 THEN 'g' || (i % 500) END,
       CASE WHEN i % 13 = 0 THEN 'boom ' || i END,
       convert_to('{\"n\":' || i || '}', 'UTF8')
FROM generate_series(1, $1) i";

/// `$1` dead letters, one failed every second back from now (ids from `$3`).
const DEAD_LETTERS: &str = "
INSERT INTO pgbus.dead_letters (id, queue, priority, enqueued_at, attempts, content_type,
                                headers, group_key, payload, failed_at, error)
SELECT $3 + i, 'q' || (i % $2), 0, now() - interval '1 day', 5, 'application/json', '{}',
       CASE WHEN i % 7 = 0 THEN 'g' || (i % 500) END, '\\x7b7d',
       now() - i * interval '1 second', 'boom ' || i
FROM generate_series(1, $1) i";

/// `$1` archived jobs, one acked every second back from now (ids from `$3`).
const ARCHIVED: &str = "
INSERT INTO pgbus.archive (id, queue, priority, enqueued_at, attempts, content_type,
                           headers, group_key, payload, acked_at)
SELECT $3 + i, 'q' || (i % $2), 0, now() - interval '1 day', 1, 'application/json', '{}',
       NULL, '\\x7b7d', now() - i * interval '1 second'
FROM generate_series(1, $1) i";

const AUDIT: &str = "
INSERT INTO pgbus.audit_log (at, actor, action, queue, count, detail)
SELECT now() - i * interval '1 second', 'sample', 'retry', 'q' || (i % $2), 1,
       jsonb_build_object('ids', jsonb_build_array(i))
FROM generate_series(1, $1) i";

/// Fresh statistics, and (with `vacuum`) the visibility map a table has once autovacuum
/// has been through it, which index-only scans (the counts) read.
const ANALYZE: &str = "ANALYZE pgbus.queues, pgbus.messages, pgbus.dead_letters, pgbus.archive,
                               pgbus.audit_log";
const VACUUM_ANALYZE: &str = "VACUUM ANALYZE pgbus.queues, pgbus.messages, pgbus.dead_letters,
                                             pgbus.archive, pgbus.audit_log";

pub(super) async fn seed(backend: &PgBackend, sample: Sample, vacuum: bool) -> Result<()> {
    if !(1..DEAD_IDS).contains(&sample.messages) || sample.dead_letters >= DEAD_IDS {
        return Err(Error::InvalidArgument(format!(
            "a sample holds 1 to {DEAD_IDS} messages and fewer than {DEAD_IDS} dead letters"
        )));
    }
    let steps = [
        Stmt::new("queues", QUEUES).bind(SAMPLE_QUEUES),
        Stmt::new("messages", MESSAGES)
            .bind(sample.messages)
            .bind(SAMPLE_QUEUES),
        Stmt::new("dead letters", DEAD_LETTERS)
            .bind(sample.dead_letters)
            .bind(SAMPLE_QUEUES)
            .bind(DEAD_IDS),
        Stmt::new("archived jobs", ARCHIVED)
            .bind(sample.archived)
            .bind(SAMPLE_QUEUES)
            .bind(ARCHIVE_IDS),
        Stmt::new("audit entries", AUDIT)
            .bind(sample.audit)
            .bind(SAMPLE_QUEUES),
    ];
    let conn = backend.conn().await?;
    for step in steps {
        step.rows(&**conn)
            .await
            .map_err(|e| db(&format!("seeding the sample's {}", step.name), e))?;
    }
    conn.batch_execute(if vacuum { VACUUM_ANALYZE } else { ANALYZE })
        .await
        .map_err(|e| db("analyzing the sample", e))?;
    Ok(())
}
