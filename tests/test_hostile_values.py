"""Hostile values are refused at the edge, in the one validator (event.check()), whichever
way they come in, and never block good events (issue 18, item 4).

- Over HTTP each hostile body (JSON, NDJSON, msgpack) is a 400 naming the item and the
  rule, all or nothing: nothing of the request is journaled, nothing is counted.
- record() and sources count the same events as `invalid`.
- Good events sent after them reach every sink (jsonl, store, postgres).
- Defence in depth: a sink given an event it cannot convert (one that got past the edge
  before these rules, in an old journal or DLQ entry) raises PermanentError naming it, so
  the core bisects the batch and only that event goes to the DLQ.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import pytest

from agent import losses
from agent.event import MAX_DATA_DEPTH, MAX_DATA_ITEMS, Event, check, new_ids
from agent.plugin import PermanentError
from agent.runtime import Agent
from tests.helpers import agent_config, await_until, make_ctx, make_events, post_raw, read_jsonl

JSON, NDJSON, MSGPACK = "application/json", "application/x-ndjson", "application/msgpack"
GOOD = {"name": "good", "value": 1.0}


def _deep_json(levels: int) -> bytes:
    return b'{"a":' * levels + b"1" + b"}" * levels


def _json(*items: bytes) -> bytes:
    return b"[" + b",".join(items) + b"]"


def _ndjson(*items: bytes) -> bytes:
    return b"\n".join(items) + b"\n"


def _msgpack(*items: Any) -> bytes:
    return msgspec.msgpack.encode(list(items))


GOOD_JSON = msgspec.json.encode(GOOD)
# A msgpack array of [GOOD, {"name": "x", "data": {"a": [[[...1]]]}}], nested past msgspec's limit.
DEEP_MSGPACK = b"\x92" + msgspec.msgpack.encode(GOOD) + b"\x82\xa4name\xa1x\xa4data\x81\xa1a" + b"\x91" * 1500 + b"\x01"

# (body, content type, index of the item named, what the error says)
HOSTILE = [
    pytest.param(_json(GOOD_JSON, b'{"name":"x","ts":1e300}'), JSON, 1, "ts must be from 0 (1970-01-01)",
                 id="json-ts-1e300"),
    pytest.param(_json(GOOD_JSON, b'{"name":"x","ts":-1e18}'), JSON, 1, "ts must be from 0 (1970-01-01)",
                 id="json-ts-neg"),
    pytest.param(_json(GOOD_JSON, b'{"name":"x","ts":"9999-12-31T00:00:00Z"}'), JSON, 1, "ts must be from 0",
                 id="json-ts-rfc3339-year-9999"),
    pytest.param(_json(GOOD_JSON, b'{"name":"x","value":1e999}'), JSON, 1, "value must be a finite number, got inf",
                 id="json-value-1e999"),
    pytest.param(b'{"name":"x","value":-1e999}', JSON, 0, "value must be a finite number, got -inf",
                 id="json-object-value-neg-1e999"),
    pytest.param(_json(GOOD_JSON, b'{"name":"x","data":{"a":[1,1e999]}}'), JSON, 1,
                 "data.a[1] must be a finite number", id="json-1e999-in-data"),
    pytest.param(_json(GOOD_JSON, b'{"name":"x","data":{"n":123456789012345678901234567890}}'), JSON, 1,
                 "data.n is an integer out of range", id="json-huge-int-in-data"),
    pytest.param(_json(GOOD_JSON, b'{"name":"x","data":' + _deep_json(MAX_DATA_DEPTH + 1) + b"}"), JSON, 1,
                 f"data nests deeper than {MAX_DATA_DEPTH} levels", id="json-data-33-deep"),
    pytest.param(_json(GOOD_JSON, GOOD_JSON, b'{"name":"x","data":' + _deep_json(1200) + b"}"), JSON, 2,
                 "nests too deeply", id="json-data-1200-deep"),
    pytest.param(b'{"name":"x","data":' + _deep_json(100_000) + b"}", JSON, 0, "nests too deeply",
                 id="json-object-100000-deep"),
    pytest.param(_json(GOOD_JSON, b'{"name":"x","data":{"l":[' + b",".join([b"0"] * MAX_DATA_ITEMS) + b"]}}"), JSON, 1,
                 f"data holds more than {MAX_DATA_ITEMS} values", id="json-data-too-many-values"),
    pytest.param(_ndjson(GOOD_JSON, b'{"name":"x","value":1e999}'), NDJSON, 1, "value must be a finite number",
                 id="ndjson-value-1e999"),
    pytest.param(_ndjson(GOOD_JSON, b'{"name":"x","ts":1e300}'), NDJSON, 1, "ts must be from 0", id="ndjson-ts-1e300"),
    pytest.param(_ndjson(GOOD_JSON, b'{"name":"x","data":' + _deep_json(2000) + b"}"), NDJSON, 1,
                 "line 2 nests too deeply", id="ndjson-data-2000-deep"),
    pytest.param(_msgpack(GOOD, {"name": "x", "value": math.nan}), MSGPACK, 1, "value must be a finite number, got nan",
                 id="msgpack-value-nan"),
    pytest.param(_msgpack(GOOD, {"name": "x", "value": math.inf}), MSGPACK, 1, "value must be a finite number, got inf",
                 id="msgpack-value-inf"),
    pytest.param(_msgpack(GOOD, {"name": "x", "ts": -math.inf}), MSGPACK, 1, "ts must be a finite number",
                 id="msgpack-ts-neg-inf"),
    pytest.param(_msgpack(GOOD, {"name": "x", "ts": 1e300}), MSGPACK, 1, "ts must be from 0", id="msgpack-ts-1e300"),
    pytest.param(_msgpack(GOOD, {"name": "x", "data": {"q": [math.nan]}}), MSGPACK, 1,
                 "data.q[0] must be a finite number", id="msgpack-nan-in-data"),
    pytest.param(_msgpack(GOOD, {"name": "x", "data": {"b": b"\x00bin"}}), MSGPACK, 1,
                 "data.b must be a JSON value, got bytes", id="msgpack-bytes-in-data"),
    pytest.param(DEEP_MSGPACK, MSGPACK, 1, "item nests too deeply", id="msgpack-1500-deep"),
    pytest.param(DEEP_MSGPACK[1 + len(msgspec.msgpack.encode(GOOD)):], MSGPACK, 0, "item nests too deeply",
                 id="msgpack-object-1500-deep"),
]


def _config(tmp_path: Path, pg_table: Any = None, **sections: Any) -> dict[str, Any]:
    sinks: dict[str, dict[str, Any]] = {"out": {"type": "jsonl", "path": str(tmp_path / "out.jsonl")}}
    if pg_table is not None:
        sinks["pg"] = {"type": "postgres", "dsn": pg_table.dsn, "schema": pg_table.schema, "table": pg_table.table,
                       "batch_size": 50}
    return agent_config(tmp_path / "data", sinks, **sections)


def _rfc3339(ts: float) -> bytes:
    return _dt.datetime.fromtimestamp(ts, _dt.UTC).isoformat().encode()


def _store_ids(agent: Agent) -> list[str]:
    with sqlite3.connect(Path(agent.config.agent.data_dir) / "store.db") as conn:
        return [i for (i,) in conn.execute("SELECT id FROM events")]


@pytest.mark.parametrize("body, ctype, index, message", HOSTILE)
async def test_a_hostile_body_is_a_400_naming_the_item_and_nothing_is_accepted(tmp_path, body, ctype, index, message):
    async with Agent(_config(tmp_path, dashboard={"store": False})) as agent:
        answer = await post_raw(agent, body, content_type=ctype)
        assert answer.status == 400, answer.body
        errors = answer.body["errors"]
        assert [e["index"] for e in errors] == [index], errors
        assert message in errors[0]["error"], errors
        assert len(json.dumps(answer.body)) < 4000  # the error names the problem, it does not echo the body
        assert agent.journal.last_seq == 0 and agent.committer.committed == 0
        assert agent.ledger.total() == 0  # a refused request is the client's to retry, never a loss
        # The agent still takes a good request.
        answer = await post_raw(agent, [GOOD])
        assert answer.status == 202, answer.body


def _bad_events() -> list[dict[str, Any]]:
    """record()-shaped hostile events: each breaks one rule HTTP answers 400 for."""
    deep: dict[str, Any] = {}
    cur = deep
    for _ in range(MAX_DATA_DEPTH):
        cur["a"] = {}
        cur = cur["a"]
    return [
        {"value": 1.0, "ts": 1e300},
        {"value": 1.0, "ts": -1e18},
        {"value": math.nan},
        {"value": -math.inf},
        {"value": 10**400},  # past the float range
        {"value": 1.0, "data": deep},
        {"value": 1.0, "data": {"x": math.inf}},
        {"value": 1.0, "data": {"big": 2**64}},
        {"value": 1.0, "data": {"when": object()}},
        {"value": 1.0, "data": {1: "int key"}},
        {"value": 1.0, "data": {"s": "lone \ud800 surrogate"}},
    ]


# A source's Event must carry string tags (record() turns its tag values into strings).
BAD_SOURCE_ONLY = [{"value": 1.0, "tags": {"k": 1}}, {"value": 1.0, "session_id": 7}]


@pytest.mark.parametrize("fields", _bad_events() + BAD_SOURCE_ONLY)
def test_the_validator_refuses_each_with_a_value_error(fields):
    e = Event(name="x", kind="gauge", ts=fields.pop("ts", time.time()), **fields)
    with pytest.raises(ValueError):
        check(e)


def test_the_ts_window_is_configurable():
    now = time.time()
    check(Event(name="x", ts=0.0))  # 1970-01-01 itself is in
    check(Event(name="x", ts=now + 300 * 86400))  # within the default year
    with pytest.raises(ValueError, match="ts must be from 0"):
        check(Event(name="x", ts=now + 3600), ts_max=now + 60)


async def test_good_events_after_hostile_ones_reach_every_sink(tmp_path, pg_table):
    """Every hostile body, every hostile record() and source event first; then good events
    by every way in. All good ones land in jsonl, the store and PostgreSQL, once; nothing
    is dead-lettered; the hostile in-process events are counted as `invalid`."""
    async with Agent(_config(tmp_path, pg_table, agent={"max_future_s": 3600})) as agent:
        for p in HOSTILE:
            body, ctype, _, _ = p.values
            answer = await post_raw(agent, body, content_type=ctype)
            assert answer.status == 400, (p.id, answer.body)
        bad = [*_bad_events(), {"value": 1.0, "ts": time.time() + 7200}]  # past this agent's max_future_s
        for fields in bad:
            agent.record("bad.rec", **fields)
        agent.emit([Event(name="bad.src", **f) for f in bad + BAD_SOURCE_ONLY])
        invalid = 2 * len(bad) + len(BAD_SOURCE_ONLY)
        await await_until(lambda: agent.ledger.by_reason().get(losses.INVALID) == invalid, timeout=10,
                          what="every hostile record() and source event to be counted as invalid")
        assert agent.journal.last_seq == 0
        # Then good events, each way in.
        ids: list[str] = []
        for ctype, body in (
            (JSON, _json(GOOD_JSON, b'{"name":"good.json","value":2,"data":{"ok":[1,2.5,"x",null,true]}}')),
            (NDJSON, _ndjson(GOOD_JSON, b'{"name":"good.ndjson","ts":"%s"}' % _rfc3339(time.time() - 60))),
            (MSGPACK, _msgpack(GOOD, {"name": "good.msgpack", "value": 3, "data": {"n": -(2**63)}})),
        ):
            answer = await post_raw(agent, body, content_type=ctype)
            assert answer.status == 202, answer.body
            ids += answer.body["ids"]
        agent.record("good.rec", 4.0, data={"edge": 2**64 - 1})
        agent.emit([Event(name="good.src", value=5.0)])
        assert await agent.flush(20)
        assert agent.ledger.by_reason() == {losses.INVALID: invalid}
        assert agent.dlq.depth() == 0
        landed = [e["id"] for e in read_jsonl(tmp_path / "out.jsonl")]
        assert len(landed) == len(ids) + 2 and set(ids) <= set(landed)
        assert sorted(_store_ids(agent)) == sorted(landed)
        rows = await pg_table.fetch("SELECT id::text FROM {t}")
        assert sorted(r["id"] for r in rows) == sorted(landed)


# -- defence in depth: the sinks ----------------------------------------------------------


def _unconvertible(n: int = 6) -> tuple[list[Event], Event]:
    """Good events and, among them, one with a ts no row or bucket can hold (as an entry
    journaled before the ts window existed would be)."""
    events = make_events(n)
    events[2].ts = 1e300
    return events, events[2]


async def test_the_postgres_sink_raises_permanent_error_for_an_event_it_cannot_convert(pg_table):
    from plugins.postgres import PostgresOptions, PostgresSink

    sink = PostgresSink("pg", PostgresOptions(dsn=pg_table.dsn, schema=pg_table.schema, table=pg_table.table),
                        make_ctx("pg"))
    events, bad = _unconvertible()
    await sink.start()
    try:
        with pytest.raises(PermanentError, match=f"event {bad.id} cannot be converted"):
            await sink.send(events)
        await sink.send([e for e in events if e is not bad])
    finally:
        await sink.close()
    rows = await pg_table.fetch("SELECT id::text FROM {t}")
    assert sorted(r["id"] for r in rows) == sorted(e.id for e in events if e is not bad)


async def test_the_supabase_sink_raises_permanent_error_for_an_event_it_cannot_convert():
    from plugins.supabase import SupabaseOptions, SupabaseSink

    sink = SupabaseSink("sb", SupabaseOptions(url="http://127.0.0.1:9", key="k"), make_ctx("sb"))
    sink._client = object()  # never reached: the rows are built before any request
    events, bad = _unconvertible()
    with pytest.raises(PermanentError, match=f"event {bad.id} cannot be converted"):
        await sink.send(events)


@pytest.mark.parametrize("poison", ["ts", "data"])
async def test_the_store_sink_raises_permanent_error_for_an_event_it_cannot_convert(tmp_path, poison):
    from plugins.store import StoreOptions, StoreSink

    ctx = make_ctx("store", tmp_path)
    sink = StoreSink("store", StoreOptions(path=str(tmp_path / "store.db")), ctx)
    events, bad = _unconvertible()
    if poison == "data":
        bad.ts = events[0].ts
        bad.data = {"when": object()}
    await sink.start()
    try:
        with pytest.raises(PermanentError, match=f"event {bad.id} cannot be stored"):
            await sink.send(events)
        await sink.send([e for e in events if e is not bad])
    finally:
        await sink.close()
    with sqlite3.connect(tmp_path / "store.db") as conn:
        stored = [i for (i,) in conn.execute("SELECT id FROM events")]
    assert sorted(stored) == sorted(e.id for e in events if e is not bad)


async def test_an_unconvertible_journaled_event_is_bisected_into_the_dlq_and_the_rest_land(tmp_path, pg_table):
    """An event journaled without the edge's rules (as before them) blocks nothing: the
    postgres and store sinks fail its batch permanently, the core bisects, only that
    event is dead-lettered (once per sink), and every good event of the batch lands."""
    async with Agent(_config(tmp_path, pg_table, dlq={"auto_replay": False})) as agent:
        events = [Event(id=i, name="mixed", value=float(k), ts=time.time(), source="test", agent_id="a")
                  for k, i in enumerate(new_ids(40))]
        events[7].ts = 1e300
        events[30].ts = 1e300
        await agent.committer.submit(events)  # the HTTP path's queue, which trusts that events are checked
        bad = {events[7].id, events[30].id}
        await await_until(lambda: agent.dlq.depth("pg") == 2 and agent.dlq.depth("store") == 2
                          and agent.journal.lag("pg") == 0 and agent.journal.lag("store") == 0,
                          timeout=30, what="bisection into the DLQ")
        for sink in ("pg", "store"):
            dead = {e.id for entry in await agent.dlq.entries(sink=sink) for e in await agent.dlq.events(entry.id)}
            assert dead == bad, sink
        good = sorted(e.id for e in events if e.id not in bad)
        assert sorted(_store_ids(agent)) == good
        rows = await pg_table.fetch("SELECT id::text FROM {t}")
        assert sorted(r["id"] for r in rows) == good
        assert Counter(e["id"] for e in read_jsonl(tmp_path / "out.jsonl")).keys() == {e.id for e in events}
