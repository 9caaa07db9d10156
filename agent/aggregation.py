"""Pre-aggregation of metric events per (series, interval): many raw events in, one
aggregated event per series and interval out.

A series is (name, kind, tags, source, agent_id); an interval bucket is
floor(ts / interval) * interval of the event's own ts (not the arrival time), so the same
events give the same buckets on any machine and on a re-send.

- counter: values summed. value = the sum.
- gauge: the value with the greatest ts (ties: the later one added). value = that last value.
- histogram: observations merged. An event whose data already carries a summary
  (`count`, `sum`, and optionally `min`, `max`, `sketch`: an earlier aggregate, or a
  source that sends summaries) is merged as one; otherwise its value is one
  observation. value = the sum of the observations.
- events of kind `event`, and metrics without a value (and histograms without a
  summary), pass through unchanged.

Every aggregate carries `data`: `interval_s`, `count` (raw events merged), and for gauges
and histograms `min`, `max`, `sum`; gauges add `last_ts` (the ts of the value kept, so rows
for the same bucket from several flushes can be reduced to the last one); histograms add
`sketch`, the mergeable log-bucket quantile sketch of agent.history.sketch (1 % relative
error; DDSketch-style): {"zero": n, "pos": {key: count}, "neg": {key: count}}, keys as
strings (JSON). Sketches, counts, sums, mins and maxes all merge exactly, which is why a
bucket split over several rows (partial aggregates) still sums right.

The aggregate's ts is the bucket start. Ids come from the caller (`ids`), since only it
knows what makes a re-send the same: agent.pipeline.delivery uses `stable_id()` over the
journal range it aggregated. Pure and synchronous: no I/O, no clock.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Iterable
from typing import Any

from agent.event import Event, new_ids
from agent.history.sketch import Sketch

# Namespace of the aggregated events' uuid5 ids (fixed: changing it changes every id).
ID_NAMESPACE = uuid.UUID("5b0f3c9e-2a41-4d1e-9a57-6f0c1e8a7d42")

SeriesKey = tuple[str, str, tuple[tuple[str, str], ...], str, str]
# (series, bucket start) -> the text an aggregated event's id is derived from, or an id
IdFunc = Callable[[SeriesKey, float], str]

UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_interval(text: str | int | float) -> float:
    """Seconds from "10s", "500ms", "1m", "1h" or a number of seconds; ValueError otherwise."""
    if isinstance(text, bool):
        raise ValueError('expected a duration such as "10s"')
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        t = text.strip().lower()
        unit = next((u for u in ("ms", "s", "m", "h") if t.endswith(u)), "")
        try:
            seconds = float(t[: len(t) - len(unit)]) * UNITS.get(unit, 1.0)
        except ValueError:
            raise ValueError(f'expected a duration such as "10s", got {text!r}') from None
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"expected a positive duration, got {text!r}")
    return seconds


def stable_id(*parts: object) -> str:
    """A uuid5 of the parts: the same parts always give the same id."""
    return str(uuid.uuid5(ID_NAMESPACE, "\x1f".join(map(str, parts))))


class _State:
    """What one series accumulates in one bucket."""

    __slots__ = ("count", "last", "last_ts", "max", "min", "sketch", "sum")

    def __init__(self) -> None:
        self.count = 0
        self.sum = 0.0
        self.min = math.inf
        self.max = -math.inf
        self.last = 0.0
        self.last_ts = -math.inf
        self.sketch: Sketch | None = None


class Aggregator:
    """Accumulates metric events per series and interval bucket; `flush()` hands out the
    aggregates of the closed buckets. Not thread-safe (one owner)."""

    def __init__(self, interval_s: float) -> None:
        if not (math.isfinite(interval_s) and interval_s > 0):
            raise ValueError("interval_s must be a positive number of seconds")
        self.interval_s = interval_s
        self._cells: dict[tuple[SeriesKey, float], _State] = {}
        self.added = 0  # raw events merged since the last flush (passed-through ones excluded)

    def __len__(self) -> int:
        return len(self._cells)

    def add(self, e: Event) -> Event | None:
        """Merge one event; returns it unchanged when it is not aggregated (see the module doc)."""
        kind = e.kind
        v = e.value
        summary = e.data if kind == "histogram" and e.data and "count" in e.data and "sum" in e.data else None
        if kind == "event" or (v is None and summary is None) or kind not in ("counter", "gauge", "histogram"):
            return e
        tags = e.tags
        tkey = tuple(sorted(tags.items())) if len(tags) > 1 else tuple(tags.items())
        series: SeriesKey = (e.name, kind, tkey, e.source, e.agent_id)
        if summary is not None:  # only histograms carry one
            cell = self._cell(series, e.ts)
            if cell.sketch is None:
                cell.sketch = Sketch()
            _merge_summary(cell, summary)
            return None
        self.add_value(series, e.ts, float(v))  # type: ignore[arg-type]  # not None: checked above
        return None

    def add_value(self, series: SeriesKey, ts: float, x: float) -> None:
        """Merge one finite sample of `series` (its kind: counter, gauge or histogram)
        taken at `ts`. The StatsD source feeds its parsed samples in here directly."""
        cell = self._cell(series, ts)
        cell.count += 1
        cell.sum += x
        kind = series[1]
        if kind == "counter":
            return
        if x < cell.min:
            cell.min = x
        if x > cell.max:
            cell.max = x
        if kind == "gauge":
            if ts >= cell.last_ts:
                cell.last_ts = ts
                cell.last = x
            return
        if cell.sketch is None:
            cell.sketch = Sketch()
        cell.sketch.add(x)

    def _cell(self, series: SeriesKey, ts: float) -> _State:
        i = self.interval_s
        key = (series, math.floor(ts / i) * i)
        cell = self._cells.get(key)
        if cell is None:
            cell = self._cells[key] = _State()
        self.added += 1
        return cell

    def add_many(self, events: Iterable[Event]) -> list[Event]:
        """Merge many events; returns those passed through, in order."""
        add = self.add
        return [e for e in events if add(e) is not None]

    def flush(self, before: float | None = None, ids: IdFunc | None = None) -> list[Event]:
        """The aggregates of buckets that end at or before `before` (all when None),
        removed from the state, ordered by bucket start then first arrival. `ids` gives
        each one its id (default: fresh UUIDv7s)."""
        i = self.interval_s
        closed = [k for k in self._cells if before is None or k[1] + i <= before]
        closed.sort(key=lambda k: k[1])  # stable: first arrival order within a bucket
        fresh = new_ids(len(closed)) if ids is None else None
        out: list[Event] = []
        for n, key in enumerate(closed):
            cell = self._cells.pop(key)
            series, bucket = key
            eid = fresh[n] if fresh is not None else ids(series, bucket)  # type: ignore[misc]
            out.append(_event(series, bucket, i, cell, eid))
        if before is None:
            self.added = 0
        return out


def _merge_summary(cell: _State, d: dict[str, Any]) -> None:
    """Merge a histogram summary (an earlier aggregate, or a source's) into a cell."""
    cell.count += int(d["count"])
    cell.sum += float(d["sum"])
    if d.get("min") is not None:
        cell.min = min(cell.min, float(d["min"]))
    if d.get("max") is not None:
        cell.max = max(cell.max, float(d["max"]))
    sk = d.get("sketch")
    if isinstance(sk, dict) and cell.sketch is not None:
        other = Sketch()
        other.zero = int(sk.get("zero", 0))
        other.pos = {int(k): int(c) for k, c in (sk.get("pos") or {}).items()}
        other.neg = {int(k): int(c) for k, c in (sk.get("neg") or {}).items()}
        other.n = other.zero + sum(other.pos.values()) + sum(other.neg.values())
        cell.sketch.merge(other)


def _event(series: SeriesKey, bucket: float, interval: float, cell: _State, eid: str) -> Event:
    name, kind, tags, source, agent_id = series
    data: dict[str, Any] = {"interval_s": interval, "count": cell.count}
    if kind == "counter":
        value = cell.sum
    else:
        data["sum"] = cell.sum
        if math.isfinite(cell.min):  # a summary without min/max leaves them unknown
            data["min"] = cell.min
        if math.isfinite(cell.max):
            data["max"] = cell.max
        if kind == "gauge":
            value = cell.last
            data["last_ts"] = cell.last_ts
        else:
            value = cell.sum
            sk = cell.sketch
            if sk is not None:
                data["sketch"] = {
                    "zero": sk.zero,
                    "pos": {str(k): c for k, c in sk.pos.items()},
                    "neg": {str(k): c for k, c in sk.neg.items()},
                }
    return Event(
        id=eid,
        name=name,
        kind=kind,
        value=value,
        ts=bucket,
        tags=dict(tags),
        source=source,
        agent_id=agent_id,
        data=data,
    )
