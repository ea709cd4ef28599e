-- pgbus schema, version 5: leases move out of the claim index. A claim, a lease extension
-- and the attempt count touch only unindexed columns, so Postgres can update the row in
-- place (a HOT update) instead of adding index entries for every claim.

ALTER TABLE pgbus.messages ADD COLUMN lease_until timestamptz;
UPDATE pgbus.messages SET lease_until = visible_at, visible_at = enqueued_at WHERE leased;
ALTER TABLE pgbus.messages DROP COLUMN leased;
-- Room on each page for the new row versions of HOT updates.
ALTER TABLE pgbus.messages SET (fillfactor = 85);
