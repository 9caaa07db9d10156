"""Both sinks survive a real PostgreSQL restart: sends fail with RetryableError while the
server is down and the same batches land exactly once after it is back.

This stops the server with pg_ctlcluster, so it is marked pg_restart (sorted to run
last) and always restarts PostgreSQL in a finally block.
"""

from __future__ import annotations

import asyncio
import os
import subprocess

import asyncpg
import pytest

from agent.errors import RetryableError
from agent.builtin_plugins.postgres import PostgresOptions, PostgresSink
from agent.builtin_plugins.supabase import SupabaseOptions, SupabaseSink
from tests.conftest_supabase import ADMIN_DSN
from tests.helpers import make_ctx, make_events

pytestmark = pytest.mark.pg_restart

VERSION = os.environ.get("SIDECAR_TEST_PG_VERSION") or sorted(os.listdir("/etc/postgresql"))[-1]
CLUSTER = os.environ.get("SIDECAR_TEST_PG_CLUSTER", "main")


def _ctl(action: str) -> None:
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", VERSION, CLUSTER, action],
        check=True, capture_output=True, timeout=60,
    )


async def _wait_ready(timeout_s: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        try:
            con = await asyncpg.connect(ADMIN_DSN, timeout=2)
            await con.close()
            return
        except (OSError, asyncpg.PostgresError, asyncio.TimeoutError):
            if loop.time() > deadline:
                raise
            await asyncio.sleep(0.2)


async def _send_until_ok(sink, events, attempts: int = 100) -> int:
    """Retry like the core does (without its backoff policy); returns the failures seen."""
    failures = 0
    for _ in range(attempts):
        try:
            await sink.send(events)
            return failures
        except RetryableError:
            failures += 1
            await asyncio.sleep(0.1)
    raise AssertionError("sink never recovered")


async def test_both_sinks_survive_postgres_restart(pg_table, supabase_emulator):
    pg = PostgresSink("postgres", PostgresOptions(dsn=pg_table.dsn, table=pg_table.table, min_pool=2, max_pool=2, connect_timeout_s=2), make_ctx("pg"))
    sb = SupabaseSink("supabase", SupabaseOptions(url=supabase_emulator.url, key=supabase_emulator.key, table=pg_table.table, timeout_s=5), make_ctx("sb"))
    await pg.start()
    await sb.start()
    before_pg, before_sb = make_events(100), make_events(100)
    during_pg, during_sb = make_events(100), make_events(100)
    try:
        await pg.send(before_pg)
        await sb.send(before_sb)
        stopped = True
        await asyncio.to_thread(_ctl, "stop")
        try:
            with pytest.raises(RetryableError):
                await pg.send(during_pg)
            with pytest.raises(RetryableError):
                await sb.send(during_sb)
        finally:
            await asyncio.to_thread(_ctl, "start")
            stopped = False
            await _wait_ready()
        # The pools still hold dead connections; the retries go through once they reconnect.
        await _send_until_ok(pg, during_pg)
        await _send_until_ok(sb, during_sb)
        await _send_until_ok(pg, before_pg)  # re-sends after restart duplicate nothing
        await _send_until_ok(sb, before_sb)
    finally:
        if stopped:  # pragma: no cover - only when the stop itself failed oddly
            await asyncio.to_thread(_ctl, "start")
            await _wait_ready()
        await pg.close()
        await sb.close()
    ids = [e.id for e in before_pg + before_sb + during_pg + during_sb]
    counts = await pg_table.count_ids(ids)
    assert set(counts.values()) == {1}, "every row exactly once"
