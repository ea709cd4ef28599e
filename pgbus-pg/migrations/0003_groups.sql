-- pgbus schema, version 3: ordered groups. Plain claims skip grouped messages; a group's
-- messages are found by (queue, group_key, id).

DROP INDEX pgbus.messages_claim_idx;
CREATE INDEX messages_claim_idx ON pgbus.messages (queue, priority DESC, visible_at, id)
    WHERE group_key IS NULL;
CREATE INDEX messages_group_idx ON pgbus.messages (queue, group_key, id)
    WHERE group_key IS NOT NULL;
