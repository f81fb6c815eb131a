-- Partitioned tables: a TRUNCATE of one partition empties part of the watched table without a
-- row trigger firing, and a statement trigger on the partitioned table does not fire for it
-- (statement triggers are not cloned to partitions, unlike row triggers). So the connector also
-- puts its truncate trigger on every partition, with the watched table's name as TG_ARGV[0], and
-- the capture function records such a truncate with the partition's name in `before`: the reader
-- announces a gap for the table (its other partitions' rows are still there, so clients reload
-- rather than clear). A TRUNCATE of the whole table fires its own trigger first, then each
-- partition's in the same transaction; the reader folds those into the one truncate.

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
    PERFORM pg_catalog.pg_notify({{channel}}, '');
    RETURN NULL;
END
$$;
