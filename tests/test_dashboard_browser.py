"""The dashboard in a real Chromium (Playwright for Python, Debian's /usr/bin/chromium).

Without Chromium or Playwright these tests skip locally and FAIL when the CI variable is
set. Screenshots go to test-artifacts/. Every test also fails on a console error or an
uncaught page error (a CSP violation shows as one).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from pathlib import Path

import aiohttp
import pytest

from tests.dashboard_support import start_agent

CHROMIUM = os.environ.get("SIDECAR_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
TIMEOUT_MS = 15_000


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"browser tests need {reason} (CI is set, so this is a failure)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
async def agents(tmp_path):
    """Start agents with `await agents(**config)`; stopped after the pages are closed."""
    started = []

    async def factory(**extra):
        a = await start_agent(tmp_path / f"agent{len(started)}", **extra)
        started.append(a)
        return a

    yield factory
    for a in started:
        await a.stop(timeout=2)


@pytest.fixture
async def browser():
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        _unavailable("Playwright for Python (pip install playwright)")
    if not os.path.exists(CHROMIUM):
        _unavailable(f"Chromium at {CHROMIUM} (apt-get install chromium)")
    async with async_playwright() as p:
        b = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
async def open_page(browser, request):
    pages, problems = [], []

    async def opener(url: str):
        ctx = await browser.new_context(viewport={"width": 1280, "height": 900})
        page = await ctx.new_page()
        page.on("console", lambda m: m.type == "error" and problems.append(f"console: {m.text}"))
        page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))
        await page.goto(url)
        pages.append(page)
        return page

    async def close_all() -> None:
        """Screenshot and close the pages opened so far. A test that stops the servers a
        page talks to calls it first: a page left open would report their refused
        connections as console errors."""
        ARTIFACTS.mkdir(exist_ok=True)
        for i, page in enumerate(pages):
            await page.screenshot(path=str(ARTIFACTS / f"{request.node.name}-{i}.png"), full_page=True)
            await page.context.close()
        pages.clear()

    opener.allow = []  # substrings of console errors a test expects
    opener.close_all = close_all
    yield opener
    await close_all()
    problems = [p for p in problems if not any(a in p for a in opener.allow)]
    assert not problems, problems


async def post(agent, events):
    async with aiohttp.ClientSession() as s:
        async with s.post(agent.server_url + "/api/v1/events", json=events) as r:
            assert r.status == 202, await r.text()
            return (await r.json())["ids"]


def row(event_id: str) -> str:
    return f'#events tbody tr[data-id="{event_id}"]'


async def test_history_then_live_event_over_websocket(agents, open_page):
    agent = await agents()
    now = time.time()
    old = await post(agent, [{"name": "cpu", "value": 10 + i, "ts": now - 60 + i, "session_id": "s-1"}
                             for i in range(5)])
    assert await agent.flush(5)
    page = await open_page(agent.server_url)
    for i in old:
        await page.wait_for_selector(row(i), timeout=TIMEOUT_MS)
    await page.wait_for_selector("#conn.live", timeout=TIMEOUT_MS)
    # the events/s chart starts with the last 5 minutes from the store, not empty
    await page.wait_for_function(
        "() => window.sidecarDashboard?.charts.data('rate').v.reduce((a, b) => a + b, 0) >= 5", timeout=TIMEOUT_MS)
    (live,) = await post(agent, {"name": "checkout.error", "kind": "event", "session_id": "s-1",
                                 "tags": {"level": "error"}})
    await page.wait_for_selector(row(live), timeout=TIMEOUT_MS)
    assert await page.locator(row(live)).count() == 1
    assert await page.text_content("#data-source") == "websocket"
    # the metric explorer drew the history of the first metric
    await page.click("a[data-tab=metrics]")
    await page.wait_for_selector("#metric-charts figure[data-loaded=cpu] canvas", timeout=TIMEOUT_MS)
    # sessions: one active session with one error
    await page.click("a[data-tab=sessions]")
    await page.wait_for_selector('#sessions tr[data-session="s-1"]', timeout=TIMEOUT_MS)
    cells = await page.locator('#sessions tr[data-session="s-1"] td').all_text_contents()
    assert cells[1] == "6" and cells[2] == "1"
    csp = (await page.request.get(agent.server_url + "/")).headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp


def figure(name: str) -> str:
    return f'#metric-charts figure[data-name="{name}"]'


async def test_metric_explorer_several_metrics_tags_and_live_updates(agents, open_page):
    agent = await agents()
    now = time.time()
    await post(agent, [{"name": "latency", "value": 5.0, "ts": now - 120, "tags": {"host": "a"}},
                       {"name": "latency", "value": 7.0, "ts": now - 110, "tags": {"host": "b"}},
                       {"name": "queue.depth", "value": 3.0, "ts": now - 100},
                       {"name": "ignored.event", "kind": "event", "ts": now - 90}])
    assert await agent.flush(5)
    page = await open_page(agent.server_url + "/#metrics?agg=max")
    # the first metric is charted by default; events (kind "event") are not offered
    await page.wait_for_selector(figure("latency") + "[data-loaded] canvas", timeout=TIMEOUT_MS)
    assert await page.get_attribute(figure("latency"), "data-last") == "7"
    assert await page.locator('#metric-list li[data-name="ignored.event"]').count() == 0
    # a second metric gets its own chart, and the choice is written into the URL
    await page.check('#metric-list input[value="queue.depth"]')
    await page.wait_for_selector(figure("queue.depth") + "[data-loaded] canvas", timeout=TIMEOUT_MS)
    assert "names=latency&names=queue.depth" in page.url and "agg=max" in page.url
    # live on the 1 h range: a new value shows up in the (server-aggregated) chart
    await post(agent, [{"name": "latency", "value": 42.0, "tags": {"host": "a"}}])
    await page.wait_for_selector(figure("latency") + '[data-last="42"]', timeout=TIMEOUT_MS)
    # a tag filter narrows every chart; a malformed one is named, not ignored
    await page.fill("#metric-tags", "host=b")
    await page.press("#metric-tags", "Enter")
    await page.wait_for_selector(figure("latency") + '[data-last="7"]', timeout=TIMEOUT_MS)
    await page.fill("#metric-tags", "host")
    await page.press("#metric-tags", "Enter")
    await page.wait_for_selector("#metric-status.error", timeout=TIMEOUT_MS)
    assert await page.text_content("#metric-status") == 'tag filter "host" is not key=value'
    # the URL restores the same view in a new tab
    await page.fill("#metric-tags", "")
    await page.press("#metric-tags", "Enter")
    await page.click("#metric-ranges button[data-range='86400']")
    await page.wait_for_selector(figure("queue.depth") + "[data-loaded] canvas", timeout=TIMEOUT_MS)
    again = await open_page(page.url)
    for name in ("latency", "queue.depth"):
        await again.wait_for_selector(figure(name) + "[data-loaded] canvas", timeout=TIMEOUT_MS)
    assert await again.get_attribute("#metric-ranges button.on", "data-range") == "86400"
    assert await again.locator("#metric-charts figure").count() == 2
    assert "minute level" in await again.text_content(figure("latency") + " .info")


async def test_metric_explorer_stays_live_across_tab_switches_and_follows_the_url(agents, open_page):
    agent = await agents()
    now = time.time()
    await post(agent, [{"name": "latency", "value": 5.0, "ts": now - 60}, {"name": "other", "value": 1.0, "ts": now - 60}])
    assert await agent.flush(5)
    page = await open_page(agent.server_url + "/")  # opens on the overview
    await page.wait_for_selector("#conn.live", timeout=TIMEOUT_MS)
    await page.click("a[data-tab=metrics]")
    await page.wait_for_selector(figure("latency") + "[data-loaded] canvas", timeout=TIMEOUT_MS)
    assert "names=latency" in page.url  # the choice is written into the URL on showing the tab
    # away long enough for a re-read to come due while hidden, then back: live again
    await page.click("a[data-tab=overview]")
    await asyncio.sleep(4)  # the 1 h range re-reads every 3 s
    await page.click("a[data-tab=metrics]")
    await post(agent, [{"name": "latency", "value": 42.0}])
    await page.wait_for_selector(figure("latency") + '[data-last="42"]', timeout=TIMEOUT_MS)
    # a new URL in the same document (a pasted link, the back button) is adopted
    await page.goto(agent.server_url + "/#metrics?names=other&range=300")
    await page.wait_for_selector(figure("other") + "[data-loaded] canvas", timeout=TIMEOUT_MS)
    assert await page.locator(figure("latency")).count() == 0
    assert await page.get_attribute("#metric-ranges button.on", "data-range") == "300"


async def test_bad_flag_value_shows_the_servers_message(agents, open_page):
    agent = await agents()
    open_page.allow.append("status of 400 (Bad Request)")  # the browser logs the refused PUT
    page = await open_page(agent.server_url + "/#flags")
    sel = 'tr[data-flag="sinks.store.rollout_percent"]'
    await page.wait_for_selector(sel, timeout=TIMEOUT_MS)
    await page.fill(f"{sel} input", "250")
    await page.click(f"{sel} button:text('Set')")
    await page.wait_for_selector("#flag-error:not([hidden])", timeout=TIMEOUT_MS)
    message = await page.text_content("#flag-error")
    async with aiohttp.ClientSession() as s:
        async with s.put(agent.server_url + "/api/v1/flags/sinks.store.rollout_percent", json="250") as r:
            assert r.status == 400
            assert message == (await r.json())["error"]
    # a good value goes through and shows up in the table and the audit trail
    await page.fill(f"{sel} input", "50")
    await page.click(f"{sel} button:text('Set')")
    await page.wait_for_function(
        "() => document.querySelector('tr[data-flag=\"sinks.store.rollout_percent\"] td:nth-child(3)').textContent"
        " === 'override'", timeout=TIMEOUT_MS)
    assert await page.is_hidden("#flag-error")
    await page.wait_for_selector("#flag-audit td:text('sinks.store.rollout_percent')", timeout=TIMEOUT_MS)


async def _sb_agent(agents, emu, table, mode, **extra):
    return await agents(
        sinks={"supabase": {"url": emu.url, "key": emu.key, "table": table.table, "policies": [], "batch_size": 50}},
        dashboard={"supabase_url": emu.url, "supabase_anon_key": emu.anon_key},
        flags={"dashboard": {"data_source": mode}},
        **extra,
    )


async def test_dlq_replay_from_the_page(agents, open_page, supabase_emulator, pg_table):
    # auto_replay off: the entries wait for the click instead of the sink's own probe.
    agent = await _sb_agent(agents, supabase_emulator, pg_table, "websocket", dlq={"auto_replay": False})
    supabase_emulator.fail_next(1, status=503)
    ids = await post(agent, [{"name": "dlq.test", "value": i} for i in range(3)])
    for _ in range(200):
        if agent.dlq.depth("supabase") == 3:
            break
        await asyncio.sleep(0.05)
    assert agent.dlq.depth("supabase") == 3
    page = await open_page(agent.server_url + "/#dlq")
    await page.wait_for_selector("#dlq[data-pending='3']", timeout=TIMEOUT_MS)
    await page.select_option("#dlq-sink", "supabase")
    await page.click("#dlq-replay")
    await page.wait_for_selector("#dlq[data-pending='0']", timeout=TIMEOUT_MS)
    assert set((await pg_table.count_ids(ids)).values()) == {1}


async def test_supabase_realtime_source(agents, open_page, supabase_emulator, pg_table):
    agent = await _sb_agent(agents, supabase_emulator, pg_table, "supabase")
    page = await open_page(agent.server_url)
    await page.wait_for_selector("#conn.live", timeout=TIMEOUT_MS)
    assert await page.text_content("#data-source") == "supabase"
    ids = await post(agent, [{"name": "sb.event", "value": i, "session_id": "sb"} for i in range(5)])
    for i in ids:
        await page.wait_for_selector(row(i), timeout=TIMEOUT_MS)
    stats = await page.evaluate("window.sidecarDashboard.adapter.stats")
    assert stats["firstBy"]["websocket"] == 0 and stats["firstBy"]["supabase"] >= 5


async def test_dual_shows_each_event_once_and_switches_live(agents, open_page, supabase_emulator, pg_table):
    agent = await _sb_agent(agents, supabase_emulator, pg_table, "dual")
    page = await open_page(agent.server_url)
    await page.wait_for_function("() => document.querySelector('#conn').textContent.split('live').length === 3",
                                 timeout=TIMEOUT_MS)
    ids = await post(agent, [{"name": "dual.event", "value": i, "id": str(uuid.uuid4())} for i in range(20)])
    for i in ids:
        await page.wait_for_selector(row(i), timeout=TIMEOUT_MS)
    # wait until the second copy of every event has arrived (and was dropped)
    await page.wait_for_function("() => window.sidecarDashboard.adapter.stats.duplicates >= 20", timeout=TIMEOUT_MS)
    for i in ids:
        assert await page.locator(row(i)).count() == 1
    stats = await page.evaluate("window.sidecarDashboard.adapter.stats")
    assert stats["firstBy"]["websocket"] + stats["firstBy"]["supabase"] == stats["delivered"]
    # the flag changes: the page follows without a reload
    async with aiohttp.ClientSession() as s:
        async with s.put(agent.server_url + "/api/v1/flags/dashboard.data_source", json="websocket") as r:
            assert r.status == 200
    await page.wait_for_function("() => document.querySelector('#data-source').textContent === 'websocket'",
                                 timeout=TIMEOUT_MS)
    (after,) = await post(agent, {"name": "after.switch", "value": 1})
    await page.wait_for_selector(row(after), timeout=TIMEOUT_MS)


FORWARDER = """
import os, sys, agent
fw = agent.start({"agent": {"data_dir": sys.argv[1], "id": "test-agent"}, "server": {"enabled": False}})
assert type(fw).__name__ == "Forwarder", fw
for k in range(int(sys.argv[2])):
    agent.record("worker.job", k, data={"k": k})
