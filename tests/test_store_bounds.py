"""The history store, bounded (issue 18, item 5):

- history queries run in a reader thread: the loop serves /healthz, /api/v1/names and
  ingest while a (deliberately held) /api/v1/series or /api/v1/events query is in progress;
- close() interrupts a runaway query instead of waiting for it;
- a cancel that reaches a write (in the writer thread) propagates, the transaction
  finishes whole, and the batch written again is stored exactly once; an agent whose
  store sink is cancelled inside its write stops, nothing abandoned or dead-lettered;
- the size cap: the file stays near `max_bytes`, the oldest raw events go first (roll-ups
  still answer for them), then the oldest roll-ups; what was trimmed is counted and
  logged, the newest data stays queryable, and a trimmed event delivered again is not
  counted twice; `[dashboard] max_store_mb` reaches the implicit store sink.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.event import Event
from agent.history import query
from agent.history.store import HistoryStore
from agent.runtime import SHUTDOWN_GRACE_S
from tests.dashboard_support import start_agent
from tests.helpers import await_until, jsonl_sink, make_agent, make_events, post_events
from tests.plugins_for_tests import STATE

NOW = 1_700_002_800.0  # a fixed, hour-aligned clock
HOLD_S = 60  # how long a held query waits for its release at most (a hang guard, never the behaviour tested)


def ev(name: str = "m", value: float = 1.0, ts: float = NOW - 10, **kw: Any) -> Event:
    return Event(id=str(uuid.uuid4()), name=name, value=value, ts=ts, kind="gauge", source="t", agent_id="a", **kw)


class Held:
    """Wraps a query function so that its call waits in its thread until released."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.entered = threading.Event()
        self.release = threading.Event()
        self.thread: int | None = None

    def __call__(self, *args: Any, **kw: Any) -> Any:
        self.thread = threading.get_ident()
        self.entered.set()
        self.release.wait(HOLD_S)
        return self.real(*args, **kw)


# -- queries off the loop ----------------------------------------------------------------


@pytest.mark.parametrize("route", ["series", "events"])
async def test_the_loop_serves_other_requests_while_a_history_query_runs(tmp_path: Path, monkeypatch, route):
    agent = await start_agent(tmp_path / "data")
    try:
        now = time.time()
        async with aiohttp.ClientSession() as http:
            await post_events(agent, [{"name": "q", "value": i, "ts": now - 30 + i} for i in range(20)], session=http)
            assert await agent.flush(10)
            held = Held(getattr(query, "series_cells" if route == "series" else "events"))
            monkeypatch.setattr(query, "series_cells" if route == "series" else "events", held)
            params = {"name": "q", "from": str(now - 60), "to": str(now + 1)}
            if route == "series":
                params.update(agg="count", step="60")
            pending = asyncio.create_task(http.get(agent.server_url + f"/api/v1/{route}", params=params))
            # Were the query run on the loop, the loop would sit in release.wait() and not
            # come back here until HOLD_S had passed, with the request already answered.
            await await_until(held.entered.is_set, timeout=HOLD_S, what="the query to start")
            async with http.get(agent.server_url + "/healthz") as r:
                assert r.status == 200
            async with http.get(agent.server_url + "/api/v1/names") as r:
                assert r.status == 200 and "q" in {n["name"] for n in (await r.json())["names"]}
            await post_events(agent, [{"name": "during", "value": 1}], session=http)  # ingest is served too
            assert not pending.done()
            assert held.thread is not None and held.thread != threading.get_ident()
            held.release.set()
            async with await pending as r:
                body = await r.json()
                assert r.status == 200, body
        if route == "series":
            assert sum(v or 0 for v in body["v"]) == 20
        else:
            assert len(body["events"]) == 20
    finally:
        await agent.stop(timeout=5)


