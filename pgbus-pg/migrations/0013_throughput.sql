-- pgbus schema, version 13: throughput. Acked rows leave the hot table, so nothing there
-- counts completed work: workers count what they settle per queue and add the counts to
-- the queue's current 10-second bucket with each registry heartbeat. Buckets older than an
-- hour are pruned in bounded batches by the same heartbeats; stats sum the last minute.

CREATE TABLE pgbus.throughput (
    queue     text NOT NULL REFERENCES pgbus.queues (name) ON DELETE CASCADE,
    bucket    timestamptz NOT NULL,
    processed bigint NOT NULL DEFAULT 0,
    failed    bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (queue, bucket)
);
-- Pruning and the history read go by time across queues.
CREATE INDEX throughput_bucket_idx ON pgbus.throughput (bucket);
