"""Delivery rate of a journaled backlog to the supabase sink when every request takes
0, 50 or 100 ms longer (a database across the internet), with the default settings and
with one batch in flight (max_in_flight = 1, delivery before issue 16), in one run.

    PYTHONPATH=. python bench/sink_latency.py [--events 40000] [--delays 0,50,100] [--repeat 3]

The sink writes through the PostgREST emulator (tests/supabase_emulator.py, Realtime
off) into a fresh table of a throwaway database on the local PostgreSQL. The backlog is
recorded while the sink is switched off (its kill switch), then the switch is cleared
and the time until the sink has confirmed all of it is measured; every row is checked
to be in the table once. Target, with the defaults: the rate at 100 ms >= 0.6x the
rate at 0 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shlex
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.runtime import Agent
from agent.table import ddl as migrations
from tests.supabase_emulator import SupabaseEmulator


async def one_run(dsn: str, emu: SupabaseEmulator, events: int, delay_ms: int, in_flight: int | None) -> float:
    """Events/s delivering a backlog of `events` with `delay_ms` added per request."""
    table = f"l_{uuid.uuid4().hex[:10]}"
    await migrations.apply(dsn, "public", table)
    emu.delay_s = delay_ms / 1000
    sink: dict[str, object] = {"type": "supabase", "url": emu.url, "key": emu.key, "table": table}
    if in_flight is not None:
        sink["max_in_flight"] = in_flight
    with tempfile.TemporaryDirectory() as tmp:
        cfg = {
            "agent": {"data_dir": tmp, "intake_capacity": events * 2, "sync": "normal"},
            "server": {"enabled": False},
            "dashboard": {"store": False},
            "sinks": {"sb": sink},
        }
        async with Agent(cfg) as agent:
            agent.flags.set("sinks.sb.enabled", False, "bench")
            for k in range(events):
                agent.record("bench.latency", float(k), kind="gauge", tags={"host": "web-1"})
            assert await agent.committer.drain(60)
            t0 = time.perf_counter()
            agent.flags.set("sinks.sb.enabled", True, "bench")
            assert await agent.flush(600), "backlog not delivered"
            rate = events / (time.perf_counter() - t0)
            assert agent.ledger.total() == 0
    con = await asyncpg.connect(dsn)
    try:
        # The agent's own events (the kill switch's audit) go to the table too: count ours.
        q = f'SELECT count(DISTINCT id), count(*) FROM "{table}" WHERE event_type = $1'
        n, total = await con.fetchrow(q, "bench.latency")
    finally:
        await con.close()
    assert n == total == events, (n, total, events)
    return rate


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=40000, help="backlog size per run")
    ap.add_argument("--delays", default="0,50,100", help="ms added to every request, comma-separated")
    ap.add_argument("--repeat", type=int, default=3, help="rounds (each runs every cell once)")
    ap.add_argument("--dsn", default="postgresql://postgres@127.0.0.1:5432/postgres", help="admin DSN")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    delays = [int(d) for d in args.delays.split(",")]
    dbname = f"sidecar_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(args.dsn)
    await admin.execute(f'CREATE DATABASE "{dbname}"')
    dsn = args.dsn.rsplit("/", 1)[0] + "/" + dbname
    settings = (("defaults", None), ("max_in_flight = 1", 1))
    # rates[(label, delay)]: one rate per round; a round runs every cell once, in turn, so
    # load from other work on the machine falls on all of them alike.
    rates: dict[tuple[str, int], list[float]] = {}
    try:
        emu = SupabaseEmulator(dsn, realtime=False)
        await emu.start()
        try:
            for _ in range(args.repeat):
                for delay in delays:
                    for label, in_flight in settings:
                        rate = await one_run(dsn, emu, args.events, delay, in_flight)
                        rates.setdefault((label, delay), []).append(rate)
        finally:
            await emu.stop()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')
        await admin.close()

    print("command:", " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]))
    print(f"backlog {args.events} events per run; {args.repeat} rounds; supabase sink -> emulator -> PostgreSQL")
    print("events/s: the median round; vs 0 ms: the median over rounds of the rate / the same settings' 0 ms rate")
    print(f"{'settings':<20}{'delay ms':>9}{'events/s':>12}{'vs 0 ms':>9}")
    ratios: dict[tuple[str, int], float] = {}
    for (label, delay), got in rates.items():
        base = rates.get((label, 0))
        line = f"{label:<20}{delay:>9}{statistics.median(got):>12,.0f}"
        if base:
            ratios[(label, delay)] = statistics.median(r / b for r, b in zip(got, base, strict=True))
            line += f"{ratios[(label, delay)]:8.2f}x"
        print(line)
    if ("defaults", 100) in ratios:
        ratio = ratios[("defaults", 100)]
        print(f"target (defaults: 100 ms >= 0.6x 0 ms): {ratio:.2f}x, {'met' if ratio >= 0.6 else 'MISSED'}")


if __name__ == "__main__":
    asyncio.run(main())
