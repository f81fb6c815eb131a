-- Two-phase commit: Postgres refuses PREPARE TRANSACTION in a transaction that has executed
-- NOTIFY ("cannot PREPARE a transaction that has executed LISTEN, UNLISTEN, or NOTIFY"), and the
-- capture trigger notified on every write, so every prepared transaction (XA transaction
-- managers, some sharding and queue tools) that wrote a watched table failed once the feed
-- watched it. No trigger can know that its transaction will be prepared, so the writer says so:
-- with `SET LOCAL dbfeed.notify = off` (or the setting on the role or database of the writers
-- that prepare) the row is journaled as always but nothing is notified, and the reader finds it
-- at its next poll (a heartbeat, `heartbeat_interval`, or another transaction's notification).
-- Any other value, or none, notifies as before.

CREATE OR REPLACE FUNCTION {{schema}}.capture() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO {{schema}}.journal (target, op, after)
        VALUES (TG_ARGV[0], 'insert', pg_catalog.to_jsonb(NEW));
    ELSIF TG_OP = 'UPDATE' THEN
        INSERT INTO {{schema}}.journal (target, op, before, after)
        VALUES (TG_ARGV[0], 'update', pg_catalog.to_jsonb(OLD), pg_catalog.to_jsonb(NEW));
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO {{schema}}.journal (target, op, before)
        VALUES (TG_ARGV[0], 'delete', pg_catalog.to_jsonb(OLD));
    ELSIF TG_ARGV[0] = TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME THEN
        INSERT INTO {{schema}}.journal (target, op) VALUES (TG_ARGV[0], 'truncate');
    ELSE
        INSERT INTO {{schema}}.journal (target, op, before)
        VALUES (TG_ARGV[0], 'truncate',
                pg_catalog.jsonb_build_object('partition', TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME));
    END IF;
    -- Identical notifications within a transaction are folded into one by the server.
    IF COALESCE(pg_catalog.current_setting('dbfeed.notify', true), '') <> 'off' THEN
        PERFORM pg_catalog.pg_notify({{channel}}, '');
    END IF;
    RETURN NULL;
END
$$;
-- CREATE OR REPLACE drops the settings 0003 pinned on the function: pinned again.
ALTER FUNCTION {{schema}}.capture()
    SET extra_float_digits = 3
    SET "TimeZone" = 'UTC'
    SET "DateStyle" = 'ISO, YMD'
    SET "IntervalStyle" = 'postgres'
    SET bytea_output = 'hex';
