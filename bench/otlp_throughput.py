"""Points/s through the `otlp` source into the durable journal, against HTTP ingest of the same count.

    PYTHONPATH=. python bench/otlp_throughput.py [--seconds 5] [--clients 4]

The agent runs in its own process (journal sync="full", one null sink, no history store)
with an `otlp` source; the clients run in this process and POST protobuf export requests
of 1000 points over keep-alive connections, each answered only after its commit:

- gauges: 1000 gauge points (no state);
- cumulative sums: 1000 monotonic counter series per client, every request a newer point
  of each (the source turns them into deltas, one export at a time);
- logs: 1000 log records with a body, severity and two attributes.

The baseline, in the same run and agent: POST /api/v1/events of 1000 JSON events of the
same shape. Prints events/s and the ratio to the baseline; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BATCH = 1000


def run_agent(data_dir: str, port: int, otlp_port: int, ready) -> None:
    from agent.runtime import Agent
    from tests import plugins_for_tests

    async def main() -> None:
        import signal

        cfg = {
            "agent": {"data_dir": data_dir, "sync": "full"},
            "server": {"port": port, "max_body_bytes": 64 << 20},
            "dashboard": {"store": False},
            "sources": {"otlp": {"port": otlp_port}},
            "sinks": {"null": {"type": "null", "policies": [], "batch_size": 2000}},
        }
        agent = Agent(cfg, plugins=[plugins_for_tests])
        await agent.start()
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        ready.send(agent.server_url)
        await stop.wait()
        await agent.stop()

    asyncio.run(main())


def gauges(client: int) -> Callable[[int], bytes]:
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    def body(n: int) -> bytes:
        req = ExportMetricsServiceRequest()
        rm = req.resource_metrics.add()
        rm.resource.attributes.add(key="service.name").value.string_value = "bench"
        m = rm.scope_metrics.add().metrics.add(name="queue.depth")
        now = time.time_ns()
        for i in range(BATCH):
            p = m.gauge.data_points.add(as_double=float(i), time_unix_nano=now)
            p.attributes.add(key="route").value.string_value = f"/api/v1/items/{i % 50}"
            p.attributes.add(key="method").value.string_value = "GET"
        return req.SerializeToString()

    return body


def sums(client: int) -> Callable[[int], bytes]:
    from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

    start = time.time_ns()

    def body(n: int) -> bytes:
        req = ExportMetricsServiceRequest()
        rm = req.resource_metrics.add()
        rm.resource.attributes.add(key="service.name").value.string_value = "bench"
        rm.resource.attributes.add(key="service.instance.id").value.string_value = f"client-{client}"
        m = rm.scope_metrics.add().metrics.add(name="http.requests")
        m.sum.aggregation_temporality = 2
        m.sum.is_monotonic = True
        now = time.time_ns()
        for i in range(BATCH):
            p = m.sum.data_points.add(as_int=n * (i + 1), start_time_unix_nano=start, time_unix_nano=now)
            p.attributes.add(key="route").value.string_value = f"/api/v1/items/{i}"
        return req.SerializeToString()

    return body


def logs(client: int) -> Callable[[int], bytes]:
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

    def body(n: int) -> bytes:
        req = ExportLogsServiceRequest()
        rl = req.resource_logs.add()
        rl.resource.attributes.add(key="service.name").value.string_value = "bench"
        sl = rl.scope_logs.add()
        now = time.time_ns()
        for i in range(BATCH):
            r = sl.log_records.add(time_unix_nano=now, severity_number=9, severity_text="INFO")
            r.body.string_value = f"request {i} served"
            r.attributes.add(key="route").value.string_value = f"/api/v1/items/{i % 50}"
            r.attributes.add(key="user").value.string_value = f"u{i}"
        return req.SerializeToString()

    return body


def http_events(client: int) -> Callable[[int], bytes]:
    def body(n: int) -> bytes:
        return json.dumps(
            [
                {
                    "name": "queue.depth",
                    "kind": "gauge",
                    "value": float(i),
                    "tags": {"service.name": "bench", "route": f"/api/v1/items/{i % 50}", "method": "GET"},
                }
                for i in range(BATCH)
            ]
        ).encode()

    return body


async def client(url: str, make: Callable[[int], bytes], ctype: str, until: float, counts: list[int]) -> None:
    conn = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=conn) as http:
        n = 0
        while time.perf_counter() < until:
            n += 1
            async with http.post(url, data=make(n), headers={"Content-Type": ctype}) as r:
                await r.read()
                if r.status not in (200, 202):
                    raise SystemExit(f"{url} answered {r.status}")
            counts[0] += BATCH


async def measure(
    url: str, kind: Callable[[int], Callable[[int], bytes]], ctype: str, clients: int, seconds: float
) -> float:
    await client(url, kind(99), ctype, time.perf_counter() + 0.5, [0])  # warm-up
    counts = [0]
    makers = [kind(c) for c in range(clients)]
    t0 = time.perf_counter()
    await asyncio.gather(*(client(url, m, ctype, t0 + seconds, counts) for m in makers))
    return counts[0] / (time.perf_counter() - t0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--clients", type=int, default=4)
    args = p.parse_args()
    print("command:", " ".join([os.path.basename(sys.executable), *sys.argv]))
    base = Path(tempfile.mkdtemp(prefix="bench-otlp-", dir="."))
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    otlp_port = free_port()
    proc = ctx.Process(target=run_agent, args=(str(base / "agent"), free_port(), otlp_port, child))
    proc.start()
    try:
        server = parent.recv()
        otlp = f"http://127.0.0.1:{otlp_port}"
        deadline = time.monotonic() + 30
        while True:  # the source binds its port after start() returns
            try:
                socket.create_connection(("127.0.0.1", otlp_port), 1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        rates = {}
        runs = (
            ("HTTP /api/v1/events JSON (baseline)", f"{server}/api/v1/events", http_events, "application/json"),
            ("otlp gauges (protobuf)", f"{otlp}/v1/metrics", gauges, "application/x-protobuf"),
            ("otlp cumulative sums (protobuf)", f"{otlp}/v1/metrics", sums, "application/x-protobuf"),
            ("otlp logs (protobuf)", f"{otlp}/v1/logs", logs, "application/x-protobuf"),
        )
        for name, url, kind, ctype in runs:
            rates[name] = asyncio.run(measure(url, kind, ctype, args.clients, args.seconds))
    finally:
        proc.terminate()
        proc.join(30)
        shutil.rmtree(base, ignore_errors=True)
    baseline = rates[runs[0][0]]
    print(f"cpus: {os.cpu_count()}  batch: {BATCH}  clients: {args.clients}  seconds: {args.seconds}")
    for name, rate in rates.items():
        print(f"{name:<38} {rate:>10,.0f} events/s  {rate / baseline:.2f}x")


if __name__ == "__main__":
    main()
