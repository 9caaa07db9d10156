"""What the locked-down server costs per request: requests/s through agent/api/server.py's
guarded listener and agent/api/security.py's middleware (Host, Origin, token and content
type checked on every request), beside the server as it was before (aiohttp's TCPSite and a
middleware that checked the token of writes only) serving the same handler, in the same run.

    .venv/bin/python bench/http_guard_overhead.py [--seconds 3] [--clients 16] [--rounds 6]

Each server runs in its own child process; the clients run in this one over keep-alive
connections, half GET and half JSON POST, with the token. Rounds alternate the two
(swapping which goes first). Besides requests/s (noisy on a shared machine), the server
process's CPU time per request; the ratios are of the medians. Also the middleware's own cost
per call on a prepared request. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TOKEN = "bench-token"


def serve(guarded: bool, ports: Any) -> None:
    from aiohttp import web

    from agent.api import security
    from agent.api.keys import AGENT
    from agent.api.server import ConnectionGuard, _GuardedSite
    from agent.config import ServerSection

    async def ping(request: web.Request) -> web.Response:
        if request.method == "POST":
            await request.read()
        return web.json_response({"ok": True})

    @web.middleware
    async def before(request: web.Request, handler: Any) -> web.StreamResponse:
        """The check this replaced: the token, for writes only."""
        if request.method in security.MUTATING and not security.authorized(request):
            return security.unauthorized()
        return await handler(request)

    def app(guarded: bool) -> web.Application:
        a = web.Application(middlewares=[security.middleware if guarded else before])
        a[AGENT] = SimpleNamespace(config=SimpleNamespace(server=ServerSection(token=TOKEN)))  # type: ignore[assignment]
        a.router.add_get("/api/v1/ping", ping)
        a.router.add_post("/api/v1/ping", ping)
        return a

    async def main() -> None:
        runner = web.AppRunner(app(guarded), access_log=None, keepalive_timeout=15.0)
        await runner.setup()
        if guarded:
            site = _GuardedSite(runner, ConnectionGuard(512, 10.0), host="127.0.0.1", port=0)
            await site.start()
            ports.put(site.port)
        else:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            ports.put(runner.addresses[0][1])
        await asyncio.Event().wait()

    asyncio.run(main())


async def load(port: int, seconds: float, clients: int) -> tuple[int, float]:
    url = f"http://127.0.0.1:{port}/api/v1/ping"
    headers = {"Authorization": f"Bearer {TOKEN}", "Origin": f"http://127.0.0.1:{port}"}
    done = 0
    end = time.perf_counter() + seconds

    async def client(s: aiohttp.ClientSession, i: int) -> None:
        nonlocal done
        while time.perf_counter() < end:
            if i % 2:
                async with s.post(url, json={"name": "x", "value": 1}, headers=headers) as r:
                    assert r.status == 200, r.status
                    await r.read()
            else:
                async with s.get(url, headers=headers) as r:
                    assert r.status == 200, r.status
                    await r.read()
            done += 1

    t0 = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as s:
        await asyncio.gather(*(client(s, i) for i in range(clients)))
    return done, done / (time.perf_counter() - t0)


def middleware_cost(n: int = 20_000) -> tuple[float, float]:
    """µs per call of a trivial handler, called directly and through security.middleware
    (a mocked GET with the token and a JSON POST with a same-site Origin, alternately)."""
    from aiohttp import web
    from aiohttp.test_utils import make_mocked_request

    from agent.api import security
    from agent.api.keys import AGENT
    from agent.config import ServerSection

    app = web.Application()
    app[AGENT] = SimpleNamespace(config=SimpleNamespace(server=ServerSection(token=TOKEN)))  # type: ignore[assignment]
    auth = {"Host": "127.0.0.1:8765", "Authorization": f"Bearer {TOKEN}"}
    tcp = SimpleNamespace(get_extra_info=lambda name, default=None: None)  # a mock transport costs 50 µs a call
    reqs = [
        make_mocked_request("GET", "/api/v1/ping", headers=auth, app=app, transport=tcp),
        make_mocked_request(
            "POST",
            "/api/v1/ping",
            app=app,
            transport=tcp,
            headers={**auth, "Origin": "http://127.0.0.1:8765", "Content-Type": "application/json"},
        ),
    ]
    response = web.Response()

    async def handler(request: web.Request) -> web.Response:
        return response

    async def run() -> tuple[float, float]:
        t0 = time.perf_counter()
        for i in range(n):
            await handler(reqs[i % 2])
        t1 = time.perf_counter()
        for i in range(n):
            r = await security.middleware(reqs[i % 2], handler)
            assert r is response
        t2 = time.perf_counter()
        return (t1 - t0) / n * 1e6, (t2 - t1) / n * 1e6

    return asyncio.run(run())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--rounds", type=int, default=6)
    args = p.parse_args()
    direct, through = min(middleware_cost() for _ in range(3))
    print(f"security.middleware: {through:.1f} µs per request (the handler alone: {direct:.1f} µs)")
    ctx = mp.get_context("spawn")
    servers = {}
    for name, guarded in (("before", False), ("guarded", True)):
        q = ctx.Queue()
        proc = ctx.Process(target=serve, args=(guarded, q), daemon=True)
        proc.start()
        servers[name] = (proc, q.get(timeout=60))
    rate: dict[str, list[float]] = {"before": [], "guarded": []}
    cpu: dict[str, list[float]] = {"before": [], "guarded": []}
    try:
        for r in range(args.rounds):
            # Each round swaps which goes first, so a warming or cooling machine favours neither.
            for name in ("before", "guarded") if r % 2 == 0 else ("guarded", "before"):
                proc, port = servers[name]
                server = psutil.Process(proc.pid)
                c0 = sum(server.cpu_times()[:2])
                n, per_s = asyncio.run(load(port, args.seconds, args.clients))
                cpu[name].append((sum(server.cpu_times()[:2]) - c0) / n * 1e6)
                rate[name].append(per_s)
            print(
                f"round {r + 1}: before {rate['before'][-1]:,.0f} req/s ({cpu['before'][-1]:.0f} µs server CPU each),"
                f" guarded {rate['guarded'][-1]:,.0f} req/s ({cpu['guarded'][-1]:.0f} µs)"
            )
        med = {k: (statistics.median(rate[k]), statistics.median(cpu[k])) for k in rate}
        print(
            f"median: before {med['before'][0]:,.0f} req/s, {med['before'][1]:.0f} µs server CPU per request;"
            f" guarded {med['guarded'][0]:,.0f} req/s, {med['guarded'][1]:.0f} µs;"
            f" guarded/before: {med['guarded'][0] / med['before'][0]:.2f}x req/s,"
            f" {med['guarded'][1] / med['before'][1]:.2f}x CPU per request"
        )
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.join(10)


if __name__ == "__main__":
    main()
