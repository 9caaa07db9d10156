"""Pre-bound metric handles for hot paths: the name, kind and tags are fixed once, so each
call is one tuple appended to the intake's deque.

    import agent
    orders = agent.counter_handle("orders.placed", tags={"region": "eu"})
    orders.inc()                 # or orders.inc(3)
    queue = agent.gauge_handle("queue.depth")
    queue.set(17)
    latency = agent.histogram_handle("http.latency_s", tags={"route": "/a"})
    latency.observe(0.012)

A handle records on the process-wide agent (agent.start()), exactly as
`agent.record(name, value, kind=..., tags=...)` would: it may be created at import time,
before start(); calls before start() (or after stop()) are counted as `not_started`, as
the module functions' are; after fork() a child's calls go to its forwarder. It binds
lazily: it keeps the current recorder's queue, and binds again whenever the process-wide
agent is another object (start, stop, fork). The tags dict is the handle's own copy,
shared by every event it records (the drain copies tags and adds `pid` off this thread).
Events are checked off the caller's thread like every record(); a bad name or tags are
counted as `invalid` there.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from agent import embed as _embed
from agent import losses

_time = time.time
_UNBOUND = object()  # no agent is ever this: the first call binds
_METHOD = {"counter": "inc", "gauge": "set", "histogram": "observe"}


class _Handle:
    """One metric, name, kind and tags fixed; bound lazily to the process-wide recorder."""

    __slots__ = ("_bound", "_capacity", "_queue", "_records", "name", "tags")
    kind: str  # a class attribute of each subclass

    def __init__(self, name: str, tags: dict[str, str] | None = None) -> None:
        self.name = name
        self.tags = dict(tags) if tags else None  # a copy: later changes to the caller's dict do not leak in
        self._bound: Any = _UNBOUND
        self._queue: Any = None
        self._records: deque[Any] = deque()
        self._capacity = 0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.tags or {}}>"

    def _slow(self, value: float) -> None:
        """Not bound to the current agent: bind, or count the call as record() would."""
        agent = _embed._agent
        if agent is None:  # not started (or stopped): counted as the module record() counts it
            _embed.record(self.name, value, kind=self.kind, tags=self.tags)
            return
        self._bind(agent)
        getattr(self, _METHOD[self.kind])(value)

    def _refused(self) -> None:
        q = self._queue
        q.ledger.add(q.refused or losses.INTAKE_FULL)

    def _bind(self, agent: Any) -> None:
        """Cache the recorder's queue. `_bound` is written last: another thread sees either
        the old binding or the whole new one. (The `pid` tag is added where the queue is
        drained, as for record().)"""
        queue = getattr(agent, "committer", agent)  # an Agent's intake, or a Forwarder itself
        self._queue = queue
        self._records = queue.records
        self._capacity = queue.capacity
        self._bound = agent


# inc/set/observe each spell out the same fast path instead of calling a shared one:
# a Python call is ~15% of a handle's whole cost (bench/record_overhead.py).


class CounterHandle(_Handle):
    """A counter: `inc(value=1)` records an increment."""

    __slots__ = ()
    kind = "counter"

    def inc(self, value: float = 1.0) -> None:
        """Record an increment of `value` (default 1)."""
        if _embed._agent is not self._bound:
            return self._slow(value)
        r = self._records
        if len(r) >= self._capacity or self._queue.refused:
            return self._refused()
        r.append((self.name, value, "counter", self.tags, _time(), None, None))
        if len(r) >= self._queue._signal_at:
            self._queue._signal()
        return None


class GaugeHandle(_Handle):
    """A gauge: `set(value)` records a reading."""

    __slots__ = ()
    kind = "gauge"

    def set(self, value: float) -> None:
        """Record the gauge's current value."""
        if _embed._agent is not self._bound:
            return self._slow(value)
        r = self._records
        if len(r) >= self._capacity or self._queue.refused:
            return self._refused()
        r.append((self.name, value, "gauge", self.tags, _time(), None, None))
        if len(r) >= self._queue._signal_at:
            self._queue._signal()
        return None


class HistogramHandle(_Handle):
    """A histogram: `observe(value)` records one observation."""

    __slots__ = ()
    kind = "histogram"

    def observe(self, value: float) -> None:
        """Record one observation of the distribution."""
        if _embed._agent is not self._bound:
            return self._slow(value)
        r = self._records
        if len(r) >= self._capacity or self._queue.refused:
            return self._refused()
        r.append((self.name, value, "histogram", self.tags, _time(), None, None))
        if len(r) >= self._queue._signal_at:
            self._queue._signal()
        return None


def counter_handle(name: str, *, tags: dict[str, str] | None = None) -> CounterHandle:
    """A pre-bound counter on the process-wide agent: `h.inc()` / `h.inc(n)`."""
    return CounterHandle(name, tags)


def gauge_handle(name: str, *, tags: dict[str, str] | None = None) -> GaugeHandle:
    """A pre-bound gauge on the process-wide agent: `h.set(value)`."""
    return GaugeHandle(name, tags)


def histogram_handle(name: str, *, tags: dict[str, str] | None = None) -> HistogramHandle:
    """A pre-bound histogram on the process-wide agent: `h.observe(value)`."""
    return HistogramHandle(name, tags)