async def test_close_interrupts_a_runaway_query(tmp_path: Path):
    store = HistoryStore(tmp_path / "store.db")
    await store.open()
    forever = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c"
    runaway = asyncio.create_task(store._fetch(forever))
    await await_until(lambda: store._readers, what="the query's reader thread")
    await asyncio.wait_for(store.close(), HOLD_S)  # a hang guard: close must not wait for the query
    with pytest.raises(sqlite3.OperationalError, match="interrupt"):
        await runaway


# -- a cancel inside the write -------------------------------------------------------------


@pytest.mark.parametrize("point", ["BEGIN", "SELECT id", "INSERT INTO raw", "INSERT INTO rollup_hour", "COMMIT"])
async def test_a_cancel_inside_the_store_write_propagates(tmp_path: Path, point: str) -> None:
    store = HistoryStore(tmp_path / "store.db")
    await store.open()
    try:
        assert store.writer is not None
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        delivered = threading.Event()

        def trace(sql: str) -> None:  # in the writer thread, as each statement starts
            if sql.startswith(point) and not delivered.is_set():
                loop.call_soon_threadsafe(task.cancel)
                delivered.wait(HOLD_S)  # the cancel reaches write() while this transaction is open

        store.writer.conn.set_trace_callback(trace)
        batch = make_events(50)
        with pytest.raises(asyncio.CancelledError):
            await store.write(batch)
        delivered.set()
        task.uncancel()
        # Not from this thread: the writer may still be inside the statement (and holds the
        # connection's mutex, this thread the GIL).
        await store._in_writer(store.writer.conn.set_trace_callback, None)
        # The transaction ended whole in its thread: the next write works, and the batch
        # written again is stored exactly once whether or not the cancelled one committed.
        assert await store.write(batch) in (0, 50)
        await store.write(make_events(5))
        assert await store._fetch("SELECT count(*) FROM events") == [(55,)]
        assert await store._fetch("SELECT sum(n) FROM rollup_minute") == [(55,)]
    finally:
        await store.close()


async def test_stop_ends_when_the_cancel_reaches_the_store_inside_its_write(tmp_path: Path) -> None:
    """The issue's hang: stop() cancels the store sink while its write is in the writer
    thread. The cancel propagates (nothing dead-lettered as "retryable") and the worker
    ends by itself (nothing abandoned)."""
    STATE.reset()
    agent = make_agent(
        tmp_path / "data", {"out": jsonl_sink(tmp_path / "out.jsonl")}, agent={"shutdown_timeout_s": 0.5}
    )
    await agent.start()
    worker = agent.workers["store"]
    await await_until(lambda: worker.started, what="the store to open")
    store = worker.sink.store  # type: ignore[attr-defined]
    parked, release = threading.Event(), threading.Event()

    def trace(sql: str) -> None:
        if sql == "COMMIT" and not parked.is_set():
            parked.set()
            release.wait(HOLD_S)  # still inside write(): stop's cancel lands on its await

    store.writer.conn.set_trace_callback(trace)
    for i in range(10):
        agent.record("before.stop", i)
    await await_until(parked.is_set, timeout=HOLD_S, what="the store's write to reach COMMIT")
    stopping = asyncio.create_task(agent.stop())

    def store_cancelled() -> bool:
        tasks = [t for t in asyncio.all_tasks() if t.get_name().startswith("sink:store")]
        return all(t.cancelling() or t.done() for t in tasks)

    await await_until(store_cancelled, timeout=HOLD_S, what="stop() to cancel the store sink")
    release.set()
    await asyncio.wait_for(stopping, HOLD_S + 0.5 + SHUTDOWN_GRACE_S)
    assert agent.abandoned == []  # the cancel propagated: the worker ended by itself
    assert agent.dlq is not None and agent.dlq.depth("store") == 0
    assert agent.workers["store"].stats.dead_lettered == 0


# -- the size cap ------------------------------------------------------------------------------


