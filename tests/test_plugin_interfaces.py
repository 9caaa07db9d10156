"""The declared interfaces through which plugin-specific things reach the core: a
policy's close(), an options struct's check_together(), figures in ctx.stats that
/metrics serves, and the history board a sink publishes its store on."""

from __future__ import annotations

import asyncio
import types

import aiohttp
import msgspec
import pytest

from agent.errors import ConfigError
from agent.plugin import BasePolicy, BaseSink, HistoryBoard, PluginContext, RetryableError, hookimpl
from agent.runtime import Agent
from tests.helpers import agent_config

CLOSED: list[tuple[str, str]] = []
USES: list[list[tuple[str, object]]] = []


class CountingPolicy(BasePolicy):
    def __init__(self, name: str, options: object, ctx: PluginContext) -> None:
        self.sink = name

    async def call(self, fn):
        return await fn()

    async def close(self) -> None:
        CLOSED.append((self.sink, "counting"))


class FailingClosePolicy(CountingPolicy):
    async def close(self) -> None:
        CLOSED.append((self.sink, "failing_close"))
        raise OSError("connection already gone")


class DeclaredBreaker(BasePolicy):
    """Declares breaker figures the way the circuit_breaker plugin does, with its own code."""

    def __init__(self, name: str, options: object, ctx: PluginContext) -> None:
        ctx.stats.update(breaker_state="testing", breaker_state_code=7, breaker_open_seconds_total=lambda: 1.5)

    async def call(self, fn):
        return await fn()


class PairOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    port: int = 0

    @classmethod
    def check_together(cls, uses: list[tuple[str, PairOptions]]) -> None:
        USES.append(list(uses))
        ports = [o.port for _, o in uses]
        if len(set(ports)) != len(ports):
            raise ConfigError(f"sinks.{uses[-1][0]}.port: port {ports[-1]} is taken")


class Sink(BaseSink):
    def __init__(self, name: str, options: object, ctx: PluginContext) -> None:
        pass

    async def send(self, events) -> None:
        return None


class NeverStarts(Sink):
    async def start(self) -> None:
        raise RetryableError("not today")


@hookimpl
def register_policies(register):
    register("counting", CountingPolicy)
    register("failing_close", FailingClosePolicy)
    register("declared_breaker", DeclaredBreaker)


@hookimpl
def register_sinks(register):
    register("pair", Sink, options=PairOptions)
    register("never", NeverStarts)


test_plugin = types.SimpleNamespace(__name__="test_plugin", register_policies=register_policies,
                                    register_sinks=register_sinks)


def _config(tmp_path, sinks, **sections):
    sections = {"server": {"enabled": False}, "dashboard": {"store": False}, **sections}
    return agent_config(tmp_path / "data", sinks, agent={"shutdown_timeout_s": 0.5}, **sections)


async def test_every_policy_closes_once_at_stop_even_when_its_sink_never_started(tmp_path):
    CLOSED.clear()
    chain = ["counting", "failing_close"]  # failing_close is outermost: it closes first
    agent = Agent(_config(tmp_path, {"a": {"type": "pair", "policies": chain},
                                     "b": {"type": "never", "policies": chain}}), plugins=[test_plugin])
    await agent.start()
    assert not agent.workers["b"].started
    await agent.stop()
    await agent.stop()  # a second stop closes nothing again
    assert sorted(CLOSED) == [("a", "counting"), ("a", "failing_close"), ("b", "counting"), ("b", "failing_close")]
    assert CLOSED.index(("a", "failing_close")) < CLOSED.index(("a", "counting"))


async def test_the_circuit_breaker_closes_its_shared_store():
    from agent.builtin_plugins.circuit_breaker import CircuitBreakerOptions, CircuitBreakerPolicy

    from agent.pipeline.resilience import Chain

    class Store:
        closed = 0

        async def close(self) -> None:
            self.closed += 1

    store = Store()
    chain = Chain(["circuit_breaker"], [CircuitBreakerPolicy("s", CircuitBreakerOptions(), store=store)])
    await chain.close()
    await chain.close()
    assert store.closed == 1


async def test_an_options_struct_checks_every_use_of_its_type_together(tmp_path):
    USES.clear()
    ok = Agent(_config(tmp_path / "ok", {"a": {"type": "pair", "port": 1, "policies": []},
                                         "b": {"type": "pair", "port": 2, "policies": []}}), plugins=[test_plugin])
    await ok.start()
    await ok.stop()
    assert len(USES) == 1 and USES[0] == [("a", PairOptions(port=1)), ("b", PairOptions(port=2))]
    clash = Agent(_config(tmp_path / "clash", {"a": {"type": "pair", "port": 1, "policies": []},
                                               "b": {"type": "pair", "port": 1, "policies": []}}),
                  plugins=[test_plugin])
    with pytest.raises(ConfigError, match=r": sinks\.b\.port: port 1 is taken$") as err:
        await clash.start()
    assert not str(err.value).startswith("sinks.")  # the agent put the config's origin first
    assert clash.state == "failed"


async def test_metrics_serve_the_breaker_figures_a_policy_declares(tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    from agent.api.metrics import render

    async with Agent(_config(tmp_path, {"a": {"type": "pair", "policies": ["declared_breaker"]}}),
                     plugins=[test_plugin]) as agent:
        families = {f.name: f for f in text_string_to_metric_families(render(agent))}
    assert [(s.labels, s.value) for s in families["sidecar_agent_breaker_state"].samples] == [({"sink": "a"}, 7)]
    assert [(s.labels, s.value) for s in families["sidecar_agent_breaker_open_seconds"].samples] == [
        ({"sink": "a"}, 1.5)]


# -- the history board ------------------------------------------------------------------------


async def test_the_board_answers_at_once_when_no_store_is_expected():
    board = HistoryBoard()
    # An hour's timeout: only an answer that does not wait for it can come back in time.
    assert await asyncio.wait_for(board.wait(3600), 60) is None


async def test_the_board_waits_for_an_expected_store_without_polling():
    board, store = HistoryBoard(), object()
    board.expect()
    waiter = asyncio.ensure_future(board.wait(5))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    board.serve(store)  # type: ignore[arg-type]
    assert await asyncio.wait_for(waiter, 1) is store
    board.withdraw(store)  # type: ignore[arg-type]
    assert board.store is None and board.expected
    assert await board.wait(0.05) is None  # expected, not served: gives up after the timeout


async def test_without_a_store_the_history_api_answers_503_at_once(tmp_path):
    cfg = _config(tmp_path, {"a": {"type": "pair", "policies": []}},
                  server={"enabled": True, "host": "127.0.0.1", "port": 0})
    async with Agent(cfg, plugins=[test_plugin]) as agent, aiohttp.ClientSession() as s:
        assert not agent.history.expected  # so the API does not wait for one
        async with s.get(agent.server_url + "/api/v1/names") as r:
            assert r.status == 503 and "history store is not running" in (await r.json())["error"]
        async with s.get(agent.server_url + "/api/v1/ui-config") as r:
            assert (await r.json())["store"] is False


async def test_the_store_sink_publishes_its_store_on_the_board(tmp_path):
    cfg = _config(tmp_path, {"a": {"type": "pair", "policies": []}}, dashboard={"store": True})
    agent = Agent(cfg, plugins=[test_plugin])
    assert not agent.history.expected
    await agent.start()
    try:
        assert agent.history.expected
        store = await agent.history.wait(5)
        assert store is not None and store is agent.workers["store"].sink.store
    finally:
        await agent.stop()
    assert agent.history.store is None  # withdrawn before the store closed
