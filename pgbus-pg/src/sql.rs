//! Every SQL statement of the Postgres backend. Queue names and all other values are bound
//! as parameters; the only statements assembled at run time are `LISTEN`/`UNLISTEN` of a
//! stream channel, which cannot take parameters (the name is a validated identifier).

use pgbus_core::StreamName;

/// Serialises migrations across processes (an arbitrary constant: "pgbus" in ASCII).
pub(crate) const MIGRATION_LOCK_KEY: i64 = 0x0070_6762_7573;

pub(crate) const MIGRATION_LOCK: &str = "SELECT pg_advisory_xact_lock($1)";

pub(crate) const CREATE_MIGRATIONS_TABLE: &str = "
CREATE SCHEMA IF NOT EXISTS pgbus;
CREATE TABLE IF NOT EXISTS pgbus.schema_migrations (
    version    bigint PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)";

pub(crate) const APPLY_GRANTS: &str = "SELECT pgbus.apply_grants()";

pub(crate) const APPLY_GRANTS_TO: &str = "SELECT pgbus.apply_grants($1)";

pub(crate) const RECORD_GRANT: &str =
    "INSERT INTO pgbus.grants (role) VALUES ($1) ON CONFLICT DO NOTHING";

/// Whether the role owns the `pgbus` schema or is a member of its owner; no row when no
/// such role exists.
pub(crate) const GRANTABLE_ROLE: &str = "
SELECT pg_has_role(r.oid, n.nspowner, 'MEMBER')
FROM pg_roles r, pg_namespace n
WHERE r.rolname = $1 AND n.nspname = 'pgbus'";

pub(crate) const APPLIED_VERSIONS: &str =
    "SELECT version FROM pgbus.schema_migrations ORDER BY version";

pub(crate) const RECORD_MIGRATION: &str =
    "INSERT INTO pgbus.schema_migrations (version, name) VALUES ($1, $2)";

/// Whether pgbus was ever migrated here (a query naming a missing table fails at parse
/// time, so this is asked first).
pub(crate) const MIGRATIONS_TABLE_EXISTS: &str =
    "SELECT to_regclass('pgbus.schema_migrations') IS NOT NULL";

pub(crate) const SCHEMA_VERSION: &str = "SELECT max(version) FROM pgbus.schema_migrations";

// Uninstalling: everything the migrations create lives in the schema `pgbus` (roles'
// grants on its objects go with them), so dropping the schema removes all of it.

pub(crate) const SCHEMA_EXISTS: &str =
    "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = 'pgbus')";

/// Whether the schema has a table (a partly migrated schema may lack some).
pub(crate) const TABLE_EXISTS: &str = "SELECT to_regclass($1) IS NOT NULL";

/// Holds off registrations and heartbeats until the uninstalling transaction ends, so no
/// worker registers between the count of live processes and the drop.
pub(crate) const LOCK_PROCESSES: &str = "LOCK TABLE pgbus.processes IN EXCLUSIVE MODE";

/// Registered processes whose last heartbeat is younger than `$1` seconds, and all of them.
pub(crate) const COUNT_PROCESSES: &str = "
SELECT count(*) FILTER (WHERE heartbeat_at > now() - make_interval(secs => $1)), count(*)
FROM pgbus.processes";

pub(crate) const COUNT_QUEUES_AND_MESSAGES: &str =
    "SELECT (SELECT count(*) FROM pgbus.queues), (SELECT count(*) FROM pgbus.messages)";

pub(crate) const DROP_SCHEMA: &str = "DROP SCHEMA pgbus CASCADE";

pub(crate) const CREATE_QUEUE: &str = "
INSERT INTO pgbus.queues (name, max_attempts, retry_base_ms, retry_cap_ms, retry_jitter,
                          lease_ms, keep_history, archive_retention_ms, breaker_failures,
                          breaker_backoff_ms)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)
ON CONFLICT (name) DO NOTHING";

/// Replaces queue `$1`'s settings (the columns of `CREATE_QUEUE`); a queue left without
/// a breaker has its open one closed.
pub(crate) const ALTER_QUEUE: &str = "
UPDATE pgbus.queues
SET max_attempts = $2, retry_base_ms = $3, retry_cap_ms = $4, retry_jitter = $5, lease_ms = $6,
    keep_history = $7, archive_retention_ms = $8, breaker_failures = $9,
    breaker_backoff_ms = $10,
    breaker_until = CASE WHEN $9 IS NULL THEN '-infinity' ELSE breaker_until END
WHERE name = $1";

/// Drops a queue; a statement trigger deletes its messages (migration 19), locking them in
/// id order first, the order the ack and the purge lock theirs in (migration 22); the other
/// tables' rows go by their foreign keys.
pub(crate) const DROP_QUEUE: &str = "DELETE FROM pgbus.queues WHERE name = $1";

/// Which of the ids `$2` are dead letters of queue `$1`.
pub(crate) const DEAD_IDS: &str = "
SELECT id FROM pgbus.dead_letters WHERE queue = $1 AND id = ANY ($2)";

/// Pauses or resumes; a resume wakes the queue's workers.
pub(crate) const SET_PAUSED: &str = "
WITH u AS (
    UPDATE pgbus.queues SET paused = $2 WHERE name = $1 RETURNING name
), wake AS (
    SELECT pg_notify('pgbus_wakeup', $1) WHERE NOT $2 AND EXISTS (SELECT 1 FROM u)
)
SELECT (SELECT count(*) FROM u), (SELECT count(*) FROM wake)";

/// Deletes queue `$1`'s messages, locking them in id order first, as the worker's batch ack
/// and the console lock theirs, so that a purge beside them queues instead of deadlocking.
pub(crate) const PURGE_QUEUE: &str = "
WITH locked AS (
    SELECT id FROM pgbus.messages WHERE queue = $1 AND id > 0 ORDER BY id FOR UPDATE
)
DELETE FROM pgbus.messages m USING locked l WHERE m.id = l.id";

/// The columns a queue's settings are read from.
macro_rules! queue_columns {
    () => {
        "name, max_attempts, retry_base_ms, retry_cap_ms, retry_jitter, lease_ms, \
         keep_history, archive_retention_ms, paused, breaker_failures, breaker_backoff_ms"
    };
}

pub(crate) const QUEUE_INFO: &str = concat!(
    "SELECT ",
    queue_columns!(),
    " FROM pgbus.queues WHERE name = $1"
);

pub(crate) const LIST_QUEUES: &str = concat!(
    "SELECT ",
    queue_columns!(),
    " FROM pgbus.queues ORDER BY name"
);

pub(crate) const QUEUE_EXISTS: &str = "SELECT EXISTS (SELECT 1 FROM pgbus.queues WHERE name = $1)";

/// The channel workers LISTEN on; the payload is the queue name.
pub(crate) const WAKEUP_CHANNEL: &str = "pgbus_wakeup";

pub(crate) const LISTEN: &str = "LISTEN pgbus_wakeup";

/// The trailing wake-up of coalesced sends (see `notify_limit.rs`); `$1` is the queue.
pub(crate) const NOTIFY_WAKEUP: &str = "SELECT pg_notify('pgbus_wakeup', $1)";

/// Bulk send: one row per array element, ids assigned in input order. `$3` (absolute time)
/// wins over `$4` (delay in seconds, on the database clock). When `$9` is true and a
/// message is visible now, one `pg_notify` per statement (Postgres also folds identical
/// notifications within a transaction into one), delivered only on commit.
pub(crate) const SEND: &str = "
WITH ins AS (
    INSERT INTO pgbus.messages (queue, priority, visible_at, content_type, headers, group_key,
                                payload)
    SELECT $1::text, m.priority, coalesce(m.at, now() + make_interval(secs => m.delay)),
           m.content_type, m.headers, m.group_key, m.payload
    FROM unnest($2::smallint[], $3::timestamptz[], $4::float8[], $5::text[], $6::jsonb[],
                $7::text[], $8::bytea[])
         WITH ORDINALITY AS m(priority, at, delay, content_type, headers, group_key, payload, n)
    ORDER BY m.n
    RETURNING id, visible_at
), wake AS (
    SELECT pg_notify('pgbus_wakeup', $1)
    WHERE $9::boolean AND EXISTS (SELECT 1 FROM ins WHERE visible_at <= now())
)
SELECT ins.id FROM ins LEFT JOIN wake ON true ORDER BY ins.id";

