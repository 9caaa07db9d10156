"""Supervised workers (issue 18, item 1).

- supervise(): an unexpected exception restarts the coroutine with a growing, capped
  backoff; a cancel (also one a callee turned into an error) and a clean return end it;
- a sink worker that raises inside its loop is restarted; status, /api/v1/sinks and
  /readyz show it restarting with its count and last error; once the fault clears every
  event reaches the sink exactly once;
- a DLQ write that fails (the disk is full) leaves the sink's cursor where it is and no
  restart happens; once it works again the batch is dead-lettered, then replayed:
  nothing lost, nothing twice;
- the committer crashing once is restarted and intake goes on, nothing lost;
- a real full filesystem (an 8 MiB tmpfs as the data dir; the test needs root, as CI
  has): the store sink's writes and its DLQ writes fail, and once space comes back every
  sink catches up by itself, without an agent restart.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import sqlite3
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.api.metrics import render
from agent.pipeline import delivery, supervisor
from agent.pipeline.supervisor import supervise
from tests.helpers import await_until, make_agent
from tests.plugins_for_tests import STATE

FAST = 0.05  # backoffs shortened for the tests (the defaults are 0.5 s doubling to 30 s)


@pytest.fixture
def fast_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(supervisor, "INITIAL_BACKOFF_S", FAST)
    monkeypatch.setattr(supervisor, "MAX_BACKOFF_S", 0.4)
    monkeypatch.setattr(delivery, "HOLD_INITIAL_S", FAST)
    monkeypatch.setattr(delivery, "HOLD_MAX_S", 0.4)


def values(sink: str) -> list[Any]:
    return [e.value for e in STATE.delivered.get(sink, [])]


async def readyz(agent: Any) -> tuple[int, dict[str, Any]]:
    async with aiohttp.ClientSession() as s, s.get(f"{agent.server_url}/readyz") as r:
        return r.status, await r.json()


# -- supervise() itself ----------------------------------------------------------------


async def test_supervise_restarts_with_capped_backoff_and_ends_on_return() -> None:
    runs: list[float] = []
    loop = asyncio.get_running_loop()

    async def work() -> str:
        runs.append(loop.time())
        if len(runs) <= 4:
            raise RuntimeError(f"boom {len(runs)}")
        return "done"

    task, rec = supervise("w", work, initial_s=0.02, max_s=0.05)
    await asyncio.wait_for(task, 5)
    assert rec.state == "finished" and rec.restarts == 4 and rec.last_error == "RuntimeError: boom 4"
    gaps = [b - a for a, b in itertools.pairwise(runs)]
    assert gaps[0] >= 0.015 and gaps[1] >= 0.035  # 0.02, 0.04, then capped at 0.05
    assert all(g < 1.0 for g in gaps)


async def test_supervise_ends_on_cancel_also_one_turned_into_an_error() -> None:
    started = asyncio.Event()

    async def forever() -> None:
        started.set()
        await asyncio.Event().wait()

    task, rec = supervise("plain", forever)
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert rec.state == "stopped" and rec.restarts == 0

    started.clear()

    async def swallows() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise RuntimeError("cleanup failed") from None

    task, rec = supervise("swallows", swallows, initial_s=0.01)
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 5)
    assert rec.state == "stopped" and rec.restarts == 0


# -- a sink worker that raises inside its loop --------------------------------------------


async def test_a_sink_worker_that_raises_is_restarted_and_delivers_every_event_once(
    tmp_path: Path, fast_backoff: None
) -> None:
    STATE.reset()
    agent = make_agent(tmp_path / "data", {"mem": {"type": "memory"}})
    await agent.start()
    try:
        worker = agent.workers["mem"]
        real = worker._deliver_rows
        fault = {"on": True}

        async def faulty(rows: Any, upto: int) -> None:
            if fault["on"]:
                raise RuntimeError("worker bug")
            await real(rows, upto)

        worker._deliver_rows = faulty  # type: ignore[method-assign]
        for i in range(100):
            agent.record("e", i)
        task = agent.supervised["sink:mem"]
        await await_until(lambda: task.restarts >= 3, what="restarts")
        await await_until(lambda: task.state == "restarting", what="the restarting state")
        status = agent.status()
        tasks = {t["name"]: t for t in status["tasks"]}
        assert tasks["sink:mem"]["restarts"] >= 3 and tasks["sink:mem"]["last_error"] == "RuntimeError: worker bug"
        assert {"committer", "housekeeping", "sink:store"} <= set(tasks)
        (sink,) = [s for s in status["sinks"] if s["name"] == "mem"]
        assert sink["state"] == "restarting" and sink["restarts"] >= 3
        metrics = {(s.name, s.labels.get("task")): s.value for f in text_string_to_metric_families(render(agent))
                   for s in f.samples}
        assert metrics[("sidecar_agent_task_restarts_total", "sink:mem")] >= 3
        assert metrics[("sidecar_agent_task_restarts_total", "committer")] == 0
        assert metrics[("sidecar_agent_task_running", "committer")] == 1
        (comp,) = [c for c in status["components"] if c["name"] == "mem"]
        assert comp["state"] == "restarting" and "worker bug" in comp["error"]
        for _ in range(50):  # it is "running" for a moment at each attempt: ask until it is caught restarting
            code, body = await readyz(agent)
            assert code == 200  # a sink restarting does not stop intake: ready, the problem named
            if any(p.startswith("task sink:mem is restarting") and "worker bug" in p for p in body["problems"]):
                break
        else:
            raise AssertionError(body)
        assert values("mem") == []

        fault["on"] = False
        for i in range(100, 200):
            agent.record("e", i)
        assert await agent.flush(10)
        assert sorted(values("mem")) == list(range(200))  # every event, none twice
        assert task.state == "running"
        code, body = await readyz(agent)
        assert code == 200 and not any("sink:mem" in p for p in body["problems"])
    finally:
        await agent.stop()
    assert agent.supervised["sink:mem"].state == "stopped" and not agent.abandoned


# -- a DLQ write that fails -----------------------------------------------------------------


async def test_a_failing_dlq_write_keeps_the_cursor_and_loses_nothing(tmp_path: Path, fast_backoff: None) -> None:
    STATE.reset()
    STATE.down.add("p")  # every send fails (retryably; no policies): each batch goes to the DLQ
    agent = make_agent(tmp_path / "data", {"p": {"type": "poison", "batch_size": 1000}})
    await agent.start()
    try:
        assert agent.dlq is not None and agent.journal is not None
        real_put = agent.dlq.put
        failures = {"left": 4, "seen": 0}

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
        worker = agent.workers["p"]
        await await_until(lambda: failures["seen"] >= 2, what="failed DLQ writes")
        assert agent.journal.cursors.get("p", 0) < agent.journal.last_seq  # the batch was not skipped
        assert worker.stats.state == "failing" and "database or disk is full" in (worker.stats.last_error or "")
        await await_until(lambda: agent.dlq.depth("p") == 50, what="the batch dead-lettered once the write works")
        assert agent.journal.cursors["p"] == agent.journal.last_seq
        assert agent.supervised["sink:p"].restarts == 0  # handled in the worker, not by a restart
        assert values("p") == []

        STATE.down.discard("p")  # the sink is back: the DLQ entry is replayed
        await await_until(lambda: agent.dlq.depth("p") == 0, timeout=30, what="the replay")
        assert sorted(values("p")) == list(range(50))
        assert agent.ledger.by_reason() == {}
    finally:
        await agent.stop()


async def test_a_replay_interrupted_by_an_error_is_released_after_the_restart(
    tmp_path: Path, fast_backoff: None
) -> None:
    """settle() failing after a replay (the disk is full) leaves the entry `replaying`:
    the restarted worker puts it back to pending and replays it."""
    STATE.reset()
    STATE.down.add("p")
    agent = make_agent(tmp_path / "data", {"p": {"type": "poison"}})
    await agent.start()
    try:
        assert agent.dlq is not None
        for i in range(10):
            agent.record("e", i)
        await await_until(lambda: agent.dlq.depth("p") == 10, what="the batch dead-lettered")
        real_settle = agent.dlq.settle
        failures = {"left": 1}

        async def settle(*args: Any, **kw: Any) -> None:
            if failures["left"]:
                failures["left"] -= 1
                raise sqlite3.OperationalError("database or disk is full")
            await real_settle(*args, **kw)

        agent.dlq.settle = settle  # type: ignore[method-assign]
        STATE.down.discard("p")
        await await_until(lambda: agent.dlq.depth("p") == 0, timeout=30, what="the replay")
        assert agent.supervised["sink:p"].restarts == 1
        entries = await agent.dlq.entries(sink="p")
        assert {e.status for e in entries} == {"delivered"}
        # Sent once before settle failed, once more after the release: at least once.
        assert set(values("p")) == set(range(10))
    finally:
        await agent.stop()


# -- the committer ----------------------------------------------------------------------


async def test_the_committer_crashing_once_is_restarted_and_intake_goes_on(
    tmp_path: Path, fast_backoff: None
) -> None:
    STATE.reset()
    agent = make_agent(tmp_path / "data", {"mem": {"type": "memory"}})
    await agent.start()
    try:
        committer = agent.committer
        real_take = committer._take
        crashes = {"left": 1}

        def take() -> Any:
            task = asyncio.current_task()
            if crashes["left"] and task is not None and task.get_name() == "committer":
                crashes["left"] -= 1
                raise RuntimeError("committer bug")  # before anything is taken off the queue
            return real_take()

        committer._take = take  # type: ignore[method-assign]
        for i in range(100):
            agent.record("e", i)
        task = agent.supervised["committer"]
        await await_until(lambda: task.restarts == 1 and task.state == "running", what="the restart")
        assert task.last_error == "RuntimeError: committer bug"
        for i in range(100, 200):
            agent.record("e", i)
        assert await agent.flush(10)
        assert sorted(values("mem")) == list(range(200))
        assert agent.ledger.by_reason() == {}
    finally:
        await agent.stop()


async def test_readyz_is_not_ready_while_the_committer_restarts(tmp_path: Path) -> None:
    STATE.reset()
    agent = make_agent(tmp_path / "data", {"mem": {"type": "memory"}})
    await agent.start()
    try:
        agent.supervised["committer"].state = "restarting"  # as during its backoff
        agent.supervised["committer"].last_error = "RuntimeError: x"
        code, body = await readyz(agent)
        assert code == 503 and any(p.startswith("task committer is restarting") for p in body["problems"])
        agent.supervised["committer"].state = "running"
        assert (await readyz(agent))[0] == 200
    finally:
        await agent.stop()


# -- a real full filesystem ---------------------------------------------------------------


@pytest.fixture
def small_fs(tmp_path: Path) -> Any:
    """An 8 MiB tmpfs mounted for the test (root only; CI runs as root)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mnt = tmp_path / "small"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path: Path, leave: int) -> None:
    """Fill the filesystem of `path` (a new file there) up to `leave` free bytes."""
    chunk = b"\0" * 65536
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    with open(path, "r+b") as f:
        size = os.fstat(f.fileno()).st_size
        f.truncate(max(0, size - leave))


