-- pgbus schema, version 6: durable streams. Publishes to one stream are serialised by a
-- transaction-scoped advisory lock taken before the id is drawn, so ids of a stream commit
-- in order and a reader past id N never later finds a lower one.

CREATE TABLE pgbus.stream_events (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream       text NOT NULL CHECK (stream ~ '^[a-z][a-z0-9_]{0,47}$'),
    event        text NOT NULL,
    data         text NOT NULL,
    published_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX stream_events_stream_idx ON pgbus.stream_events (stream, id);
CREATE INDEX stream_events_published_idx ON pgbus.stream_events (published_at);

-- Per stream, the highest id pruned: a cursor below it missed events (a gap).
CREATE TABLE pgbus.streams (
    name           text PRIMARY KEY,
    pruned_through bigint NOT NULL DEFAULT 0
);