/// The send of one message (a web request's job, say): [`SEND`]'s row, visibility and
/// wake-up, with the row's values as scalar parameters (`$1` to `$9` in `SEND`'s order),
/// so the server unpacks no arrays and sorts nothing, and the statement costs about what a
/// plain single-row `INSERT` costs.
pub(crate) const SEND_ONE: &str = "
WITH ins AS (
    INSERT INTO pgbus.messages (queue, priority, visible_at, content_type, headers, group_key,
                                payload)
    VALUES ($1::text, $2::smallint,
            coalesce($3::timestamptz, now() + make_interval(secs => $4::float8)),
            $5::text, $6::jsonb, $7::text, $8::bytea)
    RETURNING id, visible_at
), wake AS (
    SELECT pg_notify('pgbus_wakeup', $1)
    WHERE $9::boolean AND EXISTS (SELECT 1 FROM ins WHERE visible_at <= now())
)
SELECT ins.id FROM ins LEFT JOIN wake ON true";

/// Claim: pick the best claimable rows (visible, and not leased or with the lease run out)
/// with SKIP LOCKED, lease them to process `$4` (the claiming worker's registered id, NULL
/// when unknown), count the attempt. Only unindexed columns change, so the update can be
/// HOT. `RETURNING` keeps no order: the caller restores it. Grouped and
/// limited jobs have their own claims.
///
/// The update finds the picked rows by their tuple ids (`ctid = ANY`, a TID scan), never
/// by a join: its plan is then the same for any claim size, so the fetch connection can
/// run one generic plan instead of planning each claim anew (a join would be hashed over
/// the whole table whenever the size is not known at planning time). The tuple ids spare
/// the primary-key descent (and the walk along the row's update chain) that an id costs
/// per row: a loop claiming the same 500 rows again and again ran 296 claims/s against 227
/// by id (`pgbench -M prepared`, quiet machine); in a drain, where each row is claimed
/// once, the gain is smaller than the runs' spread.
/// They are exact: the row lock taken with them keeps each row from changing until the
/// claim commits. If a row changed and committed between the statement's snapshot and
/// its lock, the lock returns the newer version's tuple id, which the update (on the
/// older snapshot) does not see: that row is locked and left as it is, not claimed, and
/// the next claim takes it. (The ack must not do the same, see [`ACK`]: a row left out
/// there is an ack lost.)
pub(crate) const CLAIM: &str = "
WITH picked AS (
    SELECT ctid
    FROM pgbus.messages
    WHERE queue = $1
      AND group_key IS NULL
      AND limit_key IS NULL
      AND visible_at <= now()
      AND (lease_until IS NULL OR lease_until <= now())
      AND NOT (SELECT paused OR breaker_until > now() FROM pgbus.queues WHERE name = $1)
    ORDER BY priority DESC, visible_at, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE pgbus.messages m
SET lease_until = now() + make_interval(secs => $3),
    attempts = m.attempts + 1,
    leased_by = $4
WHERE m.ctid = ANY (ARRAY(SELECT ctid FROM picked))
RETURNING m.id, m.priority, m.visible_at AS was_visible_at, m.lease_until,
          m.attempts, m.enqueued_at, m.content_type, m.headers, m.group_key,
          m.last_error, m.payload";

/// The lease-mode fence on a statement over `pgbus.messages m`: the write happens only while
/// the session's token (parameter `$N`) owns a live lease on the message's group.
macro_rules! fence {
    ($n:literal) => {
        concat!(
            "\n  AND EXISTS (SELECT 1 FROM pgbus.group_leases g WHERE g.queue = m.queue",
            " AND g.group_key = m.group_key AND g.owner = $",
            $n,
            " AND g.expires_at > now())"
        )
    };
}

/// The current deliveries among the leases `($1[i], $2[i])` (message id, attempt), each
/// row locked with `$lock`: a `FROM` item yielding their ids as `m.id`. `$cond` adds
/// conditions on the row (`m`), `$fence` the lease-mode fence (see [`fence!`]).
///
/// Each lease is looked up by primary key, one after another in id order: the `LATERAL`
/// subquery with its own locking clause cannot be merged into a join, so the plan is the
/// same whatever the table's statistics say. A plain join of the table to the array was
/// planned from them, and with the statistics of an empty table (the normal state of a
/// queue that keeps up, see migration 18) it scanned the whole array once per row, quadratic
/// in the number of leases (a heartbeat of 200 leases: 14–24 ms instead of 2). Id order is the
/// order the rows are locked in when `$lock` waits, the order of every statement that waits
/// for several rows (the ack's delete, `pgbus.delete_deliveries`; the console's actions,
/// `console/actions.rs`, `locked!`), so two of them on overlapping jobs wait for each other
/// instead of deadlocking. A row whose attempt changed while the statement waited (claimed
/// again) fails the re-check and is left out.
///
/// `current_deliveries!(from $leases, ...)` takes the leases from `$leases`, a `FROM` list
/// yielding `l.id` and `l.attempt`, instead.
macro_rules! current_deliveries {
    ($cond:expr, $fence:expr, $lock:expr) => {
        current_deliveries!(
            from "unnest($1::bigint[], $2::int[]) AS l(id, attempt)",
            $cond,
            $fence,
            $lock
        )
    };
    (from $leases:expr, $cond:expr, $fence:expr, $lock:expr) => {
        concat!(
            "(SELECT l.id, l.attempt FROM ",
            $leases,
            "
          ORDER BY l.id) l
    CROSS JOIN LATERAL (
        SELECT m.id FROM pgbus.messages m
        WHERE m.id = l.id AND m.attempts = l.attempt",
            $cond,
            $fence,
            "
        ",
            $lock,
            "
    ) m"
        )
    };
}

/// Copies the rows deleted by the CTE `$acked` (ids and queues) to the archive when their
/// queue keeps history; the ack and the group statement ([`group_step!`]) archive with it.
macro_rules! archive_acked {
    ($acked:literal) => {
        concat!(
            "
INSERT INTO pgbus.archive (id, queue, priority, enqueued_at, attempts, content_type,
                           headers, group_key, payload, errors)
SELECT m.id, m.queue, m.priority, m.enqueued_at, m.attempts, m.content_type,
       m.headers, m.group_key, m.payload, m.errors
FROM ",
            $acked,
            " d
JOIN pgbus.queues q ON q.name = d.queue AND q.keep_history
JOIN pgbus.messages m ON m.id = d.id
WHERE EXISTS (SELECT 1 FROM pgbus.queues WHERE keep_history)"
        )
    };
}

/// Ack: delete current deliveries; archive those of history-keeping queues (the archive
/// insert, `archive_acked!`, reads the deleted rows of the CTE it names; the group
/// statement, [`group_step!`], archives its acks with it too).
///
/// The delete is `pgbus.delete_deliveries` (migration 23): one pass over the primary key
/// in id order, each lease's attempt checked in the delete's own condition, so a row a
/// heartbeat extended after this statement's snapshot is deleted in its newer version and
/// one claimed again is left alone. Id order is the order every statement that waits for
/// rows locks them in (see [`current_deliveries!`]); the function sets its statement's
/// scans (index scans on, those in heap order off), so neither the table's statistics nor
/// the session's settings can change it. Until migration 23
/// the ack locked each row first and then deleted it, finding and writing every row twice:
/// 1.94–2.02 ms of server time per ack of 500 against 1.39–1.44 ms in one pass
/// (`pgbench -M prepared`, claim 500 and ack them, two clients, quiet machine).
///
/// The function returns only ids and queues: the archive reads the deleted rows' columns
/// from this statement's snapshot, taken before the function deletes them, and only when
/// some queue keeps history at all (a one-time check), so acks of the common,
/// history-less queues pay for no row copies and no join.
pub(crate) const ACK: &str = concat!(
    "
WITH done AS (
    SELECT d.deleted_id AS id, d.deleted_queue AS queue
    FROM pgbus.delete_deliveries($1::bigint[], $2::int[]) d
), archived AS (",
    archive_acked!("done"),
    "
)
SELECT count(*) FROM done"
);