async def test_disk_full_then_space_again_every_sink_catches_up(
    tmp_path: Path, small_fs: Path, caplog: pytest.LogCaptureFixture
) -> None:
    STATE.reset()
    out = tmp_path / "out"
    out.mkdir()
    # The data dir (agent.db, store.db) on the small filesystem; the memory sink needs no disk.
    agent = make_agent(small_fs / "data", {"mem": {"type": "memory"}}, server={"enabled": False})
    await agent.start()
    try:
        assert agent.journal is not None and agent.dlq is not None
        store = agent.workers["store"]
        await await_until(lambda: store.started, what="the store to open")
        filler = small_fs / "filler"
        fill(filler, leave=256 * 1024)
        n = 0
        loop = asyncio.get_running_loop()
        end = loop.time() + 30
        # Record until the disk is full for the sinks too: the store sink fails and its
        # DLQ write fails.
        while not (store.stats.last_error and "dead-letter write failed" in store.stats.last_error):
            assert loop.time() < end, store.describe()
            for _ in range(500):
                agent.record("e", n, tags={"pad": "x" * 200})
                n += 1
            await asyncio.sleep(0.02)
        behind = agent.journal.lag("store")
        assert behind > 0
        await asyncio.sleep(1.0)  # it stays full a while
        filler.unlink()  # space again

        for i in range(n, n + 200):
            agent.record("e", i)
        n += 200
        assert await agent.committer.drain(10)

        def caught_up() -> bool:
            assert agent.journal is not None and agent.dlq is not None
            return all(agent.journal.lag(s) == 0 for s in agent.workers) and agent.dlq.depth() == 0

        await await_until(caught_up, timeout=90, what="every sink to catch up")
        journaled = agent.committer.committed
        lost = sum(agent.ledger.by_reason().values())
        assert journaled + lost == n  # what the full journal refused is counted, nothing else is gone
        mem = Counter(e.id for e in STATE.delivered["mem"])
        assert len(mem) == journaled and max(mem.values()) == 1
        rows = await store.sink.store._fetch("SELECT count(*) FROM events")  # type: ignore[attr-defined]
        assert rows == [(journaled,)]
        status = agent.status()
        assert all(t["state"] == "running" for t in status["tasks"]), status["tasks"]
        restarts = {t["name"]: t["restarts"] for t in status["tasks"] if t["restarts"]}
        assert not restarts  # the workers held their batches; none of them died
        print(f"\n  disk full: {n} recorded, {journaled} journaled, {lost} refused, store was {behind} behind")
    finally:
        await agent.stop()
    assert not agent.abandoned
