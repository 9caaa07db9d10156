"""Events/s through HTTP ingest into the durable journal, beside the raw SQLite ceiling.

    PYTHONPATH=. python bench/ingest_throughput.py [--seconds 5] [--clients 4] [--dir DIR]

The agent runs in its own process (journal sync="full", WAL, one null sink attached,
so delivery and compaction run too); the clients run in this process and POST
pre-encoded batches of 1000 events over keep-alive connections, JSON and msgpack.
The ceiling is plain sqlite3 in the same directory: WAL, the same synchronous
setting, 1000-row transactions of blobs the size of a journaled event.
Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import socket
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BATCH = 1000


def sample_events(n: int, seed: int) -> list[dict]:
    return [
        {"name": f"http.request.duration.{(seed + i) % 20}", "kind": "histogram", "value": 0.001 * ((seed + i) % 997),
         "tags": {"route": f"/api/v1/items/{i % 50}", "method": "GET", "status": "200"}}
        for i in range(n)
    ]


def run_agent(data_dir: str, port: int, ready) -> None:
    from agent.runtime import Agent
    from tests import plugins_for_tests

    async def main() -> None:
        import signal

        cfg = {"agent": {"data_dir": data_dir, "sync": "full"}, "server": {"port": port, "max_body_bytes": 64 << 20},
               "dashboard": {"store": False},  # the ingest path alone: journal + one null sink
               "sinks": {"null": {"type": "null", "policies": [], "batch_size": 2000}}}
        agent = Agent(cfg, plugins=[plugins_for_tests])
        await agent.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        ready.send(agent.server_url)
        await stop.wait()
        await agent.stop()

    asyncio.run(main())


async def client(url: str, bodies: list[bytes], ctype: str, until: float, counts: list[int]) -> None:
    conn = aiohttp.TCPConnector(limit=1)  # one keep-alive connection per client
    async with aiohttp.ClientSession(connector=conn) as http:
        i = 0
        while time.perf_counter() < until:
            async with http.post(url, data=bodies[i % len(bodies)], headers={"Content-Type": ctype}) as r:
                await r.read()
                if r.status != 202:
                    raise SystemExit(f"ingest answered {r.status}")
            counts[0] += BATCH
            i += 1


async def ingest(url: str, ctype: str, bodies: list[bytes], clients: int, seconds: float) -> float:
    await client(url, bodies, ctype, time.perf_counter() + 0.5, [0])  # warm-up
    counts = [0]
    t0 = time.perf_counter()
    await asyncio.gather(*(client(url, bodies, ctype, t0 + seconds, counts) for _ in range(clients)))
    return counts[0] / (time.perf_counter() - t0)


def raw_ceiling(directory: Path, body_size: int, seconds: float, sync: str = "FULL") -> float:
    path = directory / "raw.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={sync}")
    conn.execute("CREATE TABLE IF NOT EXISTS journal (seq INTEGER PRIMARY KEY AUTOINCREMENT, body BLOB NOT NULL)")
    blobs = [os.urandom(body_size) for _ in range(BATCH)]
    n, seq = 0, 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO journal (seq, body) VALUES (?, ?)",
                         [(seq + k + 1, b) for k, b in enumerate(blobs)])
        conn.execute("COMMIT")
        seq += BATCH
        n += BATCH
        if seq % 200_000 == 0:  # keep the table from growing without bound, as compaction does
            conn.execute("DELETE FROM journal WHERE seq <= ?", (seq - 100_000,))
    rate = n / (time.perf_counter() - t0)
    conn.close()
    return rate


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--dir", help="directory for both databases (default: a temp dir under the cwd)")
    args = p.parse_args()
    print("command:", " ".join([os.path.basename(sys.executable)] + sys.argv))
    base = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-ingest-", dir="."))
    base.mkdir(parents=True, exist_ok=True)
    data_dir = base / "agent"
    shutil.rmtree(data_dir, ignore_errors=True)

    from agent.event import Event, msgpack_encoder, new_ids

    events = [sample_events(BATCH, s) for s in range(8)]
    json_bodies = [json.dumps(b).encode() for b in events]
    mp_bodies = [msgspec.msgpack.encode(b) for b in events]
    stored = [msgpack_encoder.encode(Event(id=i, source="http", agent_id="bench", ts=time.time(), **e))
              for i, e in zip(new_ids(BATCH), events[0])]
    body_size = sum(map(len, stored)) // len(stored)
    print(f"dir: {base.resolve()}  cpus: {os.cpu_count()}  batch: {BATCH} events  clients: {args.clients}  "
          f"json body: {len(json_bodies[0])} B  msgpack body: {len(mp_bodies[0])} B  journaled event: {body_size} B")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=run_agent, args=(str(data_dir), port, child))
    proc.start()
    try:
        url = parent.recv() + "/api/v1/events"
        rates = {}
        for name, ctype, bodies in (("json", "application/json", json_bodies),
                                    ("msgpack", "application/msgpack", mp_bodies)):
            rates[name] = asyncio.run(ingest(url, ctype, bodies, args.clients, args.seconds))
    finally:
        proc.terminate()
        proc.join(30)
    ceiling = raw_ceiling(base, body_size, args.seconds)
    print(f"raw sqlite3 ceiling (WAL, synchronous=FULL, 1000-row tx, {body_size} B blobs): {ceiling:,.0f} rows/s")
    for name, rate in rates.items():
        print(f"HTTP ingest {name:<8} (sync=full, null sink): {rate:,.0f} events/s  = {rate / ceiling:.0%} of the ceiling")
    if not args.dir:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
