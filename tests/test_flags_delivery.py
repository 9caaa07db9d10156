"""Flags acting on delivery: the per-sink kill switch and the rollout percentage."""

from __future__ import annotations

from pathlib import Path

from agent.flags import in_rollout
from agent.runtime import Agent
from tests.helpers import agent_config, await_until, jsonl_sink, read_jsonl


def flag_config(tmp_path: Path, **flags: object) -> dict:
    """One jsonl sink `out` (out.jsonl), no server, the given flag values."""
    return agent_config(tmp_path / "data", {"out": jsonl_sink(tmp_path / "out.jsonl")}, agent={"commit_interval_ms": 1},
                        server={"enabled": False}, flags=flags)


def _ids(tmp_path: Path) -> list[str]:
    return [e["id"] for e in read_jsonl(tmp_path / "out.jsonl")]


def _app_ids(tmp_path: Path) -> list[str]:
    return [e["id"] for e in read_jsonl(tmp_path / "out.jsonl") if e["source"] == "app"]


async def test_kill_switch_stops_delivery_and_resumes_with_nothing_lost(tmp_path: Path) -> None:
    async with Agent(flag_config(tmp_path)) as agent:
        for i in range(100):
            agent.record("before", i)
        assert await agent.flush(5)
        assert len(_app_ids(tmp_path)) == 100

        agent.flags.set("sinks.out.enabled", False, "test")
        for i in range(100):
            agent.record("during", i)
        assert await agent.committer.drain(5)
        # The commit woke the worker; once it has cleared that wake-up and is waiting as
        # "disabled", it has had its chance to deliver and must not have.
        worker = agent.workers["out"]
        await await_until(lambda: not worker._nudge.is_set() and worker.stats.state == "disabled",
                          what="the disabled worker to see the commit")
        assert len(_app_ids(tmp_path)) == 100
        assert agent.workers["out"].describe()["lag_events"] >= 100
        assert agent.workers["out"].describe()["state"] == "disabled"

        agent.flags.set("sinks.out.enabled", True, "test")
        assert await agent.flush(5)
        ids = _app_ids(tmp_path)
        assert len(ids) == 200 and len(set(ids)) == 200
        assert agent.ledger.total() == 0


async def test_kill_switch_off_survives_restart(tmp_path: Path) -> None:
    async with Agent(flag_config(tmp_path)) as agent:
        agent.flags.set("sinks.out.enabled", False, "test")
        for i in range(10):
            agent.record("held", i)
        assert await agent.committer.drain(5)
    assert _app_ids(tmp_path) == []
    async with Agent(flag_config(tmp_path)) as agent:
        assert agent.flags.get("sinks.out.enabled") is False
        assert agent.workers["out"].describe()["lag_events"] >= 10
        agent.flags.clear("sinks.out.enabled", "test")
        assert await agent.flush(5)
    assert len(_app_ids(tmp_path)) == 10


async def test_rollout_delivers_its_share_by_stable_hash(tmp_path: Path) -> None:
    async with Agent(flag_config(tmp_path, **{"sinks.out.rollout_percent": 30})) as agent:
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
        async with Agent(flag_config(tmp_path, **{"sinks.out.rollout_percent": 50})) as agent:
            agent.emit([Event(id=i, name="fixed", value=1.0) for i in ids])
            assert await agent.flush(10)
        chosen = set(_ids(tmp_path))
        if round_ == 0:
            first = chosen
        else:
            assert chosen == first
    assert first == {i for i in ids if in_rollout(i, 50)}
    assert 900 <= len(first) <= 1_100