/// Extends the leases of current deliveries to `$3` seconds from now, skipping rows another
/// statement holds: those are being settled (acked, retried, dead-lettered) or changed, so
/// their leases are not extended now, and a heartbeat that never waits cannot deadlock with
/// a worker's batch ack of overlapping leases on another pooled connection (it did, found
/// by `cargo xtask chaos`: the two locked the shared rows in opposite orders). The rows are
/// looked up one by one in id order ([`current_deliveries!`]).
///
/// Returns how many were extended and the positions (from 1) in `$1`/`$2` of the leases
/// that are gone: no row of that id and attempt holds a lease any more (settled, deleted by an operator, claimed again,
/// given back). A skipped row still exists in the statement's snapshot, so it is never
/// reported lost: a lock is not a loss, and the next heartbeat looks again. The `OFFSET 0`
/// keeps that check a primary-key probe per lease: without it the planner may turn it
/// into an anti-join planned from the statistics, which with those of an empty table
/// compared every lease with every leased row.
macro_rules! extend {
    ($fence:expr) => {
        concat!(
            "
WITH leased AS (
    SELECT m.id
    FROM ",
            current_deliveries!(
                " AND m.lease_until IS NOT NULL",
                $fence,
                "FOR UPDATE OF m SKIP LOCKED"
            ),
            "
), extended AS (
    UPDATE pgbus.messages m
    SET lease_until = now() + make_interval(secs => $3)
    WHERE m.id = ANY (ARRAY(SELECT id FROM leased))
    RETURNING 1
)
SELECT (SELECT count(*) FROM extended),
       ARRAY(
           SELECT l.n FROM unnest($1::bigint[], $2::int[]) WITH ORDINALITY AS l(id, attempt, n)
           WHERE NOT EXISTS (
               SELECT FROM pgbus.messages m
               WHERE m.id = l.id AND m.attempts = l.attempt AND m.lease_until IS NOT NULL
               OFFSET 0))"
        )
    };
}
pub(crate) const EXTEND: &str = extend!("");
pub(crate) const EXTEND_FENCED: &str = extend!(fence!("4"));

/// Gives the message back, visible again in `$3` seconds, with error `$4` recorded as its
/// last error and appended to its attempt history (`pgbus.append_error`, migration 17: the
/// last 10 entries). A give-back without error text (a job the pool refused, or whose
/// group lost its slot, before its handler ran) is no failed attempt, so it leaves the
/// history alone. (`retry_set!`, the `SET` clause, is the group statement's retry too.)
macro_rules! retry_set {
    ($delay:literal, $error:literal) => {
        concat!(
            "
SET visible_at = now() + make_interval(secs => ",
            $delay,
            "), lease_until = NULL,
    last_error = ",
            $error,
            ",
    errors = CASE WHEN ",
            $error,
            "::text IS NULL THEN m.errors
                  ELSE pgbus.append_error(m.errors, m.attempts, ",
            $error,
            ") END"
        )
    };
}
pub(crate) const NACK: &str = concat!(
    "
UPDATE pgbus.messages m",
    retry_set!("$3", "$4"),
    "
WHERE m.id = $1 AND m.attempts = $2"
);

/// Gives back claims whose jobs never started (`Consumer::release`: a worker's
/// claimed-ahead messages when it stops): the lease ends and the claim's attempt is taken
/// back; `visible_at` is left alone, so the message is claimable at once in the place it
/// had, and its error history is untouched. Only unindexed columns change (a HOT update).
/// A row not leased under that attempt (settled, released, claimed again) is left alone.
/// The rows are looked up and locked one by one in id order ([`current_deliveries!`]).
///
/// Unless `$3` is false (the backend's sends do not notify), each queue that got messages
/// back is notified once: they are claimable now, and idle workers would otherwise find
/// them only at their next poll. Returns how many were given back.
pub(crate) const RELEASE: &str = concat!(
    "
WITH locked AS (
    SELECT m.id
    FROM ",
    current_deliveries!(" AND m.lease_until IS NOT NULL", "", "FOR UPDATE OF m"),
    "
), released AS (
    UPDATE pgbus.messages m
    SET lease_until = NULL, attempts = m.attempts - 1
    WHERE m.id = ANY (ARRAY(SELECT id FROM locked))
    RETURNING m.queue, m.visible_at
), woken AS (
    SELECT pg_notify('pgbus_wakeup', queue)
    FROM (SELECT DISTINCT queue FROM released WHERE $3::boolean AND visible_at <= now()) q
)
SELECT (SELECT count(*) FROM released), (SELECT count(*) FROM woken)"
);

/// Moves the message to the dead letters with reason `$3`, which ends its attempt history
/// (carried along, `pgbus.append_error`). `bury!` inserts the rows deleted by the CTE it
/// names; the group statement buries with it too.
macro_rules! bury {
    ($dead:literal, $reason:literal) => {
        concat!(
            "
INSERT INTO pgbus.dead_letters (id, queue, priority, enqueued_at, attempts, content_type,
                                headers, group_key, payload, error, limit_key, errors)
SELECT id, queue, priority, enqueued_at, attempts, content_type, headers, group_key,
       payload, ",
            $reason,
            ", limit_key, pgbus.append_error(errors, attempts, ",
            $reason,
            ")
FROM ",
            $dead
        )
    };
}
pub(crate) const DEAD_LETTER: &str = concat!(
    "
WITH d AS (
    DELETE FROM pgbus.messages m WHERE m.id = $1 AND m.attempts = $2
    RETURNING m.*
)",
    bury!("d", "$3")
);

pub(crate) const LIST_DEAD: &str = "
SELECT id, queue, priority, enqueued_at, attempts, content_type, headers, group_key,
       payload, failed_at, error, limit_key
FROM pgbus.dead_letters
WHERE queue = $1
ORDER BY failed_at, id
LIMIT $2";

/// The dead letters of queue `$1` named by `$2` (NULL: all), locked in id order, as the
/// console's actions lock them: a retry or discard beside one queues instead of
/// deadlocking (in its plan's order, `failed_at`'s, it could take a row the other wanted
/// next while holding one it needed).
macro_rules! locked_dead {
    () => {
        "locked AS (
    SELECT id FROM pgbus.dead_letters
    WHERE queue = $1 AND id > 0 AND ($2::bigint[] IS NULL OR id = ANY ($2))
    ORDER BY id
    FOR UPDATE
)"
    };
}

/// Retry from the dead-letter queue: `$2` NULL means all of the queue. Wakes the
/// queue's workers when anything came back. The attempt count starts again; the attempt
/// history comes back with the message (its next failure is attempt 1 again, after the
/// entries of the earlier run).
pub(crate) const RETRY_DEAD: &str = concat!(
    "
WITH ",
    locked_dead!(),
    ", r AS (
    DELETE FROM pgbus.dead_letters d USING locked l WHERE d.id = l.id
    RETURNING d.*
), ins AS (
    INSERT INTO pgbus.messages (id, queue, priority, visible_at, attempts, enqueued_at,
                                content_type, headers, group_key, last_error, payload,
                                limit_key, errors)
    SELECT id, queue, priority, now(), 0, enqueued_at, content_type, headers, group_key,
           error, payload, limit_key, errors
    FROM r
    RETURNING 1
), wake AS (
    SELECT pg_notify('pgbus_wakeup', $1) WHERE EXISTS (SELECT 1 FROM ins)
)
SELECT (SELECT count(*) FROM ins), (SELECT count(*) FROM wake)"
);

pub(crate) const DISCARD_DEAD: &str = concat!(
    "
WITH ",
    locked_dead!(),
    "
DELETE FROM pgbus.dead_letters d USING locked l WHERE d.id = l.id"
);

/// The counts of messages in each state (columns `ready`, `in_flight`, `scheduled`,
/// `oldest_ready_secs`, `next_due_secs`), aggregated over rows with `visible_at` and
/// `lease_until`: shared by [`STATS`] and [`QUEUE_STATS`] so both count alike.
macro_rules! message_counts {
    () => {
        "
           count(*) FILTER (WHERE visible_at <= now() AND NOT coalesce(lease_until > now(), false))
               AS ready,
           count(*) FILTER (WHERE lease_until > now()) AS in_flight,
           count(*) FILTER (WHERE visible_at > now() AND NOT coalesce(lease_until > now(), false))
               AS scheduled,
           extract(epoch FROM now() - min(visible_at) FILTER (
               WHERE visible_at <= now() AND NOT coalesce(lease_until > now(), false)))::float8
               AS oldest_ready_secs,
           extract(epoch FROM min(visible_at) FILTER (
               WHERE visible_at > now() AND NOT coalesce(lease_until > now(), false)) - now())::float8
               AS next_due_secs"
    };
}

/// The columns of a queue's stats row, in the order `stats_from` reads them.
macro_rules! stats_columns {
    () => {
        "
SELECT q.name, q.paused,
       coalesce(m.ready, 0), coalesce(m.in_flight, 0), coalesce(m.scheduled, 0),
       coalesce(d.dead, 0), m.oldest_ready_secs,
       CASE WHEN q.breaker_until > now()
            THEN extract(epoch FROM q.breaker_until - now())::float8 END,
       coalesce(t.processed, 0), coalesce(t.failed, 0), m.next_due_secs"
    };
}

