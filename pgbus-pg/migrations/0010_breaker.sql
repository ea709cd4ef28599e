-- pgbus schema, version 10: per-queue circuit breakers. A worker that sees a queue's jobs
-- fail `breaker_failures` times in a row sets `breaker_until`; until then every claim
-- (plain, limited, grouped) hands out nothing, in every process, and the queue resumes by
-- itself when the time passes: no process needs to be alive to close the breaker.

ALTER TABLE pgbus.queues
    ADD COLUMN breaker_failures   integer CHECK (breaker_failures > 0),
    ADD COLUMN breaker_backoff_ms bigint CHECK (breaker_backoff_ms > 0),
    ADD COLUMN breaker_until      timestamptz NOT NULL DEFAULT '-infinity',
    ADD CHECK ((breaker_failures IS NULL) = (breaker_backoff_ms IS NULL));

CREATE OR REPLACE FUNCTION pgbus.queue_closed(queue_name text) RETURNS boolean
LANGUAGE sql STABLE AS $$
    SELECT coalesce(
        (SELECT paused OR breaker_until > now() FROM pgbus.queues WHERE name = queue_name),
        true)
$$;
