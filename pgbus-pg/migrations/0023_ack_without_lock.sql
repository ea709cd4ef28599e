-- pgbus schema, version 23: the ack deletes its deliveries without locking them first.
--
-- Until now the ack (`sql::ACK`) locked each current delivery with a primary-key probe in id
-- order (so that it and the console's actions on the same jobs queue behind each other
-- instead of deadlocking), then deleted the locked rows by id: every row was found twice
-- and written twice (a lock, then the delete), about half of the ack's server time.
--
-- This function deletes them in one pass, still in id order: `id = ANY (ids)` read from the
-- primary key visits the ids in ascending order (the B-tree sorts an array's keys before
-- it scans), and the scans that would visit rows in the heap's order (a sequential or a
-- bitmap scan, which the planner takes when the table's statistics say it is small, the
-- normal state of a queue that keeps up) are switched off for the function's statement
-- alone, index scans switched on whatever the session says. Each lease's attempt is found
-- with `width_bucket` over the sorted ids (a binary search), so the check is part of the
-- delete's own condition: a row that changed after the statement's snapshot (a heartbeat
-- extended it, or another worker claimed it again after its lease ran out) is checked
-- again in its newest version, as Postgres does for a delete in read committed, and
-- deleted only if it is still the same delivery. With the same id twice (two deliveries
-- of one message, both run and acked together), the later attempt is the one checked:
-- the earlier can no longer be current, since an attempt only goes back when a claim is
-- given back unstarted, and such a claim is never acked. (Checking every attempt of the
-- id, a slice of the array per row, cost a fifth of the function's time.) A lease with no
-- id or attempt (NULL) is no delivery and is left out, as before.
--
-- Returns the deleted rows' ids and queues (the archive of history-keeping queues reads
-- their columns from the calling statement's snapshot, taken before this delete).
CREATE FUNCTION pgbus.delete_deliveries(lease_ids bigint[], lease_attempts int[])
RETURNS TABLE (deleted_id bigint, deleted_queue text)
LANGUAGE plpgsql
SET enable_seqscan = off
SET enable_bitmapscan = off
SET enable_indexscan = on
AS $$
DECLARE
    ids bigint[];
    ids_attempts int[];
BEGIN
    SELECT array_agg(l.id ORDER BY l.id, l.attempt), array_agg(l.attempt ORDER BY l.id, l.attempt)
    INTO ids, ids_attempts
    FROM unnest(lease_ids, lease_attempts) AS l(id, attempt)
    WHERE l.id IS NOT NULL AND l.attempt IS NOT NULL;
    RETURN QUERY
    DELETE FROM pgbus.messages m
    WHERE m.id = ANY (ids)
      AND m.attempts = ids_attempts[width_bucket(m.id, ids)]
    RETURNING m.id, m.queue;
END
$$;