/// Per-queue counts in one statement over the (small) hot table and the dead letters.
pub(crate) const STATS: &str = concat!(
    stats_columns!(),
    "
FROM pgbus.queues q
LEFT JOIN (
    SELECT queue,",
    message_counts!(),
    "
    FROM pgbus.messages
    GROUP BY queue
) m ON m.queue = q.name
LEFT JOIN (
    SELECT queue, count(*) AS dead FROM pgbus.dead_letters GROUP BY queue
) d ON d.queue = q.name
LEFT JOIN (
    SELECT queue, sum(processed)::bigint AS processed, sum(failed)::bigint AS failed
    FROM pgbus.throughput
    WHERE bucket > now() - interval '1 minute'
    GROUP BY queue
) t ON t.queue = q.name
ORDER BY q.name"
);

/// [`STATS`] of queue `$1` alone, reading only its rows, each through an index: the
/// messages through the three partial indexes that together hold every row (plain, grouped,
/// limited but not grouped), the dead letters and throughput by their `(queue, ...)`
/// indexes. No row when the queue does not exist.
pub(crate) const QUEUE_STATS: &str = concat!(
    stats_columns!(),
    "
FROM pgbus.queues q
CROSS JOIN (
    SELECT",
    message_counts!(),
    "
    FROM (
        SELECT visible_at, lease_until FROM pgbus.messages
        WHERE queue = $1 AND group_key IS NULL AND limit_key IS NULL
        UNION ALL
        SELECT visible_at, lease_until FROM pgbus.messages
        WHERE queue = $1 AND group_key IS NOT NULL
        UNION ALL
        SELECT visible_at, lease_until FROM pgbus.messages
        WHERE queue = $1 AND group_key IS NULL AND limit_key IS NOT NULL
    ) held
) m
CROSS JOIN (
    SELECT count(*) AS dead FROM pgbus.dead_letters WHERE queue = $1
) d
CROSS JOIN (
    SELECT sum(processed)::bigint AS processed, sum(failed)::bigint AS failed
    FROM pgbus.throughput
    WHERE queue = $1 AND bucket > now() - interval '1 minute'
) t
WHERE q.name = $1"
);

/// Deletes at most `$1` archived messages past their queue's retention.
pub(crate) const PRUNE_ARCHIVE: &str = "
WITH doomed AS (
    SELECT a.id
    FROM pgbus.archive a JOIN pgbus.queues q ON q.name = a.queue
    WHERE a.acked_at < now() - q.archive_retention_ms * interval '1 millisecond'
    LIMIT $1
    FOR UPDATE OF a SKIP LOCKED
)
DELETE FROM pgbus.archive a USING doomed WHERE a.id = doomed.id";

pub(crate) const ARCHIVED_COUNT: &str = "SELECT count(*) FROM pgbus.archive WHERE queue = $1";

pub(crate) const REGISTER_PROCESS: &str = "
INSERT INTO pgbus.processes (hostname, pid, queues, mode, capacity)
VALUES ($1, $2, $3, $4, $5)
RETURNING id";

pub(crate) const HEARTBEAT_PROCESS: &str =
    "UPDATE pgbus.processes SET busy = $2, heartbeat_at = now() WHERE id = $1";

pub(crate) const DEREGISTER_PROCESS: &str = "DELETE FROM pgbus.processes WHERE id = $1";

pub(crate) const PRUNE_PROCESSES: &str =
    "DELETE FROM pgbus.processes WHERE heartbeat_at < now() - make_interval(secs => $1)";

pub(crate) const LIST_PROCESSES: &str = "
SELECT id, hostname, pid, queues, mode, capacity, busy, started_at, heartbeat_at
FROM pgbus.processes
ORDER BY id";

/// The skip scan's step in recursive CTE `$cte`: the first message of the next group in
/// key order, within the bound `$bound` on the key (empty for none).
macro_rules! next_group_head {
    ($cte:literal, $bound:literal) => {
        concat!(
            "
    SELECT n.group_key, n.id, n.visible_at, n.lease_until
    FROM ",
            $cte,
            " h, LATERAL (
        SELECT group_key, id, visible_at, lease_until
        FROM pgbus.messages
        WHERE queue = $1 AND group_key > h.group_key",
            $bound,
            "
        ORDER BY group_key, id
        LIMIT 1
    ) n"
        )
    };
}

/// Candidate groups of queue `$1`: of a window of at most `$5` groups in key order after
/// group `$4` (wrapping round to the first), those whose oldest message is visible now
/// and not leased, oldest first, at most `$2`, leaving out `$3`. Returns them and the
/// window's last group, where the next call starts. Takes no lock (locks are taken per
/// group, on the group's own connection).
///
/// The heads are found by a skip scan of `messages_group_idx`, one index probe per group
/// for the first message after the previous group, and the scan stops at the window's
/// end (the recursion runs only as far as `LIMIT $5` reads it): a call's cost follows its
/// window, not the queue's groups (reading every group's head took 12 ms a call at 1,000
/// groups, and the calls, one after another on the fetch connection, bounded how fast
/// groups were handed out). Successive windows go round the groups, so every group comes
/// up in turn.
pub(crate) const GROUP_CANDIDATES: &str = concat!(
    "
WITH RECURSIVE after_start AS (
    (SELECT group_key, id, visible_at, lease_until
     FROM pgbus.messages
     WHERE queue = $1 AND group_key > $4
     ORDER BY group_key, id
     LIMIT 1)
    UNION ALL",
    next_group_head!("after_start", ""),
    "
), up_to_start AS (
    (SELECT group_key, id, visible_at, lease_until
     FROM pgbus.messages
     WHERE queue = $1 AND group_key IS NOT NULL AND group_key <= $4
     ORDER BY group_key, id
     LIMIT 1)
    UNION ALL",
    next_group_head!("up_to_start", " AND group_key <= $4"),
    "
), scanned AS MATERIALIZED (
    SELECT * FROM (
        SELECT 1 AS lap, * FROM after_start
        UNION ALL
        SELECT 2 AS lap, * FROM up_to_start
    ) h
    LIMIT $5
)
SELECT ARRAY(
           SELECT s.group_key
           FROM scanned s
           WHERE s.visible_at <= now()
             AND (s.lease_until IS NULL OR s.lease_until <= now())
             AND NOT (s.group_key = ANY ($3))
             AND NOT (SELECT paused OR breaker_until > now() FROM pgbus.queues WHERE name = $1)
           ORDER BY s.id
           LIMIT $2),
       (SELECT s.group_key FROM scanned s ORDER BY s.lap DESC, s.group_key DESC LIMIT 1)"
);

/// The key of group `$2`'s advisory lock in queue `$1`: (hash of the queue, hash of the
/// group). Hash collisions only make two groups share a lock (less parallelism, never
/// overlap).
macro_rules! group_lock_key {
    () => {
        "hashtext('pgbus:' || $1), hashtext($2)"
    };
}

/// The group lock: a session advisory lock on [`group_lock_key!`].
pub(crate) const TRY_LOCK_GROUP: &str =
    concat!("SELECT pg_try_advisory_lock(", group_lock_key!(), ")");

pub(crate) const UNLOCK_GROUP: &str = concat!("SELECT pg_advisory_unlock(", group_lock_key!(), ")");

/// Lease mode: takes group `$2`'s lease row for owner `$owner` for `$ttl` seconds when it
/// is free, expired, or already ours, `WHERE` `$when`; returns a row when taken.
macro_rules! take_group_lease {
    ($owner:literal, $ttl:literal, $when:literal) => {
        concat!(
            "
INSERT INTO pgbus.group_leases AS g (queue, group_key, owner, expires_at)
SELECT $1, $2, $",
            $owner,
            ", now() + make_interval(secs => $",
            $ttl,
            ")
WHERE ",
            $when,
            "
ON CONFLICT (queue, group_key) DO UPDATE
SET owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at
WHERE g.expires_at <= now() OR g.owner = EXCLUDED.owner
RETURNING owner"
        )
    };
}

/// Lease mode: takes the group's lease row (see [`take_group_lease!`]); the claim and its
/// renewal are one statement.
pub(crate) const TRY_LEASE_GROUP: &str = take_group_lease!("3", "4", "true");

