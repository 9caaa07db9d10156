"""Events/s the history store writes (`HistoryStore.write`, batches of 5,000 as the
implicit store sink gets them when it is behind), at 1,000 and 200,000 distinct tag
sets, beside two baselines in the same run.

    PYTHONPATH=. python bench/store_throughput.py [--events 200000] [--before-tree DIR]

- `store`: this tree's HistoryStore, on a fresh file per case;
- `raw sqlite`: the same events as plain rows into one table with an id primary key
  (one executemany per batch, one thread, no roll-ups): the ceiling of this disk;
- `before` (with --before-tree): the HistoryStore of another tree, e.g. the code before a
  change (`mkdir /tmp/before && git archive REV agent plugins | tar -x -C /tmp/before`),
  run in a child process with PYTHONPATH=DIR on the same events.

Gauges (each roll-up cell keeps a quantile sketch), 20 names, timestamps as if arriving
at 20,000 events/s with the ids the agent gives them (UUIDv7, time-ordered), tag sets
drawn at random from the case's count. Prints ev/s and the
ratio of this tree to each baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BATCH = 5000  # the implicit store sink's batch_size
RATE = 20_000  # the events' timestamps advance as if they arrived at this rate


def make_events(n: int, tagsets: int, seed: int = 1) -> list:
    """Gauges with the ids the agent gives (UUIDv7 of their time), 20 per millisecond."""
    from agent.event import Event, new_ids

    rnd = random.Random(seed)
    t0 = time.time() - n / RATE
    ids: list[str] = []
    out = []
    for i in range(n):
        ts = t0 + i / RATE
        if not ids:
            ids = new_ids(RATE // 1000, now=ts)[::-1]
        k = rnd.randrange(tagsets)
        out.append(
            Event(
                id=ids.pop(),
                name=f"metric.{k % 20}",
                kind="gauge",
                value=rnd.random() * 100,
                ts=ts,
                tags={"host": f"web-{k % 50}", "series": str(k)},
                source="bench",
                agent_id="bench-1",
            )
        )
    return out


async def store_rate(events: list, path: Path) -> float:
    from agent.history.store import HistoryStore

    store = HistoryStore(path)
    await store.open()
    try:
        t0 = time.perf_counter()
        for i in range(0, len(events), BATCH):
            await store.write(events[i : i + BATCH])
        return len(events) / (time.perf_counter() - t0)
    finally:
        await store.close()


def raw_sqlite_rate(events: list, path: Path) -> float:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(
        "CREATE TABLE events (id TEXT PRIMARY KEY, ts REAL, name TEXT, kind TEXT, value REAL,"
        " source TEXT, agent_id TEXT, tags TEXT)"
    )
    t0 = time.perf_counter()
    for i in range(0, len(events), BATCH):
        rows = [
            (e.id, e.ts, e.name, e.kind, e.value, e.source, e.agent_id, json.dumps(e.tags, sort_keys=True))
            for e in events[i : i + BATCH]
        ]
        conn.execute("BEGIN")
        conn.executemany("INSERT OR IGNORE INTO events VALUES (?,?,?,?,?,?,?,?)", rows)
        conn.execute("COMMIT")
    rate = len(events) / (time.perf_counter() - t0)
    conn.close()
    return rate


def child(args: argparse.Namespace) -> None:
    """One store measurement in this process (run with another tree on PYTHONPATH)."""
    events = make_events(args.events, args.child)
    with tempfile.TemporaryDirectory() as tmp:
        print(json.dumps({"rate": asyncio.run(store_rate(events, Path(tmp) / "store.db"))}))


def before_rate(tree: str, n: int, tagsets: int) -> float:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([tree, str(ROOT)]))
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(tagsets), "--events", str(n)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["rate"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--tagsets", default="1000,200000")
    ap.add_argument("--before-tree", help="a tree with the code to compare against (agent/ and plugins/)")
    ap.add_argument("--before-events", type=int, help="events for the before run (default: --events)")
    ap.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        return child(args)
    print(
        f"python {sys.version.split()[0]}, sqlite {sqlite3.sqlite_version}, {args.events} gauge events, "
        f"batches of {BATCH}"
    )
    for tagsets in (int(x) for x in args.tagsets.split(",")):
        events = make_events(args.events, tagsets)
        with tempfile.TemporaryDirectory() as tmp:
            rate = asyncio.run(store_rate(events, Path(tmp) / "store.db"))
            ceiling = raw_sqlite_rate(events, Path(tmp) / "raw.db")
        line = (
            f"{tagsets:>7} tag sets: store {rate:>9,.0f} ev/s | raw sqlite {ceiling:>9,.0f} ev/s "
            f"(store/raw {rate / ceiling:.2f})"
        )
        if args.before_tree:
            before = before_rate(args.before_tree, args.before_events or args.events, tagsets)
            line += f" | before {before:>8,.0f} ev/s (store/before {rate / before:.1f}x)"
        print(line, flush=True)


if __name__ == "__main__":
    main()
