-- pgbus schema, version 8: unique jobs. The key is a column of the job's row, so it lives
-- exactly as long as the job: released by ack, discard, dead-letter and purge, and never
-- left behind by a crash. Claims do not touch it, so they stay HOT updates.

ALTER TABLE pgbus.messages ADD COLUMN unique_key text;
CREATE UNIQUE INDEX messages_unique_idx ON pgbus.messages (queue, unique_key)
    WHERE unique_key IS NOT NULL;

-- Raised by a send whose duplicate was to be refused: aborting the statement stores
-- nothing of its batch. DETAIL carries the key, HINT the existing job's id.
CREATE FUNCTION pgbus.duplicate_job(queue text, key text, existing bigint) RETURNS bigint
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    RAISE EXCEPTION 'a job with unique key % is already in queue %', key, queue
        USING ERRCODE = 'unique_violation', CONSTRAINT = 'pgbus_duplicate_job',
              DETAIL = key, HINT = existing::text;
END
$$;
