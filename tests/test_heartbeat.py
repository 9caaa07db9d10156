"""Fleet heartbeats (agent/heartbeat.py): a `sidecar_agent.heartbeat` event every
`[agent] heartbeat_s` through the normal intake, so every sink (here a jsonl file and the
real PostgreSQL) holds each agent's version, uptime, rates, lag, breakers, losses and DLQ."""

from __future__ import annotations

import json
import math

import pytest

from agent.errors import ConfigError
from agent.event import Event
from agent.heartbeat import HEARTBEAT_EVENT
from tests.helpers import await_until, free_port, jsonl_sink, post_events, read_jsonl, start_agent


def beats(path) -> list[dict]:
    return [e for e in read_jsonl(path) if e["name"] == HEARTBEAT_EVENT]


async def test_heartbeats_describe_the_agent_and_reach_every_sink(tmp_path, pg_table):
    out = tmp_path / "out.jsonl"
    agent = await start_agent(
        tmp_path / "data",
        {
            "out": jsonl_sink(out, policies=["circuit_breaker"]),
            "pg": {"type": "postgres", "dsn": pg_table.dsn, "table": pg_table.table, "policies": ["timeout", "retry"]},
        },
        agent={"id": "edge-7", "heartbeat_s": 0.3},
    )
    try:
        await post_events(agent, [{"name": "work", "value": i} for i in range(40)])
        # A beat after the events were committed counts them in its input rate.
        seen = await await_until(
            lambda: [b for b in beats(out) if b["data"]["events_in_per_s"] > 0],
            timeout=60,
            what="a heartbeat counting the posted events",
        )
        b = seen[0]
        assert b["agent_id"] == "edge-7" and b["kind"] == "event" and b["source"] == "agent"
        d = b["data"]
        from agent.version import __version__

        assert d["version"] == __version__
        assert d["interval_s"] == 0.3 and d["uptime_s"] > 0
        assert set(d["sinks"]) == {"out", "pg", "store"}
        assert d["breakers"] == {"out": "closed"}  # only the sinks with a breaker
        assert d["sinks"]["pg"]["breaker"] is None and d["sinks"]["out"]["breaker"] == "closed"
        assert d["losses"] == {} and d["lost"] == 0 and d["dlq_depth"] == 0
        # uptime grows from beat to beat
        later = await await_until(lambda: len(beats(out)) >= 3 and beats(out), timeout=60, what="three heartbeats")
        assert later[-1]["data"]["uptime_s"] > later[0]["data"]["uptime_s"]
        assert await agent.flush(30)
        # Postgres holds the fleet's state: the heartbeat row with its agent and data
        rows = await pg_table.fetch("SELECT agent_id, kind, data FROM {t} WHERE event_type = $1", HEARTBEAT_EVENT)
        assert len(rows) >= 3
        assert {r["agent_id"] for r in rows} == {"edge-7"}
        assert all(json.loads(r["data"])["version"] == __version__ for r in rows)
    finally:
        await agent.stop(timeout=5)


async def test_a_down_sink_its_breaker_and_a_loss_show_in_the_next_heartbeat(tmp_path):
    out = tmp_path / "out.jsonl"
    down = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"  # nothing listens there
    agent = await start_agent(
        tmp_path / "data",
        {
            "out": jsonl_sink(out),
            "pg": {
                "type": "postgres",
                "dsn": down,
                "policies": ["circuit_breaker"],
                "circuit_breaker": {"failure_threshold": 1, "reset_timeout_s": 600},
            },
        },
        agent={"heartbeat_s": 0.2},
        dashboard={"store": False},
    )
    try:
        await post_events(agent, [{"name": "work", "value": i} for i in range(5)])
        agent.emit([Event(name="bad", value=math.nan)])  # counted as `invalid`

        def shows_it() -> dict | None:
            for b in beats(out):
                d = b["data"]
                pg = d["sinks"]["pg"]
                if d["breakers"].get("pg") == "open" and d["losses"].get("invalid") == 1 and pg["lag_events"] >= 5:
                    return d
            return None

        d = await await_until(shows_it, timeout=60, what="a heartbeat with pg's breaker open and the loss")
        assert d["sinks"]["pg"]["lag_s"] > 0 and d["sinks"]["pg"]["sent_per_s"] == 0
        assert d["lost"] >= 1
        assert d["sinks"]["out"]["lag_events"] >= 0 and d["sinks"]["out"]["breaker"] is None
    finally:
        await agent.stop(timeout=2)


async def test_heartbeat_s_zero_sends_none(tmp_path):
    out = tmp_path / "out.jsonl"
    agent = await start_agent(tmp_path / "data", {"out": jsonl_sink(out)}, agent={"heartbeat_s": 0})
    try:
        assert "heartbeat" not in agent.supervised
        await post_events(agent, [{"name": "work", "value": 1}])
        assert await agent.flush(10)
        assert [e["name"] for e in read_jsonl(out)] == ["work"]
    finally:
        await agent.stop(timeout=2)


def test_heartbeat_s_is_checked(tmp_path):
    from agent.config import from_dict

    assert from_dict({}).agent.heartbeat_s == 30.0
    with pytest.raises(ConfigError, match=r"agent\.heartbeat_s"):
        from_dict({"agent": {"heartbeat_s": -1}})