def file_bytes(path: Path) -> tuple[int, int]:
    """(pages of store.db, WAL included, times the page size; the WAL file's size)."""
    with sqlite3.connect(path) as conn:
        pages = conn.execute("PRAGMA page_count").fetchone()[0] * conn.execute("PRAGMA page_size").fetchone()[0]
    wal = path.with_name(path.name + "-wal")
    return pages, wal.stat().st_size if wal.exists() else 0


async def test_the_cap_trims_the_oldest_raw_events_first_and_reports_it(tmp_path: Path, caplog):
    cap = 2 * 1024 * 1024
    path = tmp_path / "store.db"
    store = HistoryStore(path, max_bytes=cap, log=logging.getLogger("test.store"))
    await store.open()
    caplog.set_level(logging.WARNING, logger="test.store")
    try:
        batches = [
            [
                ev(ts=NOW - 3000 + b * 10 + i / 100, tags={"host": f"h{i % 7}"}, data={"pad": "x" * 200})
                for i in range(500)
            ]
            for b in range(40)
        ]  # about 12 MB of raw events in all
        biggest = 0
        for batch in batches:
            assert await store.write(batch, now=NOW) == 500
            pages, wal = file_bytes(path)
            biggest = max(biggest, pages)
            assert pages <= cap + 512 * 1024, (pages, cap)  # over the cap by at most about one batch
            assert wal <= cap // 8 + 512 * 1024
        assert biggest > cap * 0.8  # it did fill up to the cap
        stats = store.stats
        assert stats["trims"] > 0 and stats["trimmed_rows"] > 0 and stats["trimmed_bytes"] > 0
        assert stats["bytes"] <= cap
        assert any("trimmed" in r.getMessage() and "raw events" in r.getMessage() for r in caplog.records)
        # The newest batch is all there; the oldest raw events are gone.
        newest, _ = await store.events(limit=1000)
        ids = {e["id"] for e in newest}
        assert {e.id for e in batches[-1]} <= ids
        assert not ids & {e.id for e in batches[0]}
        assert stats["trimmed_rows"] >= 500 and (await store._fetch("SELECT count(*) FROM raw"))[0][0] < 20_000
        # Raw data goes first: the roll-ups still count every event, the trimmed ones too.
        s = await store.series("m", NOW - 3600, NOW, 60, "count", now=NOW)
        assert s["level"] == "minute" and sum(v or 0 for v in s["v"]) == 20_000
        # A fine step over a trimmed range comes from the roll-ups, not from the raw rows left.
        assert store.choose_level(NOW - 3000, NOW, 5, NOW)[0] == "minute"
        # A trimmed event delivered again is skipped, not counted twice.
        assert await store.write(batches[0], now=NOW) == 0
        assert stats["skipped_old"] == 500
        s = await store.series("m", NOW - 3600, NOW, 60, "count", now=NOW)
        assert sum(v or 0 for v in s["v"]) == 20_000
    finally:
        await store.close()
    reopened = HistoryStore(path, max_bytes=cap)  # the trimmed boundary survives a restart
    await reopened.open()
    try:
        assert await reopened.write(batches[0][:10], now=NOW) == 0
    finally:
        await reopened.close()


async def test_past_the_raw_events_the_oldest_roll_ups_go(tmp_path: Path):
    cap = 1024 * 1024
    store = HistoryStore(tmp_path / "store.db", max_bytes=cap)
    await store.open()
    try:
        # A new series per event over 3 hours: the roll-ups alone outgrow the cap.
        for b in range(36):
            batch = [ev(ts=NOW - 3 * 3600 + b * 300 + i / 10, tags={"k": f"{b}-{i}"}) for i in range(500)]
            await store.write(batch, now=NOW)
            assert store.stats["bytes"] <= cap
        assert store.stats["trimmed_rows"] > 0
        minutes = await store._fetch("SELECT min(bucket), count(*) FROM rollup_minute")
        hours = await store._fetch("SELECT min(bucket) FROM rollup_hour")
        assert minutes[0][0] > NOW - 3 * 3600  # the oldest minutes went
        assert minutes[0][1] > 0  # the newest are there
        assert hours[0][0] is not None and hours[0][0] <= minutes[0][0]  # hours go only after the minutes
        s = await store.series("m", NOW - 600, NOW, 60, "count", now=NOW)
        assert sum(v or 0 for v in s["v"]) > 0
    finally:
        await store.close()


