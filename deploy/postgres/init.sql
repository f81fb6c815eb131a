-- The demo's tables, created when the compose stack's Postgres starts on an empty volume (the
-- official image runs /docker-entrypoint-initdb.d/*.sql then). They must exist before the feed's
-- `feed migrate` attaches its capture triggers to them. Same statements as SCHEMA_SQL in
-- feed/demo/demo_writer.py (tests/test_stack.py checks that they agree).
CREATE TABLE IF NOT EXISTS public.customers (
    id serial PRIMARY KEY,
    name text NOT NULL,
    email text NOT NULL,
    tier text NOT NULL DEFAULT 'standard'
);
CREATE TABLE IF NOT EXISTS public.orders (
    id serial PRIMARY KEY,
    customer_id integer NOT NULL REFERENCES public.customers (id) ON DELETE CASCADE,
    status text NOT NULL DEFAULT 'pending',
    amount numeric(10, 2) NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
