"""Both sinks survive a real PostgreSQL restart: sends fail with RetryableError while the
server is down, and the same batches land exactly once after it is back (the pools still
hold dead connections then).

The server restarted is a private one (initdb in a temporary directory, its own port),
never the shared server the other tests use, so this test can run in any order, even
beside other test runs, and its teardown stops and removes it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.builtin_plugins.postgres import PostgresOptions, PostgresSink
from agent.builtin_plugins.supabase import SupabaseOptions, SupabaseSink
from agent.errors import RetryableError
from agent.table import ddl as migrations
from tests.conftest_supabase import PgTable
from tests.helpers import free_port, make_ctx, make_events
from tests.supabase_emulator import SupabaseEmulator


def _bindir() -> Path:
    root = Path("/usr/lib/postgresql")
    version = os.environ.get("SIDECAR_TEST_PG_VERSION") or (sorted(os.listdir(root))[-1] if root.is_dir() else "")
    bindir = root / version / "bin"
    if not (bindir / "initdb").exists():
        pytest.fail(f"initdb and pg_ctl are required for this test (looked in {bindir})", pytrace=False)
    return bindir


@dataclass
class PrivateServer:
    """A PostgreSQL server of this test's own: `stop()` and `start()` it at will."""

    bindir: Path
    base: Path
    port: int

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        as_owner = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # initdb refuses root
        subprocess.run([*as_owner, str(self.bindir / tool), *args], check=True, capture_output=True, timeout=120)

    def init(self) -> None:
        self._run("initdb", "-D", str(self.base / "data"), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync")

    def start(self) -> None:
        # -w: pg_ctl returns once the server accepts connections
        self._run("pg_ctl", "-D", str(self.base / "data"), "-l", str(self.base / "log"), "-w", "-t", "60", "-o",
                  f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.base / "data"), "-m", "fast", "-w", "-t", "60", "stop")

    def running(self) -> bool:
        return (self.base / "data" / "postmaster.pid").exists()


@pytest.fixture
def private_server() -> Iterator[PrivateServer]:
    base = Path(tempfile.mkdtemp(prefix="sidecar-pg-"))
    if os.geteuid() == 0:
        shutil.chown(base, "postgres", "postgres")
    server = PrivateServer(_bindir(), base, free_port())
    try:
        server.init()
        server.start()
        yield server
    finally:
        if server.running():
            server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
async def private_table(private_server: PrivateServer) -> AsyncIterator[PgTable]:
    table = PgTable(private_server.dsn, "public", f"ev_{uuid.uuid4().hex[:12]}")
    await migrations.apply(table.dsn, table.schema, table.table)
    yield table


async def _send_until_ok(sink, events) -> None:
    """Resend after RetryableError as the core does (without its backoff policy)."""

    async def until_ok() -> None:
        while True:
            try:
                await sink.send(events)
                return
            except RetryableError:
                await asyncio.sleep(0.1)

    await asyncio.wait_for(until_ok(), 60)


async def test_both_sinks_survive_a_postgres_restart(private_server, private_table):
    table = private_table
    emu = SupabaseEmulator(table.dsn, realtime=False)
    await emu.start()
    pg = PostgresSink("postgres", PostgresOptions(dsn=table.dsn, table=table.table, min_pool=2, max_pool=2,
                                                  connect_timeout_s=2), make_ctx("pg"))
    sb = SupabaseSink("supabase", SupabaseOptions(url=emu.url, key=emu.key, table=table.table, timeout_s=5),
                      make_ctx("sb"))
    await pg.start()
    await sb.start()
    before_pg, before_sb = make_events(100), make_events(100)
    during_pg, during_sb = make_events(100), make_events(100)
    try:
        await pg.send(before_pg)
        await sb.send(before_sb)
        await asyncio.to_thread(private_server.stop)
        try:
            with pytest.raises(RetryableError):
                await pg.send(during_pg)
            with pytest.raises(RetryableError):
                await sb.send(during_sb)
        finally:
            await asyncio.to_thread(private_server.start)
        # The pools still hold dead connections; the retries go through once they reconnect.
        await _send_until_ok(pg, during_pg)
        await _send_until_ok(sb, during_sb)
        await _send_until_ok(pg, before_pg)  # re-sends after the restart duplicate nothing
        await _send_until_ok(sb, before_sb)
    finally:
        await pg.close()
        await sb.close()
        await emu.stop()
    counts = await table.count_ids([e.id for e in before_pg + before_sb + during_pg + during_sb])
    assert set(counts.values()) == {1}, "every row exactly once"

