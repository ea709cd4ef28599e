-- pgbus schema, version 16: producers in SQL. `pgbus.send` and `pgbus.send_batch` let any
-- client, a migration or a trigger enqueue jobs with one statement, exactly as the Rust
-- `send` does (docs/sql.md): the same checks with the same error texts, the same columns,
-- JSON payloads (so typed Rust handlers decode them), unique and limit keys, and one
-- wake-up per statement, delivered on commit. A paused queue takes sends as it does from
-- Rust and hands nothing out until resumed. Every option left NULL means "not given".
--
-- The bounds are pgbus_core's: MAX_DELAY (100 years of 365.25 days),
-- DEFAULT_MAX_PAYLOAD_BYTES (1 MiB; the Rust backend's limit can be raised, this one is
-- fixed), MAX_GROUP_KEY_LEN (255 bytes, also for unique and limit keys) and the queue name
-- rule of QueueName::new. tests/tests/sql_send_pg.rs compares every refusal's text with the
-- Rust error's.
--
-- SQLSTATEs: 22023 (invalid_parameter_value) for a refused argument, 54000
-- (program_limit_exceeded) for a payload over the limit, 42704 (undefined_object) for a
-- queue that does not exist.
CREATE FUNCTION pgbus.send_batch(
    queue       text,
    payloads    jsonb[],
    delay       interval    DEFAULT NULL,
    run_at      timestamptz DEFAULT NULL,
    priority    integer     DEFAULT 0,
    group_key   text        DEFAULT NULL,
    unique_key  text        DEFAULT NULL,
    headers     jsonb       DEFAULT NULL,
    traceparent text        DEFAULT NULL,
    limit_key   text        DEFAULT NULL
) RETURNS SETOF bigint
LANGUAGE plpgsql VOLATILE AS $$
-- The arguments share names with the columns: statements name the arguments as
-- send_batch.<name>, and a bare name is the column.
#variable_conflict use_column
DECLARE
    max_delay_secs    constant bigint  := 3155760000;
    max_payload_bytes constant integer := 1048576;
    max_key_bytes     constant integer := 255;
    name_rule  text;
    secs       numeric;
    visible    timestamptz := now();
    hdrs       jsonb := coalesce(send_batch.headers, '{}');
    bad_header record;
    bodies     bytea[];
    too_big    integer;
    repeats    integer := 1;
