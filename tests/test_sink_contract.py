"""The contract every sink passes: jsonl, store, postgres, supabase (through the emulator
over the real PostgreSQL), and each new one.

Each sink is built the way the agent builds it (its registration in the plugin host, its
options converted from a `[sinks.NAME]` table) and driven through the sink API; one case
runs the whole agent, for the bisection into the DLQ. A sink-specific test belongs in
that sink's own file (test_postgres_sink.py, test_supabase_sink.py, ...).

To add a sink: write an `open_<kind>` context manager that yields a `Harness` (its options
table and a `read_back` adapter that returns what landed as event-shaped dicts), and add
one `SinkKind` line to KINDS saying what it can do. Capabilities choose the cases it runs:
a case never skips, so a missing service fails instead of passing silently.
"""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import pytest

from agent.errors import PermanentError, RetryableError
from agent.event import Event
from agent.plugin.base import BaseSink, PluginContext
from agent.plugin.host import PluginHost
from tests.faultserver import TcpGate
from tests.helpers import (
    agent_config,
    await_until,
    make_ctx,
    make_events,
    post_events,
    read_jsonl,
)

Landed = list[dict[str, Any]]  # event-shaped: id, name, kind, value, ts, tags, source, agent_id, session_id, data


@dataclass
class Harness:
    """One sink under test: how to build it and how to read back what landed."""

    kind: str
    options: dict[str, Any]  # its [sinks.NAME] table, without type and policies
    read_back: Callable[[], Awaitable[Landed]]
    # Changes an event so that this sink refuses it permanently (sinks that classify).
    poisons: list[Callable[[Event], None]] = field(default_factory=list)
    permanent_match: str = ""  # what a PermanentError for a bad event says
    gate: TcpGate | None = None  # the network between a remote sink and its backend
    unreachable: tuple[dict[str, Any], str | None] = ({}, None)  # options that point nowhere, and the error
    missing_table: tuple[dict[str, Any], str] | None = None  # options naming no table, and the error
    pg_table: Any = None  # the table a table sink writes (tests.conftest_supabase.PgTable)
    ctx: PluginContext | None = None

    def build(self, **override: Any) -> BaseSink:
        """The sink as the agent builds it: registration, options struct, context."""
        reg = PluginHost().load().get("sinks", self.kind)
        options = msgspec.convert({**self.options, **override}, reg.options)
        self.ctx = make_ctx(self.kind)
        return reg.factory(self.kind, options, self.ctx)


@dataclass(frozen=True)
class SinkKind:
    name: str
    open: Callable[[dict[str, Any], Path], AbstractAsyncContextManager[Harness]]
    needs: tuple[str, ...] = ()  # fixtures its backend needs (passed to `open` by name)
    idempotent: bool = True  # a resent id lands once (else: at least once)
    classifies: bool = False  # tells a bad event (PermanentError) from an outage (RetryableError)
    remote: bool = False  # has a network to its backend: outages, unreachable servers
    table: bool = False  # writes monitoring_events rows (agent.table.rows)


# -- the sinks -------------------------------------------------------------------------


@asynccontextmanager
async def open_jsonl(fixtures: dict[str, Any], tmp_path: Path) -> AsyncIterator[Harness]:
    path = tmp_path / "out.jsonl"

    async def read_back() -> Landed:
        return read_jsonl(path)

    yield Harness("jsonl", {"path": str(path)}, read_back)


@asynccontextmanager
async def open_store(fixtures: dict[str, Any], tmp_path: Path) -> AsyncIterator[Harness]:
    path = tmp_path / "store.db"
    cols = ("id", "name", "kind", "value", "ts", "tags", "source", "agent_id", "session_id", "data")

    async def read_back() -> Landed:
        if not path.exists():
            return []
        with sqlite3.connect(path) as conn:  # a reader of its own, as the dashboard's is
            rows = conn.execute(f"SELECT {', '.join(cols)} FROM events").fetchall()
        return [{**dict(zip(cols, r)), "tags": json.loads(r[5]), "data": json.loads(r[9]) if r[9] else None}
                for r in rows]

    yield Harness("store", {"path": str(path)}, read_back)


