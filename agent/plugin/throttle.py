"""The one throttle behind every recurring WARNING: at most one line per key per interval,
with a count of what was held back since the last line.

Why: a sink that fails every call, a StatsD sender with a malformed line per packet, a
breaker that keeps opening: each occurrence is counted where it matters (status, the
loss ledger, /metrics); the log only has to say that it happens and why, and must not
flood. Callers word their own lines; this only decides when, and says how many it held.
"""

from __future__ import annotations

import time
from collections.abc import Callable

MAX_KEYS = 256  # keys remembered; past it the oldest are forgotten (its next line may come early)


class Throttle:
    """Lets one occurrence per `key` through every `every_s` seconds and counts the rest."""

    def __init__(self, every_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.every_s, self.clock = every_s, clock
        self._next: dict[str, float] = {}  # key -> when it may pass again
        self._held: dict[str, tuple[int, int]] = {}  # key -> (occurrences, their `amount`) held back

    def allow(self, key: str = "", amount: int = 0, now: float | None = None) -> tuple[int, int] | None:
        """None: hold this occurrence back (counted, with its `amount`). Otherwise it may be
        logged: (occurrences, amount) held back under `key` since its last line."""
        now = self.clock() if now is None else now
        if now < self._next.get(key, float("-inf")):
            held, total = self._held.get(key, (0, 0))
            self._held[key] = (held + 1, total + amount)
            return None
        self._next.pop(key, None)  # re-inserted last: the oldest key is the first one in the dict
        self._next[key] = now + self.every_s
        while len(self._next) > MAX_KEYS:
            oldest = next(iter(self._next))
            del self._next[oldest]
            self._held.pop(oldest, None)
        return self._held.pop(key, (0, 0))
