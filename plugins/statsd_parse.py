"""StatsD and DogStatsD line parsing for the `statsd` source (plugins/statsd.py): the
line format, gauge deltas and set members, per sample or into an interval's Aggregate."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

from agent.plugin import MAX_TAGS, Event

from .statsd_aggregate import Aggregate

# Loss ledger reasons of lines that yield no event (see docs/operations.md).
MALFORMED = "malformed_statsd"
UNSUPPORTED = "unsupported_statsd"

# Gauge values kept for +N/-N deltas. Past this many distinct name+tag sets the least
# recently updated is forgotten (its next delta starts from 0): a sender inventing names
# must not grow the agent without bound.
MAX_GAUGES = 100_000
# Parsed `#tags` fields remembered by their text (cleared when full).
MAX_TAG_CACHE = 10_000
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")


class BadLine(ValueError):
    """A line that yields no event; `reason` is its loss ledger reason."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _number(text: str) -> float:
    # float() alone would also take "nan", "inf", "1_000" and surrounding spaces.
    if not _NUMBER.fullmatch(text):
        raise BadLine(MALFORMED, f"not a number: {text!r}")
    value = float(text)
    if not math.isfinite(value):
        raise BadLine(MALFORMED, f"number out of range: {text!r}")
    return value


def _lines(datagram: bytes, bad: list[BadLine]) -> Iterator[str]:
    """The non-blank lines of a datagram, decoded; a line that is not UTF-8 goes to `bad`."""
    for raw in datagram.split(b"\n"):
        raw = raw.strip()
        if not raw:
            continue
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            bad.append(BadLine(MALFORMED, f"not UTF-8: {raw[:80]!r}"))