def _from_row(r: Any) -> dict[str, Any]:
    return {"id": str(r["id"]), "name": r["event_type"], "kind": r["kind"], "value": r["value"],
            "ts": r["timestamp"].timestamp(), "tags": json.loads(r["tags"]) if r["tags"] else {},
            "source": r["source"], "agent_id": r["agent_id"], "session_id": r["session_id"],
            "data": json.loads(r["data"]) if r["data"] else None}


def _nul_in_name(e: Event) -> None:
    e.name = "nul\u0000name"  # text cannot hold NUL: 22021


def _nul_in_data(e: Event) -> None:
    e.data = {"bad": "nul \u0000 byte"}  # jsonb rejects \u0000: 22P05


@asynccontextmanager
async def open_postgres(fixtures: dict[str, Any], tmp_path: Path) -> AsyncIterator[Harness]:
    table = fixtures["pg_table"]
    url = urllib.parse.urlsplit(table.dsn)
    async with TcpGate(url.hostname or "127.0.0.1", url.port or 5432) as gate:
        through_gate = url._replace(netloc=f"{url.username}@127.0.0.1:{gate.port}").geturl()

        async def read_back() -> Landed:
            return [_from_row(r) for r in await table.fetch("SELECT * FROM {t}")]

        yield Harness("postgres", {"dsn": through_gate, "schema": table.schema, "table": table.table,
                                   "connect_timeout_s": 5},
                      read_back, poisons=[_nul_in_name, _nul_in_data], permanent_match="postgres: 22",
                      gate=gate, unreachable=({"dsn": "postgresql://postgres@127.0.0.1:9/x", "connect_timeout_s": 2}, None),
                      missing_table=({"table": "no_such_table"}, "42P01"), pg_table=table)


@asynccontextmanager
async def open_supabase(fixtures: dict[str, Any], tmp_path: Path) -> AsyncIterator[Harness]:
    table = fixtures["pg_table"]
    emu = fixtures["supabase_emulator"]
    url = urllib.parse.urlsplit(emu.url)
    async with TcpGate(url.hostname or "127.0.0.1", url.port or 80) as gate:

        async def read_back() -> Landed:
            return [_from_row(r) for r in await table.fetch("SELECT * FROM {t}")]

        yield Harness("supabase", {"url": f"http://127.0.0.1:{gate.port}", "key": emu.key, "table": table.table,
                                   "timeout_s": 5},
                      read_back, poisons=[_nul_in_data], permanent_match="22P05", gate=gate,
                      unreachable=({"url": "http://127.0.0.1:9", "key": "k", "timeout_s": 2}, "transport"),
                      missing_table=({"table": "no_such_table"}, "PGRST205"), pg_table=table)


KINDS = [
    SinkKind("jsonl", open_jsonl, idempotent=False),
    SinkKind("store", open_store),
    SinkKind("postgres", open_postgres, ("pg_table",), classifies=True, remote=True, table=True),
    SinkKind("supabase", open_supabase, ("pg_table", "supabase_emulator"), classifies=True, remote=True, table=True),
]


def kinds(**need: bool) -> list[Any]:
    return [pytest.param(k, id=k.name) for k in KINDS if all(getattr(k, f) == v for f, v in need.items())]


@pytest.fixture
def backends(request: pytest.FixtureRequest, kind: SinkKind) -> dict[str, Any]:
    """The fixtures this kind of sink needs, and only those (jsonl needs no PostgreSQL)."""
    return {name: request.getfixturevalue(name) for name in kind.needs}


@pytest.fixture
async def harness(backends: dict[str, Any], tmp_path: Path, kind: SinkKind) -> AsyncIterator[Harness]:
    async with kind.open(backends, tmp_path) as h:
        yield h


async def send_all(sink: BaseSink, *batches: list[Event]) -> None:
    await sink.start()
    try:
        for b in batches:
            await sink.send(b)
    finally:
        await sink.close()


def varied_events(n: int) -> list[Event]:
    events = make_events(n, session_id="s-9")
    for i, e in enumerate(events):
        e.kind = ("gauge", "counter", "histogram", "event")[i % 4]
        if e.kind == "event":
            e.value = None
        if i % 5 == 0:
            e.session_id, e.data, e.tags = None, None, {}
    return events


