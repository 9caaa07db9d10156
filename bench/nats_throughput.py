"""Events/s through NATS JetStream: the nats sink against nats-py publishing the same batches
bare, and JetStream -> one collector agent -> PostgreSQL against the postgres sink alone.

    PYTHONPATH=. .venv/bin/python bench/nats_throughput.py [--events 20000] [--batch 500] [--repeat 3]

Edge side, each round runs every method once, in turn, each into a fresh stream:
- "bare publish_async": nats-py's js.publish_async of the same batches, payloads encoded
  beforehand, no headers, the batch's PubAcks awaited together (the library's floor);
- "nats sink": NatsSink.send per batch (encodes each event, Nats-Msg-Id and content type);
- "nats sink, 4 in flight": four send() calls at once, as the delivery worker runs it.
Target: nats sink >= 0.7x bare (the median over rounds of the ratio within a round).

Collector side: the stream is filled first, then an agent with the nats source and the
postgres sink starts; events/s from its start until every row is in the table, against
the same agent (no source) fed the same events by Agent.submit, the durable path the
source uses, 4 batches at a time (same round, fresh table): the cost of NATS itself. Also
a bare nats-py pull consumer (fetch, decode, ack each), and the collector with one fetch
loop instead of the default 4.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import logging
import shlex
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import msgspec
import nats

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.builtin_plugins.nats import NatsSink, NatsSinkOptions

from agent.event import Event, new_ids
from agent.plugin.base import PluginContext
from agent.runtime import Agent
from agent.table import ddl as migrations

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Event)


def ctx() -> PluginContext:
    return PluginContext("bench", "bench", Path("."), logging.getLogger("bench"), lambda e: None)


def events(n: int) -> list[Event]:
    now = time.time()
    return [
        Event(id=i, name=f"metric.{k % 20}", kind="gauge", value=k * 0.5, ts=now + k * 1e-4,
              tags={"host": "web-1", "region": "eu"}, source="bench", agent_id="edge-1", data={"k": k})
        for k, i in enumerate(new_ids(n))
    ]  # fmt: skip


def batches(evs: list[Event], size: int) -> list[list[Event]]:
    return [evs[i : i + size] for i in range(0, len(evs), size)]


async def fresh_stream(url: str) -> tuple[str, str]:
    tag = uuid.uuid4().hex[:8]
    nc = await nats.connect(url)
    await nc.jetstream().add_stream(name=f"B_{tag}", subjects=[f"bench.{tag}"])
    await nc.close()
    return f"B_{tag}", f"bench.{tag}"


async def drop_stream(url: str, name: str) -> None:
    nc = await nats.connect(url)
    await nc.jetstream().delete_stream(name)
    await nc.close()


async def run_bare(url: str, subject: str, evs: list[Event], size: int) -> float:
    payloads = [[_encoder.encode(e) for e in b] for b in batches(evs, size)]
    nc = await nats.connect(url)
    js = nc.jetstream()
    try:
        t0 = time.perf_counter()
        for b in payloads:
            await asyncio.gather(*[await js.publish_async(subject, p) for p in b])
        return len(evs) / (time.perf_counter() - t0)
    finally:
        await nc.close()


async def run_sink(url: str, stream: str, subject: str, evs: list[Event], size: int, in_flight: int) -> float:
    sink = NatsSink("nats", NatsSinkOptions(url=url, stream=stream, subject=subject), ctx())
    await sink.start()
    try:
        t0 = time.perf_counter()
        todo = batches(evs, size)
        for i in range(0, len(todo), in_flight):
            await asyncio.gather(*[sink.send(b) for b in todo[i : i + in_flight]])
        return len(evs) / (time.perf_counter() - t0)
    finally:
        await sink.close()


EDGE_METHODS = ("bare publish_async", "nats sink", "nats sink, 4 in flight")


async def edge_round(url: str, method: str, n: int, size: int) -> float:
    stream, subject = await fresh_stream(url)
    try:
        evs = events(n)
        if method == "bare publish_async":
            return await run_bare(url, subject, evs, size)
        return await run_sink(url, stream, subject, evs, size, 4 if method.endswith("in flight") else 1)
    finally:
        await drop_stream(url, stream)


async def agent_to_postgres(dsn: str, sources: dict[str, Any], evs: list[Event], size: int, feed: bool) -> float:
    """Events/s from a started agent (postgres sink, `sources`) until all of `evs` are rows;
    with `feed`, the bench hands them to Agent.submit itself, 4 batches at a time."""
    table = f"b_{uuid.uuid4().hex[:10]}"
    await migrations.apply(dsn, "public", table)
    con = await asyncpg.connect(dsn)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {
            "agent": {"id": "collector", "data_dir": tmp},
            "server": {"enabled": False},
            "sources": sources,
            "sinks": {"pg": {"type": "postgres", "dsn": dsn, "table": table, "batch_size": size}},
        }
        agent = Agent(cfg)
        await agent.start()
        try:
            t0 = time.perf_counter()
            if feed:
                todo = batches(evs, size)
                for i in range(0, len(todo), 4):
                    await asyncio.gather(*[agent.submit(b) for b in todo[i : i + 4]])
            while await con.fetchval(f'SELECT count(*) FROM "{table}" WHERE event_type LIKE $1', "metric.%") < len(evs):
                await asyncio.sleep(0.01)
            return len(evs) / (time.perf_counter() - t0)
        finally:
            await agent.stop()
            await con.close()


async def bare_consume(url: str, stream: str, subject: str, n: int, size: int) -> float:
    """nats-py alone: a pull consumer fetching `size` at a time and acking each message."""
    nc = await nats.connect(url)
    try:
        psub = await nc.jetstream().pull_subscribe(subject, durable="bare", stream=stream)
        t0 = time.perf_counter()
        got = 0
        while got < n:
            msgs = await psub.fetch(size, timeout=5)
            for m in msgs:
                _decoder.decode(m.data)
                await m.ack()
            got += len(msgs)
        return n / (time.perf_counter() - t0)
    finally:
        await nc.close()


async def collector_round(url: str, dsn: str, n: int, size: int) -> tuple[float, float, float, float]:
    """(collector events/s, the same agent fed by Agent.submit, a bare nats-py consumer) for n events."""
    stream, subject = await fresh_stream(url)
    try:
        await run_sink(url, stream, subject, events(n), size, 4)
        source = {"type": "nats", "url": url, "stream": stream, "subject": subject, "durable": "bench", "batch": size}
        collector = await agent_to_postgres(dsn, {"in": source}, events(n), size, feed=False)
        one_loop = await agent_to_postgres(dsn, {"in": {**source, "durable": "one", "fetchers": 1}}, events(n), size,
                                           feed=False)  # fmt: skip
        direct = await agent_to_postgres(dsn, {}, events(n), size, feed=True)
        bare = await bare_consume(url, stream, subject, n, size)
        return collector, direct, bare, one_loop
    finally:
        await drop_stream(url, stream)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=20000, help="events per method and round")
    ap.add_argument("--batch", type=int, default=500, help="events per batch")
    ap.add_argument("--repeat", type=int, default=3, help="rounds (each runs every method once)")
    ap.add_argument("--url", default="nats://127.0.0.1:4222")
    ap.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres", help="admin DSN")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    rates: dict[str, list[float]] = {}
    for _ in range(args.repeat):
        for method in EDGE_METHODS:
            rates.setdefault(method, []).append(await edge_round(args.url, method, args.events, args.batch))

    dbname = f"sidecar_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(args.dsn)
    await admin.execute(f'CREATE DATABASE "{dbname}"')
    dsn = args.dsn.rsplit("/", 1)[0] + "/" + dbname
    try:
        for _ in range(args.repeat):
            collector, direct, bare, one_loop = await collector_round(args.url, dsn, args.events, args.batch)
            rates.setdefault("collector with fetchers = 1", []).append(one_loop)
            rates.setdefault("bare pull consumer (fetch, decode, ack)", []).append(bare)
            rates.setdefault("JetStream -> collector -> Postgres", []).append(collector)
            rates.setdefault("Agent.submit -> Postgres", []).append(direct)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        await admin.close()

    print("command:", " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    version = importlib.metadata.version("nats-py")
    print(f"events per run: {args.events}; batch {args.batch}; {args.repeat} rounds; nats-py {version}")
    print("events/s: the best round; ratio: the median over rounds of rate / baseline in the same round")
    print(f"{'method':<38}{'events/s':>12}{'ratio':>8}  baseline")
    base_of = dict.fromkeys(EDGE_METHODS, "bare publish_async")
    base_of["JetStream -> collector -> Postgres"] = base_of["Agent.submit -> Postgres"] = "Agent.submit -> Postgres"
    base_of["bare pull consumer (fetch, decode, ack)"] = "Agent.submit -> Postgres"
    base_of["collector with fetchers = 1"] = "Agent.submit -> Postgres"
    ratios = {}
    for method, got in rates.items():
        base = rates[base_of[method]]
        ratios[method] = statistics.median(r / b for r, b in zip(got, base, strict=True))
        print(f"{method:<38}{max(got):>12,.0f}{ratios[method]:>7.2f}x  {base_of[method]}")
    # The collector decodes and acks like the bare consumer and commits like Agent.submit, on
    # one event loop: both costs in series are its ceiling.
    serial = statistics.median(
        c / (1 / (1 / b + 1 / d))
        for c, b, d in zip(
            rates["JetStream -> collector -> Postgres"],
            rates["bare pull consumer (fetch, decode, ack)"],
            rates["Agent.submit -> Postgres"],
            strict=True,
        )
    )
    print(f"collector vs bare consumer and Agent.submit in series (its ceiling on one loop): {serial:.2f}x")
    ratio = ratios["nats sink"]
    print(f"target (nats sink >= 0.7x bare publish_async): {ratio:.2f}x, {'met' if ratio >= 0.7 else 'MISSED'}")


if __name__ == "__main__":
    asyncio.run(main())