/// A group session's one statement for its messages (`pgbus:group`): settle what the
/// session ran, then claim the group's next run, in one round trip and one commit. Run only
/// by the session holding the group's lock, or taking it here (`$3`).
///
/// - `$3`: take the group's lock first (the gate); otherwise the session holds it already
///   (in lease mode: its lease must be live, else nothing is claimed).
/// - Settled, each only while its `(id, attempt)` is current (and, in lease mode, fenced):
///   acks `$4`/`$5` (deleted, archived for history-keeping queues, as [`ACK`] does); the
///   failed message `$6`/`$7`, retried after `$8` seconds with error `$9`, or, when `$8` is
///   NULL, dead-lettered with reason `$9` (as [`NACK`] and [`DEAD_LETTER`] do); claims never
///   started, `$10`/`$11`, given back untouched: lease cleared, the claim's attempt taken
///   back. All are locked first, in id order, like every statement that waits for rows,
///   and looked up one by one as [`current_deliveries!`] does, a plan that needs no
///   statistics.
/// - Claimed: up to `$12` of the group's oldest messages after those settled here, in id
///   order, stopping before the first that is delayed, leased, or given back or retried
///   here; leased for `$13` seconds to process `$14`. The candidates are read with `FOR
///   UPDATE`, which returns each row as it is now rather than as the statement's snapshot
///   saw it: the snapshot is taken before the gate's lock, so a previous owner's last
///   writes may postdate it, and a row it retried must stop the run, not be skipped.
/// - `$15`: release the lock when nothing was claimed (also when `$12` is 0).
///
/// Returns one row per claimed message (one row of NULLs when none), each carrying whether
/// the gate holds the lock, the acked ids, whether the failure was settled and how many
/// were given back.
macro_rules! group_step {
    ($gate:expr, $fence:expr, $more:expr, $released:expr) => {
        concat!(
            "
WITH ",
            $gate,
            ",
settling AS (
    SELECT m.id, s.kind
    FROM (
        SELECT a.id, a.attempt, 'ack' AS kind
        FROM unnest($4::bigint[], $5::int[]) AS a(id, attempt)
        UNION ALL
        SELECT $6::bigint, $7::int, CASE WHEN $8::float8 IS NULL THEN 'dead' ELSE 'retry' END
        WHERE $6::bigint IS NOT NULL
        UNION ALL
        SELECT b.id, b.attempt, 'back'
        FROM unnest($10::bigint[], $11::int[]) AS b(id, attempt)
        ORDER BY id
    ) s
    CROSS JOIN LATERAL (
        SELECT m.id FROM pgbus.messages m
        WHERE m.id = s.id AND m.attempts = s.attempt",
            $fence,
            "
        FOR UPDATE OF m
    ) m
), acked AS (
    DELETE FROM pgbus.messages m
    WHERE m.id = ANY (ARRAY(SELECT id FROM settling WHERE kind = 'ack'))
    RETURNING m.id, m.queue
), archived AS (",
            archive_acked!("acked"),
            "
), dead AS (
    DELETE FROM pgbus.messages m
    WHERE m.id = (SELECT id FROM settling WHERE kind = 'dead')
    RETURNING m.*
), buried AS (",
            bury!("dead", "$9"),
            "
), retried AS (
    UPDATE pgbus.messages m",
            retry_set!("$8", "$9"),
            "
    WHERE m.id = (SELECT id FROM settling WHERE kind = 'retry')
    RETURNING m.id
), given_back AS (
    UPDATE pgbus.messages m
    SET lease_until = NULL, attempts = m.attempts - 1
    WHERE m.id = ANY (ARRAY(SELECT id FROM settling WHERE kind = 'back'))
    RETURNING m.id
), run AS (
    SELECT n.id,
           n.visible_at <= now() AND (n.lease_until IS NULL OR n.lease_until <= now()) AS ready
    FROM gate, LATERAL (
        SELECT id, visible_at, lease_until
        FROM pgbus.messages
        WHERE queue = $1 AND group_key = $2 AND gate.held
          AND id <> ALL (ARRAY(SELECT id FROM settling))
        ORDER BY id
        LIMIT $12
        FOR UPDATE
    ) n
), claimed AS (
    UPDATE pgbus.messages m
    SET lease_until = now() + make_interval(secs => $13),
        attempts = m.attempts + 1,
        leased_by = $14
    WHERE m.id = ANY (ARRAY(
        SELECT id FROM run
        WHERE ready
          AND id < ALL (ARRAY(
              SELECT id FROM run WHERE NOT ready
              UNION ALL
              SELECT id FROM settling WHERE kind IN ('retry', 'back')))))
      AND NOT (SELECT paused OR breaker_until > now() FROM pgbus.queues WHERE name = $1)
    RETURNING m.id, m.priority, m.lease_until, m.attempts, m.enqueued_at, m.content_type,
              m.headers, m.group_key, m.last_error, m.payload
)",
            $more,
            "
SELECT gate.held,
       ARRAY(SELECT id FROM acked) AS acked,
       EXISTS (SELECT 1 FROM dead) OR EXISTS (SELECT 1 FROM retried) AS failed,
       (SELECT count(*) FROM given_back) AS given_back,
       ",
            $released,
            " AS released,
       c.id, c.priority, c.lease_until, c.attempts, c.enqueued_at, c.content_type,
       c.headers, c.group_key, c.last_error, c.payload
FROM gate LEFT JOIN claimed c ON true
ORDER BY c.id"
        )
    };
}

/// A column of [`group_step!`]'s gate: a step that settles nothing (a claim, a lock, a
/// release) commits asynchronously, as the fetch connection's claims do: a lost commit
/// only makes its messages claimable again. Steps that settle commit durably.
macro_rules! claim_commits_async {
    () => {
        "CASE WHEN cardinality($4::bigint[]) = 0 AND $6::bigint IS NULL
                AND cardinality($10::bigint[]) = 0
           THEN set_config('synchronous_commit', 'off', true) END AS commit"
    };
}

/// [`group_step!`] with session advisory locks: the gate tries the lock, and the release
/// unlocks it. (A session lock is released at once, before the statement commits; whoever
/// takes the group next reads the rows with `FOR UPDATE`, so it waits for this commit.)
pub(crate) const GROUP_STEP: &str = group_step!(
    concat!(
        "gate AS (
    SELECT CASE WHEN $3 THEN pg_try_advisory_lock(",
        group_lock_key!(),
        ") ELSE true END AS held, ",
        claim_commits_async!(),
        "
)"
    ),
    "",
    "",
    concat!(
        "CASE WHEN $15 AND NOT EXISTS (SELECT 1 FROM claimed) THEN pg_advisory_unlock(",
        group_lock_key!(),
        ") END"
    )
);

/// [`group_step!`] with lease rows owned by token `$16` for `$17` seconds: the gate takes
/// the lease (or checks that it is still this session's), every write is fenced by it, the
/// session's live leases with less than two thirds of `$17` left are renewed, and the
/// group's own is deleted when it is released.
///
/// The session's live leases are read once (`owned`, a handful of rows through the owner
/// index, `pgbus.session_leases` of migration 20, whatever the table's size was when the
/// session planned the statement) and the gate, the fence of every settled message and
/// the renewal's check read that copy: the table is a few pages that every session writes at every take and
/// release, and probing it once per settled message (20 share locks a run) queued the
/// sessions behind each other's writes. The fence is as strong as one read of the table:
/// the statement's snapshot is the same. Renewal is rare (not every step: 32 sessions
/// rewriting their rows at every step queued behind each other) and checked first on the
/// copy. A release deletes the row rather than ending it now: an update wrote a new row
/// version and two index entries on those same pages, and left a row that only recovery
/// removed. (The delete finds the row by key with a plan made from the estimates, a
/// sequential scan when the session planned on a small table: once a run, not each step.)
pub(crate) const GROUP_STEP_FENCED: &str = group_step!(
    concat!(
        "taken AS (",
        take_group_lease!("16", "17", "$3"),
        "
), owned AS MATERIALIZED (
    SELECT o.queue, o.group_key, o.expires_at FROM pgbus.session_leases($16) o
), gate AS (
    SELECT CASE WHEN $3 THEN EXISTS (SELECT 1 FROM taken)
                ELSE EXISTS (SELECT 1 FROM owned o WHERE o.queue = $1 AND o.group_key = $2)
           END AS held, ",
        claim_commits_async!(),
        "
)"
    ),
    "
  AND EXISTS (SELECT 1 FROM owned o WHERE o.queue = m.queue AND o.group_key = m.group_key)",
    "
, released AS (
    SELECT $15 AND NOT EXISTS (SELECT 1 FROM claimed) AS released
), given_up AS (
    DELETE FROM pgbus.group_leases g
    WHERE g.queue = $1 AND g.group_key = $2 AND g.owner = $16
      AND (SELECT released FROM released)
), renewed AS (
    UPDATE pgbus.group_leases g
    SET expires_at = now() + make_interval(secs => $17)
    WHERE g.owner = $16 AND g.expires_at > now()
      AND g.expires_at < now() + make_interval(secs => $17 * 2 / 3)
      AND NOT (($3 OR (SELECT released FROM released)) AND g.queue = $1 AND g.group_key = $2)
      AND EXISTS (SELECT 1 FROM owned o
                  WHERE o.expires_at < now() + make_interval(secs => $17 * 2 / 3))
)",
    "(SELECT released FROM released)"
);

