-- pgbus schema, version 22: a queue drop locks its messages in id order before deleting them.
--
-- The cascade of migration 19 (kept with migration 21's guard) deleted a dropped queue's
-- messages in its plan's order, the heap's or an index's, locking each row as it went.
-- The worker's batch ack, the console's actions and the queue purge lock theirs in id
-- order (`sql::ACK`, `console/actions.rs`, `sql::PURGE_QUEUE`): a drop beside one of them
-- on the same queue could hold a row the other wanted next while waiting for one it held,
-- and Postgres aborted one of the two with "deadlock detected". Both cascades, of a delete
-- and of `TRUNCATE pgbus.queues`, now lock the rows they delete in id order first, so they
-- queue behind such a statement instead. (`id > 0`, true of every id, lets a single
-- queue's rows be read in id order from `messages_queue_id_idx`, as the purge does.)
CREATE OR REPLACE FUNCTION pgbus.queues_drop_messages() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'pgbus queues are deleted under read committed, not %',
            current_setting('transaction_isolation')
            USING ERRCODE = '0A000',
                  HINT = 'Use pgbus queue delete, or SET TRANSACTION ISOLATION LEVEL READ COMMITTED.';
    END IF;
    PERFORM 1 FROM pgbus.messages m
    WHERE m.queue IN (SELECT d.name FROM dropped d) AND m.id > 0
    ORDER BY m.id
    FOR UPDATE;
    DELETE FROM pgbus.messages m USING dropped d WHERE m.queue = d.name;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION pgbus.queues_truncate_messages() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM 1 FROM pgbus.messages m WHERE m.id > 0 ORDER BY m.id FOR UPDATE;
    DELETE FROM pgbus.messages;
    RETURN NULL;
END
$$;
