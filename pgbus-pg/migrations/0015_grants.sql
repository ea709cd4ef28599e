-- pgbus schema, version 15: least privilege. `pgbus migrate --grant ROLE` records a role
-- here and grants it what workers, producers, the dashboard and the relay need at run time:
-- use of the schema, rows of the tables (not their definitions: no TRUNCATE, REFERENCES or
-- TRIGGER), the sequences, and the functions. Every later migration grants the recorded
-- roles again, so objects it adds are covered and a worker role keeps working after an
-- upgrade.
CREATE TABLE pgbus.grants (
    role       name PRIMARY KEY,
    granted_at timestamptz NOT NULL DEFAULT now()
);

-- Grants to every recorded role, or to `only_role`. Run by the migrating role (the schema's
-- owner), never by the granted roles. A recorded role that was dropped since is forgotten
-- (with a notice) rather than failing the upgrade.
CREATE FUNCTION pgbus.apply_grants(only_role name DEFAULT NULL) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    r name;
BEGIN
    FOR r IN DELETE FROM pgbus.grants g
             WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = g.role)
             RETURNING g.role LOOP
        RAISE NOTICE 'pgbus: role % no longer exists; its grant is forgotten', r;
    END LOOP;
    FOR r IN SELECT g.role FROM pgbus.grants g WHERE only_role IS NULL OR g.role = only_role LOOP
        EXECUTE format('GRANT USAGE ON SCHEMA pgbus TO %I', r);
        EXECUTE format('GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA pgbus TO %I', r);
        -- The bookkeeping of migrations and grants is read (`check_schema`), never written.
        EXECUTE format('REVOKE INSERT, UPDATE, DELETE ON pgbus.schema_migrations, pgbus.grants FROM %I', r);
        EXECUTE format('GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA pgbus TO %I', r);
        EXECUTE format('GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA pgbus TO %I', r);
        EXECUTE format('REVOKE EXECUTE ON FUNCTION pgbus.apply_grants(name) FROM %I', r);
    END LOOP;
END
$$;
REVOKE EXECUTE ON FUNCTION pgbus.apply_grants(name) FROM PUBLIC;
