"""StatsD lines/s through the statsd source's parser, beside the least any parser must do.

    PYTHONPATH=. python bench/statsd_throughput.py [--packets 20000]

Datagrams of 10 lines each (counters with sample rates, gauges and deltas, timers,
sets, DogStatsD tags), parsed in this process:

- baseline "split + decode + float": split the datagram into lines, decode each, and
  convert the text between `:` and `|` to a float; no types, rates, tags or events;
- the same plus building one Event per line (what any source handing events over pays);
- `Parser.feed`: the source's parser, building one Event per sample.

Best of 5 runs each. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.event import Event  # noqa: E402
from agent.builtin_plugins.statsd import Parser  # noqa: E402

LINES = [
    "api.requests:1|c|@0.5|#route:/v1/items,method:GET,status:200",
    "api.requests:1|c|#route:/v1/orders,method:POST,status:201",
    "api.latency:12.7|ms|#route:/v1/items",
    "api.latency:48.1|ms|@0.25|#route:/v1/orders",
    "queue.depth:17|g|#queue:emails",
    "queue.depth:+3|g|#queue:emails",
    "payload.bytes:512|h",
    "users.active:{}|s",  # a user id: a set member
    "cache.hits:4|c",
    "worker.busy:-1|g|#pool:io",
]


def datagrams(n: int) -> list[bytes]:
    return ["\n".join(LINES).replace("{}", str(i % 997)).encode() for i in range(n)]


def floor(packets: list[bytes]) -> None:
    for d in packets:
        for raw in d.split(b"\n"):
            line = raw.decode()
            float(line[line.index(":") + 1:line.index("|")].lstrip("+"))


def floor_events(packets: list[bytes]) -> None:
    now = time.time()
    for d in packets:
        for raw in d.split(b"\n"):
            line = raw.decode()
            name, _, rest = line.partition(":")
            Event(name=name, kind="counter", value=float(rest[:rest.index("|")].lstrip("+")), ts=now, tags={})


def parser(packets: list[bytes]) -> None:
    p = Parser({"env": "bench"})
    now = time.time()
    for d in packets:
        _, bad = p.feed(d, now)
        if bad:
            raise SystemExit(f"a bench line did not parse: {bad[0]}")
    p.flush_sets(now)


def best_rate(fn, packets: list[bytes], lines: int) -> float:
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        fn(packets)
        best = min(best, time.perf_counter() - t0)
    return lines / best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--packets", type=int, default=20_000)
    args = ap.parse_args()
    print("command:", " ".join([os.path.basename(sys.executable)] + sys.argv))
    packets = datagrams(args.packets)
    lines = args.packets * len(LINES)
    base = best_rate(floor, packets, lines)
    rows = [("baseline: split + decode + float", base),
            ("split + decode + float + Event()", best_rate(floor_events, packets, lines)),
            ("statsd Parser.feed", best_rate(parser, packets, lines))]
    print(f"{args.packets} datagrams x {len(LINES)} lines, best of 5")
    for label, rate in rows:
        print(f"{label:<34} {rate:>12,.0f} lines/s  {rate / base:.2f}x  ({1e6 / rate:.2f} us/line)")

if __name__ == "__main__":
    main()