assert agent.flush(60)
print(os.getpid(), flush=True)
sys.stdin.read()  # connected until the test closes stdin; the exit hook stops the forwarder
"""


async def test_processes_tab_lists_a_forwarding_process(agents, open_page):
    """An owner and one worker process forwarding to it (same data dir): the Processes tab
    shows the worker's pid, its committed events and connected; once it exits, gone."""
    import sys

    from agent.forwarding.owner import Owner
    from tests.helpers import subprocess_env

    agent = await agents()
    owner = Owner(agent)  # what agent.start() runs beside the Agent in the owning process
    await owner.start()
    agent.forwarding = owner  # shown in status, /metrics and so on the page
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", FORWARDER, agent.config.agent.data_dir, "25", env=subprocess_env(),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdin is not None
        pid = (await asyncio.wait_for(proc.stdout.readline(), 120)).decode().strip()
        assert pid.isdigit(), pid
        page = await open_page(agent.server_url + "/#processes")
        fw_row = f'#forwarders tbody tr[data-pid="{pid}"]'
        await page.wait_for_selector(fw_row, timeout=TIMEOUT_MS)
        cells = page.locator(fw_row + " td")
        assert await cells.nth(0).text_content() == pid
        assert await cells.nth(1).text_content() == "connected"
        assert await cells.nth(2).text_content() == "25"  # events committed for it
        assert await cells.nth(5).text_content() == "0"  # lost
        assert "1 of 1 forwarders connected" in await page.text_content("#processes-status")
        # the worker's events carry its pid, as the owner's newest events show
        await page.click("a[data-tab=overview]")
        await page.wait_for_selector(f'#events tbody tr:has(td:text-is("worker.job")):has-text("pid={pid}")',
                                     timeout=TIMEOUT_MS)
        # the worker exits: it stays listed, as gone, with its counts
        proc.stdin.close()
        assert await asyncio.wait_for(proc.wait(), 120) == 0
        await page.click("a[data-tab=processes]")
        await page.wait_for_selector(fw_row + ' td:text-is("gone")', timeout=TIMEOUT_MS)
        assert await cells.nth(2).text_content() == "25"
        assert "0 of 1 forwarders connected" in await page.text_content("#processes-status")
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await owner.stop(1.0)