BEGIN
    -- The queue name, as QueueName::new.
    IF send_batch.queue IS NULL THEN
        RAISE EXCEPTION 'invalid argument: the queue name is NULL' USING ERRCODE = '22023';
    END IF;
    name_rule := CASE
        WHEN send_batch.queue = '' THEN 'must not be empty'
        WHEN octet_length(send_batch.queue) > 48 THEN 'must be at most 48 bytes long'
        WHEN send_batch.queue !~ '^[a-z]' THEN 'must start with a lowercase letter a-z'
        WHEN send_batch.queue !~ '^[a-z0-9_]*$' THEN 'may contain only [a-z0-9_]'
    END;
    IF name_rule IS NOT NULL THEN
        -- The name quoted as Rust's {:?} quotes it.
        RAISE EXCEPTION 'invalid queue name "%": a queue name % (lowercase [a-z0-9_], starting with a letter, at most 48 bytes)',
            replace(replace(replace(replace(replace(send_batch.queue,
                '\', '\\'), '"', '\"'), E'\n', '\n'), E'\r', '\r'), E'\t', '\t'),
            name_rule
            USING ERRCODE = '22023';
    END IF;

    -- Then each message, as NewMessage::check: visibility, headers, keys, payloads.
    IF send_batch.delay IS NOT NULL AND send_batch.run_at IS NOT NULL THEN
        RAISE EXCEPTION 'invalid argument: give a delay or a run_at time, not both'
            USING ERRCODE = '22023';
    END IF;
    IF send_batch.delay IS NOT NULL THEN
        secs := extract(epoch FROM send_batch.delay);
        IF secs < 0 THEN
            RAISE EXCEPTION 'invalid argument: a delay must not be negative (got %)',
                send_batch.delay USING ERRCODE = '22023';
        END IF;
        IF secs > max_delay_secs THEN
            RAISE EXCEPTION 'invalid argument: a delay of % s is longer than the limit of % s (100 years)',
                trunc(secs), max_delay_secs USING ERRCODE = '22023';
        END IF;
        visible := now() + send_batch.delay;
    ELSIF send_batch.run_at IS NOT NULL THEN
        IF send_batch.run_at < '1970-01-01 00:00:00+00' THEN
            RAISE EXCEPTION 'invalid argument: a scheduled time before 1970-01-01 is refused'
                USING ERRCODE = '22023';
        END IF;
        IF NOT isfinite(send_batch.run_at) THEN
            RAISE EXCEPTION 'invalid argument: a scheduled time of infinity is refused'
                USING ERRCODE = '22023';
        END IF;
        secs := extract(epoch FROM send_batch.run_at) - extract(epoch FROM now());
        IF secs > max_delay_secs THEN
            RAISE EXCEPTION 'invalid argument: a scheduled time ahead of % s is longer than the limit of % s (100 years)',
                trunc(secs), max_delay_secs USING ERRCODE = '22023';
        END IF;
        visible := send_batch.run_at;
    END IF;
    IF send_batch.priority IS NOT NULL AND send_batch.priority NOT BETWEEN -32768 AND 32767 THEN
        RAISE EXCEPTION 'invalid argument: a priority must be from -32768 to 32767 (got %)',
            send_batch.priority USING ERRCODE = '22023';
    END IF;

    -- Headers are string pairs (pgbus_core::Headers): a worker reads them back as such.
    IF jsonb_typeof(hdrs) <> 'object' THEN
        RAISE EXCEPTION 'invalid argument: headers must be a JSON object of string values, not a JSON %',
            jsonb_typeof(hdrs) USING ERRCODE = '22023';
    END IF;
    SELECT h.key, jsonb_typeof(h.value) AS kind INTO bad_header
    FROM jsonb_each(hdrs) AS h
    WHERE jsonb_typeof(h.value) <> 'string'
    ORDER BY h.key
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'invalid argument: header % must be a JSON string, not a JSON %',
            to_jsonb(bad_header.key), bad_header.kind USING ERRCODE = '22023';
    END IF;
    -- W3C trace context, checked for its shape only: version 00, trace id, parent id, flags.
    IF send_batch.traceparent IS NOT NULL THEN
        IF send_batch.traceparent !~ '^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$' THEN
            RAISE EXCEPTION 'invalid argument: traceparent % is not a W3C trace context (00-<32 hex>-<16 hex>-<2 hex>, lowercase)',
                to_jsonb(send_batch.traceparent) USING ERRCODE = '22023';
        END IF;
        IF hdrs ->> 'traceparent' <> send_batch.traceparent THEN
            RAISE EXCEPTION 'invalid argument: the traceparent argument and the traceparent header differ'
                USING ERRCODE = '22023';
        END IF;
        hdrs := hdrs || jsonb_build_object('traceparent', send_batch.traceparent);
    END IF;

    IF octet_length(send_batch.unique_key) NOT BETWEEN 1 AND max_key_bytes THEN
        RAISE EXCEPTION 'invalid argument: a unique key must be 1 to % bytes long', max_key_bytes
            USING ERRCODE = '22023';
    END IF;
    IF octet_length(send_batch.limit_key) NOT BETWEEN 1 AND max_key_bytes THEN
        RAISE EXCEPTION 'invalid argument: a limit key must be 1 to % bytes long', max_key_bytes
            USING ERRCODE = '22023';
    END IF;
    IF send_batch.limit_key IS NOT NULL AND send_batch.group_key IS NOT NULL THEN
        RAISE EXCEPTION 'invalid argument: a job cannot have both a group key and a limit key'
            USING ERRCODE = '22023';
    END IF;

    IF send_batch.payloads IS NULL OR array_position(send_batch.payloads, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'invalid argument: a payload is NULL (JSON null is ''null''::jsonb)'
            USING ERRCODE = '22023';
    END IF;
    -- Stored as the UTF-8 text of the JSON, whatever the database encoding.
    SELECT coalesce(array_agg(convert_to(p.payload::text, 'UTF8') ORDER BY p.n), '{}')
    INTO bodies
    FROM unnest(send_batch.payloads) WITH ORDINALITY AS p(payload, n);
    SELECT octet_length(b.body) INTO too_big
    FROM unnest(bodies) AS b(body)
    WHERE octet_length(b.body) > max_payload_bytes
    LIMIT 1;
    IF too_big IS NOT NULL THEN
        RAISE EXCEPTION 'payload of % bytes exceeds the limit of % bytes', too_big, max_payload_bytes
            USING ERRCODE = '54000';
    END IF;

    IF send_batch.group_key = '' THEN
        RAISE EXCEPTION 'invalid group key: must not be empty' USING ERRCODE = '22023';
    END IF;
    IF octet_length(send_batch.group_key) > max_key_bytes THEN
        RAISE EXCEPTION 'invalid group key: must be at most 255 bytes long' USING ERRCODE = '22023';
    END IF;

    -- Checked even for an empty batch, so a misspelt queue shows at once.
    IF NOT EXISTS (SELECT 1 FROM pgbus.queues q WHERE q.name = send_batch.queue) THEN
        RAISE EXCEPTION 'queue % does not exist', send_batch.queue USING ERRCODE = '42704';
    END IF;
    IF cardinality(bodies) = 0 THEN
        RETURN;
    END IF;
    -- One job per unique key, as a Rust batch: the repeats of the key get the first's id
    -- (a statement may not update a row twice).
    IF send_batch.unique_key IS NOT NULL THEN
        repeats := cardinality(bodies);
        bodies := bodies[1:1];
    END IF;

    -- As the Rust keyed send: a duplicate key updates the existing row to itself, so the
    -- row is locked and returned even when another transaction committed it meanwhile;
    -- `xmax = 0` tells new rows from existing ones. One notification per statement, when
    -- a new job is visible now.
    RETURN QUERY
    WITH ins AS (
        INSERT INTO pgbus.messages AS t (queue, priority, visible_at, content_type, headers,
                                         group_key, payload, unique_key, limit_key)
        SELECT send_batch.queue, coalesce(send_batch.priority, 0), visible, 'application/json',
               hdrs, send_batch.group_key, b.body, send_batch.unique_key, send_batch.limit_key
        FROM unnest(bodies) WITH ORDINALITY AS b(body, n)
        ORDER BY b.n
        ON CONFLICT (queue, unique_key) WHERE unique_key IS NOT NULL
        DO UPDATE SET unique_key = EXCLUDED.unique_key
        RETURNING t.id, t.visible_at, t.xmax = 0 AS fresh
    ), wake AS (
        SELECT pg_notify('pgbus_wakeup', send_batch.queue)
        WHERE EXISTS (SELECT 1 FROM ins WHERE ins.fresh AND ins.visible_at <= now())
    )
    SELECT ins.id
    FROM ins LEFT JOIN wake ON true CROSS JOIN generate_series(1, repeats)
    ORDER BY ins.id;
END
$$;

-- One message: `pgbus.send_batch` with a one-element batch.
CREATE FUNCTION pgbus.send(
    queue       text,
    payload     jsonb,
    delay       interval    DEFAULT NULL,
    run_at      timestamptz DEFAULT NULL,
    priority    integer     DEFAULT 0,
    group_key   text        DEFAULT NULL,
    unique_key  text        DEFAULT NULL,
    headers     jsonb       DEFAULT NULL,
    traceparent text        DEFAULT NULL,
    limit_key   text        DEFAULT NULL
) RETURNS bigint
LANGUAGE sql VOLATILE AS $$
    SELECT pgbus.send_batch($1, ARRAY[$2], $3, $4, $5, $6, $7, $8, $9, $10)
$$;
