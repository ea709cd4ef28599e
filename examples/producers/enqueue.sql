-- Enqueues COUNT pgbus jobs on QUEUE from psql and prints their ids:
--
--     psql -X -At -v queue=emails -v count=3 -f examples/producers/enqueue.sql
--
-- psql takes the connection from the environment: PGHOST, PGPORT, PGUSER, PGDATABASE, and
-- the password from PGPASSWORD or ~/.pgpass (or run `psql "$DATABASE_URL" ...` with a URL
-- that holds no password: arguments show in process listings). Stops at the first error.
\set ON_ERROR_STOP on

-- The whole batch in one statement, in one transaction: ids in send order. Each payload is
-- {"n": 1..COUNT, "producer": "psql"}, JSON that a typed Rust handler decodes.
SELECT id
FROM pgbus.send_batch(
    :'queue',
    ARRAY(SELECT jsonb_build_object('n', n, 'producer', 'psql')
          FROM generate_series(1, :'count'::integer) AS n ORDER BY n),
    headers => '{"producer": "psql"}') AS id;

-- One job with every option, by name (each may be left out; NULL means not given):
--
-- SELECT pgbus.send('emails', '{"to": "ada@example.com"}',
--     delay => interval '10 minutes',          -- or run_at => '2030-01-01 09:00+00'
--     priority => 5,                           -- higher first; default 0
--     group_key => 'customer:42',              -- one at a time, in order, per group
--     unique_key => 'welcome:42',              -- a second send returns the first's id
--     headers => '{"tenant": "acme"}',         -- string values only
--     traceparent => '00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01');
