-- The change journal behind the Postgres connector's notify mode.
--
-- Applied by `feed migrate` (connectors/postgres_migrate.py), which replaces {{schema}} with the
-- connector's quoted `schema` setting and {{channel}} with its NOTIFY channel, runs the whole file
-- in one transaction and records it in {{schema}}.migrations.
--
-- Why a journal: NOTIFY payloads are limited to 8000 bytes (a bigger one raises inside the trigger
-- and rolls back the user's write) and notifications sent while nobody listens are lost. So the
-- trigger writes the whole change into this table, inside the user's transaction, and NOTIFY only
-- wakes the reader with an empty payload.
--
-- Why xid: identity values are taken before commit, so "id > last delivered" skips the rows of a
-- transaction that commits after a later one. Each row records its top-level transaction id
-- (xid8, never wraps); the reader diffs two snapshots of the server (pg_current_snapshot) to find
-- exactly the transactions that committed in between, whatever order they started in.

CREATE TABLE {{schema}}.journal (
    id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    xid     xid8 NOT NULL DEFAULT pg_current_xact_id(),
    ts      timestamptz NOT NULL DEFAULT clock_timestamp(),
    target  text NOT NULL,
    op      text NOT NULL,
    before  jsonb,
    after   jsonb
);

CREATE INDEX journal_xid ON {{schema}}.journal (xid);

COMMENT ON TABLE {{schema}}.journal IS
    'Changes captured by the feed''s triggers; delivered rows are pruned by the reader.';

-- One row per connector name: where its reader stands. Every transaction visible in `snapshot`
-- has been delivered; `batch_snapshot` and the cursor describe a batch stopped half way.
CREATE TABLE {{schema}}.consumers (
    name            text PRIMARY KEY,
    snapshot        text NOT NULL,
    batch_snapshot  text,
    cursor_maxid    bigint,
    cursor_id       bigint,
    updated_at      timestamptz NOT NULL DEFAULT now()
);

-- Which connector watches which table: a table's triggers are dropped only when nobody does.
CREATE TABLE {{schema}}.watches (
    consumer    text NOT NULL,
    target      text NOT NULL,
    since       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, target)
);

-- SECURITY DEFINER: writers need no privilege on the journal (granting INSERT to PUBLIC would let
-- anyone forge changes). Every name in the body is schema-qualified, so the caller's search_path
-- cannot redirect it. TG_ARGV[0] is the target name the trigger was created with.
CREATE FUNCTION {{schema}}.capture() RETURNS trigger
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
    ELSE
        INSERT INTO {{schema}}.journal (target, op) VALUES (TG_ARGV[0], 'truncate');
    END IF;
    -- Identical notifications within a transaction are folded into one by the server.
    PERFORM pg_catalog.pg_notify({{channel}}, '');
    RETURN NULL;
END
$$;

REVOKE ALL ON {{schema}}.journal, {{schema}}.consumers, {{schema}}.watches FROM PUBLIC;
