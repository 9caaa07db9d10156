"""The monitoring_events migration on plain PostgreSQL and on a Supabase-like database."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from agent.table import ddl as migrations

INDEXES = {
    "timestamp_idx": '("timestamp" DESC)',
    "event_type_timestamp_idx": '(event_type, "timestamp" DESC)',
    "source_timestamp_idx": '(source, "timestamp" DESC)',
    "agent_id_timestamp_idx": '(agent_id, "timestamp" DESC)',
}
COLUMNS = {
    "id": "uuid", "agent_id": "text", "event_type": "text", "kind": "text", "value": "double precision",
    "timestamp": "timestamp with time zone", "source": "text", "tags": "jsonb", "data": "jsonb",
    "metadata": "jsonb", "session_id": "text", "created_at": "timestamp with time zone",
}


async def _describe(con: asyncpg.Connection, table: str) -> dict:
    cols = {r["column_name"]: r["data_type"] for r in await con.fetch(
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema='public' AND table_name=$1", table)}
    idx = {r["indexname"]: r["indexdef"] for r in await con.fetch("SELECT indexname, indexdef FROM pg_indexes WHERE tablename=$1", table)}
    rls = await con.fetchval("SELECT relrowsecurity FROM pg_class WHERE oid = to_regclass($1)", f"public.{table}")
    pols = await con.fetch("SELECT policyname, cmd, roles::text[] AS roles FROM pg_policies WHERE tablename=$1", table)
    published = await con.fetchval(
        "SELECT count(*) FROM pg_publication_tables WHERE pubname='supabase_realtime' AND tablename=$1", table)
    pk = await con.fetchval("SELECT indexdef FROM pg_indexes WHERE tablename=$1 AND indexname=$2", table, f"{table}_pkey")
    return {"cols": cols, "idx": idx, "rls": rls, "policies": [dict(p) for p in pols], "published": published, "pk": pk}


def test_sql_renders_for_schema_and_table():
    sql = migrations.migration_sql("metrics", "events_x")
    assert 'CREATE TABLE IF NOT EXISTS "metrics"."events_x"' in sql and "{{" not in sql
    assert "ALTER PUBLICATION supabase_realtime ADD TABLE" in sql
    for bad in ("x; drop table y", "Bad", "a-b", ""):
        with pytest.raises(ValueError):
            migrations.migration_sql("public", bad)


async def test_applied_twice_is_harmless_and_complete(pg_database):
    table = f"mig_{uuid.uuid4().hex[:10]}"
    await migrations.apply(pg_database, "public", table)
    con = await asyncpg.connect(pg_database)
    try:
        first = await _describe(con, table)
        await con.execute(f'INSERT INTO public."{table}" (id, event_type) VALUES (gen_random_uuid(), $1)', "x")
        await migrations.apply(pg_database, "public", table)
        second = await _describe(con, table)
        assert await con.fetchval(f'SELECT count(*) FROM public."{table}"') == 1
    finally:
        await con.close()
    assert first == second
    assert first["cols"] == COLUMNS
    assert "(id)" in first["pk"]
    for suffix, cols in INDEXES.items():
        assert first["idx"][f"{table}_{suffix}"].endswith(cols)
    assert first["rls"] is True
    assert first["published"] == 1  # the test database has a supabase_realtime publication


async def test_upgrades_a_predecessor_table(pg_database):
    table = f"old_{uuid.uuid4().hex[:10]}"
    con = await asyncpg.connect(pg_database)
    try:
        await con.execute(f'CREATE TABLE public."{table}" (id uuid PRIMARY KEY, event_type text, "timestamp" timestamptz, data jsonb)')
        await migrations.apply(pg_database, "public", table)
        desc = await _describe(con, table)
    finally:
        await con.close()
    assert desc["cols"] == COLUMNS


async def test_read_policy_only_where_supabase_roles_exist(pg_database):
    """On plain PostgreSQL (no anon/authenticated roles) no policy is made; with them, one SELECT policy."""
    con = await asyncpg.connect(pg_database)
    created = []
    try:
        existing = {r["rolname"] for r in await con.fetch("SELECT rolname FROM pg_roles WHERE rolname IN ('anon','authenticated')")}
        table = f"rls_{uuid.uuid4().hex[:10]}"
        await migrations.apply(pg_database, "public", table)
        if not existing:
            assert (await _describe(con, table))["policies"] == []
        for role in ("anon", "authenticated"):
            if role not in existing:
                await con.execute(f"CREATE ROLE {role} NOLOGIN")
                created.append(role)
        await migrations.apply(pg_database, "public", table)
        await migrations.apply(pg_database, "public", table)
        pols = (await _describe(con, table))["policies"]
        assert pols == [{"policyname": f"{table}_read", "cmd": "SELECT", "roles": ["anon", "authenticated"]}]
        # anon can read but not write
        await con.execute(f'INSERT INTO public."{table}" (id) VALUES (gen_random_uuid())')
        async with con.transaction():
            await con.execute("SET LOCAL ROLE anon")
            assert await con.fetchval(f'SELECT count(*) FROM public."{table}"') == 1
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                async with con.transaction():
                    await con.execute(f'INSERT INTO public."{table}" (id) VALUES (gen_random_uuid())')
    finally:
        if created:
            await con.execute(f'DROP TABLE IF EXISTS public."{table}"')
            for role in created:
                await con.execute(f"REVOKE ALL ON SCHEMA public FROM {role}")
                await con.execute(f"DROP OWNED BY {role}")
                await con.execute(f"DROP ROLE {role}")
        await con.close()