def assert_fields(landed: dict[str, Any], e: Event) -> None:
    assert landed["id"] == e.id and landed["name"] == e.name and landed["kind"] == e.kind
    assert landed["value"] == e.value and abs(landed["ts"] - e.ts) < 1e-3
    assert landed["tags"] == e.tags and landed["data"] == e.data
    assert (landed["source"], landed["agent_id"], landed["session_id"]) == (e.source, e.agent_id, e.session_id)


# -- the contract ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", kinds())
async def test_delivers_every_event_once_with_its_fields(harness):
    events = varied_events(120)
    await send_all(harness.build(), events[:40], events[40:80], events[80:])
    landed = await harness.read_back()
    assert Counter(x["id"] for x in landed) == Counter(e.id for e in events)
    by_id = {x["id"]: x for x in landed}
    for e in events:
        assert_fields(by_id[e.id], e)


@pytest.mark.parametrize("kind", kinds())
async def test_a_resent_batch_loses_nothing_and_an_idempotent_sink_lands_each_id_once(harness, kind):
    events, fresh = make_events(50), make_events(5)
    # the same batch twice, duplicates inside one batch, and old ids mixed with new ones
    await send_all(harness.build(), events, events, events[:10] + events[:10], events[10:20] + fresh)
    counts = Counter(x["id"] for x in await harness.read_back())
    assert set(counts) == {e.id for e in events + fresh}
    if kind.idempotent:
        assert set(counts.values()) == {1}
    else:  # at least once: the journal's cursor, not the sink, prevents resends
        assert counts[events[0].id] == 4 and counts[fresh[0].id] == 1


@pytest.mark.parametrize("kind", kinds(classifies=True))
async def test_a_bad_event_fails_its_batch_permanently_and_the_rest_land_alone(harness):
    sink = harness.build()
    events = make_events(10)
    bad = [events[3], events[7]][: len(harness.poisons)]
    for e, poison in zip(bad, harness.poisons):
        poison(e)
    good = [e for e in events if e not in bad]
    await sink.start()
    try:
        with pytest.raises(PermanentError, match=harness.permanent_match):
            await sink.send(events)
        await sink.send(good)  # what the core's bisection ends up doing
        for e in bad:
            with pytest.raises(PermanentError):
                await sink.send([e])
        await sink.send(good)  # the sink is still usable after failures
    finally:
        await sink.close()
    counts = Counter(x["id"] for x in await harness.read_back())
    assert all(counts[e.id] == 0 for e in bad)
    assert sorted(counts.elements()) == sorted(e.id for e in good)


@pytest.mark.parametrize("kind", kinds(classifies=True))
async def test_the_agent_bisects_bad_events_into_the_dlq_and_delivers_the_rest(harness, tmp_path):
    cfg = agent_config(tmp_path / "data", dashboard={"store": False},
                       sinks={"db": {"type": harness.kind, **harness.options, "batch_size": 50,
                                     "policies": ["timeout", "retry", "circuit_breaker"],
                                     "retry": {"max_attempts": 2, "initial_backoff_ms": 10, "max_backoff_ms": 20},
                                     "circuit_breaker": {"failure_threshold": 50, "reset_timeout_s": 0.2}}})
    from agent.runtime import Agent

    async with Agent(cfg) as agent:
        events = [{"name": "mixed", "value": i} for i in range(40)]
        events[7]["data"] = {"note": "bad\u0000byte"}  # PostgreSQL rejects NUL in jsonb/text
        events[30]["tags"] = {"k": "also\u0000bad"}
        ids = await post_events(agent, events)
        await await_until(lambda: agent.dlq.depth("db") == 2 and agent.journal.lag("db") == 0,
                          what="bisection into the DLQ")
        entries = await agent.dlq.entries(sink="db")
        dead = {e.id for entry in entries for e in await agent.dlq.events(entry.id)}
        assert dead == {ids[7], ids[30]}
        assert all(e.count == 1 for e in entries)
    counts = Counter(x["id"] for x in await harness.read_back())
    assert set(counts) == set(ids) - dead and set(counts.values()) == {1}


async def _send_until_ok(sink: BaseSink, events: list[Event]) -> int:
    """Resend after RetryableError as the core does (without its backoff); return the failures."""
    failures = 0

    async def attempt() -> bool:
        nonlocal failures
        try:
            await sink.send(events)
            return True
        except RetryableError:
            failures += 1
            return False

    async def until_ok() -> None:
        while not await attempt():
            await asyncio.sleep(0.05)

    await asyncio.wait_for(until_ok(), 60)
    return failures


