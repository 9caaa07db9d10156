"""Fixtures for the Postgres and Supabase sinks: a throwaway database on the real
PostgreSQL server, a fresh migrated table per test, and the Supabase emulator.

PostgreSQL is required: if it is unreachable the tests FAIL (never skip). Set
SIDECAR_TEST_PG_DSN to point at another server (default: postgres@127.0.0.1:5432).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import asyncpg
import pytest

from agent.table import ddl as migrations
from tests.supabase_emulator import SupabaseEmulator

ADMIN_DSN = os.environ.get("SIDECAR_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")


def dsn_for(database: str) -> str:
    """ADMIN_DSN with the database name replaced."""
    base, _, _ = ADMIN_DSN.rpartition("/")
    return f"{base}/{database}"


async def _create_database(name: str) -> None:
    try:
        con = await asyncpg.connect(ADMIN_DSN, timeout=10)
    except (OSError, asyncpg.PostgresError, asyncio.TimeoutError) as exc:
        pytest.fail(f"PostgreSQL is required for these tests and is unreachable at {ADMIN_DSN}: {exc}", pytrace=False)
    try:
        await con.execute(f'CREATE DATABASE "{name}"')
    finally:
        await con.close()
    con = await asyncpg.connect(dsn_for(name))
    try:
        # As on Supabase: an (empty) publication for Realtime, so the migration adds its table.
        await con.execute("SET client_min_messages = error; CREATE PUBLICATION supabase_realtime")
    finally:
        await con.close()


async def _drop_database(name: str) -> None:
    con = await asyncpg.connect(ADMIN_DSN, timeout=30)
    try:
        await con.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await con.close()


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """DSN of a throwaway database (sidecar_test_<random>) for this session; dropped afterwards."""
    name = f"sidecar_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_create_database(name))
    try:
        yield dsn_for(name)
    finally:
        asyncio.run(_drop_database(name))


@dataclass
class PgTable:
    """A freshly migrated events table in the session database."""

    dsn: str
    schema: str
    table: str

    @property
    def qname(self) -> str:
        return f'"{self.schema}"."{self.table}"'

    async def fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        """Run a query; `{t}` in `sql` is replaced by the table's qualified name."""
        con = await asyncpg.connect(self.dsn)
        try:
            return await con.fetch(sql.format(t=self.qname), *args)
        finally:
            await con.close()

    async def count_ids(self, ids: list[str]) -> dict[str, int]:
        """How many rows each id has (0 when missing)."""
        rows = await self.fetch("SELECT id::text AS id, count(*) AS n FROM {t} WHERE id = ANY($1::uuid[]) GROUP BY id", ids)
        found = {r["id"]: r["n"] for r in rows}
        return {i: found.get(i, 0) for i in ids}


@pytest.fixture
async def pg_table(pg_database: str) -> AsyncIterator[PgTable]:
    """A new monitoring_events-shaped table (unique name, migration applied) per test."""
    t = PgTable(pg_database, "public", f"ev_{uuid.uuid4().hex[:12]}")
    await migrations.apply(t.dsn, t.schema, t.table)
    yield t


@pytest.fixture
async def supabase_emulator(pg_database: str) -> AsyncIterator[SupabaseEmulator]:
    """A running SupabaseEmulator (PostgREST + Realtime) over the session database.

    Use `.url` and `.key` (service role) or `.anon_key` with supabase-py; fault switches:
    `.fail_next(n, status=503, retry_after=None)`, `.delay_s`, `.drop_next(n, after_commit=False)`.
    """
    emu = SupabaseEmulator(pg_database)
    await emu.start()
    try:
        yield emu
    finally:
        await emu.stop()