/// Whether a live worker holds message `m`'s group, in either lock mode: a granted
/// session advisory lock (advisory mode) or an unexpired lease row (lease mode). Recovery
/// in either mode leaves such groups alone, so workers of both modes may share a queue, as
/// during a rolling switch to a transaction-mode pooler. The statement must read the locks
/// first, as `held_locks` ([`held_locks!`]).
macro_rules! group_held {
    () => {
        "(EXISTS (
          SELECT 1 FROM held_locks l
          WHERE l.classid = hashtext('pgbus:' || m.queue)::oid
            AND l.objid = hashtext(m.group_key)::oid
      ) OR EXISTS (
          SELECT 1 FROM pgbus.group_leases g
          WHERE g.queue = m.queue AND g.group_key = m.group_key AND g.expires_at > now()
      ))"
    };
}

/// The granted advisory locks of this database (see [`group_held!`]), read once per
/// statement: `pg_locks` takes every lock-table partition while it reads them, so read per
/// message (as a correlated subquery is) it stalled every lock taken meanwhile, the group
/// sessions' included, for hundreds of milliseconds a pass.
macro_rules! held_locks {
    () => {
        "held_locks AS MATERIALIZED (
    SELECT l.classid, l.objid
    FROM pg_locks l
    WHERE l.locktype = 'advisory'
      AND l.granted
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND l.objsubid = 2
)"
    };
}

/// Advisory mode: lists the in-flight grouped messages of queues `$3` whose group's lock
/// is gone (its owner died) and frees those among them that are due, the claims
/// `($1[i], $2[i])` (message id, attempt) seen orphaned by an earlier pass for the grace
/// period. A claim taken again meanwhile has another attempt and is left alone. Returns
/// every orphaned claim with whether it was freed.
///
/// The due claims still orphaned (joined once, by hash: a filter per claim was quadratic)
/// are locked in id order ([`current_deliveries!`]), as a failed group session's give-back
/// of the same rows ([`RELEASE`]) and lease-mode recovery ([`RECOVER_LEASED_GROUPS`]) lock
/// them: in the scan's order two of them could deadlock, and a give-back chosen as the
/// victim left its messages to be freed here with their claim's attempt counted.
pub(crate) const RECOVER_GROUPS: &str = concat!(
    "
WITH ",
    held_locks!(),
    ", orphaned AS (
    SELECT m.id, m.attempts
    FROM pgbus.messages m
    WHERE m.queue = ANY ($3)
      AND m.group_key IS NOT NULL
      AND m.lease_until > now()
      AND NOT ",
    group_held!(),
    "
), locked AS (
    SELECT m.id
    FROM ",
    current_deliveries!(
        from "unnest($1::bigint[], $2::int[]) AS l(id, attempt)
          JOIN orphaned o ON o.id = l.id AND o.attempts = l.attempt",
        " AND m.lease_until > now()",
        "",
        "FOR UPDATE OF m"
    ),
    "
), freed AS (
    UPDATE pgbus.messages m
    SET lease_until = NULL
    WHERE m.id = ANY (ARRAY(SELECT id FROM locked))
    RETURNING m.id
)
SELECT o.id, o.attempts, o.id IN (SELECT id FROM freed) AS freed FROM orphaned o"
);

/// Lease mode: renews every live lease this session owns.
pub(crate) const RENEW_GROUP_LEASES: &str = "
UPDATE pgbus.group_leases SET expires_at = now() + make_interval(secs => $2)
WHERE owner = $1 AND expires_at > now()";

pub(crate) const RELEASE_GROUP_LEASE: &str =
    "DELETE FROM pgbus.group_leases WHERE queue = $1 AND group_key = $2 AND owner = $3";

/// Lease mode: frees in-flight grouped messages whose group has no live lease, and drops
/// expired lease rows. The rows are locked in id order first, as the give-back
/// ([`RELEASE`]) and advisory-mode recovery ([`RECOVER_GROUPS`], beside which it runs while
/// a queue's workers switch modes) lock them, so that none of them deadlocks another.
pub(crate) const RECOVER_LEASED_GROUPS: &str = concat!(
    "
WITH ",
    held_locks!(),
    ", locked AS (
    SELECT m.id
    FROM pgbus.messages m
    WHERE m.queue = ANY ($1)
      AND m.group_key IS NOT NULL
      AND m.lease_until > now()
      AND NOT ",
    group_held!(),
    "
    ORDER BY m.id
    FOR UPDATE OF m
), freed AS (
    UPDATE pgbus.messages m
    SET lease_until = NULL
    WHERE m.id = ANY (ARRAY(SELECT id FROM locked))
    RETURNING 1
), expired AS (
    DELETE FROM pgbus.group_leases WHERE queue = ANY ($1) AND expires_at <= now()
)
SELECT count(*) FROM freed"
);

/// Publishes a durable stream event: lock the stream for this transaction, then draw the
/// id, so the stream's ids commit in order; wake its listeners on commit (the channel is
/// `pgbus_stream_<name>`; stream names are valid identifiers).
pub(crate) const PUBLISH_EVENT: &str = "
WITH lock AS (
    SELECT pg_advisory_xact_lock(hashtext('pgbus:stream:' || $1))
), ins AS (
    INSERT INTO pgbus.stream_events (stream, event, data)
    SELECT $1, $2, $3 FROM lock
    RETURNING id
), wake AS (
    SELECT pg_notify('pgbus_stream_' || $1, '') FROM ins
)
SELECT ins.id FROM ins LEFT JOIN wake ON true";

/// Stream notifications go to this channel prefix plus the stream name (a valid
/// identifier: stream names follow the queue-name rule); durable ones carry an empty
/// payload, ephemeral ones the JSON event.
pub(crate) const STREAM_CHANNEL_PREFIX: &str = "pgbus_stream_";

/// `LISTEN` takes no parameters; the name is a validated identifier, quoted anyway.
pub(crate) fn listen_stream(stream: &StreamName) -> String {
    format!("LISTEN \"{STREAM_CHANNEL_PREFIX}{stream}\"")
}

pub(crate) fn unlisten_stream(stream: &StreamName) -> String {
    format!("UNLISTEN \"{STREAM_CHANNEL_PREFIX}{stream}\"")
}

/// The highest id a stream has had, stored or pruned.
pub(crate) const LATEST_EVENT: &str = "
SELECT greatest(
    (SELECT coalesce(max(id), 0) FROM pgbus.stream_events WHERE stream = $1),
    (SELECT coalesce(max(pruned_through), 0) FROM pgbus.streams WHERE name = $1))";

/// An ephemeral broadcast: the notification payload is the whole event.
pub(crate) const BROADCAST_EVENT: &str = "SELECT pg_notify('pgbus_stream_' || $1, $2)";

pub(crate) const READ_EVENTS: &str = "
SELECT id, event, data, published_at
FROM pgbus.stream_events
WHERE stream = $1 AND id > $2
ORDER BY id
LIMIT $3";

pub(crate) const PRUNED_THROUGH: &str =
    "SELECT coalesce((SELECT pruned_through FROM pgbus.streams WHERE name = $1), 0)";

/// Deletes at most `$2` events older than `$1` seconds and records, per stream, the
/// highest id pruned.
pub(crate) const PRUNE_EVENTS: &str = "
WITH doomed AS (
    SELECT id FROM pgbus.stream_events
    WHERE published_at < now() - make_interval(secs => $1)
    ORDER BY id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
), del AS (
    DELETE FROM pgbus.stream_events e USING doomed WHERE e.id = doomed.id
    RETURNING e.stream, e.id
), mark AS (
    INSERT INTO pgbus.streams AS s (name, pruned_through)
    SELECT stream, max(id) FROM del GROUP BY stream
    ON CONFLICT (name) DO UPDATE
    SET pruned_through = GREATEST(s.pruned_through, EXCLUDED.pruned_through)
)
SELECT count(*) FROM del";

// ---------------------------------------------------------------------------------------
// Scheduling and flow control: unique jobs, concurrency and rate limits, circuit breakers,
// recurring jobs, batches. Plain sends and claims above never use these statements.

