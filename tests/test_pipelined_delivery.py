"""Pipelined delivery (issue 16): several batches in flight per sink, the cursor moving in
journal order, against the PostgREST emulator with injected latency (real supabase-py
client, real PostgreSQL, real sockets)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from agent.pipeline.inflight import AdaptiveLimit
from agent.runtime import Agent
from tests.helpers import await_until, plan_error
from tests.supabase_emulator import SupabaseEmulator

BATCH = 50


class GatedEmulator(SupabaseEmulator):
    """The emulator, plus per-request control: a request whose rows include a `held` id
    waits until that id's gate opens; one including a `failing` id is answered 503. It
    also counts requests in flight and their peak."""

    def __init__(self, dsn: str) -> None:
        super().__init__(dsn, realtime=False)
        self.held: dict[str, asyncio.Event] = {}
        self.failing: set[str] = set()
        self.active = 0
        self.peak = 0
        self.failed = 0

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        self.active += 1
        self.peak = max(self.peak, self.active)
        try:
            if request.method == "POST":
                body = (await request.read()).decode()  # cached: the emulator reads it again
                for key, gate in list(self.held.items()):
                    if key in body:
                        await gate.wait()
                if any(key in body for key in self.failing):
                    self.failed += 1
                    return web.Response(status=503, text="injected failure")
            return await super()._rest(request)
        finally:
            self.active -= 1


@pytest.fixture
async def emu(pg_database: str) -> Any:
    e = GatedEmulator(pg_database)
    await e.start()
    try:
        yield e
    finally:
        for gate in e.held.values():
            gate.set()
        await e.stop()


def config(tmp_path: Path, emu: SupabaseEmulator, table: str, **sink: Any) -> dict[str, Any]:
    return {
        "agent": {"data_dir": str(tmp_path / "data"), "commit_interval_ms": 2, "shutdown_timeout_s": 2},
        "server": {"enabled": False},
        "dashboard": {"store": False},
        "sinks": {
            "sb": {"type": "supabase", "url": emu.url, "key": emu.key, "table": table, "batch_size": BATCH, **sink}
        },
    }


async def backlog(agent: Agent, n: int) -> list[str]:
    """Journal `n` events while the sink is switched off; return the ids of every event
    after the cursor in journal order (the kill switch's audit event comes first), so
    ids[k * BATCH : (k + 1) * BATCH] is the sink's batch k."""
    agent.flags.set("sinks.sb.enabled", False, "test")
    for k in range(n - 1):
        agent.record("app.work", float(k), kind="gauge")
    assert await agent.committer.drain(20)
    start = agent.journal.cursors["sb"]
    rows, _ = await agent.journal.read_batch(start, 100_000)
    assert len(rows) == n
    return [e.id for _, e in rows]


async def counts(table: Any, ids: list[str]) -> list[int]:
    found = await table.count_ids(ids)
    return [found[i] for i in ids]


async def test_a_backlog_goes_out_with_batches_in_flight_exactly_once(tmp_path, emu, pg_table) -> None:
    emu.delay_s = 0.05  # every request 50 ms slower: one batch at a time would take 40 round trips
    async with Agent(config(tmp_path, emu, pg_table.table, max_in_flight=4)) as agent:
        ids = await backlog(agent, 40 * BATCH)
        agent.flags.set("sinks.sb.enabled", True, "test")
        assert await agent.flush(120)
        described = agent.workers["sb"].describe()
        assert described["max_in_flight"] == 4 and described["in_flight"] == 0
        assert agent.ledger.total() == 0 and described["dlq_pending"] == 0
    assert await counts(pg_table, ids) == [1] * len(ids)
    assert emu.peak > 1  # the server did see batches overlap
    assert emu.peak <= 4  # never more than the limit


async def test_the_cursor_waits_for_an_earlier_batch_that_later_ones_overtook(tmp_path, emu, pg_table) -> None:
    async with Agent(config(tmp_path, emu, pg_table.table, max_in_flight=4)) as agent:
        ids = await backlog(agent, 4 * BATCH)
        start = agent.journal.cursors["sb"]
        emu.held[ids[0]] = asyncio.Event()  # the first batch is slow
        agent.flags.set("sinks.sb.enabled", True, "test")
        later = ids[BATCH:]
        # The three later batches are confirmed by the database...
        await await_until(lambda: emu.peak >= 4, what="four batches in flight")
        for _ in range(400):
            if await counts(pg_table, later) == [1] * len(later):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the later batches were not written")
        worker = agent.workers["sb"]
        await await_until(lambda: worker.describe()["in_flight"] == 1, what="only the first batch still in flight")
        # ...but the cursor stays before the first one, which is still in flight.
        assert agent.journal.cursors["sb"] == start
        assert await counts(pg_table, ids[:BATCH]) == [0] * BATCH
        emu.held[ids[0]].set()
        assert await agent.flush(60)
        assert agent.journal.cursors["sb"] >= agent.journal.last_seq
    assert await counts(pg_table, ids) == [1] * len(ids)


async def test_a_failing_batch_holds_the_cursor_and_a_restart_sends_it_once(tmp_path, emu, pg_table) -> None:
    # Batch 2 of 4 fails at the server while the others are confirmed: it is retried (its
    # budget is not spent), so it is still ours and the cursor must not pass it.
    sink = {
        "max_in_flight": 4,
        "retry": {
            "max_attempts": 10_000,
            "initial_backoff_ms": 10,
            "max_backoff_ms": 50,
            "max_elapsed_s": 600,
            "budget_min_retries": 100_000,
        },
    }
    cfg = config(tmp_path, emu, pg_table.table, **sink)
    async with Agent(cfg) as agent:
        ids = await backlog(agent, 4 * BATCH)
        start = agent.journal.cursors["sb"]
        emu.failing.add(ids[BATCH])
        agent.flags.set("sinks.sb.enabled", True, "test")
        rest = ids[:BATCH] + ids[2 * BATCH :]
        for _ in range(400):
            if await counts(pg_table, rest) == [1] * len(rest) and emu.failed >= 3:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the other batches were not written, or batch 2 not retried")
        worker = agent.workers["sb"]
        first_end = start + BATCH
        assert start <= agent.journal.cursors["sb"] <= first_end  # past batch 1 at most, never past batch 2
        assert worker.describe()["dlq_pending"] == 0
        assert worker.limit.cuts >= 1  # the failures cut the concurrency limit
    # Stopped with batch 2 still being retried: it was cancelled, not parked, so it and
    # everything after it is still journaled past the cursor.
    assert await counts(pg_table, ids[BATCH : 2 * BATCH]) == [0] * BATCH
    emu.failing.clear()
    async with Agent(cfg) as agent:
        assert agent.journal.cursors["sb"] <= first_end
        assert agent.workers["sb"].describe()["dlq_pending"] == 0
        assert await agent.flush(60)
        assert agent.ledger.total() == 0
    assert await counts(pg_table, ids) == [1] * len(ids)  # batches 3 and 4 went twice, landed once


async def test_stop_with_batches_in_flight_ends_and_keeps_them_journaled(tmp_path, emu, pg_table) -> None:
    # Neither the timeout policy nor the HTTP client gives up on the hung requests first.
    cfg = config(tmp_path, emu, pg_table.table, max_in_flight=4, timeout={"timeout_s": 600}, timeout_s=600)
    gate = asyncio.Event()
    agent = Agent(cfg)
    await agent.start()
    try:
        ids = await backlog(agent, 4 * BATCH)
        for k in range(4):
            emu.held[ids[k * BATCH]] = gate  # every batch hangs at the server
        agent.flags.set("sinks.sb.enabled", True, "test")
        await await_until(lambda: emu.active >= 4, what="four batches hanging at the server")
        start = agent.journal.cursors["sb"]
    finally:
        # The requests hang for good: stop must still end (bounded by shutdown_timeout_s + grace),
        # the generous bound here only keeps a broken stop from hanging the suite.
        await asyncio.wait_for(agent.stop(), 120)
    assert agent.state == "stopped" and agent.abandoned == []
    assert agent.journal.cursors["sb"] == start
    gate.set()
    await await_until(lambda: emu.active == 0, what="the hung requests to end")
    emu.held.clear()
    # What the cancelled requests wrote is in the table already or not at all; after a
    # restart every event is there once.
    async with Agent(cfg) as again:
        assert await again.flush(60)
    assert await counts(pg_table, ids) == [1] * len(ids)


def test_default_concurrency_comes_from_the_sink_and_the_config_overrides_it(tmp_path) -> None:
    cfg: dict[str, Any] = {
        "agent": {"data_dir": str(tmp_path / "data")},
        "server": {"enabled": False},
        "dashboard": {"store": False},
        "sinks": {
            "sb": {"type": "supabase", "url": "http://127.0.0.1:9", "key": "k"},
            "file": {"type": "jsonl", "path": str(tmp_path / "out.jsonl")},
            "file4": {"type": "jsonl", "path": str(tmp_path / "out4.jsonl"), "max_in_flight": 4},
        },
    }

    async def build() -> dict[str, int]:
        async with Agent(cfg) as agent:
            return {n: w.limit.maximum for n, w in agent.workers.items()}

    assert asyncio.run(build()) == {"sb": 16, "file": 1, "file4": 4}
    msg = plan_error(tmp_path, '[sinks.out]\ntype = "jsonl"\npath = "x"\nmax_in_flight = 0\n')
    assert "sinks.out.max_in_flight: expected a positive integer" in msg


def test_aimd_halves_once_per_round_and_grows_one_per_round() -> None:
    limit = AdaptiveLimit(8)
    assert limit.current == 8
    limit.congested()
    assert limit.current == 4
    for _ in range(7):  # the other requests of the round that was in flight: no further cut
        limit.congested()
    assert limit.current == 4
    limit.congested()  # a new round
    assert limit.current == 2 and limit.cuts == 2
    for _ in range(3):  # a clean round (2 to 3 requests) adds one: 1/2 + 1/2.5 + 1/2.9
        limit.clean()
    assert limit.current == 3
    for _ in range(100):
        limit.clean()
    assert limit.current == 8  # never above the maximum
    floor = AdaptiveLimit(1)
    floor.congested()
    assert floor.current == 1


async def test_a_failed_dlq_write_with_batches_in_flight_keeps_every_event(tmp_path, monkeypatch) -> None:
    """Batches that fail are parked in the DLQ; when parking the first of them fails (a
    full disk), the cursor stays before it, the later batches in flight are dropped from
    the window and read again: every event ends in the DLQ (some perhaps twice, never
    none) and is delivered once the sink is back."""
    import sqlite3

    from agent.pipeline import delivery
    from tests.helpers import make_agent
    from tests.plugins_for_tests import STATE

    monkeypatch.setattr(delivery, "HOLD_INITIAL_S", 0.05)
    monkeypatch.setattr(delivery, "HOLD_MAX_S", 0.2)
    STATE.reset()
    STATE.down.add("p")  # every send fails retryably (no policies): each batch goes to the DLQ
    agent = make_agent(tmp_path / "data", {"p": {"type": "poison", "batch_size": 10, "max_in_flight": 4}})
    await agent.start()
    try:
        agent.flags.set("sinks.p.enabled", False, "test")
        assert agent.dlq is not None and agent.journal is not None
        real_put = agent.dlq.put
        failures = {"left": 3, "seen": 0}

        async def put(*args: Any, **kw: Any) -> int:
            if failures["left"] and args[0] == "p":
                failures["left"] -= 1
                failures["seen"] += 1
                raise sqlite3.OperationalError("database or disk is full")
            return await real_put(*args, **kw)

        agent.dlq.put = put  # type: ignore[method-assign]
        for i in range(50):
            agent.record("e", i)
        assert await agent.committer.drain(5)
        start = agent.journal.cursors["p"]
        agent.flags.set("sinks.p.enabled", True, "test")
        await await_until(lambda: failures["seen"] >= 1, what="a failed DLQ write")
        assert agent.journal.cursors["p"] == start  # the batch that could not be parked was not skipped
        await await_until(lambda: agent.journal.cursors["p"] == agent.journal.last_seq, what="every batch parked")
        entries = await agent.dlq.entries(sink="p", limit=1000)
        parked = [e.value for entry in entries for e in await agent.dlq.events(entry.id) if e.name == "e"]
        assert set(parked) == set(range(50))
        STATE.down.discard("p")  # the sink is back: the DLQ is replayed
        await await_until(lambda: agent.dlq.depth("p") == 0, timeout=60, what="the replay")
        got = [e.value for e in STATE.delivered.get("p", []) if e.name == "e"]
        assert set(got) == set(range(50))
        assert agent.ledger.by_reason() == {}
    finally:
        await agent.stop()
