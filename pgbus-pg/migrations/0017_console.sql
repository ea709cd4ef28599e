-- pgbus schema, version 17: the operator's console. Each message keeps the history of its
-- failed attempts (the last 10: attempt, error, time), carried to the dead letters, back
-- by a retry, and into the archive; the process whose worker holds a lease is recorded
-- with it; every console action is written to an audit log. The indexes serve the
-- console's listings (keyset pages by id per queue and state), so no page scans a table.

-- `[{"attempt": 3, "error": "...", "at": "2026-12-06T22:00:00Z"}, ...]`, oldest first,
-- at most 10 entries (appended by nack and dead-letter, trimmed in the same statement).
ALTER TABLE pgbus.messages ADD COLUMN errors jsonb;
ALTER TABLE pgbus.dead_letters ADD COLUMN errors jsonb;
ALTER TABLE pgbus.archive ADD COLUMN errors jsonb;

-- The registered process (`pgbus.processes.id`) whose worker claimed the current lease;
-- meaningful only while `lease_until` is in the future. Not indexed, so a claim that sets
-- it stays a HOT update.
ALTER TABLE pgbus.messages ADD COLUMN leased_by bigint;

-- Keyset pages of one queue's messages by id, newest or oldest first (every state of the
-- hot table: ready, scheduled and in flight are filters on the rows of this scan).
CREATE INDEX messages_queue_id_idx ON pgbus.messages (queue, id);
-- Dead letters newest or oldest first by id, and by group.
CREATE INDEX dead_letters_queue_id_idx ON pgbus.dead_letters (queue, id);
CREATE INDEX dead_letters_group_idx ON pgbus.dead_letters (queue, group_key, id)
    WHERE group_key IS NOT NULL;
-- The archive of a queue by id (the pruner keeps using `archive_queue_acked_idx`).
CREATE INDEX archive_queue_id_idx ON pgbus.archive (queue, id);

-- What operators did through the console, its API and `pgbus job`: who (a token's name,
-- `loopback`, or `cli:<user>`), what, on which queue, to how many jobs, and the selection
-- (ids, or the filter with its bound).
CREATE TABLE pgbus.audit_log (
    id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at      timestamptz NOT NULL DEFAULT now(),
    actor   text NOT NULL,
    action  text NOT NULL,
    queue   text,
    count   bigint NOT NULL,
    detail  jsonb NOT NULL DEFAULT '{}'
);
CREATE INDEX audit_log_queue_idx ON pgbus.audit_log (queue, id);
