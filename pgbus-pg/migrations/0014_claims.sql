-- pgbus schema, version 14, claims: room on every page of the hot table for each row's next
-- version. A claim updates rows that sit next to each other (the claim index follows send
-- order), so with pages 85% full only the first few rows of a page found room for their
-- new version there; the rest moved to other pages and added entries to every index (a
-- non-HOT update), which the next claims then had to step over. Half-full pages keep a
-- whole claim HOT. Applies to pages written from now on.
ALTER TABLE pgbus.messages SET (fillfactor = 50);

-- Claims run with generic plans on the fetch connection (`plan_cache_mode =
-- force_generic_plan`, since claims of any size share one good plan). The limited claim's
-- statements depend on their limits, so it keeps planning each call.
ALTER FUNCTION pgbus.claim_limited(text, bigint, float8) SET plan_cache_mode = auto;
