"""What the explorer's per-kind aggregations cost: `rate` and bucket `quantile` against the
plain aggregation on the same data in the same run (a ratio), on a fresh store.db.

    .venv/bin/python bench/explorer_aggs.py [--hours 6] [--series 50] [--every 15] [--runs 5]

Data, ending now: a counter (`jobs`, deltas) and a gauge running total (`total`, with a
reset halfway) with `--series` tag sets each, and a Prometheus-style histogram
(`rt_bucket`: 12 `le` bounds x 10 routes, deltas), one sample per series every `--every` s.
Prints the median query time of `--runs` runs for each pair and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.event import Event, new_ids
from agent.history.store import HistoryStore

LE = ["0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "+Inf"]
PAIRS = [  # label, name, (agg, q) measured, (agg, q) baseline, range seconds
    ("counter rate vs sum, 1 h (raw)", "jobs", ("rate", None), ("sum", None), 3600),
    ("counter rate vs sum, whole range (roll-ups)", "jobs", ("rate", None), ("sum", None), None),
    ("running-total rate vs avg, 1 h (raw)", "total", ("rate", None), ("avg", None), 3600),
    ("running-total rate (raw) vs avg (roll-ups), whole range", "total", ("rate", None), ("avg", None), None),
    ("bucket p99 vs avg across le, 1 h (raw)", "rt_bucket", ("quantile", 0.99), ("avg", None), 3600),
    ("bucket p99 vs avg across le, whole range (roll-ups)", "rt_bucket", ("quantile", 0.99), ("avg", None), None),
]


def make_events(hours: float, series: int, every: float, now: float) -> list[Event]:
    span = hours * 3600
    steps = int(span // every)
    out: list[Event] = []
    for i in range(steps):
        ts = now - span + i * every
        total = (i if i < steps // 2 else i - steps // 2) * 3.0
        for k in range(series):
            out.append(Event(id="", name="jobs", kind="counter", value=3.0, ts=ts, tags={"host": f"h{k}"}))
            out.append(Event(id="", name="total", kind="gauge", value=total + k, ts=ts, tags={"host": f"h{k}"}))
        for r in range(10):
            for j, le in enumerate(LE):
                v = float(min(j + 1, 9) * 2)
                out.append(
                    Event(id="", name="rt_bucket", kind="counter", value=v, ts=ts, tags={"le": le, "route": f"/r{r}"})
                )
    ids = new_ids(len(out), now=now - span)
    for e, eid in zip(out, ids, strict=True):
        e.id = eid
    return out


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hours", type=float, default=6)
    ap.add_argument("--series", type=int, default=50)
    ap.add_argument("--every", type=float, default=15)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    now = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        store = HistoryStore(Path(tmp) / "store.db")
        await store.open()
        try:
            events = make_events(args.hours, args.series, args.every, now)
            for i in range(0, len(events), 5000):
                await store.write(events[i : i + 5000], now=now)
            print(f"{len(events):,} events over {args.hours:g} h")
            print("| query | measured | baseline | ratio | level (measured / baseline) |\n|---|---|---|---|---|")
            for label, name, (agg, q), (base, _), rng in PAIRS:
                start = now - (rng or args.hours * 3600)
                times: dict[str, list[float]] = {agg: [], base: []}
                levels = {}
                for _ in range(args.runs):
                    for a, qq in ((agg, q), (base, None)):
                        t0 = time.perf_counter()
                        s = await store.series(name, start, now, None, a, now=now, q=qq)
                        times[a].append(time.perf_counter() - t0)
                        levels[a] = s["level"]
                m, b = statistics.median(times[agg]), statistics.median(times[base])
                level = f"{levels[agg]} / {levels[base]}"
                print(f"| {label} | {m * 1000:.1f} ms | {b * 1000:.1f} ms | {m / b:.2f}x | {level} |")
        finally:
            await store.close()


if __name__ == "__main__":
    asyncio.run(main())
