-- pgbus schema, version 9: concurrency and rate limits per key. Jobs with a limit key are
-- left out of the plain claim (by its index's predicate, as grouped jobs are) and claimed
-- by `pgbus.claim_limited`, which takes each key's turn under a row lock on its limits.
-- Running jobs are counted by their live leases: a crashed worker's slots free themselves
-- when its leases run out. Claims never change `limit_key`, so they stay HOT updates.

ALTER TABLE pgbus.messages ADD COLUMN limit_key text;
ALTER TABLE pgbus.dead_letters ADD COLUMN limit_key text;

DROP INDEX pgbus.messages_claim_idx;
CREATE INDEX messages_claim_idx ON pgbus.messages (queue, priority DESC, visible_at, id)
    WHERE group_key IS NULL AND limit_key IS NULL;
-- Serves the limited claim: the distinct keys of a queue (a skip scan), each key's most
-- urgent ready job, and its jobs in claim order.
CREATE INDEX messages_limited_idx
    ON pgbus.messages (queue, limit_key, priority DESC, visible_at, id)
    WHERE limit_key IS NOT NULL;
-- Serves the running count of a key, across queues.
CREATE INDEX messages_limit_key_idx ON pgbus.messages (limit_key)
    WHERE limit_key IS NOT NULL;

CREATE TABLE pgbus.limits (
    key              text PRIMARY KEY,
    concurrency      integer CHECK (concurrency > 0),
    rate             integer CHECK (rate > 0),
    rate_interval_ms bigint CHECK (rate_interval_ms > 0),
    -- The current fixed rate window: when it started and how many jobs started in it.
    window_start     timestamptz NOT NULL DEFAULT now(),
    window_count     integer NOT NULL DEFAULT 0,
    CHECK (concurrency IS NOT NULL OR rate IS NOT NULL),
    CHECK ((rate IS NULL) = (rate_interval_ms IS NULL))
);

-- Whether a queue hands out nothing now (paused; missing queues too).
CREATE FUNCTION pgbus.queue_closed(queue_name text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT paused FROM pgbus.queues WHERE name = queue_name), true)
$$;

-- Jobs of `key` running now (live leases), counted up to `enough`.
CREATE FUNCTION pgbus.running(key text, enough integer) RETURNS bigint
LANGUAGE sql VOLATILE AS $$
    SELECT count(*) FROM (
        SELECT 1 FROM pgbus.messages
        WHERE limit_key = key AND lease_until > now()
        LIMIT enough
    ) running
$$;

-- Claims up to `max_jobs` ready jobs with limit keys from `queue_name`, key by key (the key
-- with the most urgent job first). A key whose limits row another claimer holds is
-- skipped (SKIP LOCKED: claimers never wait). A plpgsql function because each statement
-- below takes a fresh snapshot in READ COMMITTED: the running count read after the lock
-- sees every claim committed by the lock's previous holder, which one statement (whose
-- snapshot predates the lock) would miss.
CREATE FUNCTION pgbus.claim_limited(queue_name text, max_jobs bigint, lease_secs float8)
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
            attempts = m.attempts + 1
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

-- A finished limited job frees a slot of its key: wake the queue's workers in every
-- process (on commit), so a job waiting for that slot starts at once rather than at the
-- next poll. Plain jobs skip the trigger in its WHEN clause.
CREATE FUNCTION pgbus.limited_job_done() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('pgbus_wakeup', OLD.queue);
    RETURN NULL;
END
$$;

CREATE TRIGGER messages_limited_done AFTER DELETE ON pgbus.messages
    FOR EACH ROW WHEN (OLD.limit_key IS NOT NULL) EXECUTE FUNCTION pgbus.limited_job_done();
