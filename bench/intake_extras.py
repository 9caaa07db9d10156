"""The per-event cost of issue 13's additions to the intake, each against a baseline
measured in the same run:

- the cardinality cap (SeriesLimit.apply, on the committer) against event.check(), the
  validation every event already gets there: 100k events of 20 names x 50 tag sets
  (every series known, the steady state) and 100k events with all-new tag sets past
  the cap (the worst case: each one is folded);
- agent.LogHandler on the caller's thread: a logger.info() call with it as the only
  handler against the same call with logging.NullHandler (the cost of logging itself),
  and against agent.record() alone; plain, with `extra`, and with an exception.

    PYTHONPATH=. python bench/intake_extras.py [--events 100000] [--calls 100000] [--repeat 5]

Best of `repeat` rounds; ns per event or call. The agent is never started (its intake
is cleared between rounds), so no drain thread competes for the GIL: the call alone.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

COMMAND = "PYTHONPATH=. python bench/intake_extras.py"


def events(n: int, *, fresh: bool) -> list:
    from agent.event import Event

    now = time.time()
    return [
        Event(
            name=f"http.request.duration.{i % 20}",
            kind="histogram",
            value=0.001 * (i % 997),
            ts=now,
            tags={"route": f"/api/v1/items/{i if fresh else i % 50}", "method": "GET", "status": "200"},
            source="http",
            agent_id="bench",
        )
        for i in range(n)
    ]


def best(fn, rounds: int) -> float:
    return min(fn() for _ in range(rounds))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--events", type=int, default=100_000)
    p.add_argument("--calls", type=int, default=100_000)
    p.add_argument("--repeat", type=int, default=5)
    a = p.parse_args()
    print(f"$ {COMMAND} --events {a.events} --calls {a.calls} --repeat {a.repeat}")
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cpus; best of {a.repeat} rounds\n")

    from agent.cardinality import SeriesLimit
    from agent.event import check

    def per_event(fn, evs) -> float:
        t0 = time.perf_counter()
        fn(evs)
        return (time.perf_counter() - t0) / len(evs) * 1e9

    known = events(a.events, fresh=False)
    fresh = events(a.events, fresh=True)

    def check_all(evs) -> None:
        for e in evs:
            check(e)

    warm = SeriesLimit(2000)
    warm.apply(known)  # every series known from now on
    base = best(lambda: per_event(check_all, known), a.repeat)
    steady = best(lambda: per_event(warm.apply, known), a.repeat)

    def folded() -> float:
        limit = SeriesLimit(2000)
        evs = events(a.events, fresh=True)
        limit.apply(fresh[: 20 * 2000])  # every name at its cap
        return per_event(limit.apply, evs[20 * 2000 :] or evs)

    worst = best(folded, a.repeat)
    print("committer, ns per event:")
    print(f"  event.check() (baseline)                         {base:8.0f}  1.00x")
    print(f"  SeriesLimit.apply, every series known            {steady:8.0f}  {steady / base:.2f}x")
    print(f"  SeriesLimit.apply, all new past the cap (folded) {worst:8.0f}  {worst / base:.2f}x\n")

    from agent.log_handler import LogHandler
    from agent.runtime import Agent

    idle = Agent({"agent": {"intake_capacity": a.calls * 4}, "server": {"enabled": False}})
    log = logging.getLogger("bench.app")
    log.propagate = False
    log.setLevel(logging.INFO)
    null, handler = logging.NullHandler(), LogHandler(agent=idle)
    try:
        raise ValueError("bench")
    except ValueError:
        exc = sys.exc_info()

    def timed(stmt) -> float:
        def one() -> float:
            idle.committer.records.clear()
            return timeit.timeit(stmt, number=a.calls) / a.calls * 1e9

        return best(one, a.repeat)

    rec = idle.record
    cases = {
        "plain": lambda: log.info("order %s placed", "A-1"),
        "extra": lambda: log.info("order %s placed", "A-1", extra={"order_id": 42, "user": "ann"}),
        "exc_info": lambda: log.error("failed", exc_info=exc),
    }
    rows = []
    for label, stmt in cases.items():
        log.handlers[:] = [null]
        base_ns = timed(stmt)
        log.handlers[:] = [handler]
        ours = timed(stmt)
        rows.append((label, base_ns, ours))
    record_ns = timed(lambda: rec("log", None, kind="event", tags={"level": "INFO", "logger": "bench.app"}))
    print("caller's thread, ns per call:")
    print(f"  agent.record() alone: {record_ns:.0f}")
    for label, base_ns, ours in rows:
        print(
            f"  logger call, {label:<8}  NullHandler (baseline) {base_ns:6.0f}  LogHandler {ours:6.0f}  "
            f"{ours / base_ns:.2f}x"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