class Parser:
    """Turns datagrams into events.

    Holds the state StatsD semantics need across lines: the last value of each gauge
    (for deltas) and the members of each set until `flush_sets`.
    """

    def __init__(self, tags: dict[str, str] | None = None, max_gauges: int = MAX_GAUGES) -> None:
        self.tags = dict(tags or {})
        self.max_gauges = max_gauges
        self.gauges: dict[tuple[str, Any], float] = {}
        self.sets: dict[tuple[str, Any], tuple[dict[str, str], set[str]]] = {}
        self._base = (self.tags, tuple(sorted(self.tags.items())))
        self._tag_cache: dict[str, tuple[dict[str, str], Any]] = {}

    def feed(self, datagram: bytes, now: float) -> tuple[list[Event], list[BadLine]]:
        """Parse every line of a datagram: the events, and one BadLine per line that failed."""
        events: list[Event] = []
        bad: list[BadLine] = []
        for line in _lines(datagram, bad):
            try:
                events.extend(self.parse_line(line, now))
            except BadLine as exc:
                bad.append(exc)
        return events, bad

    def feed_into(self, datagram: bytes, now: float, agg: Aggregate) -> tuple[list[Event], list[BadLine]]:
        """Parse a datagram into `agg`: the events of lines with their own `T` timestamp
        (not aggregated: they keep their time), and one BadLine per line that failed."""
        events: list[Event] = []
        bad: list[BadLine] = []
        for line in _lines(datagram, bad):
            try:
                name, mtype, values, rate, tags, tkey, ts = self._split(line, None)
                if ts is not None:
                    events.extend(self._events(name, mtype, values, rate, tags, tkey, ts, line))
                    continue
                key = (name, tkey)
                if mtype == "s":
                    agg.member(key, tags, self._member(values, line), now)
                    continue
                nums = [_number(v) for v in values.split(":")]  # all or nothing
                if mtype == "c":
                    agg.samples(key, "counter", [v / rate for v in nums], now)
                elif mtype == "g":
                    agg.samples(key, "gauge", self._gauge(key, values.split(":"), nums), now)
                elif mtype in ("ms", "h", "d"):
                    agg.samples(key, "histogram", nums, now)
                else:
                    raise BadLine(MALFORMED, f"unknown metric type {mtype[:10]!r}: {line[:80]!r}")
            except BadLine as exc:
                bad.append(exc)
        return events, bad

    def parse_line(self, line: str, now: float) -> list[Event]:
        """One line's events (none for a set member); raises BadLine."""
        name, mtype, values, rate, tags, tkey, ts = self._split(line, now)
        return self._events(name, mtype, values, rate, tags, tkey, ts if ts is not None else now, line)

    def _split(self, line: str, now: float | None) -> tuple[str, str, str, float, dict[str, str], Any, float | None]:
        """(name, type, value text, rate, tags, tag key, ts): ts is the line's `T`, else `now`."""
        if line.startswith(("_e{", "_sc|")):
            raise BadLine(UNSUPPORTED, f"DogStatsD events and service checks are not supported: {line[:80]!r}")
        name, sep, rest = line.partition(":")
        fields = rest.split("|")
        if not sep or not name or len(fields) < 2:
            raise BadLine(MALFORMED, f"expected name:value|type: {line[:80]!r}")
        if len(name) > 255:
            raise BadLine(MALFORMED, f"name longer than 255 characters: {name[:80]!r}...")
        rate, (tags, tkey), ts = 1.0, self._base, now
        for f in fields[2:]:
            if f.startswith("@"):
                rate = _number(f[1:])
                if not 0 < rate <= 1:
                    raise BadLine(MALFORMED, f"sample rate must be in (0, 1]: {line[:80]!r}")
            elif f.startswith("#"):
                tags, tkey = self._tagset(f[1:])
            elif f.startswith("T"):
                ts = _number(f[1:])
                if ts <= 0:
                    raise BadLine(MALFORMED, f"timestamp must be positive epoch seconds: {line[:80]!r}")
            elif not f.startswith(("c:", "e:")):  # DogStatsD container id / external data: not kept
                raise BadLine(MALFORMED, f"unknown field |{f[:20]}: {line[:80]!r}")
        return name, fields[1], fields[0], rate, tags, tkey, ts

    @staticmethod
    def _member(values: str, line: str) -> str:
        if not values:
            raise BadLine(MALFORMED, f"empty set member: {line[:80]!r}")
        return values

    def _events(
        self, name: str, mtype: str, values: str, rate: float, tags: dict[str, str], tkey: Any, ts: float, line: str
    ) -> list[Event]:
        """The events of one parsed line, one per sample (sets are collected instead)."""
        key = (name, tkey)
        if mtype == "s":
            self.sets.setdefault(key, (tags, set()))[1].add(self._member(values, line))
            return []
        raw = values.split(":")  # DogStatsD 1.1: several values in one line
        nums = [_number(v) for v in raw]  # all or nothing: no half-applied gauge deltas
        if mtype == "c":
            return [Event(name=name, kind="counter", value=v / rate, ts=ts, tags=tags) for v in nums]
        if mtype == "g":
            return [Event(name=name, kind="gauge", value=v, ts=ts, tags=tags) for v in self._gauge(key, raw, nums)]
        if mtype in ("ms", "h", "d"):
            data = {"sample_rate": rate} if rate != 1.0 else None
            return [Event(name=name, kind="histogram", value=v, ts=ts, tags=tags, data=data) for v in nums]
        raise BadLine(MALFORMED, f"unknown metric type {mtype[:10]!r}: {line[:80]!r}")

    def _tagset(self, text: str) -> tuple[dict[str, str], Any]:
        """The tags of a `#...` field and their sorted items (the series key), cached by
        the field's text: senders repeat the same few tag sets."""
        hit = self._tag_cache.get(text)
        if hit is not None:
            return hit
        tags = self._tags(text)
        hit = (tags, tuple(sorted(tags.items())))
        if len(self._tag_cache) >= MAX_TAG_CACHE:
            self._tag_cache.clear()  # a sender inventing tag sets: start over, stay bounded
        self._tag_cache[text] = hit
        return hit

    def _tags(self, text: str) -> dict[str, str]:
        tags = dict(self.tags)
        for item in text.split(","):
            if not item:
                continue
            k, _, v = item.partition(":")  # a tag without a value (DogStatsD allows it) gets ""
            if not k:
                raise BadLine(MALFORMED, f"tag without a key: {item[:40]!r}")
            tags[k] = v
        if len(tags) > MAX_TAGS:
            raise BadLine(MALFORMED, f"too many tags ({len(tags)} > {MAX_TAGS})")
        return tags

    def _gauge(self, key: tuple[str, Any], raw: list[str], nums: list[float]) -> list[float]:
        value = self.gauges.pop(key, 0.0)  # re-inserted below: the dict's order is recency
        out = []
        for text, v in zip(raw, nums, strict=True):
            value = value + v if text[0] in "+-" else v
            out.append(value)
        self.gauges[key] = value
        if len(self.gauges) > self.max_gauges:
            del self.gauges[next(iter(self.gauges))]
        return out

    def flush_sets(self, now: float) -> list[Event]:
        """One gauge per set seen since the last flush: its number of distinct members."""
        sets, self.sets = self.sets, {}
        return [
            Event(name=name, kind="gauge", value=float(len(members)), ts=now, tags=tags)
            for (name, _), (tags, members) in sets.items()
        ]
