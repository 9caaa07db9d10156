"""StatsD aggregation per flush interval, as StatsD servers do: many lines in, one event per
series (name and tag set), kind and interval out.

Counters, gauges and timers go into the agent's own aggregator (agent.aggregation, the
one a sink's `aggregate` uses), so their buckets, data fields and sketches are the same
as a sink's aggregates and merge with them exactly:

- counters: `value` = the sum of `V / rate`; `data.count` = the samples merged;
- gauges: `value` = the last value (deltas were applied by the parser); `data` adds
  `count`, `sum`, `min`, `max`, `last_ts`;
- timers/histograms/distributions: one `histogram` event, `value` = the sum, `data` has
  `count`, `sum`, `min`, `max` and `sketch` (agent.history.sketch's log buckets, 1 %
  relative error);
- sets (StatsD only, kept here): a `gauge` with the number of distinct members.

Every aggregate's `ts` is its interval's start (a multiple of `flush_interval_s`, from the
sample's arrival time) and `data.interval_s` the interval. Owned by one thread (the
source's reader); no locks.
"""

from __future__ import annotations

import math
from typing import Any

from agent.plugin import Aggregator, Event

Key = tuple[str, Any]  # (name, the sorted tag items)


class Aggregate:
    """The samples of the current intervals; `flush(now)` returns the closed ones' events."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.metrics = Aggregator(interval_s)
        self.sets: dict[Key, tuple[dict[str, str], set[str]]] = {}
        self.sets_since = self._start(0.0)  # the interval the sets are collected for (0: none yet)

    def __len__(self) -> int:
        return len(self.metrics) + len(self.sets)

    def _start(self, ts: float) -> float:
        return math.floor(ts / self.interval_s) * self.interval_s

    def samples(self, key: Key, kind: str, values: list[float], ts: float) -> None:
        """Merge a line's samples (a counter's already divided by its rate) into `kind`'s series."""
        series = (key[0], kind, key[1], "", "")
        for v in values:
            self.metrics.add_value(series, ts, v)

    def member(self, key: Key, tags: dict[str, str], member: str, ts: float) -> None:
        if not self.sets:
            self.sets_since = self._start(ts)
        s = self.sets.get(key)
        if s is None:
            s = self.sets[key] = (tags, set())
        s[1].add(member)

    def flush(self, now: float | None = None) -> list[Event]:
        """The events of the intervals that ended by `now` (all of them when None: a stop).
        Sets close with the interval they were collected in."""
        out = self.metrics.flush(now)
        if self.sets and (now is None or self.sets_since + self.interval_s <= now):
            for (name, _), (tags, members) in self.sets.items():
                data = {"interval_s": self.interval_s, "count": len(members)}
                out.append(
                    Event(name=name, kind="gauge", value=float(len(members)), ts=self.sets_since, tags=tags, data=data)
                )
            self.sets = {}
        return out
