-- pgbus schema, version 21: a queue delete by hand cannot leave messages behind.
--
-- Migration 19's cascade deletes a dropped queue's messages in a statement of its own,
-- which under read committed sees every send the queue row's delete waited for. Under
-- repeatable read or serializable it would read the transaction's first snapshot instead,
-- and the messages of a send that committed while the delete waited would outlive their
-- queue (claims never take them; a queue of the same name would inherit them). Such a
-- delete is refused now. `drop_queue` runs under read committed.
CREATE OR REPLACE FUNCTION pgbus.queues_drop_messages() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'pgbus queues are deleted under read committed, not %',
            current_setting('transaction_isolation')
            USING ERRCODE = '0A000',
                  HINT = 'Use pgbus queue delete, or SET TRANSACTION ISOLATION LEVEL READ COMMITTED.';
    END IF;
    DELETE FROM pgbus.messages m USING dropped d WHERE m.queue = d.name;
    RETURN NULL;
END
$$;

-- `TRUNCATE pgbus.queues CASCADE` empties the tables whose foreign keys name the queue;
-- the hot table has none since migration 19, so it is emptied here (a delete, so that the
-- hot table's row triggers of batches and key limits run).
CREATE FUNCTION pgbus.queues_truncate_messages() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM pgbus.messages;
    RETURN NULL;
END
$$;

CREATE TRIGGER queues_truncate_messages AFTER TRUNCATE ON pgbus.queues
    FOR EACH STATEMENT EXECUTE FUNCTION pgbus.queues_truncate_messages();
