"""Flags acting on delivery: the per-sink kill switch and the rollout percentage."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from agent.flags import in_rollout
from agent.runtime import Agent


def _config(tmp_path: Path, **flags: object) -> dict:
    return {
        "agent": {"data_dir": str(tmp_path / "data"), "commit_interval_ms": 1},
        "server": {"enabled": False},
        "sinks": {"out": {"type": "jsonl", "path": str(tmp_path / "out.jsonl"), "policies": []}},
        "flags": flags,
    }


def _ids(tmp_path: Path) -> list[str]:
    path = tmp_path / "out.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["id"] for line in path.read_text().splitlines()]


def _app_ids(tmp_path: Path) -> list[str]:
    path = tmp_path / "out.jsonl"
    return [e["id"] for e in map(json.loads, path.read_text().splitlines()) if e["source"] == "app"]


async def test_kill_switch_stops_delivery_and_resumes_with_nothing_lost(tmp_path: Path) -> None:
    async with Agent(_config(tmp_path)) as agent:
        for i in range(100):
            agent.record("before", i)
        assert await agent.flush(5)
        assert len(_app_ids(tmp_path)) == 100

        agent.flags.set("sinks.out.enabled", False, "test")
        for i in range(100):
            agent.record("during", i)
        assert await agent.committer.drain(5)
        # Several flush intervals pass; the worker must not deliver anything meanwhile.
        await asyncio.sleep(0.3)
        assert len(_app_ids(tmp_path)) == 100
        assert agent.workers["out"].describe()["lag_events"] >= 100
        assert agent.workers["out"].describe()["state"] == "disabled"

        agent.flags.set("sinks.out.enabled", True, "test")
        assert await agent.flush(5)
        ids = _app_ids(tmp_path)
        assert len(ids) == 200 and len(set(ids)) == 200
        assert agent.ledger.total() == 0


async def test_kill_switch_off_survives_restart(tmp_path: Path) -> None:
    async with Agent(_config(tmp_path)) as agent:
        agent.flags.set("sinks.out.enabled", False, "test")
        for i in range(10):
            agent.record("held", i)
        assert await agent.committer.drain(5)
    assert _app_ids(tmp_path) == []
    async with Agent(_config(tmp_path)) as agent:
        assert agent.flags.get("sinks.out.enabled") is False
        assert agent.workers["out"].describe()["lag_events"] >= 10
        agent.flags.clear("sinks.out.enabled", "test")
        assert await agent.flush(5)
    assert len(_app_ids(tmp_path)) == 10


async def test_rollout_delivers_its_share_by_stable_hash(tmp_path: Path) -> None:
    async with Agent(_config(tmp_path, **{"sinks.out.rollout_percent": 30})) as agent:
        for i in range(10_000):
            agent.record("rollout", i)
        assert await agent.flush(10)
        status = agent.workers["out"].describe()
    delivered = _app_ids(tmp_path)
    assert 2_800 <= len(delivered) <= 3_200, len(delivered)
    assert all(in_rollout(i, 30) for i in delivered)
    assert status["filtered"] == 10_000 - len(delivered)


async def test_rollout_same_events_across_restarts(tmp_path: Path) -> None:
    from agent.event import Event, new_ids

    ids = new_ids(2_000)
    for round_ in range(2):
        (tmp_path / "out.jsonl").unlink(missing_ok=True)
        async with Agent(_config(tmp_path, **{"sinks.out.rollout_percent": 50})) as agent:
            agent.emit([Event(id=i, name="fixed", value=1.0) for i in ids])
            assert await agent.flush(10)
        chosen = set(_ids(tmp_path))
        if round_ == 0:
            first = chosen
        else:
            assert chosen == first
    assert first == {i for i in ids if in_rollout(i, 50)}
    assert 900 <= len(first) <= 1_100
