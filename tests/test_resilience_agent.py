"""Resilience end to end through the agent: a sink behind the default policy chain
against a fault-injecting server, beside a healthy sink.

Script: healthy 0.5 s, then a 3 s outage (503 for 1.5 s, hangs for 0.5 s, 429 with
Retry-After for 1 s), then healthy. Asserted:
- while the breaker is open the server sees at most one probe per reset_timeout_s;
- requests during the outage stay under threshold x attempts + outage / reset + 1;
- after recovery every event is delivered, exactly once per id, and nothing is lost;
- the healthy sink keeps up throughout (its lag stays within one producer second).
"""

from __future__ import annotations

import asyncio
import collections
import sys
import types

import msgspec
import pytest

from agent.plugin.hookspecs import hookimpl
from tests import plugins_for_tests
from tests.faultserver import FaultServer, Phase
from tests.helpers import await_until
from tests.http_sink import HttpSink
from tests.plugins_for_tests import STATE

THRESHOLD, ATTEMPTS, RESET_S, TIMEOUT_S = 3, 3, 0.5, 0.2
OUTAGE_S = 3.0
RATE = 200  # events/s recorded by the app


class HttpOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    url: str


def _http_plugin() -> types.ModuleType:
    mod = types.ModuleType("http_sink_plugin")

    @hookimpl
    def register_sinks(register):
        register("http", lambda name, options, ctx: HttpSink(options.url), options=HttpOptions)

    mod.register_sinks = register_sinks
    sys.modules[mod.__name__] = mod
    return mod


