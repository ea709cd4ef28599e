-- pgbus schema, version 7: the event bus. Topic bindings (a routing-key pattern to a
-- queue), the event log (every publish, for subscriptions created later with a start
-- position, and for per-topic counts), the dedup records of idempotent consumers, and the
-- transactional outbox.

-- A pattern as an anchored POSIX regular expression over '.' || routing_key: every segment
-- is matched with its leading dot, so '#' (any number of segments, none included) is simply
-- a repeated group. Literal segments are [A-Za-z0-9_-], which need no escaping.
-- pgbus_core::TopicPattern::matches implements the same rules; both run one table of cases.
CREATE FUNCTION pgbus.topic_regex(pattern text) RETURNS text
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE AS $$
    SELECT '^' || string_agg(
        CASE s.seg WHEN '*' THEN '\.[^.]+' WHEN '#' THEN '(\.[^.]+)*' ELSE '\.' || s.seg END,
        '' ORDER BY s.n) || '$'
    FROM unnest(string_to_array(pattern, '.')) WITH ORDINALITY AS s(seg, n)
$$;

CREATE TABLE pgbus.topic_bindings (
    pattern    text NOT NULL CHECK (
        length(pattern) <= 255
        AND pattern ~ '^([A-Za-z0-9_-]+|\*|#)(\.([A-Za-z0-9_-]+|\*|#))*$'),
    queue      text NOT NULL REFERENCES pgbus.queues (name) ON DELETE CASCADE,
    regex      text NOT NULL GENERATED ALWAYS AS (pgbus.topic_regex(pattern)) STORED,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pattern, queue)
);

-- Every published event, delivered or not (copies = 0: it matched no binding), until
-- pruned after a retention.
CREATE TABLE pgbus.events (
    seq          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id           uuid NOT NULL,
    routing_key  text NOT NULL,
    content_type text NOT NULL,
    headers      jsonb NOT NULL,
    payload      bytea NOT NULL,
    copies       integer NOT NULL,
    published_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX events_published_idx ON pgbus.events (published_at);

-- Publishers share this lock; a bind takes it exclusively, so a new binding's replay of the
-- log and the publishes around it are ordered: the function takes the lock before its
-- insert, and (being VOLATILE) reads the bindings with a snapshot taken after the lock, so
-- an event is either fanned out to the new binding or already in the log the bind replays.
CREATE FUNCTION pgbus.publish(
    p_ids uuid[], p_keys text[], p_content_types text[], p_headers jsonb[],
    p_payloads bytea[], p_notify boolean
) RETURNS TABLE (n bigint, copies bigint)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    PERFORM pg_advisory_xact_lock_shared(8099550711436832624);
    RETURN QUERY
    WITH ev AS (
        SELECT e.* FROM unnest(p_ids, p_keys, p_content_types, p_headers, p_payloads)
            WITH ORDINALITY AS e(id, key, content_type, headers, payload, n)
    ), routes AS (
        -- A queue bound by several matching patterns gets one copy.
        SELECT DISTINCT ev.n, b.queue
        FROM ev JOIN pgbus.topic_bindings b ON ('.' || ev.key) ~ b.regex
    ), ins AS (
        INSERT INTO pgbus.messages (queue, visible_at, content_type, headers, payload)
        SELECT r.queue, now(), ev.content_type, ev.headers, ev.payload
        FROM routes r JOIN ev ON ev.n = r.n
        ORDER BY r.n, r.queue
        RETURNING queue
    ), counted AS (
        SELECT ev.*, coalesce(c.copies, 0) AS copies
        FROM ev LEFT JOIN (SELECT r.n, count(*) AS copies FROM routes r GROUP BY r.n) c
            ON c.n = ev.n
    ), logged AS (
        INSERT INTO pgbus.events (id, routing_key, content_type, headers, payload, copies)
        SELECT c.id, c.key, c.content_type, c.headers, c.payload, c.copies
        FROM counted c ORDER BY c.n
    ), woke AS (
        -- One notification per queue and statement, delivered on commit.
        SELECT count(pg_notify('pgbus_wakeup', q.queue)) AS woken
        FROM (SELECT DISTINCT queue FROM ins) q
        WHERE p_notify
    )
    SELECT c.n, c.copies FROM counted c, woke ORDER BY c.n;
END
$$;

-- Idempotent consumers: claimed before the handler runs, completed after it returns and
-- before the ack. message_id/attempt name the delivery holding the claim.
CREATE TABLE pgbus.event_dedup (
    subscriber text NOT NULL,
    event_id   uuid NOT NULL,
    state      text NOT NULL CHECK (state IN ('claimed', 'completed')),
    message_id bigint NOT NULL,
    attempt    integer NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (subscriber, event_id)
);
CREATE INDEX event_dedup_updated_idx ON pgbus.event_dedup (updated_at);

-- The transactional outbox: producers insert here in their own transaction (any client,
-- plain SQL); the relay publishes the rows to topics and marks them published.
CREATE TABLE pgbus.outbox (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id     uuid NOT NULL DEFAULT gen_random_uuid(),
    routing_key  text NOT NULL CHECK (
        length(routing_key) <= 255
        AND routing_key ~ '^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$'),
    content_type text NOT NULL DEFAULT 'application/json'
        CHECK (content_type IN ('application/msgpack', 'application/json')),
    headers      jsonb NOT NULL DEFAULT '{}',
    payload      bytea NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    published_at timestamptz,
    -- Why the relay could not publish the row (a reserved header name, a payload over the
    -- limit); such a row is kept, out of the relay's way, for an operator.
    error        text
);
CREATE INDEX outbox_pending_idx ON pgbus.outbox (id) WHERE published_at IS NULL AND error IS NULL;
CREATE INDEX outbox_published_idx ON pgbus.outbox (published_at) WHERE published_at IS NOT NULL;

-- Any insert wakes the relay once per statement (and Postgres folds identical
-- notifications of one transaction), on commit only.
CREATE FUNCTION pgbus.outbox_wakeup() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('pgbus_outbox', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER outbox_wakeup AFTER INSERT ON pgbus.outbox
    FOR EACH STATEMENT EXECUTE FUNCTION pgbus.outbox_wakeup();
