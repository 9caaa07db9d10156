"""`[sinks.NAME] aggregate = "10s"` (issue 16, item 4) against real PostgreSQL: the sink gets
per-interval aggregates whose sums equal the raw sums exactly, a re-send (a retry after the
write landed, a restart before the cursor moved) writes the same rows under the same ids and
never counts twice, and the local store keeps the raw events."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from agent.builtin_plugins.postgres import PostgresSink

from agent.errors import RetryableError
from agent.event import Event
from agent.plugin.hookspecs import hookimpl
from agent.runtime import Agent
from tests import plugins_for_tests
from tests.conftest_supabase import PgTable
from tests.helpers import agent_config, await_until, plan_error

T0 = (time.time() // 3600 - 1) * 3600  # an hour ago (within the store's retention), a bucket boundary


class _Faults:
    """What the test sinks do after (or instead of) the real write."""

    def __init__(self) -> None:
        self.fail_after_write = 0  # sends still to fail with RetryableError after the write landed
        self.hang_after_write = False  # never return after the write (the cursor never moves)
        self.sent: list[list[str]] = []  # the ids of every send, in order


FAULTS = _Faults()


class FaultyPostgres(PostgresSink):
    """The real postgres sink; the write lands, then the fault strikes."""

    async def send(self, events: list[Event]) -> None:
        await super().send(events)
        FAULTS.sent.append([e.id for e in events])
        if FAULTS.fail_after_write > 0:
            FAULTS.fail_after_write -= 1
            raise RetryableError("the response was lost after the write landed")
        if FAULTS.hang_after_write:
            await asyncio.Event().wait()


class _Plugins:
    @hookimpl
    def register_sinks(self, register: Any) -> None:
        from agent.builtin_plugins.postgres import PostgresOptions

        register("faulty_postgres", FaultyPostgres, PostgresOptions)


def make(data: Path, table: PgTable, sink_type: str = "postgres", **extra: Any) -> Agent:
    sink = {"type": sink_type, "dsn": table.dsn, "table": table.table, "aggregate": "10s", **extra}
    cfg = agent_config(data, {"pg": sink})
    return Agent(cfg, plugins=[plugins_for_tests, _Plugins()])


def workload(n: int, offset: int = 0) -> list[Event]:
    """Counters, gauges and histograms over three 10 s buckets and two tag sets."""
    out = []
    for k in range(offset, offset + n):
        tags = {"host": f"h{k % 2}"}
        ts = T0 + (k % 30)
        out.append(Event(name="orders", kind="counter", value=float(k % 7 + 1), ts=ts, tags=tags))
        out.append(Event(name="temp", kind="gauge", value=float(k), ts=ts + k * 1e-6, tags=tags))
        out.append(Event(name="latency", kind="histogram", value=float(k % 13) / 4, ts=ts, tags=tags))
    return out


async def rows(table: PgTable) -> list[Any]:
    return await table.fetch("SELECT id::text AS id, event_type, kind, value, tags, data FROM {t}")


def sums(events: list[Event]) -> dict[tuple[str, str], tuple[float, int]]:
    """(name, host) -> (sum of values, count of raw events)."""
    out: dict[tuple[str, str], tuple[float, int]] = {}
    for e in events:
        if e.kind == "gauge":
            continue
        s, n = out.get((e.name, e.tags["host"]), (0.0, 0))
        out[(e.name, e.tags["host"])] = (s + (e.value or 0.0), n + 1)
    return out


def table_sums(found: list[Any]) -> dict[tuple[str, str], tuple[float, int]]:
    import json

    out: dict[tuple[str, str], tuple[float, int]] = {}
    for r in found:
        if r["kind"] == "gauge":
            continue
        tags, data = json.loads(r["tags"]), json.loads(r["data"])
        s, n = out.get((r["event_type"], tags["host"]), (0.0, 0))
        out[(r["event_type"], tags["host"])] = (s + r["value"], n + data["count"])
    return out


async def store_count(agent: Agent) -> int:
    """Raw events in the local store, read page by page over HTTP."""
    n, cursor = 0, None
    async with aiohttp.ClientSession() as s:
        while True:
            q = f"/api/v1/events?limit=1000&from={T0 - 1}&to={T0 + 60}" + (f"&cursor={cursor}" if cursor else "")
            async with s.get(agent.server_url + q) as r:
                body = await r.json()
            n += len(body["events"])
            cursor = body.get("next")
            if not cursor:
                return n


async def test_aggregated_sums_equal_raw_sums_and_the_store_keeps_raw_events(tmp_path: Path, pg_table: PgTable) -> None:
    raw = workload(400)
    async with make(tmp_path / "data", pg_table) as agent:
        await agent.submit(raw)
        assert await agent.flush(timeout=60)
        found = await rows(pg_table)
        assert table_sums(found) == sums(raw)  # sums of floats of quarters: exact
        # far fewer rows than events: per batch, one per series and bucket
        assert len(found) <= len(raw) // 10
        assert {r["kind"] for r in found} == {"counter", "gauge", "histogram"}
        # the gauges: the last value (by ts) per row; the greatest last_ts per bucket is the bucket's last
        import json

        last: dict[tuple[str, float], tuple[float, float]] = {}
        for r in found:
            if r["kind"] == "gauge":
                d, host = json.loads(r["data"]), json.loads(r["tags"])["host"]
                key = (host, d["last_ts"] // 10)
                last[key] = max(last.get(key, (-1.0, 0.0)), (d["last_ts"], r["value"]))
        want: dict[tuple[str, float], tuple[float, float]] = {}
        for e in raw:
            if e.kind == "gauge":
                key = (e.tags["host"], e.ts // 10)
                want[key] = max(want.get(key, (-1.0, 0.0)), (e.ts, e.value or 0.0))
        assert last == want
        await await_until(lambda: agent.workers["store"].journal.lag("store") == 0, timeout=60, what="store")
        assert await store_count(agent) == len(raw)
        sinks = agent.workers["pg"].describe()
        assert sinks["aggregate_s"] == 10 and sinks["aggregated"] == len(raw) - len(found)


async def test_a_send_that_fails_after_the_write_landed_is_resent_with_the_same_ids(
    tmp_path: Path, pg_table: PgTable
) -> None:
    FAULTS.__init__()  # type: ignore[misc]
    FAULTS.fail_after_write = 2
    raw = workload(300)  # 900 events: one batch
    retry = {"max_attempts": 6, "initial_backoff_ms": 5, "max_backoff_ms": 20}
    async with make(
        tmp_path / "data", pg_table, "faulty_postgres", batch_size=1000, policies=["retry"], retry=retry
    ) as agent:
        await agent.submit(raw)
        assert await agent.flush(timeout=60)
    assert FAULTS.fail_after_write == 0
    assert FAULTS.sent[0] == FAULTS.sent[1] == FAULTS.sent[2]  # the same rows, the same ids, three times
    found = await rows(pg_table)
    assert table_sums(found) == sums(raw)
    assert len({r["id"] for r in found}) == len(found) == len({i for ids in FAULTS.sent for i in ids})


async def test_a_restart_before_the_cursor_moved_resends_the_same_range(tmp_path: Path, pg_table: PgTable) -> None:
    """The first run writes a batch, then hangs before its cursor can move, while more
    events are journaled behind it; a naive re-read after the restart would take a bigger
    batch (new ids: the first batch's events counted twice). The persisted range makes the
    second run send exactly the first batch again, then the rest."""
    FAULTS.__init__()  # type: ignore[misc]
    FAULTS.hang_after_write = True
    first, later = workload(100), workload(200, offset=100)
    data = tmp_path / "data"
    async with make(data, pg_table, "faulty_postgres", batch_size=1000) as agent:
        await agent.submit(first)
        agent.workers["pg"].hurry()  # send it now, not after lingering for the interval
        await await_until(lambda: FAULTS.sent, timeout=60, what="the first write")
        await agent.submit(later)  # journaled behind the hanging batch
        await agent.stop(timeout=1)
    db = sqlite3.connect(data / "agent.db")
    try:
        (cursor,) = db.execute("SELECT seq FROM cursors WHERE sink = 'pg'").fetchone()
    finally:
        db.close()
    assert cursor == 0  # the batch never retired
    written = {r["id"] for r in await rows(pg_table)}
    sent_before = len(FAULTS.sent)  # the first batch and, pipelined, maybe the later one too
    FAULTS.hang_after_write = False
    async with make(data, pg_table, "faulty_postgres", batch_size=1000) as agent:
        assert await agent.flush(timeout=60)
    run1, run2 = FAULTS.sent[:sent_before], FAULTS.sent[sent_before:]
    assert run1 and all(ids in run2 for ids in run1)  # the same ranges again: the same ids
    found = await rows(pg_table)
    assert written <= {r["id"] for r in found}
    assert table_sums(found) == sums(first + later)


def test_aggregate_is_checked_and_the_store_ignores_it(tmp_path: Path) -> None:
    msg = plan_error(tmp_path, '[sinks.out]\ntype = "jsonl"\npath = "x.jsonl"\naggregate = "soon"\n')
    assert "sinks.out.aggregate" in msg and "duration" in msg
    from agent.config import load
    from agent.plan import plan
    from agent.plugin.host import PluginHost

    path = tmp_path / "ok.toml"
    path.write_text(
        f'[agent]\ndata_dir = "{tmp_path}"\n[sinks.out]\ntype = "jsonl"\npath = "x.jsonl"\naggregate = "1m"\n'
        '[sinks.store]\naggregate = "10s"\n'
    )
    cfg = load(path)
    specs = {s.name: s for s in plan(cfg, PluginHost(cfg.plugins).load()) if s.kind == "sinks"}
    assert specs["out"].aggregate_s == 60
    assert specs["store"].aggregate_s is None


@pytest.fixture(autouse=True)
def _reset_faults() -> None:
    FAULTS.__init__()  # type: ignore[misc]


async def test_an_aggregating_sink_lingers_for_fuller_batches_until_a_flush(tmp_path: Path) -> None:
    """Five commits of a few events each: a raw sink gets them as they come, an aggregating
    one waits (up to its interval) and sends them as one batch when flush() hurries it."""
    state = plugins_for_tests.STATE
    state.reset()
    cfg = agent_config(tmp_path / "data", {"agg": {"type": "memory", "aggregate": "1h"}, "raw": {"type": "memory"}})
    async with Agent(cfg, plugins=[plugins_for_tests]) as agent:
        for k in range(5):
            await agent.submit(workload(4, offset=4 * k))
            await await_until(lambda k=k: len(state.delivered["raw"]) == 12 * (k + 1), what="raw delivery")
        assert state.calls.get("agg", 0) == 0
        assert await agent.flush(timeout=60)
        assert state.calls["agg"] == 1
        got = state.delivered["agg"]
        assert sum(e.value or 0 for e in got if e.kind == "counter") == sum(
            e.value or 0 for e in workload(20) if e.kind == "counter"
        )


CHILD = """
import asyncio, sys
from pathlib import Path
from tests.conftest_supabase import PgTable
from tests.test_sink_aggregation import FAULTS, make, workload

async def main() -> None:
    data, dsn, table = sys.argv[1:4]
    FAULTS.hang_after_write = True  # every write lands, then never returns: no cursor moves
    agent = make(Path(data), PgTable(dsn, "public", table), "faulty_postgres", batch_size=1000)
    await agent.start()
    await agent.submit(workload(100))
    agent.workers["pg"].hurry()
    while len(FAULTS.sent) < 1:
        await asyncio.sleep(0.01)
    await agent.submit(workload(200, offset=100))
    agent.workers["pg"].hurry()
    while len(FAULTS.sent) < 2:  # pipelined: the second batch is written while the first hangs
        await asyncio.sleep(0.01)
    print("written", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_kill_9_after_the_writes_landed_resends_the_same_rows(tmp_path: Path, pg_table: PgTable) -> None:
    """An agent in its own process writes two aggregated batches and is killed (SIGKILL)
    before either cursor moves; the next run re-sends both ranges: the same ids, no row
    counted twice, the sums exact."""
    import subprocess
    import sys

    from tests.helpers import subprocess_env

    data = tmp_path / "data"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(data), pg_table.dsn, pg_table.table],
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 120)
        assert line.strip() == "written", proc.stderr.read() if proc.stderr else ""
    finally:
        proc.kill()
        proc.wait(60)
    written = {r["id"] for r in await rows(pg_table)}
    assert written
    async with make(data, pg_table, "faulty_postgres", batch_size=1000) as agent:
        assert await agent.flush(timeout=60)
    assert len(FAULTS.sent) == 2  # the two ranges again, nothing else
    assert {i for ids in FAULTS.sent for i in ids} == written  # the same ids as before the kill
    found = await rows(pg_table)
    assert len(found) == len(written)
    assert table_sums(found) == sums(workload(300))