/// Send of jobs with keys: parameters as [`SEND`], plus `$10` the unique keys, `$11`
/// whether a duplicate of each is refused, `$12` the limit keys. A duplicate key updates the existing row to
/// itself (so the row is locked and returned, even when another transaction committed it
/// while this one waited: a plain `DO NOTHING` would hide it from this statement's
/// snapshot); `xmax = 0` tells inserted rows from existing ones. A refused duplicate
/// raises in `pgbus.duplicate_job`, which aborts the statement: nothing is stored. The
/// caller removes duplicates within the batch first (a statement may not update a row
/// twice). Keyed rows go in key order, so concurrent sends of overlapping keys take their
/// locks in one order and cannot deadlock one another.
pub(crate) const SEND_KEYED: &str = "
WITH ins AS (
    INSERT INTO pgbus.messages AS t (queue, priority, visible_at, content_type, headers,
                                     group_key, payload, unique_key, limit_key)
    SELECT $1, m.priority, coalesce(m.at, now() + make_interval(secs => m.delay)),
           m.content_type, m.headers, m.group_key, m.payload, m.unique_key, m.limit_key
    FROM unnest($2::smallint[], $3::timestamptz[], $4::float8[], $5::text[], $6::jsonb[],
                $7::text[], $8::bytea[], $10::text[], $12::text[])
         WITH ORDINALITY AS m(priority, at, delay, content_type, headers, group_key, payload,
                              unique_key, limit_key, n)
    ORDER BY m.unique_key NULLS FIRST, m.n
    ON CONFLICT (queue, unique_key) WHERE unique_key IS NOT NULL
    DO UPDATE SET unique_key = EXCLUDED.unique_key
    RETURNING t.id, t.visible_at, t.unique_key, t.xmax = 0 AS fresh
), refused AS (
    SELECT pgbus.duplicate_job($1, ins.unique_key, ins.id)
    FROM ins JOIN unnest($10::text[], $11::bool[]) AS r(key, reject) ON r.key = ins.unique_key
    WHERE NOT ins.fresh AND r.reject
), wake AS (
    SELECT pg_notify('pgbus_wakeup', $1)
    WHERE $9 AND EXISTS (SELECT 1 FROM ins WHERE fresh AND visible_at <= now())
)
SELECT ins.id, ins.unique_key, ins.fresh
FROM ins LEFT JOIN wake ON true
WHERE NOT EXISTS (SELECT 1 FROM refused)
ORDER BY ins.id";

/// Claim of jobs with limit keys, as far as the keys' limits allow, leased to process `$4`
/// (see the function in migrations 9 and 17); the columns of [`CLAIM`].
pub(crate) const CLAIM_LIMITED: &str = "
SELECT id, priority, visible_at AS was_visible_at, lease_until, attempts, enqueued_at,
       content_type, headers, group_key, last_error, payload
FROM pgbus.claim_limited($1, $2, $3, $4)";

/// Sets a key's limits; a changed rate starts a new window.
pub(crate) const SET_LIMIT: &str = "
INSERT INTO pgbus.limits AS l (key, concurrency, rate, rate_interval_ms)
VALUES ($1, $2, $3, $4)
ON CONFLICT (key) DO UPDATE
SET concurrency = EXCLUDED.concurrency, rate = EXCLUDED.rate,
    rate_interval_ms = EXCLUDED.rate_interval_ms,
    window_start = CASE WHEN (l.rate, l.rate_interval_ms)
                             IS NOT DISTINCT FROM (EXCLUDED.rate, EXCLUDED.rate_interval_ms)
                        THEN l.window_start ELSE now() END,
    window_count = CASE WHEN (l.rate, l.rate_interval_ms)
                             IS NOT DISTINCT FROM (EXCLUDED.rate, EXCLUDED.rate_interval_ms)
                        THEN l.window_count ELSE 0 END";

pub(crate) const REMOVE_LIMIT: &str = "DELETE FROM pgbus.limits WHERE key = $1";

pub(crate) const LIST_LIMITS: &str =
    "SELECT key, concurrency, rate, rate_interval_ms FROM pgbus.limits ORDER BY key";

/// Opens a queue's circuit breaker for `$2` seconds (never shortening an open one).
pub(crate) const TRIP_BREAKER: &str = "
UPDATE pgbus.queues
SET breaker_until = greatest(breaker_until, now() + make_interval(secs => $2))
WHERE name = $1";

/// The scheduler lease's row name.
pub(crate) const SCHEDULER_LEASE_NAME: &str = "pgbus:scheduler";

pub(crate) const NEW_TOKEN: &str = "SELECT gen_random_uuid()::text";

/// Takes or renews the scheduler lease (`$1` the lease row, `$2` our token, `$3` seconds)
/// when it is free, expired or already ours; returns the database clock when we lead.
pub(crate) const TRY_LEAD: &str = "
INSERT INTO pgbus.scheduler_lease AS l (name, owner, expires_at)
VALUES ($1, $2, now() + make_interval(secs => $3))
ON CONFLICT (name) DO UPDATE
SET owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at
WHERE l.expires_at <= now() OR l.owner = EXCLUDED.owner
RETURNING now()";

pub(crate) const RESIGN: &str = "DELETE FROM pgbus.scheduler_lease WHERE name = $1 AND owner = $2";

/// Declares a task (its definition may change); returns the time after which its
/// occurrences are due: the latest enqueued, or when it was first declared.
pub(crate) const DECLARE_TASK: &str = "
INSERT INTO pgbus.schedules AS s (task, queue, schedule, missed)
VALUES ($1, $2, $3, $4)
ON CONFLICT (task) DO UPDATE
SET queue = EXCLUDED.queue, schedule = EXCLUDED.schedule, missed = EXCLUDED.missed,
    updated_at = now()
RETURNING coalesce(s.last_at, s.first_seen_at)";

/// Records occurrences of task `$1`; returns those not recorded before.
pub(crate) const RECORD_RUNS: &str = "
INSERT INTO pgbus.schedule_runs (task, scheduled_at)
SELECT $1, unnest($2::timestamptz[])
ON CONFLICT (task, scheduled_at) DO NOTHING
RETURNING scheduled_at";

/// Moves task `$1`'s cursor forward to `$2`, the latest occurrence enqueued (never back;
/// NULL when none was: `greatest` ignores NULLs, so a task that never ran keeps a NULL
/// `last_at`) and records its next run `$3`.
pub(crate) const ADVANCE_TASK: &str = "
UPDATE pgbus.schedules
SET last_at = greatest(last_at, $2), next_at = $3
WHERE task = $1";

/// Deletes at most `$2` occurrence records older than `$1` seconds, never a task's latest.
pub(crate) const PRUNE_RUNS: &str = "
WITH doomed AS (
    SELECT r.task, r.scheduled_at
    FROM pgbus.schedule_runs r JOIN pgbus.schedules s ON s.task = r.task
    WHERE r.scheduled_at < now() - make_interval(secs => $1)
      AND r.scheduled_at < s.last_at
    LIMIT $2
)
DELETE FROM pgbus.schedule_runs r USING doomed
WHERE r.task = doomed.task AND r.scheduled_at = doomed.scheduled_at";

pub(crate) const LIST_SCHEDULES: &str = "
SELECT task, queue, schedule, missed, last_at, next_at, updated_at
FROM pgbus.schedules
ORDER BY task";

pub(crate) const CREATE_BATCH: &str =
    "INSERT INTO pgbus.batches (queue, total, pending) VALUES ($1, $2, $2) RETURNING id";

/// A batch's callbacks: `$1` the batch, then one array per column.
pub(crate) const ADD_BATCH_CALLBACKS: &str = "
INSERT INTO pgbus.batch_callbacks (batch_id, kind, queue, priority, content_type, headers,
                                   payload)
SELECT $1, c.kind, c.queue, c.priority, c.content_type, c.headers, c.payload
FROM unnest($2::text[], $3::text[], $4::smallint[], $5::text[], $6::jsonb[], $7::bytea[])
     AS c(kind, queue, priority, content_type, headers, payload)";

/// Marks just-sent messages `$2` (in the same transaction, so no worker saw them) as jobs
/// of batch `$1`; `batch_id` is unindexed, so this is a HOT update.
pub(crate) const JOIN_BATCH: &str =
    "UPDATE pgbus.messages SET batch_id = $1 WHERE id = ANY ($2::bigint[])";

pub(crate) const BATCH_INFO: &str = "
SELECT id, queue, total, pending, dead_lettered, created_at, finished_at
FROM pgbus.batches WHERE id = $1";

pub(crate) const OPEN_BATCHES: &str = "
SELECT id, queue, total, pending, dead_lettered, created_at, finished_at
FROM pgbus.batches WHERE finished_at IS NULL ORDER BY id";

// Event bus: topics, the event log, idempotent consumers, the outbox (migration 0007).
// ---------------------------------------------------------------------------------------

/// The lock publishers share and a bind takes exclusively ("pgbustop" in ASCII); the same
/// constant is in `pgbus.publish` (migration 0007).
pub(crate) const TOPICS_LOCK_KEY: i64 = 0x7067_6275_7374_6f70;

