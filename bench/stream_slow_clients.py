"""The agent's RSS while WebSocket clients that never read are connected, at a high event rate.

    .venv/bin/python bench/stream_slow_clients.py [--clients 20] [--rate 20000] [--seconds 15] [--tree DIR]

The agent runs in its own process (`python -m agent.cli run`, a jsonl sink, no store);
this process connects `--clients` live-stream clients that never read, then POSTs
batches of 1000 events (about 250 bytes of JSON each) at `--rate` events/s for
`--seconds`, sampling the agent's RSS from /proc every 0.25 s. The baseline, in the same
run, is the same load with no client connected: the figure is the peak RSS with the
stuck clients over the baseline's (a ratio), and the MB they add. `--tree DIR` runs the
agent from another checkout (e.g. the commit before a change, for a before/after).
The seconds stay under the server's WebSocket heartbeat (20 s), which closes a client
that never answers a ping. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
BATCH = 1000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def batch_body(seed: int) -> bytes:
    return json.dumps(
        [
            {
                "name": f"http.request.duration.{(seed + i) % 20}",
                "kind": "histogram",
                "value": 0.001 * ((seed + i) % 997),
                "tags": {"route": f"/api/v1/items/{i % 50}", "method": "GET", "status": "200", "host": "web-1"},
            }
            for i in range(BATCH)
        ]
    ).encode()


async def one_run(tree: Path, clients: int, rate: float, seconds: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        cfg = Path(tmp) / "agent.toml"
        cfg.write_text(
            f'[agent]\ndata_dir = "{tmp}/data"\n[server]\nport = {port}\nmax_body_bytes = 67108864\n'
            f'[dashboard]\nstore = false\n[sinks.out]\ntype = "jsonl"\npath = "{tmp}/out.jsonl"\n'
            "policies = []\n"
        )
        env = {**os.environ, "PYTHONPATH": str(tree)}
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "--config", str(cfg)],
            cwd=tree,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            async with aiohttp.ClientSession() as http:
                for _ in range(400):
                    try:
                        async with http.get(url + "/healthz") as r:
                            if r.status == 200:
                                break
                    except aiohttp.ClientError:
                        await asyncio.sleep(0.05)
                stuck = [
                    await http.ws_connect(url.replace("http", "ws") + "/api/v1/stream", autoping=False)
                    for _ in range(clients)
                ]  # never read
                bodies = [batch_body(i) for i in range(8)]
                start_rss = rss_mb(proc.pid)
                peak, sent, posted = start_rss, 0, 0
                loop = asyncio.get_running_loop()
                t0 = loop.time()
                next_sample = t0
                while (now := loop.time()) - t0 < seconds:
                    if sent < rate * (now - t0):
                        async with http.post(
                            url + "/api/v1/events",
                            data=bodies[posted % 8],
                            headers={"Content-Type": "application/json"},
                        ) as r:
                            assert r.status == 202, await r.text()
                        sent += BATCH
                        posted += 1
                    else:
                        await asyncio.sleep(0.005)
                    if now >= next_sample:
                        peak = max(peak, rss_mb(proc.pid))
                        next_sample = now + 0.25
                took = loop.time() - t0
                peak = max(peak, rss_mb(proc.pid))
                async with http.get(url + "/api/v1/losses") as r:
                    losses = (await r.json())["by_reason"]
                for ws in stuck:
                    await ws.close()
        finally:
            proc.terminate()
            proc.wait(60)
    return {
        "start_mb": start_rss,
        "peak_mb": peak,
        "rate": sent / took,
        "stream_dropped": float(losses.get("stream_dropped", 0)),
    }


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--rate", type=float, default=20_000, help="events/s posted")
    ap.add_argument("--seconds", type=float, default=15.0)
    ap.add_argument("--tree", type=Path, default=ROOT, help="the checkout the agent runs from")
    args = ap.parse_args()
    base = await one_run(args.tree, 0, args.rate, args.seconds)
    stuck = await one_run(args.tree, args.clients, args.rate, args.seconds)
    print(f"tree: {args.tree}")
    for label, r in (("baseline, no client", base), (f"{args.clients} clients that never read", stuck)):
        print(
            f"{label:>28}: RSS {r['start_mb']:.0f} -> peak {r['peak_mb']:.0f} MB at {r['rate']:.0f} events/s"
            f" posted; stream_dropped {r['stream_dropped']:.0f}"
        )
    print(
        f"peak RSS ratio (stuck clients / baseline): {stuck['peak_mb'] / base['peak_mb']:.2f}x;"
        f" the clients add {stuck['peak_mb'] - base['peak_mb']:.0f} MB"
    )


if __name__ == "__main__":
    asyncio.run(main())
