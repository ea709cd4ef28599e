-- pgbus schema, version 12: batches. A batch's jobs carry its id; when one leaves the hot
-- table (acked, discarded, dead-lettered) a row trigger counts it on the batch's row, whose
-- lock orders concurrent completions: the completion that sees the last pending job
-- enqueues the finished (and, with no dead letters, the succeeded) callback, the first
-- dead letter the dead-lettered one, each exactly once, in the completing transaction.
-- Plain jobs have no batch id and skip the trigger in its WHEN clause.

ALTER TABLE pgbus.messages ADD COLUMN batch_id bigint;

CREATE TABLE pgbus.batches (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue         text NOT NULL,
    total         integer NOT NULL CHECK (total > 0),
    pending       integer NOT NULL,
    dead_lettered integer NOT NULL DEFAULT 0,
    created_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz
);
CREATE INDEX batches_unfinished_idx ON pgbus.batches (id) WHERE finished_at IS NULL;

CREATE TABLE pgbus.batch_callbacks (
    batch_id     bigint NOT NULL REFERENCES pgbus.batches (id) ON DELETE CASCADE,
    kind         text NOT NULL CHECK (kind IN ('finished', 'succeeded', 'dead_lettered')),
    -- A dropped queue takes its callbacks along, so a completion never fails on them.
    queue        text NOT NULL REFERENCES pgbus.queues (name) ON DELETE CASCADE,
    priority     smallint NOT NULL,
    content_type text NOT NULL,
    headers      jsonb NOT NULL,
    payload      bytea NOT NULL,
    PRIMARY KEY (batch_id, kind)
);

-- Enqueues a batch's callback of one kind, if it has one.
CREATE FUNCTION pgbus.batch_callback(batch bigint, callback text) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    target text;
BEGIN
    INSERT INTO pgbus.messages (queue, priority, visible_at, content_type, headers, payload)
    SELECT c.queue, c.priority, now(), c.content_type,
           c.headers || jsonb_build_object('pgbus-batch', batch::text,
                                           'pgbus-batch-callback', callback),
           c.payload
    FROM pgbus.batch_callbacks c
    WHERE c.batch_id = batch AND c.kind = callback
    RETURNING queue INTO target;
    IF target IS NOT NULL THEN
        PERFORM pg_notify('pgbus_wakeup', target);
    END IF;
END
$$;

CREATE FUNCTION pgbus.batch_job_done() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    -- AFTER triggers run once the whole statement is done, so a dead-letter statement's
    -- insert is visible here.
    dead boolean := EXISTS (SELECT 1 FROM pgbus.dead_letters WHERE id = OLD.id);
    b    pgbus.batches;
BEGIN
    UPDATE pgbus.batches
    SET pending = pending - 1,
        dead_lettered = dead_lettered + dead::int,
        finished_at = CASE WHEN pending = 1 THEN now() END
    WHERE id = OLD.batch_id
    RETURNING * INTO b;
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    IF dead AND b.dead_lettered = 1 THEN
        PERFORM pgbus.batch_callback(b.id, 'dead_lettered');
    END IF;
    IF b.pending = 0 THEN
        PERFORM pgbus.batch_callback(b.id, 'finished');
        IF b.dead_lettered = 0 THEN
            PERFORM pgbus.batch_callback(b.id, 'succeeded');
        END IF;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER messages_batch_done AFTER DELETE ON pgbus.messages
    FOR EACH ROW WHEN (OLD.batch_id IS NOT NULL) EXECUTE FUNCTION pgbus.batch_job_done();
