-- pgbus schema, version 18: autovacuum settings of the hot table. A queue's table swings
-- from empty (a queue that keeps up) to millions of rows (a backlog) and back, so Postgres's
-- default triggers, a fraction of the row count the table had at its last vacuum or
-- analyze, are wrong at both ends: at 5,000,000 rows a vacuum waits for 1,000,000 dead
-- rows, every one of which the claims step over until then. Here the triggers are counts
-- of changes, whatever the table's size, and the hot table's vacuum is not throttled: after
-- a long transaction elsewhere ends (a pinned xmin), the dead versions it kept are removed
-- in one unthrottled pass instead of one paced for a cold table.
--
-- The statistics still read "empty" most of the time (they are taken while the table is
-- empty, or by a vacuum that found no live row), so no statement on the hot path may
-- depend on them: the claims, the acks and the lease extensions are written so that their
-- plans stay on their indexes with any estimate (see `sql.rs`, and the test in
-- pgbus-pg's `hot_plans.rs`). Storage parameters take only a SHARE UPDATE EXCLUSIVE lock:
-- reads and writes go on while this runs.
ALTER TABLE pgbus.messages SET (
    autovacuum_vacuum_scale_factor = 0,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_analyze_scale_factor = 0,
    autovacuum_analyze_threshold = 5000,
    autovacuum_vacuum_cost_delay = 0
);
