"""The Fleet tab in a real Chromium: two agents' heartbeats reach one place (the Supabase
emulator over the real PostgreSQL, or a collector agent's HTTP ingest), the tab lists both,
marks a stopped one stale (no heartbeat for 3 intervals), and picking one filters the
other tabs by agent_id. Browser fixtures come from test_dashboard_browser."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import msgspec

from agent.plugin.hookspecs import hookimpl
from agent.runtime import Agent
from tests.dashboard_support import agent_config
from tests.helpers import post_events
from tests.http_sink import HttpSink
from tests.test_dashboard_browser import TIMEOUT_MS, agents, browser, open_page  # noqa: F401  (fixtures)

BEAT_S = 1.0  # stale after 3 s without one: generous for a loaded machine, short for a test


def fleet_row(agent_id: str, state: str | None = None) -> str:
    return f'#fleet tbody tr[data-agent="{agent_id}"]' + (f'[data-state="{state}"]' if state else "")


def event_row(event_id: str) -> str:
    return f'#events tbody tr[data-id="{event_id}"]'


class HttpOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    url: str


def _http_plugin() -> types.ModuleType:
    """An `http` sink type (tests/http_sink.py): an edge agent posting to a collector's ingest."""
    mod = types.ModuleType("fleet_http_sink_plugin")

    @hookimpl
    def register_sinks(register: Any) -> None:
        register("http", lambda name, options, ctx: HttpSink(options.url), options=HttpOptions)

    mod.register_sinks = register_sinks  # type: ignore[attr-defined]
    sys.modules[mod.__name__] = mod
    return mod


async def edge(tmp_path: Path, agent_id: str, sinks: dict[str, Any], server: bool = False, **extra: Any) -> Agent:
    """An agent named `agent_id` sending a heartbeat every BEAT_S to `sinks`."""
    cfg = agent_config(
        tmp_path / agent_id,
        agent={"id": agent_id, "heartbeat_s": BEAT_S},
        sinks=sinks,
        server={"enabled": server},
        **extra,
    )
    a = Agent(cfg, plugins=[_http_plugin()])
    await a.start()
    return a


async def check_filter(page: Any, mine: list[str], theirs: list[str], agent_id: str) -> None:
    """Pick `agent_id` in the Fleet tab: the overview shows only its events; clear: all again."""
    await page.click("a[data-tab=fleet]")
    await page.click(fleet_row(agent_id) + " button")
    await page.wait_for_selector(fleet_row(agent_id) + ".on", timeout=TIMEOUT_MS)
    assert f"showing {agent_id} only" in await page.text_content("#fleet-status")
    await page.click("a[data-tab=overview]")
    for i in mine:
        await page.wait_for_selector(event_row(i), timeout=TIMEOUT_MS)
    for i in theirs:
        assert await page.locator(event_row(i)).count() == 0
    await page.click("a[data-tab=sessions]")
    await page.wait_for_selector(f'#agents tr[data-agent="{agent_id}"]', timeout=TIMEOUT_MS)
    assert await page.locator("#agents tbody tr").count() == 1
    # the header's filter badge shows every agent again
    assert await page.text_content("#agent-filter") == f"agent: {agent_id} ✕"
    await page.click("#agent-filter")
    await page.click("a[data-tab=overview]")
    for i in mine + theirs:
        await page.wait_for_selector(event_row(i), timeout=TIMEOUT_MS)


async def test_fleet_from_supabase_lists_both_marks_a_stopped_one_stale_and_filters(
    tmp_path, open_page, supabase_emulator, pg_table
):  # noqa: F811
    emu = supabase_emulator
    sink = {
        "supabase": {
            "type": "supabase",
            "url": emu.url,
            "key": emu.key,
            "table": pg_table.table,
            "policies": [],
            "batch_size": 50,
        }
    }
    a = await edge(
        tmp_path,
        "edge-a",
        sink,
        server=True,
        dashboard={"supabase_url": emu.url, "supabase_anon_key": emu.anon_key},
        flags={"dashboard": {"data_source": "supabase"}},
    )
    b = await edge(tmp_path, "edge-b", sink)
    try:
        page = await open_page(a.server_url + "/#fleet")
        for agent_id in ("edge-a", "edge-b"):
            await page.wait_for_selector(fleet_row(agent_id, "live"), timeout=TIMEOUT_MS)
        cells = await page.locator(fleet_row("edge-b") + " td").all_text_contents()
        from agent.version import __version__

        assert cells[0] == "edge-b" and cells[5] == "0" and cells[8] == __version__
        assert cells[7] == "\u2013"  # an en dash: no sink with a breaker (policies = [])
        ids_a = await post_events(a, [{"name": "from.a", "value": i} for i in range(3)])
        b.record("from.b", 1.0)
        assert await b.flush(30)
        ids_b = [r["id"] for r in await pg_table.fetch("SELECT id::text FROM {t} WHERE event_type = 'from.b'")]
        assert len(ids_b) == 1
        # b stops: no heartbeat for 3 intervals makes it stale; a stays live
        await b.stop(timeout=5)
        await page.wait_for_selector(fleet_row("edge-b", "stale"), timeout=TIMEOUT_MS)
        await page.wait_for_selector(fleet_row("edge-a", "live"), timeout=TIMEOUT_MS)
        assert "2 agents seen, 1 stale" in await page.text_content("#fleet-status")
        await check_filter(page, ids_a, ids_b, "edge-a")
    finally:
        await open_page.close_all()  # before `a` (its server) and the emulator go away
        await b.stop(timeout=2)
        await a.stop(timeout=2)


async def test_fleet_from_a_collectors_live_stream(tmp_path, agents, open_page):  # noqa: F811
    collector = await agents(agent={"heartbeat_s": 0})  # the fleet is the two edges only
    ingest = {"up": {"type": "http", "url": collector.server_url + "/api/v1/events", "policies": [], "batch_size": 50}}
    a = await edge(tmp_path, "edge-a", ingest, dashboard={"store": False})
    b = await edge(tmp_path, "edge-b", ingest, dashboard={"store": False})
    try:
        page = await open_page(collector.server_url + "/#fleet")
        for agent_id in ("edge-a", "edge-b"):
            await page.wait_for_selector(fleet_row(agent_id, "live"), timeout=TIMEOUT_MS)
        assert await page.locator("#fleet tbody tr").count() == 2
        a.record("from.a", 1.0)
        b.record("from.b", 2.0)
        assert await a.flush(30) and await b.flush(30)
        assert await collector.flush(30)
        events = await _events(collector)
        ids_a = [e["id"] for e in events if e["name"] == "from.a"]
        ids_b = [e["id"] for e in events if e["name"] == "from.b"]
        assert len(ids_a) == len(ids_b) == 1
        await check_filter(page, ids_b, ids_a, "edge-b")
        # b stops; a page opened afterwards still lists it (from the collector's history of
        # heartbeats, as no live one comes), stale
        await b.stop(timeout=5)
        again = await open_page(collector.server_url + "/#fleet")
        await again.wait_for_selector(fleet_row("edge-b", "stale"), timeout=TIMEOUT_MS)
        await again.wait_for_selector(fleet_row("edge-a", "live"), timeout=TIMEOUT_MS)
    finally:
        await b.stop(timeout=2)
        await a.stop(timeout=2)


async def _events(agent: Agent) -> list[dict[str, Any]]:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(agent.server_url + "/api/v1/events?limit=1000") as r:
        assert r.status == 200
        return (await r.json())["events"]
