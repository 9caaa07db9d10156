"""Plugin loading: broken third-party plugins are named and isolated; allow/deny; duplicates;
misspelled hooks. Third-party plugins come from entry points (faked here with real
EntryPoint objects over modules in a temp dir; tests/test_example_plugin.py installs a
real package)."""

from __future__ import annotations

import asyncio
import importlib.metadata
import logging
import sys
import textwrap

import aiohttp
import pytest

from agent.api import create_app
from agent.config import PluginsSection
from agent.plugin.host import ENTRY_POINT_GROUP, PluginHost
from agent.runtime import Agent

MODULES = {
    "sc_import_fails": """
        raise ImportError("No module named 'frobnicate'")
    """,
    "sc_register_raises": """
        from agent.plugin.hookspecs import hookimpl

        class S:
            async def run(self, emit):
                pass

        @hookimpl
        def register_sources(register):
            register("half_registered", lambda name, options, ctx: S())
            raise RuntimeError("register hook exploded")
    """,
    "sc_bad_components": """
        from agent.plugin.hookspecs import hookimpl
        from agent.plugin.base import BaseSink

        class FlakySource:
            def __init__(self, name, options, ctx):
                pass
            async def run(self, emit):
                raise RuntimeError("source run exploded")

        class BrokenSink(BaseSink):
            def __init__(self, name, options, ctx):
                pass
            async def start(self):
                raise ConnectionError("sink start exploded")

        @hookimpl
        def register_sources(register):
            register("flaky", FlakySource)

        @hookimpl
        def register_sinks(register):
            register("brokensink", BrokenSink)
    """,
    "sc_good": """
        import asyncio
        from agent.event import Event
        from agent.plugin.hookspecs import hookimpl

        class Ticker:
            def __init__(self, name, options, ctx):
                pass
            async def run(self, emit):
                i = 0
                while True:
                    emit([Event(name="tick", value=float(i), kind="counter")])
                    i += 1
                    await asyncio.sleep(0.02)

        @hookimpl
        def register_sources(register):
            register("ticker", Ticker)
    """,
    "sc_dup": """
        from agent.plugin.hookspecs import hookimpl

        @hookimpl
        def register_sinks(register):
            register("jsonl", object)
    """,
    "sc_misspelled": """
        from agent.plugin.hookspecs import hookimpl

        @hookimpl
        def register_sink(register):  # should be register_sinks
            register("never", object)
    """,
    "sc_extras": """
        from aiohttp import web
        from agent.plugin.hookspecs import hookimpl
        from agent.flags import Flag

        CALLS = []

        class Counting:
            def __init__(self, name, options, ctx):
                self.name = name
            async def call(self, fn):
                CALLS.append(self.name)
                return await fn()

        async def hello(request):
            return web.json_response({"hello": "world"})

        @hookimpl
        def register_policies(register):
            register("counting", Counting)

        @hookimpl
        def register_flags(register):
            register(Flag("example.enabled", "bool", True, "Turns the example on."))

        @hookimpl
        def register_routes(register):
            register("GET", "/api/v1/example/hello", hello)
            register("GET", "/api/v1/example/reset", hello, mutating=True)
    """,
}


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    """Install fake entry points for the given module names (written to tmp_path)."""
    pkg_dir = tmp_path / "plugins_src"
    pkg_dir.mkdir()
    for mod, src in MODULES.items():
        (pkg_dir / f"{mod}.py").write_text(textwrap.dedent(src))
    monkeypatch.syspath_prepend(str(pkg_dir))

    def install(*names: str) -> None:
        eps = importlib.metadata.EntryPoints(
            importlib.metadata.EntryPoint(name=n, value=n, group=ENTRY_POINT_GROUP) for n in names
        )

        def entry_points(**kw):
            return eps.select(**kw) if kw else eps

        monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)

    yield install
    for mod in MODULES:
        sys.modules.pop(mod, None)


def _host(**settings) -> PluginHost:
    return PluginHost(PluginsSection(**settings)).load()


def test_builtins_register_like_third_party():
    host = _host(entry_points=False)
    assert {n: i.state for n, i in host.info.items()} == {n: "loaded" for n in OTHER_BUILTINS | {"jsonl"}}
    assert {n: i.package for n, i in host.info.items()} == {n: "sidecar-agent" for n in OTHER_BUILTINS | {"jsonl"}}
    assert host.get("sinks", "jsonl").plugin == "jsonl"
    assert host.get("sources", "system").plugin == "system"


def test_import_failure_is_named_and_others_load(third_party, caplog):
    third_party("sc_import_fails", "sc_good")
    with caplog.at_level(logging.ERROR, logger="sidecar_agent.plugins"):
        host = _host()
    bad = host.info["sc_import_fails"]
    assert bad.state == "failed" and "frobnicate" in bad.error
    assert "sc_import_fails" in caplog.text
    assert host.info["sc_good"].state == "loaded"
    assert host.get("sources", "ticker").plugin == "sc_good"


