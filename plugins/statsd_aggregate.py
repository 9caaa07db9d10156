"""StatsD aggregation per flush interval, as StatsD servers do: many lines in, one event per
series (name and tag set) and kind out.

- counters: `value` = the sum of `V / rate`; `data.count` = the lines merged;
- gauges: `value` = the last value (deltas were applied by the parser); `data.count`;
- timers/histograms/distributions: one `histogram` event, `value` = the sum, `data` has
  `count`, `sum`, `min`, `max` and `sketch`: the log-bucket sketch of agent.aggregation
  and agent.history.sketch (same bucket keys, 1 % relative error), so it merges exactly
  with the aggregates a sink's `aggregate` makes and with other intervals;
- sets: a `gauge` with the number of distinct members.

Every aggregate's `ts` is the flush time and `data.interval_s` the interval. Owned by one
thread (the source's reader); no locks.
"""

from __future__ import annotations

import math
from typing import Any

from agent.plugin import Event

# The bucket keys of agent.history.sketch (plugins import only agent.plugin): a value v
# falls in ceil(log_gamma(|v|)), gamma = (1 + 0.01) / (1 - 0.01).
_LOG_GAMMA = math.log((1 + 0.01) / (1 - 0.01))
_MIN_MAGNITUDE = 1e-9

Key = tuple[str, Any]  # (name, the sorted tag items)


class _Hist:
    __slots__ = ("count", "max", "min", "neg", "pos", "sum", "zero")

    def __init__(self) -> None:
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.pos: dict[int, int] = {}
        self.neg: dict[int, int] = {}
        self.zero = 0

    def add(self, v: float) -> None:
        self.count += 1
        self.sum += v
        if v < self.min:
            self.min = v
        if v > self.max:
            self.max = v
        mag = abs(v)
        if mag < _MIN_MAGNITUDE:
            self.zero += 1
            return
        bins = self.pos if v > 0 else self.neg
        k = math.ceil(math.log(mag) / _LOG_GAMMA)
        bins[k] = bins.get(k, 0) + 1


class Aggregate:
    """One flush interval's state; `flush()` returns its events and starts the next."""

    def __init__(self) -> None:
        self.counters: dict[Key, list[Any]] = {}  # key -> [tags, sum, lines]
        self.gauges: dict[Key, list[Any]] = {}  # key -> [tags, last, lines]
        self.hists: dict[Key, tuple[dict[str, str], _Hist]] = {}
        self.sets: dict[Key, tuple[dict[str, str], set[str]]] = {}
        self.lines = 0  # samples merged since the last flush

    def __len__(self) -> int:
        return len(self.counters) + len(self.gauges) + len(self.hists) + len(self.sets)

    def counter(self, key: Key, tags: dict[str, str], values: list[float], rate: float) -> None:
        c = self.counters.get(key)
        if c is None:
            c = self.counters[key] = [tags, 0.0, 0]
        for v in values:
            c[1] += v / rate
        c[2] += len(values)
        self.lines += len(values)

    def gauge(self, key: Key, tags: dict[str, str], values: list[float]) -> None:
        g = self.gauges.get(key)
        if g is None:
            g = self.gauges[key] = [tags, 0.0, 0]
        g[1] = values[-1]
        g[2] += len(values)
        self.lines += len(values)

    def observe(self, key: Key, tags: dict[str, str], values: list[float]) -> None:
        h = self.hists.get(key)
        if h is None:
            h = self.hists[key] = (tags, _Hist())
        for v in values:
            h[1].add(v)
        self.lines += len(values)

    def member(self, key: Key, tags: dict[str, str], member: str) -> None:
        s = self.sets.get(key)
        if s is None:
            s = self.sets[key] = (tags, set())
        s[1].add(member)
        self.lines += 1

    def flush(self, now: float, interval_s: float) -> list[Event]:
        """The interval's events (ts = now), and an empty state for the next one."""
        out: list[Event] = []
        for (name, _), (tags, total, n) in self.counters.items():
            data = {"interval_s": interval_s, "count": n}
            out.append(Event(name=name, kind="counter", value=total, ts=now, tags=tags, data=data))
        for (name, _), (tags, last, n) in self.gauges.items():
            data = {"interval_s": interval_s, "count": n}
            out.append(Event(name=name, kind="gauge", value=last, ts=now, tags=tags, data=data))
        for (name, _), (tags, h) in self.hists.items():
            data = {
                "interval_s": interval_s,
                "count": h.count,
                "sum": h.sum,
                "min": h.min,
                "max": h.max,
                "sketch": {
                    "zero": h.zero,
                    "pos": {str(k): c for k, c in h.pos.items()},
                    "neg": {str(k): c for k, c in h.neg.items()},
                },
            }
            out.append(Event(name=name, kind="histogram", value=h.sum, ts=now, tags=tags, data=data))
        for (name, _), (tags, members) in self.sets.items():
            data = {"interval_s": interval_s, "count": len(members)}
            out.append(Event(name=name, kind="gauge", value=float(len(members)), ts=now, tags=tags, data=data))
        self.counters, self.gauges, self.hists, self.sets = {}, {}, {}, {}
        self.lines = 0
        return out
