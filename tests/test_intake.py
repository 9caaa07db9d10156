"""The intake: record() from many threads never loses a wake-up (the committer waits
with no timeout), a full batch cuts the commit window short, one capacity rule, and one
validator for record(), sources and HTTP, with one ledger reason for what it refuses."""

from __future__ import annotations

import asyncio
import inspect
import math
import re
import sys
import threading

import msgspec
import pytest

from agent import losses
from agent.event import check
from agent.pipeline import intake
from agent.plugin import Event, hookimpl
from tests.helpers import agent_config, await_until, post_raw
from tests.plugins_for_tests import STATE


class FeedSource:
    """A source that emits what a test puts in FEED, then waits."""

    def __init__(self, name: str, options: object, ctx: object) -> None:
        pass

    async def run(self, emit) -> None:
        while True:
            emit(await FEED.get())


@hookimpl
def register_sources(register):
    register("feed", FeedSource)


FEED: asyncio.Queue[list[Event]]


def _agent(tmp_path, server: bool = False, **agent_options):
    """An agent with a memory sink "out" and the feed source, not started."""
    global FEED
    from agent.runtime import Agent
    from tests import plugins_for_tests

    FEED = asyncio.Queue()
    STATE.reset()
    cfg = agent_config(tmp_path, {"out": {"type": "memory"}}, server={"enabled": server}, dashboard={"store": False},
                       sources={"feed": {"type": "feed"}}, agent={"shutdown_timeout_s": 0.5, **agent_options})
    return Agent(cfg, plugins=[plugins_for_tests, sys.modules[__name__]])


def delivered() -> list[Event]:
    return STATE.delivered.get("out", [])


def test_the_committer_waits_without_a_timeout():
    # By construction: a lost wake-up would leave events queued forever, so the tests
    # below can only pass if none is lost (there is no safety net to hide one).
    body = inspect.getsource(intake.Committer.run)
    assert "await self._wake.wait()" in body
    assert body.count("asyncio.timeout(") == 1 and "commit_interval_s" in body  # only the window


def _record_from_threads(a, threads: int, per_thread: int, wave: int) -> None:
    barrier = threading.Barrier(threads)

    def work(t: int) -> None:
        barrier.wait()  # all at once
        for i in range(per_thread):
            a.record("thr", float(i), tags={"t": str(t), "w": str(wave)})

    ts = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


@pytest.mark.parametrize("round_", range(3))
async def test_records_from_many_threads_are_all_committed_without_flush(tmp_path, round_):
    """N threads x M records, in waves, each wave started from an empty intake: every
    record is committed by the committer's own loop (no flush()/drain() to rescue one)."""
    threads, per_thread, waves = 8, 500, 5
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible: provoke the races
    try:
        async with _agent(tmp_path, commit_interval_ms=1, commit_batch=64) as a:
            for wave in range(waves):
                await asyncio.to_thread(_record_from_threads, a, threads, per_thread, wave)
                total = (wave + 1) * threads * per_thread
                await await_until(lambda total=total: a.committer.committed == total, timeout=30,
                                  what=f"wave {wave}: the committer to commit every record by itself")
            assert a.ledger.total() == 0
            assert await a.flush(10)
            assert len(delivered()) == total
    finally:
        sys.setswitchinterval(old)


async def test_a_full_batch_cuts_the_commit_window_short(tmp_path):
    # A one-hour window: only a full batch can get these committed in time.
    async with _agent(tmp_path, commit_interval_ms=3_600_000, commit_batch=10) as a:
        for i in range(9):
            a.record("held", float(i))
        await asyncio.sleep(0)
        assert a.committer.committed == 0  # woken, but gathering a group
        a.record("held", 9.0)  # the tenth: a full batch
        await await_until(lambda: a.committer.committed == 10, timeout=5, what="the full batch to commit")
        # Source events fill the same batch.
        FEED.put_nowait([Event(name="src", value=float(i)) for i in range(10)])
        await await_until(lambda: a.committer.committed == 20, timeout=5, what="a full batch from a source")


