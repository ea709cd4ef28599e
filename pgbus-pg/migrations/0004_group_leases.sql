-- pgbus schema, version 4: row leases for ordered groups, for deployments behind a
-- transaction-mode pooler where session advisory locks are unsafe.

CREATE TABLE pgbus.group_leases (
    queue      text NOT NULL REFERENCES pgbus.queues (name) ON DELETE CASCADE,
    group_key  text NOT NULL,
    owner      text NOT NULL,
    expires_at timestamptz NOT NULL,
    PRIMARY KEY (queue, group_key)
);
CREATE INDEX group_leases_owner_idx ON pgbus.group_leases (owner);