def test_register_hook_failure_is_named_and_rolled_back(third_party, caplog):
    third_party("sc_register_raises", "sc_good")
    with caplog.at_level(logging.ERROR, logger="sidecar_agent.plugins"):
        host = _host()
    info = host.info["sc_register_raises"]
    assert info.state == "failed" and "register hook exploded" in info.error
    assert "sc_register_raises" in caplog.text
    assert "half_registered" not in host.registry["sources"]  # what it registered before failing is dropped
    assert "ticker" in host.registry["sources"]


def test_duplicate_type_names_rejected_naming_both(third_party):
    third_party("sc_dup")
    host = _host()
    info = host.info["sc_dup"]
    assert info.state == "failed"
    assert "sc_dup" in info.error and "'jsonl'" in info.error and "already registered by jsonl" in info.error
    assert host.get("sinks", "jsonl").plugin == "jsonl"  # the first registration stands


def test_check_pending_catches_misspelled_hookimpl(third_party, caplog):
    third_party("sc_misspelled", "sc_good")
    with caplog.at_level(logging.ERROR, logger="sidecar_agent.plugins"):
        host = _host()
    info = host.info["sc_misspelled"]
    assert info.state == "failed" and "register_sink" in info.error
    assert "sc_misspelled" in caplog.text
    assert host.info["sc_good"].state == "loaded"
    assert host.pm.get_plugin("sc_misspelled") is None


OTHER_BUILTINS = {m.rsplit(".", 1)[-1] for m in __import__("plugins").BUILTIN} - {"jsonl"}


@pytest.mark.parametrize("settings, blocked", [
    ({"deny": ["postgres", "sc_good"]}, {"postgres", "sc_good"}),
    ({"allow": ["jsonl", "sc_good"]}, OTHER_BUILTINS),
    ({"allow": ["jsonl", "sc_good"], "deny": ["sc_good"]}, OTHER_BUILTINS | {"sc_good"}),
])
def test_allow_and_deny_lists(third_party, settings, blocked):
    third_party("sc_good")
    host = _host(**settings)
    assert {n for n, i in host.info.items() if i.state == "blocked"} == blocked
    for name in blocked:
        assert host.pm.get_plugin(name) is None
        assert not host.info[name].provides
    assert ("ticker" in host.registry["sources"]) == ("sc_good" not in blocked)


def test_entry_points_can_be_turned_off(third_party):
    third_party("sc_good")
    assert "sc_good" not in _host(entry_points=False).info


async def test_failing_components_named_in_status_and_agent_keeps_running(third_party, tmp_path, caplog,
                                                                          aiohttp_client):
    third_party("sc_import_fails", "sc_register_raises", "sc_bad_components", "sc_good", "sc_misspelled")
    cfg = {
        # the broken sink never confirms anything, so stop() waits out its deadline: keep it short
        "agent": {"data_dir": str(tmp_path / "data"), "shutdown_timeout_s": 0.5},
        "server": {"enabled": False},
        "sources": {"ticker": {}, "flaky": {}},
        "sinks": {"good": {"type": "jsonl", "path": str(tmp_path / "out.jsonl"), "policies": []},
                  "bad": {"type": "brokensink", "policies": []}},
    }
    with caplog.at_level(logging.ERROR):
        async with Agent(cfg) as a:
            client = await aiohttp_client(create_app(a))
            deadline = asyncio.get_running_loop().time() + 20
            while True:
                s = await (await client.get("/api/v1/status")).json()
                comps = {c["name"]: c for c in s["components"]}
                sinks = {x["name"]: x for x in s["sinks"]}
                if (comps["flaky"]["state"] == "restarting" and comps["bad"]["state"] == "failed"
                        and sinks["good"]["sent"] >= 3):
                    break
                assert asyncio.get_running_loop().time() < deadline, s
                await asyncio.sleep(0.05)
            assert a.state == "running"
    plugins = {p["name"]: p for p in s["plugins"]}
    assert plugins["sc_import_fails"]["state"] == "failed" and "frobnicate" in plugins["sc_import_fails"]["error"]
    assert plugins["sc_register_raises"]["state"] == "failed"
    assert "register hook exploded" in plugins["sc_register_raises"]["error"]
    assert plugins["sc_misspelled"]["state"] == "failed"
    assert plugins["sc_good"]["state"] == "loaded"
    assert comps["flaky"]["plugin"] == "sc_bad_components" and "source run exploded" in comps["flaky"]["error"]
    assert comps["bad"]["plugin"] == "sc_bad_components" and "sink start exploded" in comps["bad"]["error"]
    assert sinks["bad"]["plugin"] == "sc_bad_components"
    assert comps["ticker"]["state"] == "running"
    for needle in ("sc_import_fails", "sc_register_raises", "sc_misspelled", "source flaky (plugin sc_bad_components)",
                   "sink bad (plugin sc_bad_components)"):
        assert needle in caplog.text, needle