async def test_token_prompt_once_then_history_live_stream_and_a_reload(agents, open_page):
    """With a token, reads need it too (docs/security.md): the page asks once, however many
    calls were refused, then shows history and the live WebSocket (carried by the session
    cookie the login set); a reload of the tab asks nothing."""
    token = "br0wser-t0ken"
    agent = await agents(server={"token": token})
    auth = {"Authorization": f"Bearer {token}"}
    async with aiohttp.ClientSession() as s, s.post(agent.server_url + "/api/v1/events",
                                                   json=[{"name": "before.login", "value": 1}], headers=auth) as r:
        assert r.status == 202
        (old,) = (await r.json())["ids"]
    assert await agent.flush(5)
    open_page.allow.append("status of 401 (Unauthorized)")  # the browser logs the refused reads
    page = await open_page(agent.server_url)
    await page.wait_for_selector("#token-dialog[open]", timeout=TIMEOUT_MS)
    await page.fill("#token-input", token)
    await page.click("#token-ok")
    await page.wait_for_selector(row(old), timeout=TIMEOUT_MS)
    await page.wait_for_selector("#conn.live", timeout=TIMEOUT_MS)
    async with aiohttp.ClientSession() as s, s.post(agent.server_url + "/api/v1/events",
                                                   json={"name": "after.login", "value": 2}, headers=auth) as r:
        (live,) = (await r.json())["ids"]
    await page.wait_for_selector(row(live), timeout=TIMEOUT_MS)
    assert await page.evaluate("sessionStorage.getItem('sidecar-agent-token')") == token
    # The timers keep reading (status every 2 s): no second prompt.
    await page.wait_for_function("() => document.querySelector('#conn').classList.contains('live')",
                                 timeout=TIMEOUT_MS)
    await asyncio.sleep(2.5)
    assert await page.locator("#token-dialog[open]").count() == 0
    await page.reload()
    await page.wait_for_selector("#conn.live", timeout=TIMEOUT_MS)
    await page.wait_for_selector(row(live), timeout=TIMEOUT_MS)
    assert await page.locator("#token-dialog[open]").count() == 0
