"""Dashboard latency in a real Chromium: record() -> row visible in the DOM (p50/p99) at
100 and 1000 events/s over the agent's WebSocket and through the Supabase emulator
(supabase sink -> PostgreSQL -> Realtime); navigation to the first painted chart with
1 h of history for 20 metrics at 1 event/s; the page's transfer size with and without
supabase-js.

    PYTHONPATH=. .venv/bin/python bench/dashboard_latency.py [--seconds 5] [--no-supabase]

Needs Playwright for Python and Chromium (/usr/bin/chromium or SIDECAR_CHROMIUM); the
Supabase part needs PostgreSQL (SIDECAR_TEST_PG_DSN, default postgres@127.0.0.1:5432).
Figures depend on the machine; nothing here asserts on them.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.dashboard_support import start_agent  # noqa: E402

CHROMIUM = os.environ.get("SIDECAR_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]

OBSERVE = """() => {
  window.__seen = {};
  const body = document.querySelector('#events tbody');
  new MutationObserver((muts) => {
    const t = performance.timeOrigin + performance.now();
    for (const m of muts) for (const n of m.addedNodes) {
      const rows = n.nodeType === 1 && n.tagName === 'TR' ? [n] : (n.querySelectorAll ? n.querySelectorAll('tr') : []);
      for (const r of rows) { const k = /(?:^|\\s)b=(\\d+)/.exec(r.lastElementChild ? r.lastElementChild.textContent : ''); if (k && !(k[1] in window.__seen)) window.__seen[k[1]] = t; }
    }
  }).observe(body, { childList: true, subtree: true });
}"""


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * (len(values) - 1)))]


# Each event is found in the page by its own tag `b`: the default cardinality cap (2000 tag
# sets per name) would fold all later ones into {"overflow": "true"}.
UNCAPPED = {"max_series_per_name": 1_000_000}


async def latency(page, agent, rate: int, seconds: float) -> tuple[float, float, int, int]:
    await page.evaluate(OBSERVE)
    sent: dict[str, float] = {}
    loop = asyncio.get_running_loop()
    per_tick = max(1, rate // 100)
    start = loop.time()
    n = 0
    while loop.time() - start < seconds:
        for _ in range(per_tick):
            sent[str(n)] = time.time() * 1000
            agent.record("bench.latency", float(n), tags={"b": str(n)})
            n += 1
        await asyncio.sleep(max(0.0, start + n / rate - loop.time()))
    await asyncio.sleep(2.0)
    seen = await page.evaluate("() => window.__seen")
    lat = [seen[k] - t for k, t in sent.items() if k in seen]
    if not lat:
        return float("nan"), float("nan"), 0, len(sent)
    return statistics.median(lat), pct(lat, 0.99), len(lat), len(sent)


async def transfer_size(page) -> int:
    return await page.evaluate(
        "() => performance.getEntriesByType('navigation').concat(performance.getEntriesByType('resource'))"
        ".filter((e) => !e.name.includes('/api/')).reduce((a, e) => a + (e.encodedBodySize || 0), 0)")


async def run(args: argparse.Namespace) -> None:
    from playwright.async_api import async_playwright

    print("$ PYTHONPATH=. python bench/dashboard_latency.py " + " ".join(sys.argv[1:]))
    tmp = Path(tempfile.mkdtemp(prefix="dash-bench-"))
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        agent = await start_agent(tmp / "ws", agent=UNCAPPED)
        try:
            await live_part(browser, agent, "websocket", "websocket mode (no supabase-js)", args)
        finally:
            await agent.stop(timeout=5)
        await navigation_part(browser, tmp, args)
        if not args.no_supabase:
            await supabase_part(browser, tmp, args)
        await browser.close()


async def live_part(browser, agent, label: str, mode: str, args: argparse.Namespace, settle_s: float = 0.0) -> None:
    """Open the page on a live source; print its transfer size and record() -> DOM at 100 and 1000 ev/s."""
    page = await browser.new_page()
    await page.goto(agent.server_url)
    await page.wait_for_selector("#conn.live")
    await asyncio.sleep(settle_s)
    print(f"page transfer size, {mode}: {await transfer_size(page) / 1024:.1f} KiB")
    for rate in (100, 1000):
        p50, p99, got, n = await latency(page, agent, rate, args.seconds)
        print(f"{label:<10} {rate:5d} ev/s: record() -> DOM p50 {p50:7.1f} ms  p99 {p99:7.1f} ms  ({got}/{n} seen)")
    await page.close()


async def first_chart_ms(browser, url: str, context=None) -> float:
    """Navigate to the metric explorer; the time of the page's `first-chart` mark, which it
    sets in the frame after the first chart got its data (no harness latency included)."""
    ctx = context or await browser.new_context()
    page = await ctx.new_page()
    await page.goto(url + "/#metrics")
    await page.wait_for_selector("#metric-charts figure[data-loaded] canvas", timeout=30_000)
    await page.wait_for_function("() => performance.getEntriesByName('first-chart').length > 0")
    ms = await page.evaluate("() => performance.getEntriesByName('first-chart')[0].startTime")
    await page.close()
    if context is None:
        await ctx.close()
    return ms


async def bare_navigation_ms(browser, url: str) -> float:
    """The floor: a fresh context navigating to a tiny page, until its load event."""
    ctx = await browser.new_context()
    page = await ctx.new_page()
    await page.goto(url + "/healthz")
    ms = await page.evaluate("() => performance.getEntriesByType('navigation')[0].loadEventEnd")
    await ctx.close()
    return ms


async def navigation_part(browser, tmp: Path, args: argparse.Namespace) -> None:
    """The agent as `make run` runs it (its own process, so the benchmark's event loop and
    Playwright's messages are not on the agent's loop), with 1 h of history for 20 metrics
    at 1 event/s posted over HTTP ingest, then navigations to the explorer."""
    import socket
    import subprocess

    import aiohttp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = tmp / "nav.toml"
    conf.write_text(f'[agent]\nid = "bench"\ndata_dir = "{tmp / "nav"}"\n[server]\nport = {port}\n[sources]\n')
    proc = subprocess.Popen([sys.executable, "-m", "agent.cli", "run", "--config", str(conf)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                try:
                    async with http.get(url + "/readyz") as r:
                        if r.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
            now = time.time()
            for m in range(20):
                batch = [{"name": f"bench.metric{m:02d}", "kind": "gauge", "value": float(i % 97), "ts": now - 3600 + i}
                         for i in range(3600)]
                async with http.post(url + "/api/v1/events", json=batch) as r:
                    assert r.status == 202, await r.text()
            while True:  # until the history store has every event
                async with http.get(url + "/api/v1/sinks") as r:
                    if all(s["lag_events"] == 0 for s in (await r.json())["sinks"]):
                        break
                await asyncio.sleep(0.1)
        await first_chart_ms(browser, url)  # warm the browser process itself; not counted
        floor = [await bare_navigation_ms(browser, url) for _ in range(args.navigations)]
        cold = [await first_chart_ms(browser, url) for _ in range(args.navigations)]
        ctx = await browser.new_context()
        await first_chart_ms(browser, url, ctx)
        warm = [await first_chart_ms(browser, url, ctx) for _ in range(args.navigations)]
        await ctx.close()
        base = statistics.median(floor)
        print(f"baseline: navigation to a bare JSON page (/healthz) in the same browser: median {base:.0f} ms")
        for label, times in (("empty cache", cold), ("repeat visit (304s)", warm)):
            print(f"navigation -> first painted chart, {label} (1 h x 20 metrics @ 1 ev/s = 72k events): "
                  f"median {statistics.median(times):.0f} ms = {statistics.median(times) / base:.1f}x baseline, "
                  f"max {max(times):.0f} ms (runs: {', '.join(f'{t:.0f}' for t in times)})")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def supabase_part(browser, tmp: Path, args: argparse.Namespace) -> None:
    from agent.table import ddl as migrations
    from tests.conftest_supabase import _create_database, _drop_database, dsn_for
    from tests.supabase_emulator import SupabaseEmulator

    name = f"sidecar_bench_{uuid.uuid4().hex[:10]}"
    await _create_database(name)
    try:
        dsn = dsn_for(name)
        await migrations.apply(dsn, "public", "monitoring_events")
        async with SupabaseEmulator(dsn) as emu:
            agent = await start_agent(
                tmp / "sb", agent=UNCAPPED,
                sinks={"supabase": {"url": emu.url, "key": emu.key, "policies": [], "batch_size": 500}},
                dashboard={"supabase_url": emu.url, "supabase_anon_key": emu.anon_key},
                flags={"dashboard": {"data_source": "supabase"}})
            try:
                await live_part(browser, agent, "supabase", "supabase mode (with supabase-js)", args, settle_s=0.5)
            finally:
                await agent.stop(timeout=5)
    finally:
        await _drop_database(name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="seconds per rate")
    ap.add_argument("--no-supabase", action="store_true", help="skip the Supabase emulator path")
    ap.add_argument("--navigations", type=int, default=7, help="timed navigations per cache state")
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
