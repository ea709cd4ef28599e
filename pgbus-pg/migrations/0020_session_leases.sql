-- pgbus schema, version 20: the lease-mode group statement's lookup of its session's leases,
-- and autovacuum settings of the lease table.
--
-- Every group run inserts a lease row and deletes it at its end, from every session at
-- once, so the table's pages fill with dead rows faster than they are pruned, and 32
-- sessions extending it together make Postgres add many pages at a time: a bench run left a
-- table of a few live rows on 500 pages. A statement planned while the table was one page
-- reads it whole (a sequential scan is the cheapest plan for one page), and the group
-- statement keeps the plan its session made first. The session's leases are looked up
-- here instead, on the owner index whatever the table's size or statistics say.
CREATE FUNCTION pgbus.session_leases(token text)
RETURNS TABLE (queue text, group_key text, expires_at timestamptz)
LANGUAGE sql STABLE ROWS 4 SET enable_seqscan = off AS $$
    SELECT g.queue, g.group_key, g.expires_at
    FROM pgbus.group_leases g
    WHERE g.owner = token AND g.expires_at > now()
$$;

-- Vacuumed after a count of changes, unthrottled, as the hot table is (migration 18): the
-- free space of the deleted rows is then found again instead of new pages being added.
ALTER TABLE pgbus.group_leases SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_analyze_scale_factor = 0,
    autovacuum_analyze_threshold = 5000,
    autovacuum_vacuum_cost_delay = 0
);