async def test_dashboard_max_store_mb_caps_the_agents_store(tmp_path: Path):
    agent = await start_agent(tmp_path / "data", dashboard={"max_store_mb": 1.5})
    try:
        store = agent.workers["store"].sink.store  # type: ignore[attr-defined]
        assert store.max_bytes == int(1.5 * 1024 * 1024)
        now = time.time()
        async with aiohttp.ClientSession() as http:
            for _ in range(16):
                await post_events(
                    agent,
                    [
                        {"name": "big", "value": i, "ts": now - 100 + i / 1000, "data": {"pad": "y" * 300}}
                        for i in range(1000)
                    ],
                    session=http,
                )
            assert await agent.flush(30)
            async with http.get(agent.server_url + "/api/v1/sinks") as r:
                sinks = {s["name"]: s for s in (await r.json())["sinks"]}
            async with http.get(agent.server_url + "/metrics") as r:
                metrics = dict(line.rsplit(" ", 1) for line in (await r.text()).splitlines() if line[:1] != "#")
        reported = sinks["store"]["policies"]["store"]
        assert reported["trimmed_rows"] > 0 and reported["trimmed_bytes"] > 0
        assert reported["max_bytes"] == store.max_bytes
        assert int(metrics['sidecar_agent_store_trimmed_rows_total{sink="store"}']) >= reported["trimmed_rows"] > 0
        assert int(metrics['sidecar_agent_store_trimmed_bytes_total{sink="store"}']) > 0
        assert 0 < int(metrics['sidecar_agent_store_bytes{sink="store"}']) <= store.max_bytes
    finally:
        await agent.stop(timeout=5)


@pytest.mark.parametrize("few", [1, 500])
async def test_many_series_and_few_give_the_same_answers(tmp_path: Path, monkeypatch, few: int):
    """A name with more than query.FEW_SERIES tag sets is read by time range, not per series."""
    monkeypatch.setattr(query, "FEW_SERIES", few)
    store = HistoryStore(tmp_path / "store.db")
    await store.open()
    try:
        batch = [
            ev(value=float(i), ts=NOW - 300 + i, tags={"host": f"h{i % 10}", "dc": f"d{i % 2}"}) for i in range(200)
        ]
        batch += [ev(name="other", value=1000.0, ts=NOW - 300 + i, tags={"host": f"h{i % 10}"}) for i in range(50)]
        await store.write(batch, now=NOW)
        for step in (1, 60):
            for tags, want in (({}, range(200)), ({"host": "h3"}, range(3, 200, 10)), ({"dc": "d1"}, range(1, 200, 2))):
                for agg, expect in (("count", len(want)), ("sum", float(sum(want))), ("max", float(max(want)))):
                    s = await store.series("m", NOW - 600, NOW, step, agg, tags, now=NOW)
                    got = [v for v in s["v"] if v is not None]
                    combined = sum(got) if agg in ("count", "sum") else max(got)
                    assert combined == expect, (step, tags, agg, s["level"])
            s = await store.series(None, NOW - 600, NOW, step, "count", {"host": "h3"}, now=NOW)
            assert sum(v or 0 for v in s["v"]) == 20 + 5
        seen, cursor = [], None  # raw events of one name, newest first, page by page
        while True:
            page, cursor = await store.events(name="m", limit=64, cursor=cursor)
            seen += page
            if cursor is None:
                break
        assert [e["id"] for e in seen] == [e.id for e in reversed(batch[:200])]
    finally:
        await store.close()