def test_plugins_command_shows_failed_plugin(third_party, capsys):
    from agent.cli import main

    third_party("sc_import_fails")
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("sc_import_fails"))
    assert "failed" in line and "frobnicate" in line


async def test_register_policies_flags_and_routes(third_party, tmp_path, aiohttp_client):
    third_party("sc_extras")
    cfg = {
        "agent": {"data_dir": str(tmp_path / "data")},
        "server": {"enabled": False, "token": "t0ken"},
        "sinks": {"out": {"type": "jsonl", "path": str(tmp_path / "out.jsonl"), "policies": ["counting"]}},
    }
    async with Agent(cfg) as a:
        host = a.host
        assert host.get("policies", "counting").plugin == "sc_extras"
        assert "policy:counting" in host.info["sc_extras"].provides
        ((plugin, flag),) = host.flags
        assert plugin == "sc_extras" and flag.name == "example.enabled"
        assert [(m, p, pl) for m, p, _, _, pl in host.routes] == [
            ("GET", "/api/v1/example/hello", "sc_extras"), ("GET", "/api/v1/example/reset", "sc_extras")]
        client = await aiohttp_client(create_app(a))
        # With a token set every /api/ route needs it, plugin routes too (docs/security.md)
        assert (await client.get("/api/v1/example/hello")).status == 401
        r = await client.get("/api/v1/example/hello", headers={"Authorization": "Bearer t0ken"})
        assert r.status == 200 and await r.json() == {"hello": "world"}
        # mutating=True: the token is required even for a GET
        assert (await client.get("/api/v1/example/reset")).status == 401
        r = await client.get("/api/v1/example/reset", headers={"Authorization": "Bearer t0ken"})
        assert r.status == 200
        a.record("through.policy", 1)
        assert await a.flush(10)
    assert sys.modules["sc_extras"].CALLS == ["out"]


def test_route_path_must_start_with_slash(third_party, tmp_path):
    (tmp_path / "plugins_src" / "sc_badroute.py").write_text(textwrap.dedent("""
        from agent.plugin.hookspecs import hookimpl

        @hookimpl
        def register_routes(register):
            register("GET", "no-slash", lambda request: None)
    """))
    third_party("sc_badroute")
    host = _host()
    sys.modules.pop("sc_badroute", None)
    assert host.info["sc_badroute"].state == "failed" and "must start with /" in host.info["sc_badroute"].error
    assert host.routes == []


def _route_plugin(name: str, routes: list[tuple[str, str]]):
    import types

    from aiohttp import web

    from agent.plugin.hookspecs import hookimpl

    mod = types.ModuleType(name)

    async def mine(request):
        return web.json_response({"mine": name})

    @hookimpl
    def register_routes(register):
        for method, path in routes:
            register(method, path, mine)

    mod.register_routes = register_routes
    return mod


async def test_a_route_that_clashes_fails_its_plugin_not_the_agent(tmp_path):
    from agent.runtime import Agent

    clashes = {
        "sc_same": ("GET", "/healthz"),                  # a core path, same method
        "sc_under_param": ("DELETE", "/api/v1/flags/mine"),  # would win over DELETE /api/v1/flags/{name}
        "sc_same_pattern": ("PUT", "/api/v1/flags/{flag}"),  # the core's pattern, another name
        "sc_star": ("*", "/readyz"),                      # every method, GET included
        "sc_ui": ("GET", "/ui/mine.js"),                  # the dashboard's
    }
    plugins = [_route_plugin(name, [route]) for name, route in clashes.items()]
    plugins.append(_route_plugin("sc_fine", [("GET", "/clash/ok"), ("POST", "/healthz/extra")]))
    cfg = {"agent": {"data_dir": str(tmp_path / "d")}, "server": {"port": 0}, "sources": {},
           "dashboard": {"store": False}}
    async with Agent(cfg, plugins=plugins) as agent, aiohttp.ClientSession() as s:
        assert agent.state == "running"
        async with s.get(agent.server_url + "/healthz") as r:
            assert await r.json() == {"status": "ok"}  # the core's routes won
        async with s.delete(agent.server_url + "/api/v1/flags/mine") as r:
            assert r.status == 404 and "mine" in (await r.json())["error"]  # the core's flag delete
        async with s.get(agent.server_url + "/clash/ok") as r:
            assert await r.json() == {"mine": "sc_fine"}
        info = {p["name"]: p for p in agent.host.describe()}
        for name, (method, path) in clashes.items():
            assert info[name]["state"] == "failed" and f"route {method} {path}" in info[name]["error"], name
        assert info["sc_fine"]["state"] == "loaded"
