-- pgbus schema, version 19: a send checks its queue once per statement, not once per row.
-- The foreign key from the hot table to `pgbus.queues` ran one referential-integrity query
-- per inserted message (half the server time of a 200,000-message bulk send). A statement
-- trigger now checks the statement's distinct queues against `pgbus.queues` and locks
-- each queue row `FOR KEY SHARE`, as the foreign key's check did: a queue drop that
-- committed first makes the send fail with the same error (SQLSTATE 23503, which pgbus
-- reports as the missing queue), and a drop that comes later waits for the send to commit.
-- The trigger sees every writer of the table (the Rust sends, `COPY`, the SQL functions,
-- fan-out publishes, batch callbacks, retries of dead letters, the console).
--
-- The cascade is a statement trigger on `pgbus.queues` too: deleting queue rows, by
-- `drop_queue` or by hand, deletes their messages. The delete inside the trigger is a
-- statement of its own, so under read committed (which `drop_queue` sets) it takes a
-- fresh snapshot and sees every send the queue row's delete waited for. The other tables
-- keep their foreign keys.
ALTER TABLE pgbus.messages DROP CONSTRAINT messages_queue_fkey;

CREATE FUNCTION pgbus.messages_queue_check() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    wanted text;
BEGIN
    -- One probe and one row lock per distinct queue of the statement.
    FOR wanted IN SELECT DISTINCT queue FROM inserted LOOP
        PERFORM FROM pgbus.queues q WHERE q.name = wanted FOR KEY SHARE;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'queue % does not exist', wanted USING ERRCODE = '23503';
        END IF;
    END LOOP;
    RETURN NULL;
END
$$;

CREATE TRIGGER messages_queue_check AFTER INSERT ON pgbus.messages
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION pgbus.messages_queue_check();

CREATE FUNCTION pgbus.queues_drop_messages() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM pgbus.messages m USING dropped d WHERE m.queue = d.name;
    RETURN NULL;
END
$$;

CREATE TRIGGER queues_drop_messages AFTER DELETE ON pgbus.queues
    REFERENCING OLD TABLE AS dropped
    FOR EACH STATEMENT EXECUTE FUNCTION pgbus.queues_drop_messages();
