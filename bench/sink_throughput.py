"""Rows/s into PostgreSQL: the postgres sink, the supabase sink through the emulator, and
two asyncpg baselines: the physical one, binary COPY straight into the same indexed table
with no dedupe, and an executemany INSERT ... ON CONFLICT DO NOTHING; at batch sizes 500
and 1000.

    PYTHONPATH=. python bench/sink_throughput.py [--rows 20000] [--dsn postgresql://postgres@127.0.0.1:5432/postgres]

Each method writes into its own fresh table in a throwaway database (dropped at the
end), one batch at a time. The emulator runs without its Realtime trigger so every
method pays the same per-row cost. "postgres sink, re-sent" sends every batch twice
(the second time every id is already there), the cost of a retry or a replay.
Target: postgres sink >= 0.8x COPY, still exactly once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shlex
import statistics
import sys
import time
import uuid
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.builtin_plugins.postgres import PostgresOptions, PostgresSink
from agent.builtin_plugins.supabase import SupabaseOptions, SupabaseSink

from agent.event import Event, new_ids
from agent.plugin.base import PluginContext
from agent.table import ddl as migrations
from agent.table.rows import COLUMNS, to_record
from tests.supabase_emulator import SupabaseEmulator


def ctx() -> PluginContext:
    return PluginContext("bench", "bench", Path("."), logging.getLogger("bench"), lambda e: None)


def events(n: int) -> list[Event]:
    now = time.time()
    return [
        Event(
            id=i,
            name=f"metric.{k % 20}",
            kind="gauge",
            value=k * 0.5,
            ts=now + k * 1e-4,
            tags={"host": "web-1", "region": "eu"},
            source="bench",
            agent_id="bench-1",
            data={"k": k},
        )
        for k, i in enumerate(new_ids(n))
    ]


def batches(evs: list[Event], size: int) -> list[list[Event]]:
    return [evs[i : i + size] for i in range(0, len(evs), size)]


async def run_sink(sink, evs: list[Event], size: int, twice: bool = False) -> float:
    await sink.start()
    try:
        t0 = time.perf_counter()
        for b in batches(evs, size):
            await sink.send(b)
            if twice:
                await sink.send(b)
        return len(evs) / (time.perf_counter() - t0)
    finally:
        await sink.close()


async def run_copy(dsn: str, table: str, evs: list[Event], size: int) -> float:
    """The physical baseline: binary COPY into the table itself, no dedupe (a re-sent batch would fail)."""
    con = await asyncpg.connect(dsn)
    try:
        t0 = time.perf_counter()
        for b in batches(evs, size):
            await con.copy_records_to_table(table, records=[to_record(e) for e in b], columns=COLUMNS)
        return len(evs) / (time.perf_counter() - t0)
    finally:
        await con.close()


async def run_executemany(dsn: str, table: str, evs: list[Event], size: int) -> float:
    cols = ", ".join(f'"{c}"' for c in COLUMNS)
    ph = ", ".join(f"${i + 1}" for i in range(len(COLUMNS)))
    sql = f'INSERT INTO "public"."{table}" ({cols}) VALUES ({ph}) ON CONFLICT ("id") DO NOTHING'
    con = await asyncpg.connect(dsn)
    try:
        t0 = time.perf_counter()
        for b in batches(evs, size):
            await con.executemany(sql, [to_record(e) for e in b])
        return len(evs) / (time.perf_counter() - t0)
    finally:
        await con.close()


METHODS = ("COPY", "executemany", "postgres sink", "postgres sink, re-sent", "supabase sink")


async def one_run(method: str, dsn: str, emu: SupabaseEmulator, rows: int, size: int) -> float:
    """Write `rows` fresh events into a fresh table with one method; check they all landed."""
    table = f"b_{uuid.uuid4().hex[:10]}"
    await migrations.apply(dsn, "public", table)
    evs = events(rows)
    if method == "COPY":
        rate = await run_copy(dsn, table, evs, size)
    elif method == "executemany":
        rate = await run_executemany(dsn, table, evs, size)
    elif method.startswith("postgres sink"):
        sink = PostgresSink("pg", PostgresOptions(dsn=dsn, table=table), ctx())
        rate = await run_sink(sink, evs, size, twice=method.endswith("re-sent"))
    else:
        rate = await run_sink(
            SupabaseSink("sb", SupabaseOptions(url=emu.url, key=emu.key, table=table), ctx()), evs, size
        )
    con = await asyncpg.connect(dsn)
    try:
        n = await con.fetchval(f'SELECT count(*) FROM "{table}"')
    finally:
        await con.close()
    assert n == rows, (method, n)
    return rate


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=20000, help="rows per method and batch size")
    ap.add_argument("--repeat", type=int, default=3, help="rounds (each runs every method once)")
    ap.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres", help="admin DSN")
    args = ap.parse_args()
    dbname = f"sidecar_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(args.dsn)
    server = await admin.fetchval("SHOW server_version")
    await admin.execute(f'CREATE DATABASE "{dbname}"')
    dsn = args.dsn.rsplit("/", 1)[0] + "/" + dbname
    # rates[(method, size)]: one rate per round. Each round runs every method once, in turn,
    # so load from other work on the machine falls on all of them alike.
    rates: dict[tuple[str, int], list[float]] = {}
    try:
        emu = SupabaseEmulator(dsn, realtime=False)
        await emu.start()
        try:
            for size in (500, 1000):
                for _ in range(args.repeat):
                    for method in METHODS:
                        rate = await one_run(method, dsn, emu, args.rows, size)
                        rates.setdefault((method, size), []).append(rate)
        finally:
            await emu.stop()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        await admin.close()

    print("command:", " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    print(f"rows per run: {args.rows}; {args.repeat} rounds; PostgreSQL {server}; asyncpg {asyncpg.__version__}")
    print("rows/s: the best round; vs COPY: the median over rounds of the rate / COPY's rate in the same round")
    print(f"{'method':<24}{'batch':>7}{'rows/s':>12}{'vs COPY':>9}")
    ratios: dict[tuple[str, int], float] = {}
    for (method, size), got in rates.items():
        base = rates[("COPY", size)]
        ratios[(method, size)] = statistics.median(r / b for r, b in zip(got, base, strict=True))
        print(f"{method:<24}{size:>7}{max(got):>12,.0f}{ratios[(method, size)]:>8.2f}x")
    for size in (500, 1000):
        ratio = ratios[("postgres sink", size)]
        print(f"target (batch {size}: postgres sink >= 0.8x COPY): {ratio:.2f}x, {'met' if ratio >= 0.8 else 'MISSED'}")


if __name__ == "__main__":
    asyncio.run(main())