async def test_capacity_is_one_rule_counted_once_as_intake_full(tmp_path):
    a = _agent(tmp_path, intake_capacity=5)  # not started: nothing drains the intake
    for i in range(4):
        a.record("r", float(i))
    a.emit([Event(name="e", value=1.0), Event(name="e", value=2.0)])  # 4 + 2 > 5: refused whole
    a.emit([Event(name="e", value=1.0)])  # 4 + 1 fits
    a.record("r", 9.0)  # 5 wait: full
    assert a.ledger.by_reason() == {losses.INTAKE_FULL: 3}
    assert len(a.committer.records) == 5
    async with a:
        assert await a.flush(10)
        assert a.ledger.by_reason() == {losses.INTAKE_FULL: 3}
        assert sorted(e.name for e in delivered()) == ["e"] + ["r"] * 4


BAD = [
    pytest.param({"ts": math.nan}, "ts must be a finite number", id="nan-ts"),
    pytest.param({"ts": math.inf}, "ts must be a finite number", id="inf-ts"),
    pytest.param({"ts": -1e18}, "ts must be from 0 (1970-01-01) to", id="ts-before-1970"),
    pytest.param({"ts": 1e300}, "ts must be from 0 (1970-01-01) to", id="ts-far-future"),
    pytest.param({"value": math.nan}, "value must be a finite number, got nan", id="nan-value"),
    pytest.param({"value": -math.inf}, "value must be a finite number, got -inf", id="inf-value"),
    pytest.param({"data": {"a": {"b": math.nan}}}, "data.a.b must be a finite number", id="nan-in-data"),
    pytest.param({"tags": {f"t{i}": "v" for i in range(65)}}, "too many tags (65 > 64)", id="65-tags"),
    pytest.param({"kind": "summary"}, "kind must be one of", id="bad-kind"),
    pytest.param({"name": "x" * 256}, "name must be a string of 1 to 255", id="long-name"),
    pytest.param({"name": ""}, "name must be a string of 1 to 255", id="empty-name"),
]


@pytest.mark.parametrize("bad, message", BAD)
async def test_one_validator_one_reason_on_every_path(tmp_path, bad, message, caplog):
    fields = {"name": "bad", "value": 1.0, "ts": 1_700_000_000.0, **bad}
    # The rule itself, as every path applies it.
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check(Event(**{"kind": "gauge", **fields}))
    async with _agent(tmp_path) as a:
        # record(): counted as invalid, never raised on the caller's thread.
        a.record(fields["name"], fields["value"], kind=fields.get("kind"), tags=fields.get("tags"), ts=fields["ts"],
                 data=fields.get("data"))
        a.record("good", 1.0)
        assert await a.flush(10)
        assert a.ledger.by_reason() == {losses.INVALID: 1}
        assert message in caplog.text
        # A source's emit: the same reason.
        FEED.put_nowait([Event(**{"kind": "gauge", **fields}), Event(name="good.src", value=1.0)])
        await await_until(lambda: a.ledger.by_reason().get(losses.INVALID) == 2, timeout=5,
                          what="the source's bad event to be counted")
        assert await a.flush(10)
        assert sorted(e.name for e in delivered()) == ["good", "good.src"]
    # HTTP: 400 naming the item and the same rule; nothing accepted, nothing counted.
    async with _agent(tmp_path / "http", server=True) as h:
        body = msgspec.msgpack.encode([{"name": "ok", "value": 1.0}, fields])  # msgpack carries NaN
        answer = await post_raw(h, body, content_type="application/msgpack")
        assert answer.status == 400, answer.body
        assert answer.body["accepted"] == 0 and [e["index"] for e in answer.body["errors"]] == [1]
        err = answer.body["errors"][0]["error"]
        # msgspec refuses what a type can say (the name's length, the kind) while decoding.
        field = message.split()[0]
        assert message in err or (field in ("name", "kind") and f"`$.{field}`" in err), err
        assert h.ledger.total() == 0 and h.journal.last_seq == 0


@pytest.mark.parametrize("value, ok", [(1, True), (True, False), ("3", False), (object(), False)])
def test_record_values_follow_the_http_types(value, ok):
    e = Event(name="x", value=value)
    if ok:
        assert check(e).value == 1.0 and type(e.value) is float
    else:
        with pytest.raises(ValueError, match="value must be a number"):
            check(e)


async def test_record_after_stop_and_before_start(tmp_path):
    a = _agent(tmp_path)
    a.record("early", 1.0)  # queued, committed at start
    async with a:
        assert await a.flush(10)
        assert [e.name for e in delivered()] == ["early"]
    a.record("late", 1.0)
    a.emit([Event(name="late.src")])
    assert a.ledger.by_reason() == {losses.STOPPED: 1, losses.SHUTDOWN_TIMEOUT: 1}


