"""Cardinality limits: at most `max_series_per_name` distinct tag sets per event name in a
rolling hour (`[agent] max_series_per_name`, docs/operations.md).

The committer calls `SeriesLimit.apply()` on every batch before the journal write, the
one place every way in passes (record(), sources, HTTP, forwarders). An event whose tag
set is new for its name once the name already has the maximum keeps its name, kind,
value and data, but its tags become `{"overflow": "true"}`: one overflow series per
name, as the OTel SDK folds the excess. Not a loss: nothing is dropped, so the ledger
does not count it; `overflowed` does, per name, for /metrics and the status.

Memory: a series is remembered as the hash of its tag set (a Python int) in one of two
half-hour windows per name. Each half hour the current window becomes the previous one
and the old previous one is forgotten, so a series counts against its name's cap from
its first event until 30 to 60 minutes after its last. A window holds at most
`max_series` hashes, so a name costs at most 2 x max_series of them; all names together
hold at most `max_tracked` hashes (about 100 bytes each with the set's slots, measured
with tracemalloc: ~50 MB at the default 500,000), and at most `max_names` names are
tracked. Past either bound a new series of any name overflows until the next rotation
makes room; the names counted in `overflowed` are bounded by `max_names` too (the
excess is counted under OTHER_NAMES).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from agent.event import Event

OVERFLOW_TAGS = {"overflow": "true"}
OTHER_NAMES = "(other names)"  # where overflow counts go once `overflowed` holds max_names names
WINDOW_S = 3600.0
MAX_TRACKED = 500_000
MAX_NAMES = 20_000


class _Name:
    """One name's series: hashes seen this half hour (`cur`) and the half hour before (`prev`)."""

    __slots__ = ("cur", "prev", "prev_only")

    def __init__(self) -> None:
        self.cur: set[int] = set()
        self.prev: set[int] = set()
        self.prev_only = 0  # hashes in prev that are not (yet) in cur

    def count(self) -> int:
        """Distinct series in the last two windows."""
        return len(self.cur) + self.prev_only


class SeriesLimit:
    """Caps distinct tag sets per event name; see the module docstring."""

    def __init__(
        self,
        max_series: int,
        *,
        window_s: float = WINDOW_S,
        max_tracked: int = MAX_TRACKED,
        max_names: int = MAX_NAMES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_series = max_series
        self.half_s = window_s / 2
        self.max_tracked = max_tracked
        self.max_names = max_names
        self.clock = clock
        self.names: dict[str, _Name] = {}
        self.tracked = 0  # hashes held over all names, both windows
        self.overflowed: dict[str, int] = {}  # name -> events given the overflow tags, ever
        self._rotate_at = clock() + self.half_s

    def apply(self, events: list[Event]) -> int:
        """Fold the tags of events past their name's cap into OVERFLOW_TAGS, in place;
        returns how many were folded."""
        now = self.clock()
        if now >= self._rotate_at:
            idle = now >= self._rotate_at + self.half_s  # no batch for a whole half hour more: forget it all
            self.rotate()
            if idle:
                self.rotate()
        names, folded = self.names, 0
        for e in events:
            key = hash(frozenset(e.tags.items())) if e.tags else 0
            s = names.get(e.name)
            if s is not None and key in s.cur:  # the common case: a series seen this half hour
                continue
            if not self._admit(e.name, s, key):
                e.tags = dict(OVERFLOW_TAGS)
                folded += 1
                self._count(e.name)
        return folded

    def _admit(self, name: str, s: _Name | None, key: int) -> bool:
        if s is None:
            if len(self.names) >= self.max_names or self.tracked >= self.max_tracked:
                return False
            s = self.names[name] = _Name()
        elif key in s.prev:  # still active: it moves to this half hour, the count stays
            s.prev_only -= 1
        elif s.count() >= self.max_series or self.tracked >= self.max_tracked:
            return False
        s.cur.add(key)
        self.tracked += 1
        return True

    def _count(self, name: str) -> None:
        o = self.overflowed
        if name not in o and len(o) >= self.max_names:
            name = OTHER_NAMES
        o[name] = o.get(name, 0) + 1

    def rotate(self) -> None:
        """Start a new half hour: forget the series not seen for the last one."""
        self._rotate_at = self.clock() + self.half_s
        tracked = 0
        for name, s in list(self.names.items()):
            if not s.cur:
                del self.names[name]
                continue
            s.prev, s.cur, s.prev_only = s.cur, set(), len(s.cur)
            tracked += s.prev_only
        self.tracked = tracked

    def describe(self) -> dict[str, object]:
        """For the status: the cap, what is tracked, and the names that overflowed (with counts)."""
        return {
            "max_series_per_name": self.max_series,
            "tracked_names": len(self.names),
            "tracked_series": self.tracked,
            "overflowed": dict(sorted(self.overflowed.items(), key=lambda kv: -kv[1])),
        }
