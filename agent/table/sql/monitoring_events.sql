-- sidecar-agent: the monitoring_events table for PostgreSQL and Supabase.
-- Idempotent: every statement may run again on an up-to-date database.
-- Rendered by agent.migrations.migration_sql(schema, table) from a template;
-- `sidecar-agent supabase sql` prints it, `sidecar-agent postgres migrate` applies it.

CREATE SCHEMA IF NOT EXISTS {{schema}};

CREATE TABLE IF NOT EXISTS {{schema}}.{{table}} (
    id          uuid PRIMARY KEY,
    agent_id    text,
    event_type  text,
    kind        text,
    value       double precision,
    "timestamp" timestamptz,
    source      text,
    tags        jsonb,
    data        jsonb,
    metadata    jsonb,
    session_id  text,
    created_at  timestamptz DEFAULT now()
);

-- Upgrade a predecessor table in place: add whatever columns it lacks.
ALTER TABLE {{schema}}.{{table}}
    ADD COLUMN IF NOT EXISTS agent_id    text,
    ADD COLUMN IF NOT EXISTS event_type  text,
    ADD COLUMN IF NOT EXISTS kind        text,
    ADD COLUMN IF NOT EXISTS value       double precision,
    ADD COLUMN IF NOT EXISTS "timestamp" timestamptz,
    ADD COLUMN IF NOT EXISTS source      text,
    ADD COLUMN IF NOT EXISTS tags        jsonb,
    ADD COLUMN IF NOT EXISTS data        jsonb,
    ADD COLUMN IF NOT EXISTS metadata    jsonb,
    ADD COLUMN IF NOT EXISTS session_id  text,
    ADD COLUMN IF NOT EXISTS created_at  timestamptz DEFAULT now();

CREATE INDEX IF NOT EXISTS {{prefix}}_timestamp_idx
    ON {{schema}}.{{table}} ("timestamp" DESC);
CREATE INDEX IF NOT EXISTS {{prefix}}_event_type_timestamp_idx
    ON {{schema}}.{{table}} (event_type, "timestamp" DESC);
CREATE INDEX IF NOT EXISTS {{prefix}}_source_timestamp_idx
    ON {{schema}}.{{table}} (source, "timestamp" DESC);
CREATE INDEX IF NOT EXISTS {{prefix}}_agent_id_timestamp_idx
    ON {{schema}}.{{table}} (agent_id, "timestamp" DESC);

-- Row-level security: writers use the service role (which bypasses RLS); the
-- dashboard's anon key may only read.
ALTER TABLE {{schema}}.{{table}} ENABLE ROW LEVEL SECURITY;

DO $$
BEGIN
    -- Supabase has the anon and authenticated roles; plain PostgreSQL usually does not.
    IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'anon')
       AND EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'authenticated') THEN
        IF NOT EXISTS (
            SELECT 1 FROM pg_policies
            WHERE schemaname = {{schema_lit}} AND tablename = {{table_lit}}
              AND policyname = '{{prefix}}_read'
        ) THEN
            CREATE POLICY {{prefix}}_read ON {{schema}}.{{table}}
                FOR SELECT TO anon, authenticated USING (true);
        END IF;
        GRANT USAGE ON SCHEMA {{schema}} TO anon, authenticated;
        GRANT SELECT ON {{schema}}.{{table}} TO anon, authenticated;
    END IF;
END
$$;

-- Supabase Realtime: publish inserts, unless the table is already published.
DO $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'supabase_realtime')
       AND NOT EXISTS (
            SELECT 1 FROM pg_publication_tables
            WHERE pubname = 'supabase_realtime'
              AND schemaname = {{schema_lit}} AND tablename = {{table_lit}}
       ) THEN
        ALTER PUBLICATION supabase_realtime ADD TABLE {{schema}}.{{table}};
    END IF;
END
$$;