pub(crate) const LOCK_TOPICS: &str = "SELECT pg_advisory_xact_lock($1)";

/// Fans each event out to the queues with a matching binding and logs it, in one
/// statement (see `pgbus.publish`); one row per event, in input order.
pub(crate) const PUBLISH: &str =
    "SELECT n, copies FROM pgbus.publish($1::text[]::uuid[], $2, $3, $4, $5, $6)";

pub(crate) const INSERT_BINDING: &str = "
INSERT INTO pgbus.topic_bindings (pattern, queue) VALUES ($1, $2)
ON CONFLICT (pattern, queue) DO NOTHING";

/// Copies the logged events matching pattern `$1` published since `$3` (all when NULL)
/// into queue `$2`, in publish order, and wakes its workers.
pub(crate) const REPLAY_EVENTS: &str = "
WITH ins AS (
    INSERT INTO pgbus.messages (queue, visible_at, content_type, headers, payload)
    SELECT $2, now(), e.content_type, e.headers, e.payload
    FROM pgbus.events e
    WHERE ('.' || e.routing_key) ~ pgbus.topic_regex($1)
      AND ($3::timestamptz IS NULL OR e.published_at >= $3)
    ORDER BY e.seq
    RETURNING 1
), wake AS (
    SELECT pg_notify('pgbus_wakeup', $2) WHERE EXISTS (SELECT 1 FROM ins)
)
SELECT (SELECT count(*) FROM ins), (SELECT count(*) FROM wake)";

pub(crate) const DELETE_BINDING: &str =
    "DELETE FROM pgbus.topic_bindings WHERE pattern = $1 AND queue = $2";

pub(crate) const LIST_BINDINGS: &str =
    "SELECT pattern, queue, created_at FROM pgbus.topic_bindings ORDER BY pattern, queue";

pub(crate) const TOPIC_STATS: &str = "
SELECT routing_key, count(*), count(*) FILTER (WHERE copies = 0), sum(copies)::bigint,
       max(published_at)
FROM pgbus.events
GROUP BY routing_key
ORDER BY routing_key";

/// Deletes at most `$2` rows of `$table` whose `$time` is older than `$1` seconds, oldest
/// key first, skipping rows locked elsewhere.
macro_rules! prune_older {
    ($table:literal, $key:literal, $time:literal) => {
        concat!(
            "
WITH doomed AS (
    SELECT ",
            $key,
            " FROM ",
            $table,
            "
    WHERE ",
            $time,
            " < now() - make_interval(secs => $1)
    ORDER BY ",
            $key,
            "
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
DELETE FROM ",
            $table,
            " t USING doomed WHERE t.",
            $key,
            " = doomed.",
            $key
        )
    };
}

pub(crate) const PRUNE_EVENT_LOG: &str = prune_older!("pgbus.events", "seq", "published_at");

/// Adds per-queue counts (`$1` queues, `$2` processed, `$3` failed) to each queue's current
/// bucket (`$4` seconds wide, aligned on the epoch). Counts of queues that no longer exist
/// are dropped; a queue named twice is summed first (one row may be updated only once).
pub(crate) const RECORD_THROUGHPUT: &str = "
INSERT INTO pgbus.throughput AS t (queue, bucket, processed, failed)
SELECT c.queue, to_timestamp(floor(extract(epoch FROM now())::float8 / $4) * $4),
       sum(c.processed)::bigint, sum(c.failed)::bigint
FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS c(queue, processed, failed)
JOIN pgbus.queues q ON q.name = c.queue
GROUP BY c.queue
ON CONFLICT (queue, bucket) DO UPDATE
SET processed = t.processed + EXCLUDED.processed, failed = t.failed + EXCLUDED.failed";

/// Throughput buckets past retention. The table's key is two columns, so a batch is
/// picked by row address (`ctid`), which holds it to `$2` rows.
pub(crate) const PRUNE_THROUGHPUT: &str = prune_older!("pgbus.throughput", "ctid", "bucket");

/// Throughput buckets that started less than `$1` seconds ago, oldest first.
pub(crate) const THROUGHPUT_HISTORY: &str = "
SELECT queue, bucket, processed, failed
FROM pgbus.throughput
WHERE bucket > now() - make_interval(secs => $1)
ORDER BY bucket, queue";

/// Claims the dedup record of (`$1` subscriber, `$2` event) for the delivery (`$3` message,
/// `$4` attempt): a new record, or one left `claimed` by this message's earlier attempt or by
/// a delivery whose lease is gone. Answers `run`, `done` (completed already) or `busy`
/// (another live delivery holds it; also when that one committed after this statement's
/// snapshot, so no row is returned: the caller reads no row as busy).
pub(crate) const CLAIM_EVENT: &str = "
WITH claim AS (
    INSERT INTO pgbus.event_dedup AS d (subscriber, event_id, state, message_id, attempt)
    VALUES ($1, $2::text::uuid, 'claimed', $3, $4)
    ON CONFLICT (subscriber, event_id) DO UPDATE
    SET message_id = EXCLUDED.message_id, attempt = EXCLUDED.attempt, updated_at = now()
    WHERE d.state = 'claimed'
      AND (d.message_id = EXCLUDED.message_id
           OR NOT EXISTS (
               SELECT 1 FROM pgbus.messages m
               WHERE m.id = d.message_id AND m.attempts = d.attempt AND m.lease_until > now()))
    RETURNING 'run'::text AS verdict
)
SELECT verdict FROM claim
UNION ALL
SELECT CASE d.state WHEN 'completed' THEN 'done' ELSE 'busy' END
FROM pgbus.event_dedup d
WHERE d.subscriber = $1 AND d.event_id = $2::text::uuid AND NOT EXISTS (SELECT 1 FROM claim)";

/// Completes the record, only for the delivery holding the claim.
pub(crate) const COMPLETE_EVENT: &str = "
UPDATE pgbus.event_dedup SET state = 'completed', updated_at = now()
WHERE subscriber = $1 AND event_id = $2::text::uuid AND message_id = $3 AND attempt = $4";

pub(crate) const PRUNE_DEDUP: &str = "
WITH doomed AS (
    SELECT subscriber, event_id FROM pgbus.event_dedup
    WHERE updated_at < now() - make_interval(secs => $1)
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
DELETE FROM pgbus.event_dedup d USING doomed
WHERE d.subscriber = doomed.subscriber AND d.event_id = doomed.event_id";

/// The channel the outbox's insert trigger notifies (migration 0007).
pub(crate) const LISTEN_OUTBOX: &str = "LISTEN pgbus_outbox";

/// Takes the oldest pending outbox rows, locked until the relay's transaction ends; rows
/// another relay holds are skipped.
pub(crate) const CLAIM_OUTBOX: &str = "
SELECT id, event_id::text, routing_key, content_type, headers, payload
FROM pgbus.outbox
WHERE published_at IS NULL AND error IS NULL
ORDER BY id
LIMIT $1
FOR UPDATE SKIP LOCKED";

pub(crate) const MARK_OUTBOX_PUBLISHED: &str =
    "UPDATE pgbus.outbox SET published_at = now() WHERE id = ANY ($1)";

pub(crate) const MARK_OUTBOX_FAILED: &str = "
UPDATE pgbus.outbox o SET error = f.error
FROM unnest($1::bigint[], $2::text[]) AS f(id, error)
WHERE o.id = f.id";

/// Writes outbox rows (on the producer's connection or transaction).
pub(crate) const WRITE_OUTBOX: &str = "
INSERT INTO pgbus.outbox (event_id, routing_key, content_type, headers, payload)
SELECT e.id::uuid, e.key, e.content_type, e.headers, e.payload
FROM unnest($1::text[], $2::text[], $3::text[], $4::jsonb[], $5::bytea[])
     WITH ORDINALITY AS e(id, key, content_type, headers, payload, n)
ORDER BY e.n";

/// Published rows only: pending ones have no `published_at`.
pub(crate) const PRUNE_OUTBOX: &str = prune_older!("pgbus.outbox", "id", "published_at");

pub(crate) const OUTBOX_PENDING: &str =
    "SELECT count(*) FROM pgbus.outbox WHERE published_at IS NULL AND error IS NULL";

/// Grouped messages running now, for the dashboard: one row per in-flight group, its
/// oldest leased message (a group's session leases a run of several).
pub(crate) const GROUPS_IN_FLIGHT: &str = "
SELECT DISTINCT ON (queue, group_key) queue, group_key, id, attempts, lease_until
FROM pgbus.messages
WHERE group_key IS NOT NULL AND lease_until > now()
ORDER BY queue, group_key, id
LIMIT $1";
