-- pgbus schema, version 11: recurring jobs. One scheduler leads at a time (a lease row it
-- renews; a dead leader's lease runs out and another takes over). Each occurrence is
-- recorded under its (task, scheduled_at) key in the transaction that enqueues its job, so
-- two schedulers (a leader and one that does not know it lost its lease) never enqueue
-- the same occurrence twice.

CREATE TABLE pgbus.scheduler_lease (
    name       text PRIMARY KEY,
    owner      text NOT NULL,
    expires_at timestamptz NOT NULL
);

-- The tasks schedulers declared, for operators (`pgbus cron list`) and as the cursor of
-- each task: the latest occurrence enqueued.
CREATE TABLE pgbus.schedules (
    task          text PRIMARY KEY,
    queue         text NOT NULL,
    schedule      text NOT NULL,
    missed        text NOT NULL,
    first_seen_at timestamptz NOT NULL DEFAULT now(),
    last_at       timestamptz,
    next_at       timestamptz,
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE pgbus.schedule_runs (
    task         text NOT NULL,
    scheduled_at timestamptz NOT NULL,
    enqueued_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task, scheduled_at)
);