@pytest.mark.parametrize("kind", kinds(remote=True))
async def test_an_outage_is_retryable_and_resends_after_it_lose_and_duplicate_nothing(harness):
    assert harness.gate is not None
    sink = harness.build()
    before, during = make_events(30), make_events(30)
    await sink.start()
    try:
        await sink.send(before)
        harness.gate.close()  # the network goes: open connections reset, new ones refused
        with pytest.raises(RetryableError):
            await sink.send(during)
        with pytest.raises(RetryableError):
            await sink.send(during)
        harness.gate.open()
        await _send_until_ok(sink, during)
        await _send_until_ok(sink, before)  # a resend of what had landed before the outage
    finally:
        await sink.close()
    counts = Counter(x["id"] for x in await harness.read_back())
    assert set(counts) == {e.id for e in before + during} and set(counts.values()) == {1}


@pytest.mark.parametrize("kind", kinds(remote=True))
async def test_an_unreachable_server_is_retryable(harness):
    options, message = harness.unreachable
    sink = harness.build(**options)
    await sink.start()  # logs, does not raise: remote sinks connect lazily
    try:
        with pytest.raises(RetryableError, match=message):
            await sink.send(make_events(1))
    finally:
        await sink.close()


@pytest.mark.parametrize("kind", kinds(table=True))
async def test_a_missing_table_is_permanent(harness):
    assert harness.missing_table is not None
    options, code = harness.missing_table
    sink = harness.build(**options)
    await sink.start()
    try:
        with pytest.raises(PermanentError, match=code):
            await sink.send(make_events(1))
    finally:
        await sink.close()


@pytest.mark.parametrize("kind", kinds())
async def test_close_is_safe_twice_and_before_start(harness):
    never_started = harness.build()
    await never_started.close()
    await never_started.close()
    sink = harness.build()
    await sink.start()
    await sink.send(make_events(3))
    await sink.close()
    await sink.close()
    assert len(await harness.read_back()) == 3


@pytest.mark.parametrize("kind", kinds())
async def test_unicode_and_large_data_round_trip(harness):
    events = make_events(3)
    events[0].name = "ünïcødé.测试.🚀"
    events[0].tags = {"città": "東京 🗼", "rtl": "שלום", "quote": "it's \"quoted\" \\ backslash"}
    events[1].data = {"blob": "é" * 200_000, "nested": {"list": [1, "二", {"emoji": "🙂"}], "none": None}}
    events[2].data = {"line": "a\nb\tc\r", "control": "\u0001\u001f"}
    await send_all(harness.build(), events)
    by_id = {x["id"]: x for x in await harness.read_back()}
    for e in events:
        assert_fields(by_id[e.id], e)


@pytest.mark.parametrize("kind", kinds(table=True))
async def test_nonfinite_values_are_stored_as_null_with_the_original_kept(harness):
    sink = harness.build()
    events = make_events(4)
    events[0].value, events[1].value, events[2].value = math.inf, math.nan, -math.inf
    events[3].data = {"nested": math.nan}
    await send_all(sink, events)
    by_id = {x["id"]: x for x in await harness.read_back()}
    for e, name in zip(events[:3], ("Infinity", "NaN", "-Infinity")):
        assert by_id[e.id]["value"] is None and by_id[e.id]["data"]["value_nonfinite"] == name
    assert by_id[events[3].id]["data"] == {"nested": None}
    assert harness.ctx is not None and harness.ctx.stats["nonfinite_values"] == 3


@pytest.mark.parametrize("kind", kinds(table=True))
async def test_rows_fill_the_table_columns(harness):
    (e,) = make_events(1, session_id="s-1")
    await send_all(harness.build(), [e])
    (r,) = await harness.pg_table.fetch("SELECT *, tags::text AS tags_text, data::text AS data_text FROM {t}")
    assert str(r["id"]) == e.id and r["event_type"] == "cpu.percent" and r["kind"] == "gauge"
    assert r["created_at"] is not None and r["metadata"] is None and r["session_id"] == "s-1"
    assert '"host": "h1"' in r["tags_text"] and r["data_text"] == '{"k": 0}'