async def test_outage_is_bounded_and_nothing_is_lost(tmp_path) -> None:
    from agent.runtime import Agent

    STATE.reset()
    script = [Phase("healthy", 0.5), Phase("error", 1.5, status=503), Phase("hang", 0.5),
              Phase("throttle", 1.0, retry_after=0.2), Phase("healthy")]
    async with FaultServer(script) as server:
        cfg = {
            "agent": {"data_dir": str(tmp_path / "data"), "commit_interval_ms": 2},
            "server": {"enabled": False},
            "dashboard": {"store": False},
            "dlq": {"replay_per_s": 20},
            "sinks": {
                "remote": {
                    "type": "http", "url": server.url, "batch_size": 100,
                    "timeout": {"timeout_s": TIMEOUT_S},
                    "retry": {"max_attempts": ATTEMPTS, "initial_backoff_ms": 20, "max_backoff_ms": 100},
                    "circuit_breaker": {"failure_threshold": THRESHOLD, "reset_timeout_s": RESET_S},
                },
                "local": {"type": "memory", "policies": []},
            },
        }
        async with Agent(cfg, plugins=[plugins_for_tests, _http_plugin()]) as agent:
            server.restart()
            loop = asyncio.get_running_loop()
            end = loop.time() + 0.5 + OUTAGE_S + 1.0
            local_lag: list[int] = []
            i = 0
            while loop.time() < end:
                for _ in range(RATE // 20):
                    agent.record("orders.placed", i, kind="counter")
                    i += 1
                await asyncio.sleep(0.05)
                local_lag.append(agent.workers["local"].describe()["lag_events"])
            recorded = i
            # Recovery: live batches flow again and the DLQ drains by itself.
            def app_ids() -> list[str]:  # the sink also gets the agent's own events
                return [e.id for e in STATE.delivered["local"] if e.name == "orders.placed"]

            await await_until(lambda: len(app_ids()) >= recorded and agent.dlq.depth("remote") == 0
                              and agent.journal.lag("remote") == 0, timeout=30, what="recovery")
            sent_ids = app_ids()
            breaker_state = agent.workers["remote"].describe()["policies"]["breaker_state"]
            losses = agent.ledger.total()

    assert len(sent_ids) == recorded and losses == 0
    # Delivered once per id: count every id the server accepted.
    accepted = collections.Counter(i for r in server.requests if r.status == 200 for i in r.ids)
    app_ids = set(sent_ids)
    assert set(accepted) >= app_ids, f"{len(app_ids - set(accepted))} events never reached the server"
    dupes = {i: n for i, n in accepted.items() if n > 1 and i in app_ids}
    assert not dupes, f"{len(dupes)} ids delivered more than once"
    assert breaker_state == "closed"

    start, stop = server.window()
    during = server.between(start, stop)
    bound = THRESHOLD * ATTEMPTS + int(OUTAGE_S / RESET_S) + 1
    print(f"\n{len(during)} requests during a {OUTAGE_S}s outage (bound {bound}); max local lag {max(local_lag)}")
    assert len(during) <= bound, f"{len(during)} requests during a {OUTAGE_S}s outage (bound {bound})"
    # Once the breaker opened, requests are probes at least ~reset_timeout_s apart.
    failed = [r for r in during if r.status != 200]
    probes = failed[THRESHOLD * ATTEMPTS:]
    gaps = [b.t - a.t for a, b in zip(probes, probes[1:])]
    assert all(g >= RESET_S * 0.9 for g in gaps), gaps
    # The healthy sink never fell more than one producer second behind.
    assert max(local_lag) <= RATE, max(local_lag)


async def _deliver_through_two_slow_sinks(tmp_path, concurrency: dict) -> int:
    """Two slow sinks with the same concurrency table; 40 events recorded in 8 commits."""
    from agent.runtime import Agent

    STATE.reset()
    sink = {"type": "slow", "policies": ["concurrency"], "concurrency": concurrency, "batch_size": 5}
    cfg = {"agent": {"data_dir": str(tmp_path / "data"), "commit_interval_ms": 2},
           "server": {"enabled": False}, "dashboard": {"store": False}, "sinks": {"a": sink, "b": dict(sink)}}
    async with Agent(cfg, plugins=[plugins_for_tests]) as agent:
        for i in range(8):
            for j in range(5):
                agent.record("work", float(i * 5 + j))
            await asyncio.sleep(0.005)
        assert await agent.flush(10)
    return STATE.most_in_flight


async def test_a_concurrency_group_limits_sends_across_sinks(tmp_path) -> None:
    # alone, each sink has its own limit: both send at the same time
    assert await _deliver_through_two_slow_sinks(tmp_path / "own", {"max_in_flight": 1}) == 2
    assert len(STATE.delivered["a"]) == len(STATE.delivered["b"]) == 40
    # in one group, they take turns, and still deliver everything
    assert await _deliver_through_two_slow_sinks(tmp_path / "group", {"max_in_flight": 1, "group": "db"}) == 1
    assert sorted(e.value for e in STATE.delivered["a"]) == sorted(e.value for e in STATE.delivered["b"]) \
        == [float(i) for i in range(40)]


async def test_a_concurrency_group_with_two_limits_is_a_config_error_before_start(tmp_path) -> None:
    from agent.errors import ConfigError
    from agent.runtime import Agent

    cfg = {"agent": {"data_dir": str(tmp_path / "data")}, "server": {"enabled": False},
           "dashboard": {"store": False},
           "sinks": {"a": {"type": "memory", "policies": ["concurrency"], "concurrency": {"max_in_flight": 2, "group": "db"}},
                     "b": {"type": "memory", "policies": ["concurrency"], "concurrency": {"max_in_flight": 3, "group": "db"}}}}
    agent = Agent(cfg, plugins=[plugins_for_tests])
    with pytest.raises(ConfigError, match=r"sinks\.b\.concurrency\.max_in_flight: group 'db' is already limited to 2 by sink a"):
        await agent.start()
    assert agent.state == "failed"


async def test_a_sink_that_fails_to_build_keeps_its_backlog(tmp_path) -> None:
    """Its cursor stays, so compaction keeps its undelivered events until it runs again."""
    from agent.runtime import Agent

    STATE.reset()

    def cfg(b_type: str) -> dict:
        return {"agent": {"data_dir": str(tmp_path / "data"), "commit_interval_ms": 2, "shutdown_timeout_s": 0.5},
                "server": {"enabled": False}, "dashboard": {"store": False},
                "sinks": {"a": {"type": "memory", "policies": []}, "b": {"type": b_type, "policies": []}}}

    async with Agent(cfg("hang"), plugins=[plugins_for_tests]) as agent:  # b takes nothing
        for i in range(100):
            agent.record("kept", float(i))
        await await_until(lambda: len(STATE.delivered.get("a", [])) == 100)
    async with Agent(cfg("broken"), plugins=[plugins_for_tests]) as agent:  # b cannot be built
        comps = {c["name"]: c for c in agent.status()["components"] if c["kind"] == "sink"}
        assert comps["b"]["state"] == "failed"
        assert await agent.flush(5)
        await agent.journal.compact()
    STATE.reset()
    async with Agent(cfg("memory"), plugins=[plugins_for_tests]) as agent:  # b is back
        assert await agent.flush(10)
        assert sorted(e.value for e in STATE.delivered["b"]) == [float(i) for i in range(100)]
        assert agent.ledger.total() == 0