async def test_flush_waits_on_signals_not_a_timer(tmp_path):
    """flush() returns when the journal signals the sink's cursor moved, and when a flag
    switches the sink off (it can confirm nothing then)."""
    from agent.runtime import Agent
    from tests import plugins_for_tests

    STATE.reset()
    cfg = agent_config(tmp_path, {"s": {"type": "slow"}}, server={"enabled": False}, dashboard={"store": False},
                       agent={"shutdown_timeout_s": 0.5})
    async with Agent(cfg, plugins=[plugins_for_tests]) as a:
        STATE.delay = 0.2
        a.record("x", 1.0)
        assert await a.flush(10)
        assert a.journal.cursors["s"] == a.journal.last_seq
        STATE.delay = 3600
        a.record("y", 1.0)
        waiting = asyncio.ensure_future(a.flush(30))
        await await_until(lambda: STATE.in_flight == 1, timeout=5, what="the send to hang")
        assert not waiting.done()
        a.flags.set("sinks.s.enabled", False, "test")
        assert await asyncio.wait_for(waiting, 5)


# record() tuples: (name, value, kind, tags, ts, data, session_id). The committer checks the
# common shape inline (intake.event_from_record's fast path); these cover both sides of
# each inline rule, and the odd shapes that must take the full path.
_NOW = 1_700_000_000.0
_RECORDS = [
    ("http.requests", 1.0, None, {"route": "/a", "method": "GET"}, _NOW, None, None),
    ("http.requests", 1.0, "counter", None, _NOW, None, None),
    ("http.requests", 1.0, "counter", {}, _NOW, None, None),
    ("http.requests", 1.0, "counter", {"pid": "7"}, _NOW, None, None),
    ("h", 2.5, "histogram", {f"k{i}": "v" for i in range(63)}, _NOW, None, None),
    ("h", 2.5, "histogram", {f"k{i}": "v" for i in range(64)}, _NOW, None, None),  # full: no pid
    ("h", 2.5, "histogram", {f"k{i}": "v" for i in range(65)}, _NOW, None, None),  # too many
    ("n" * 255, 0.0, None, None, 0.0, None, None),
    ("n" * 256, 0.0, None, None, _NOW, None, None),
    ("", 1.0, None, None, _NOW, None, None),
    (17, 1.0, None, None, _NOW, None, None),
    ("naïve", 1.0, None, {"ü": "ß"}, _NOW, None, None),
    ("bad\ud800", 1.0, None, None, _NOW, None, None),
    ("x", 1.0, None, {"k": "\udc80"}, _NOW, None, None),
    ("x", 1.0, None, {"k": 5, 6: "v"}, _NOW, None, None),  # str() of both, full path
    ("x", float("nan"), None, None, _NOW, None, None),
    ("x", float("inf"), "counter", None, _NOW, None, None),
    ("x", 3, None, None, _NOW, None, None),  # an int value becomes a float
    ("x", None, None, None, _NOW, None, None),
    ("x", 1.0, "bogus", None, _NOW, None, None),
    ("x", 1.0, None, None, -1.0, None, None),
    ("x", 1.0, None, None, _NOW + 301, None, None),
    ("x", 1.0, None, None, float("nan"), None, None),
    ("x", 1.0, None, None, _NOW, {"a": 1}, None),
    ("x", 1.0, None, None, _NOW, None, "s-1"),
    ("x", 1.0, None, ["not", "a", "dict"], _NOW, None, None),
]


@pytest.mark.parametrize("t", _RECORDS, ids=range(len(_RECORDS)))
@pytest.mark.parametrize("pid", ["123", None])
def test_event_from_record_fast_path_gives_the_full_paths_answer(t, pid):
    # ts_max=None makes event_from_record take the full path (check() with its own ts_max),
    # so the two calls compare the inline checks with check() on the same tuple.
    def outcome(ts_max):
        try:
            e = intake.event_from_record(t, "agent-1", ts_max, pid)
        except (TypeError, ValueError) as exc:
            return type(exc), re.sub(r"to \d+ \(now", "to T (now", str(exc))
        return msgspec.structs.asdict(e)

    fast = outcome(_NOW + 300)
    if t[4] == _NOW + 301:  # only the explicit ts_max can refuse this one
        assert fast[0] is ValueError and "ts must be from 0" in fast[1]
        return
    assert fast == outcome(None)
