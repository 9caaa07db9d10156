"""The supervised tasks test_supervision.py does not fault (issue 18, item 1: "every
long-running task (sink workers, committer, sources, housekeeping) runs under a
supervisor"):

- a source whose run() raises is restarted with backoff; status shows it restarting
  with its count and last error, never a stale "running"; what it emits after the
  restart is delivered;
- housekeeping whose checkpoint fails (the database refuses writes for a while) keeps
  running: once writes work again the cursors are persisted, the journal compacts and
  agent.db gives its space back, without a restart.
"""

from __future__ import annotations

import sqlite3
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from agent.event import Event
from agent.pipeline import supervisor
from agent.runtime import Agent
from tests import plugins_for_tests
from tests.helpers import agent_config, await_until
from tests.plugins_for_tests import STATE


class _FlakySource:
    """Raises on its first `fail` runs, then emits one event per run and waits."""

    fail = 2
    runs = 0

    def __init__(self, name: str, options: object, ctx: object) -> None:
        pass

    async def run(self, emit: Any) -> None:
        import asyncio

        _FlakySource.runs += 1
        if _FlakySource.runs <= _FlakySource.fail:
            raise RuntimeError(f"source bug #{_FlakySource.runs}")
        emit([Event(name="from.source", value=float(_FlakySource.runs))])
        await asyncio.Event().wait()


def _source_plugin() -> types.ModuleType:
    from agent.plugin.hookspecs import hookimpl

    module = types.ModuleType("flaky_source_plugin")

    @hookimpl
    def register_sources(register):  # type: ignore[no-untyped-def]
        register("flaky", _FlakySource)

    module.register_sources = register_sources  # type: ignore[attr-defined]
    return module


async def test_a_source_that_raises_is_restarted_and_its_events_arrive(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(supervisor, "INITIAL_BACKOFF_S", 0.05)
    STATE.reset()
    _FlakySource.runs = 0
    cfg = agent_config(tmp_path / "data", {"mem": {"type": "memory"}}, sources={"flaky": {}},
                       dashboard={"store": False})
    async with Agent(cfg, plugins=[plugins_for_tests, _source_plugin()]) as agent:
        task = agent.supervised["source:flaky"]
        await await_until(lambda: STATE.delivered.get("mem"), what="the source's event after its restarts")
        assert [e.name for e in STATE.delivered["mem"]] == ["from.source"]
        assert task.restarts == 2 and task.state == "running"
        (row,) = [t for t in agent.status()["tasks"] if t["name"] == "source:flaky"]
        assert row["restarts"] == 2 and row["last_error"] == "RuntimeError: source bug #2"


async def test_housekeeping_outlives_failing_checkpoints_and_catches_up(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    STATE.reset()
    cfg = agent_config(tmp_path / "data", {"mem": {"type": "memory"}}, dashboard={"store": False})
    async with Agent(cfg, plugins=[plugins_for_tests]) as agent:
        journal = agent.journal
        assert journal is not None
        real = journal.db.tx
        failures = {"left": 10**9, "seen": 0}

        def refusing_tx():  # type: ignore[no-untyped-def]
            # Only housekeeping's writes fail (the committer's appends go on), as when its
            # checkpoint writes fail on a disk that is nearly full.
            if failures["left"] and sys._getframe(1).f_code.co_name in ("checkpoint", "compact"):
                failures["left"] -= 1
                failures["seen"] += 1
                raise sqlite3.OperationalError("database or disk is full")
            return real()

        monkeypatch.setattr(journal.db, "tx", refusing_tx)
        for _ in range(40):  # ~16 MB journaled and delivered; nothing of it can be compacted yet
            agent.emit([Event(name="bulk", value=1.0, data={"pad": "p" * 400}) for _ in range(1000)])
            await agent.committer.drain(30)  # type: ignore[union-attr]
        await await_until(lambda: len(STATE.delivered.get("mem", [])) == 40_000, timeout=60, what="delivery")
        await await_until(lambda: failures["seen"] >= 5, what="housekeeping to keep trying")
        assert journal.segments >= 40 and agent.supervised["housekeeping"].restarts == 0
        db = Path(journal.db.path)
        with sqlite3.connect(db) as conn:
            full = conn.execute("PRAGMA page_count").fetchone()[0]
        failures["left"] = 0  # writes work again
        await await_until(lambda: journal.segments == 0, timeout=60, what="compaction after the fault")

        def pages() -> int:
            with sqlite3.connect(db) as conn:
                return conn.execute("PRAGMA page_count").fetchone()[0]

        await await_until(lambda: pages() < full // 4, timeout=60, interval=0.2, what="agent.db to shrink")
        with sqlite3.connect(db) as conn:
            (cursor,) = conn.execute("SELECT seq FROM cursors WHERE sink = 'mem'").fetchone()
        assert cursor == journal.last_seq  # persisted once writes worked again
        assert agent.supervised["housekeeping"].state == "running"
