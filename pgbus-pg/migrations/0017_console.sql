-- pgbus schema, version 17: the operator's console. Each message keeps the history of its
-- failed attempts (the last 10: attempt, error, time), carried to the dead letters, back
-- by a retry, and into the archive; the process whose worker holds a lease is recorded
-- with it; every console action is written to an audit log. The indexes serve the
-- console's listings (keyset pages by id per queue and state), so no page scans a table.

-- `[{"attempt": 3, "error": "...", "at": "2026-12-06T22:00:00Z"}, ...]`, oldest first,
-- at most 10 entries (appended by nack and dead-letter, trimmed in the same statement).
ALTER TABLE pgbus.messages ADD COLUMN errors jsonb;
ALTER TABLE pgbus.dead_letters ADD COLUMN errors jsonb;
ALTER TABLE pgbus.archive ADD COLUMN errors jsonb;

-- `errors` (an attempt history, or NULL) with one more entry, `{"attempt": attempt,
-- "error": error, "at": now}` (the time as RFC 3339 text in UTC, to the millisecond),
-- keeping the last 10 entries, oldest first. The entry keeps the first 4096 characters of
-- the text: the whole text stays in `last_error` (and a dead letter's `error`), and ten
-- copies of a long stderr would bloat the hot table's rows. The one definition of an entry
-- that the worker's nack and dead-letter and the console's dead-letter all append. A
-- single-expression SQL function, so the planner inlines it into the calling statement:
-- no call overhead, no extra round trip.
CREATE FUNCTION pgbus.append_error(errors jsonb, attempt int, error text) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT jsonb_path_query_array(
        coalesce(errors, '[]') || jsonb_build_array(jsonb_build_object(
            'attempt', attempt,
            'error', left(error, 4096),
            'at', to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.MS"Z"'))),
        '$[last - 9 to last]')
$$;

-- The registered process (`pgbus.processes.id`) whose worker claimed the current lease;
-- meaningful only while `lease_until` is in the future. Not indexed, so a claim that sets
-- it stays a HOT update.
ALTER TABLE pgbus.messages ADD COLUMN leased_by bigint;

-- Keyset pages of one queue's messages by id, newest or oldest first (every state of the
-- hot table: ready, scheduled and in flight are filters on the rows of this scan).
--
-- The `(queue, id)` indexes hold every row, but their predicate `id > 0` (true of every
-- id) is stated only by the console's queries: no other statement can be planned on them.
-- A claim's generic plan once was (after autovacuum analyzed a table of dead rows only,
-- under a pinned xmin), reading the queue's whole backlog and sorting it for each claim.
CREATE INDEX messages_queue_id_idx ON pgbus.messages (queue, id) WHERE id > 0;
-- Dead letters newest or oldest first by id, and by group.
CREATE INDEX dead_letters_queue_id_idx ON pgbus.dead_letters (queue, id) WHERE id > 0;
CREATE INDEX dead_letters_group_idx ON pgbus.dead_letters (queue, group_key, id)
    WHERE group_key IS NOT NULL;
-- The archive of a queue by id (the pruner keeps using `archive_queue_acked_idx`).
CREATE INDEX archive_queue_id_idx ON pgbus.archive (queue, id) WHERE id > 0;

-- What operators did through the console, its API and `pgbus job`: who (a token's name,
-- `loopback`, or `cli:<user>`), what, on which queue, to how many jobs, and the selection
-- (ids, or the filter with its bound).
CREATE TABLE pgbus.audit_log (
    id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT now(),
    actor   text NOT NULL,
    action  text NOT NULL,
    queue   text,
    count   bigint NOT NULL,
    detail  jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_queue_idx ON pgbus.audit_log (queue, id);

-- The limited claim records its lease holder like the plain and group claims: the same
-- function as in migration 9 with one more argument, `holder` (the claiming worker's
-- `pgbus.processes.id`; it defaults to NULL, so a worker of the previous version calling
-- it with three arguments keeps working during a rolling upgrade). A changed argument list
-- is a new function, hence the drop.
DROP FUNCTION pgbus.claim_limited(text, bigint, float8);
CREATE FUNCTION pgbus.claim_limited(queue_name text, max_jobs bigint, lease_secs float8,
                                    holder bigint DEFAULT NULL)
RETURNS SETOF pgbus.messages
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    k     text;
    lim   pgbus.limits;
    room  bigint;
    taken bigint;
    left_to_take bigint := max_jobs;
BEGIN
    IF pgbus.queue_closed(queue_name) THEN
        RETURN;
    END IF;
    FOR k IN
        -- The queue's keys by a skip scan (one index probe per key, however many jobs
        -- wait), then each key's most urgent ready job.
        WITH RECURSIVE keys AS (
            (SELECT limit_key FROM pgbus.messages
             WHERE queue = queue_name AND limit_key IS NOT NULL
             ORDER BY limit_key LIMIT 1)
            UNION ALL
            SELECT (SELECT m.limit_key FROM pgbus.messages m
                    WHERE m.queue = queue_name AND m.limit_key > keys.limit_key
                    ORDER BY m.limit_key LIMIT 1)
            FROM keys WHERE keys.limit_key IS NOT NULL
        )
        SELECT keys.limit_key
        FROM keys
        CROSS JOIN LATERAL (
            SELECT m.priority, m.visible_at, m.id FROM pgbus.messages m
            WHERE m.queue = queue_name AND m.limit_key = keys.limit_key
              AND m.visible_at <= now() AND (m.lease_until IS NULL OR m.lease_until <= now())
            ORDER BY m.priority DESC, m.visible_at, m.id
            LIMIT 1
        ) head
        ORDER BY head.priority DESC, head.visible_at, head.id
    LOOP
        EXIT WHEN left_to_take <= 0;
        room := left_to_take;
        SELECT * INTO lim FROM pgbus.limits WHERE key = k FOR UPDATE SKIP LOCKED;
        IF NOT FOUND THEN
            -- Another claimer has the key's turn.
            CONTINUE WHEN EXISTS (SELECT 1 FROM pgbus.limits WHERE key = k);
            -- A while-running unique key: one at a time, its turn taken by a lock on the
            -- key alone (it has no limits row).
            IF k LIKE 'unique:%' THEN
                CONTINUE WHEN NOT pg_try_advisory_xact_lock(hashtext('pgbus:limit:' || k));
                room := least(room, 1 - pgbus.running(k, 1));
            END IF;
        ELSE
            IF lim.concurrency IS NOT NULL THEN
                room := least(room, lim.concurrency - pgbus.running(k, lim.concurrency));
            END IF;
            IF lim.rate IS NOT NULL THEN
                IF lim.window_start + lim.rate_interval_ms * interval '1 millisecond' <= now() THEN
                    lim.window_start := now();
                    lim.window_count := 0;
                END IF;
                room := least(room, lim.rate - lim.window_count);
            END IF;
        END IF;
        CONTINUE WHEN room <= 0;
        RETURN QUERY
        WITH picked AS (
            SELECT id FROM pgbus.messages
            WHERE queue = queue_name AND limit_key = k
              AND visible_at <= now() AND (lease_until IS NULL OR lease_until <= now())
            ORDER BY priority DESC, visible_at, id
            LIMIT room
            FOR UPDATE SKIP LOCKED
        )
        UPDATE pgbus.messages m
        SET lease_until = now() + make_interval(secs => lease_secs),
            attempts = m.attempts + 1,
            leased_by = holder
        FROM picked
        WHERE m.id = picked.id
        RETURNING m.*;
        GET DIAGNOSTICS taken = ROW_COUNT;
        left_to_take := left_to_take - taken;
        IF lim.rate IS NOT NULL AND taken > 0 THEN
            UPDATE pgbus.limits
            SET window_start = lim.window_start, window_count = lim.window_count + taken
            WHERE key = k;
        END IF;
    END LOOP;
END
$$;
ALTER FUNCTION pgbus.claim_limited(text, bigint, float8, bigint) SET plan_cache_mode = auto;
