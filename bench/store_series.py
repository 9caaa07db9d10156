"""How long a history query stalls the event loop: the longest gap a 1 ms ticker task sees
while `HistoryStore.series()` runs (what `/api/v1/series` awaits), for this tree and,
with --before-tree, another one (e.g. the code before a change:
`mkdir /tmp/before && git archive REV agent plugins | tar -x -C /tmp/before`) on the
same events in the same run.

    PYTHONPATH=. python bench/store_series.py [--events 400000] [--series 200000] [--before-tree DIR]

Each tree runs in its own process on its own fresh store.db: counters over 4 names with
`--series` distinct tag sets, and one histogram (`lat`, 1,000 tag sets) for the
percentiles, 10 minutes of data ending now. Prints, per query, the longest loop stall
and the query's own time, and the ratio of the stalls.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH = 5000
SPAN_S = 600.0
NAMES = 4  # counter names: a name with many tag sets is what makes a query heavy
QUERIES = [  # (label, name or None for all=1, agg, range seconds, step)
    ("all=1 count, 5 min, 1 s steps (raw)", None, "count", 300, 1),
    ("one name avg, 5 min, 1 s steps (raw)", "hits.0", "avg", 300, 1),
    ("one name sum, 1 h, 1 min steps (roll-ups)", "hits.0", "sum", 3600, 60),
    ("histogram p95, 1 h, 1 min steps (sketches)", "lat", "p95", 3600, 60),
    ("histogram p99, 10 min, 1 s steps (raw)", "lat", "p99", 600, 1),
]


def make_events(n: int, series: int, now: float) -> list:
    from agent.event import Event, new_ids

    rnd = random.Random(3)
    ids = new_ids(n, now=now - SPAN_S)
    out = []
    for i in range(n):
        ts = now - SPAN_S + SPAN_S * i / n
        if i % 10 == 0:
            k = rnd.randrange(1000)
            e = Event(id=ids[i], name="lat", kind="histogram", value=rnd.lognormvariate(0, 1), ts=ts,
                      tags={"route": f"/r{k}"}, source="bench", agent_id="bench-1")  # fmt: skip
        else:
            k = rnd.randrange(series)
            e = Event(id=ids[i], name=f"hits.{k % NAMES}", kind="counter", value=1.0, ts=ts,
                      tags={"host": f"web-{k % 50}", "series": str(k)}, source="bench", agent_id="bench-1")  # fmt: skip
        out.append(e)
    return out


async def stall_during(coro: object) -> tuple[float, float]:
    """(longest loop stall, the awaitable's own time), in seconds."""
    worst = 0.0
    done = False

    async def ticker() -> None:
        nonlocal worst
        loop = asyncio.get_running_loop()
        last = loop.time()
        while not done:
            await asyncio.sleep(0.001)
            now = loop.time()
            worst = max(worst, now - last - 0.001)
            last = now

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0.01)
    t0 = time.perf_counter()
    await coro  # type: ignore[misc]
    took = time.perf_counter() - t0
    done = True
    await tick
    return worst, took


async def child(n: int, series: int) -> dict[str, list[float]]:
    from agent.history.store import HistoryStore

    now = time.time()
    events = make_events(n, series, now)
    with tempfile.TemporaryDirectory() as tmp:
        store = HistoryStore(Path(tmp) / "store.db")
        await store.open()
        try:
            for i in range(0, n, BATCH):
                await store.write(events[i : i + BATCH], now=now)
            out = {}
            for label, name, agg, rng, step in QUERIES:
                best = None
                for _ in range(2):  # the first run warms the page cache
                    got = await stall_during(store.series(name, now - rng, now, step, agg, now=now))
                    best = got if best is None or got[0] < best[0] else best
                out[label] = list(best or ())
            return out
        finally:
            await store.close()


def run_child(tree: str | None, n: int, series: int) -> dict[str, list[float]]:
    paths = [tree, str(ROOT)] if tree else [str(ROOT)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    cmd = [sys.executable, __file__, "--child", "--events", str(n), "--series", str(series)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=400_000)
    ap.add_argument("--series", type=int, default=200_000)
    ap.add_argument("--before-tree")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(child(args.events, args.series))))
        return
    print(f"{args.events} events, {args.series} counter tag sets + 1,000 histogram tag sets, over {SPAN_S:.0f} s")
    after = run_child(None, args.events, args.series)
    before = run_child(args.before_tree, args.events, args.series) if args.before_tree else None
    for label, *_ in QUERIES:
        stall, took = after[label]
        line = f"{label:<46} stall {stall * 1000:7.1f} ms (query {took:5.2f} s)"
        if before is not None:
            bstall, btook = before[label]
            line += f" | before: stall {bstall * 1000:7.1f} ms (query {btook:5.2f} s), {bstall / stall:5.0f}x the stall"
        print(line, flush=True)


if __name__ == "__main__":
    main()
