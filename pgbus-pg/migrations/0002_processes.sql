-- pgbus schema, version 2: the registry of worker processes.

CREATE TABLE pgbus.processes (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    hostname     text NOT NULL,
    pid          integer NOT NULL,
    queues       text[] NOT NULL,
    mode         text NOT NULL,
    capacity     integer NOT NULL,
    busy         integer NOT NULL DEFAULT 0,
    started_at   timestamptz NOT NULL DEFAULT now(),
    heartbeat_at timestamptz NOT NULL DEFAULT now()
);
