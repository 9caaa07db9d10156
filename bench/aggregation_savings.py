"""Rows and money `[sinks.NAME] aggregate = "10s"` saves on Supabase, measured through
the real pipeline (journal, delivery workers, per-batch aggregation) and real PostgreSQL.

    PYTHONPATH=. .venv/bin/python bench/aggregation_savings.py [--seconds 20] [--metrics 50] [--tagsets 10] [--rate 100]

The workload: `metrics` names (a third counters, a third gauges, a third histograms)
x `tagsets` tag sets, each series at `rate` events/s of event time; `seconds` of it are
journaled as fast as the agent takes them, so the sinks read a backlog (full batches, as
a sink that lingers sees at this rate). In the same agent run a raw sink (the baseline)
and aggregating sinks at several batch sizes receive the same journal; each counts the
rows it is sent. Bytes per row: a sample of each sink's rows is written into its own
migrated table on PostgreSQL (the postgres sink, same table as Supabase's) and measured
with pg_total_relation_size (heap + TOAST + the four indexes). Per day = the measured
rows per raw event x the workload's events per day.

Money is an ASSUMPTION, labelled as such: Supabase bills database disk (beyond a plan's
included size) at about USD 0.125 per GB-month; we assume rows are kept 30 days, so the
steady-state disk is 30 days of rows. Writes (ingress) are not billed; egress to readers
and compute are left out (they depend on the queries, not on the rows written).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shlex
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.builtin_plugins.postgres import PostgresOptions, PostgresSink

from agent.event import Event
from agent.plugin.base import BaseSink, PluginContext
from agent.plugin.hookspecs import hookimpl
from agent.runtime import Agent
from agent.table import ddl as migrations

INTERVAL = "10s"
BATCH_SIZES = (5_000, 20_000, 100_000)  # 20,000 is the default with aggregate
SAMPLE = 20_000  # rows per sink written to PostgreSQL to measure bytes per row
USD_PER_GB_MONTH = 0.125  # ASSUMPTION: Supabase database disk beyond the plan's included size
RETENTION_DAYS = 30  # ASSUMPTION


class Counted:
    """What one counting sink was sent."""

    def __init__(self) -> None:
        self.rows = 0
        self.counter_sum = 0.0
        self.sample: list[Event] = []


COUNTS: dict[str, Counted] = {}


class CountSink(BaseSink):
    """Counts rows, sums counter values, keeps the first SAMPLE rows."""

    max_in_flight = 4

    def __init__(self, name: str, options: object, ctx: PluginContext) -> None:
        self.c = COUNTS.setdefault(name, Counted())

    async def send(self, events: list[Event]) -> None:
        c = self.c
        c.rows += len(events)
        c.counter_sum += sum(e.value or 0.0 for e in events if e.kind == "counter")
        if len(c.sample) < SAMPLE:
            c.sample.extend(events[: SAMPLE - len(c.sample)])


class _Plugins:
    @hookimpl
    def register_sinks(self, register: Any) -> None:
        register("count", CountSink)


def workload(metrics: int, tagsets: int, rate: float, start: float, second: int) -> list[Event]:
    """One second of event time: every series `rate` times, spread over the second."""
    kinds = ("counter", "gauge", "histogram")
    n = int(rate)
    out = []
    for k in range(n):
        ts = start + second + k / n
        for m in range(metrics):
            kind = kinds[m % 3]
            for t in range(tagsets):
                value = float((k + t) % 5 + 1) if kind == "counter" else float((k * 7 + m + t) % 100) / 4
                out.append(
                    Event(
                        name=f"app.metric_{m}",
                        kind=kind,
                        value=value,
                        ts=ts,
                        tags={"host": f"web-{t}", "region": "eu"},
                        source="bench",
                        agent_id="bench-1",
                    )
                )
    return out


async def bytes_per_row(dsn: str, sample: list[Event]) -> float:
    """Write `sample` through the postgres sink into a fresh table; its size per row."""
    table = f"agg_{uuid.uuid4().hex[:10]}"
    await migrations.apply(dsn, "public", table)
    ctx = PluginContext("bench", "bench", Path("."), logging.getLogger("bench"), lambda e: None)
    sink = PostgresSink("pg", PostgresOptions(dsn=dsn, table=table), ctx)
    await sink.start()
    try:
        for i in range(0, len(sample), 1000):
            await sink.send(sample[i : i + 1000])
    finally:
        await sink.close()
    con = await asyncpg.connect(dsn)
    try:
        await con.execute(f'VACUUM ANALYZE "{table}"')
        size = await con.fetchval("SELECT pg_total_relation_size($1::regclass)", table)
        rows = await con.fetchval(f'SELECT count(*) FROM "{table}"')
    finally:
        await con.close()
    return size / rows


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=20, help="seconds of event time journaled")
    ap.add_argument("--metrics", type=int, default=50)
    ap.add_argument("--tagsets", type=int, default=10)
    ap.add_argument("--rate", type=float, default=100, help="events/s per series")
    ap.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres", help="admin DSN")
    args = ap.parse_args()

    sinks: dict[str, dict[str, Any]] = {"raw": {"type": "count", "policies": []}}
    for b in BATCH_SIZES:
        sinks[f"agg_{b}"] = {"type": "count", "policies": [], "aggregate": INTERVAL, "batch_size": b}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {
            "agent": {"data_dir": tmp, "heartbeat_s": 0, "max_journal_mb": 4096, "max_series_per_name": 100_000},
            "server": {"enabled": False},
            "dashboard": {"store": False},
            "sinks": sinks,
        }
        start = (time.time() // 3600 - 2) * 3600  # a bucket boundary, two hours ago
        raw_events = 0
        t0 = time.perf_counter()
        async with Agent(cfg, plugins=[_Plugins()]) as agent:
            for s in range(args.seconds):
                evs = workload(args.metrics, args.tagsets, args.rate, start, s)
                for i in range(0, len(evs), 10_000):
                    await agent.submit(evs[i : i + 10_000])
                raw_events += len(evs)
            assert await agent.flush(timeout=1800), "not delivered in time"
        took = time.perf_counter() - t0
    raw = COUNTS["raw"]
    assert raw.rows == raw_events, (raw.rows, raw_events)

    dbname = f"sidecar_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(args.dsn)
    await admin.execute(f'CREATE DATABASE "{dbname}"')
    base, _, _ = args.dsn.rpartition("/")
    dsn = f"{base}/{dbname}"
    try:
        size = {name: await bytes_per_row(dsn, COUNTS[name].sample) for name in sinks}
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        await admin.close()

    series = args.metrics * args.tagsets
    per_day = series * args.rate * 86400
    ideal = series * 86400 / 10  # one row per series and 10 s bucket
    print(f"command: PYTHONPATH=. .venv/bin/python bench/aggregation_savings.py {shlex.join(sys.argv[1:])}")
    print(
        f"workload: {args.metrics} metrics x {args.tagsets} tag sets at {args.rate:g} ev/s each = "
        f"{series * args.rate:,.0f} ev/s, {per_day / 1e9:.2f} G events/day; measured on {raw_events:,} events "
        f"({args.seconds} s of event time) in {took:.0f} s; aggregate = {INTERVAL!r}"
    )
    print(f"ideal (one row per series per 10 s): {ideal / 1e6:.2f} M rows/day")
    print(
        f"cost ASSUMPTION: USD {USD_PER_GB_MONTH}/GB-month of database disk, rows kept {RETENTION_DAYS} days "
        "(steady-state disk = 30 days of rows); ingress free; egress and compute not counted"
    )
    print()
    print(
        "| sink | batch_size | rows sent | rows / raw event | bytes/row (PG, with indexes) | rows/day | GB/day | "
        "disk at 30 days | USD/month (assumed) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in sinks:
        c = COUNTS[name]
        assert abs(c.counter_sum - raw.counter_sum) < 1e-6 * max(1.0, raw.counter_sum), (name, c.counter_sum)
        ratio = c.rows / raw_events
        rows_day = per_day * ratio
        gb_day = rows_day * size[name] / 1e9
        disk = gb_day * RETENTION_DAYS
        usd = disk * USD_PER_GB_MONTH
        batch = "-" if name == "raw" else f"{int(name.split('_')[1]):,}"
        print(
            f"| {'raw (baseline)' if name == 'raw' else 'aggregate 10s'} | {batch} | {c.rows:,} | {ratio:.5f} "
            f"({1 / ratio:,.0f}x fewer) | {size[name]:.0f} | {rows_day / 1e6:,.1f} M | {gb_day:,.2f} | "
            f"{disk:,.0f} GB | {usd:,.0f} |"
        )
    print("\ncounter sums: every aggregating sink's equal the raw sink's (checked)")


if __name__ == "__main__":
    asyncio.run(main())
