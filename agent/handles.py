"""Pre-bound metric handles for hot paths: the name, kind and tags are fixed once.

    import agent
    orders = agent.counter_handle("orders.placed", tags={"region": "eu"})
    orders.inc()                 # or orders.inc(3)
    queue = agent.gauge_handle("queue.depth")
    queue.set(17)
    latency = agent.histogram_handle("http.latency_s", tags={"route": "/a"})
    latency.observe(0.012)

Counters sum in place, as StatsD servers and Prometheus do: `inc(n)` adds `n` to a cell
of the calling thread (a one-element list in a `threading.local`, registered with the
handle on the thread's first call), with no lock and no event. Only the owning thread
writes its cell, so no increment is lost. Gauges keep the last value and a change count.
The drainer reads every cell and emits ONE counter event per handle with the delta since
its last read (ts = now, same name and tags), and a gauge's last value when it changed:
the owner's committer does so every commit interval (at least MIN_TICK_S apart) and
before each flush/stop drain; a forwarder's drain thread on each send round (at most a
second apart) and before its flush/stop hand-over. So counters from handles arrive as
per-interval deltas, not one event per inc(). Histograms keep one event per observe()
(one tuple appended to the intake's deque, as record() does).

A handle records on the process-wide agent (agent.start()): it may be created at import
time, before start(); calls before start() (or after stop()) are counted as
`not_started`, as the module functions' are (nothing is held back for a later start: a
count that may never be delivered is a loss, and is said so at once). It binds lazily
and binds again whenever the process-wide agent is another object (start, stop, fork).
A name or tags that no event may carry are found at binding: every call of that handle
then goes through record() and is counted `invalid`, one per call. After fork() a child
starts from empty cells (the parent's counts are the parent's to send). The stop's last
drain unbinds the agent's handles, so a call after it is counted `stopped`, as record()'s;
only an increment racing that drain by a few bytecodes stays in its cell, and is sent by
the next agent the handle binds to in this process (none at interpreter exit).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import weakref
from collections import deque
from typing import Any

from agent import embed as _embed
from agent import losses
from agent.pipeline.intake import Committer, event_from_record

_time = time.time
_UNBOUND = object()  # no agent is ever this: the first call binds
_METHOD = {"counter": "inc", "gauge": "set", "histogram": "observe"}
MIN_TICK_S = 0.05  # the owner emits handles' deltas at most this often (an idle agent wakes no more)


class _Handle:
    """One metric, name, kind and tags fixed; bound lazily to the process-wide recorder."""

    __slots__ = ("__weakref__", "_bad", "_bound", "_capacity", "_queue", "_records", "name", "tags")
    kind: str  # a class attribute of each subclass

    def __init__(self, name: str, tags: dict[str, str] | None = None) -> None:
        self.name = name
        self.tags = dict(tags) if tags else None  # a copy: later changes to the caller's dict do not leak in
        self._bound: Any = _UNBOUND
        self._queue: Any = None
        self._records: deque[Any] = deque()
        self._capacity = 0
        self._bad: bool | None = None  # checked at the first binding

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.tags or {}}>"

    def _slow(self, value: Any) -> None:
        """Not bound to the current agent: bind, or count the call as record() would."""
        agent = _embed._agent
        if agent is None or self._is_bad():  # counted as the module record() counts it
            _embed.record(self.name, value, kind=self.kind, tags=self.tags)
            return
        queue: Any = _embed.intake_of(agent)
        if queue.refused:  # stopping: its last drain is done (drain_into unbound us), as record() counts it
            queue.ledger.add(queue.refused)
            return
        self._bind(agent)
        getattr(self, _METHOD[self.kind])(value)

    def _is_bad(self) -> bool:
        if self._bad is None:
            try:
                event_from_record((self.name, 0.0, self.kind, self.tags, _time(), None, None), "probe")
                self._bad = False
            except (TypeError, ValueError):
                self._bad = True
        return self._bad

    def _last_words(self, value: Any, kind: str) -> None:
        """A collected handle's un-emitted value: to the queue it was bound to while that
        one accepts, else counted as record() counts a call made now."""
        q = self._queue
        if q is not None and q.refused is None and _embed._agent is self._bound:
            q.record(self.name, value, kind=kind, tags=self.tags)
        else:
            _embed.record(self.name, value, kind=kind, tags=self.tags)

    def _refused(self) -> None:
        q = self._queue
        q.ledger.add(q.refused or losses.INTAKE_FULL)

    def _bind(self, agent: Any) -> None:
        """Cache the recorder's queue. `_bound` is written last: another thread sees either
        the old binding or the whole new one. (The `pid` tag is added where the queue is
        drained, as for record().)"""
        queue = _embed.intake_of(agent)
        self._queue = queue
        self._records = queue.records
        self._capacity = queue.capacity
        if isinstance(queue, Committer):
            _start_ticking(queue)
        self._bound = agent

    def _drain(self, queue: Any, now: float, capacity: int) -> None:
        """Summing handles: queue what was counted since the last drain (if the deque holds
        fewer than `capacity`)."""


class CounterHandle(_Handle):
    """A counter: `inc(value=1)` adds to this thread's cell; the drainer emits the sum."""

    __slots__ = ("_cells", "_local", "_lock", "_sent")

    def __init__(self, name: str, tags: dict[str, str] | None = None) -> None:
        super().__init__(name, tags)
        self._reset()
        _register(self)

    kind = "counter"

    def _reset(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()  # guards _cells (a thread's first call) and a drain
        # (thread, cell) per thread that counted; a dead thread's cell is folded into _sent's
        # base by the drainer (its owner can write it no more).
        self._cells: list[tuple[threading.Thread, list[float]]] = []
        self._sent = 0.0  # what the drainer has emitted (or folded) of the cells' sums

    def inc(self, value: float = 1.0) -> None:
        """Add `value` (default 1): summed in place, emitted as a delta per interval."""
        if _embed._agent is not self._bound:
            return self._slow(value)
        try:
            self._local.cell[0] += value
        except AttributeError:  # this thread's first call: it has no cell yet
            self._new_cell(value)
        except TypeError:  # not a number: counted as record() would count it
            _embed.record(self.name, value, kind="counter", tags=self.tags)
        return None

    def _new_cell(self, value: float) -> None:
        if not isinstance(value, (int, float)):
            _embed.record(self.name, value, kind="counter", tags=self.tags)
            return
        cell = [float(value)]
        with self._lock:
            self._cells.append((threading.current_thread(), cell))
        self._local.cell = cell

    def __del__(self) -> None:
        # Nobody can inc() any more: what was not emitted goes as one record() (a handle
        # made for one call, `counter_handle(n).inc()`, is collected before any drain).
        with contextlib.suppress(Exception):  # at interpreter exit modules may be gone
            delta = sum(cell[0] for _, cell in self._cells) - self._sent
            if delta:
                self._last_words(delta, "counter")

    def _drain(self, queue: Any, now: float, capacity: int) -> None:
        with self._lock:
            total = dead = 0.0
            live = []
            for thread, cell in self._cells:
                n = cell[0]
                total += n
                if thread.is_alive():
                    live.append((thread, cell))
                else:
                    dead += n  # its owner wrote its last increment: fold the cell
            delta = total - self._sent
            if delta:
                r = queue.records
                if len(r) >= capacity:
                    return  # kept in the cells: the next drain emits it
                r.append((self.name, delta, "counter", self.tags, now, None, None))
            self._cells = live
            self._sent = total - dead


class GaugeHandle(_Handle):
    """A gauge: `set(value)` keeps the last value; the drainer emits it when it changed."""

    __slots__ = ("_changes", "_last", "_seen", "_sent")
    kind = "gauge"

    def __init__(self, name: str, tags: dict[str, str] | None = None) -> None:
        super().__init__(name, tags)
        self._last: Any = None
        self._changes = 0  # += from several threads may lose a step: _sent covers that (see _drain)
        self._seen = 0
        self._sent: Any = None  # the value object last emitted
        _register(self)

    def set(self, value: float) -> None:
        """Set the gauge's current value (emitted once per interval when it changed)."""
        if _embed._agent is not self._bound:
            return self._slow(value)
        self._last = value  # before the count: a drainer that sees the count sees this value
        self._changes += 1
        return None

    def _reset(self) -> None:
        self._seen, self._sent = self._changes, self._last  # the parent's reading is the parent's to send

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            if self._changes != self._seen or self._last is not self._sent:
                self._last_words(self._last, "gauge")

    def _drain(self, queue: Any, now: float, capacity: int) -> None:
        # The count first, then the value (set() writes them the other way round). Two
        # threads' `+= 1` may leave the count where it was last seen; the value is then
        # another object than the one sent, unless it is the same value.
        n = self._changes
        v = self._last
        if n == self._seen and v is self._sent:
            return
        r = queue.records
        if len(r) >= capacity:
            return
        r.append((self.name, v, "gauge", self.tags, now, None, None))
        self._seen, self._sent = n, v


class HistogramHandle(_Handle):
    """A histogram: `observe(value)` records one observation (one event)."""

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


# -- the drain: one registry of summing handles per process --------------------------------

_live: weakref.WeakSet[_Handle] = weakref.WeakSet()
_live_lock = threading.Lock()
_drain_lock = threading.Lock()  # one drain at a time (a forwarder drains on its thread and in flush())
_ticking: weakref.WeakSet[Any] = weakref.WeakSet()  # committers whose loop emits handles' deltas
_fork_hook = False


def _register(h: _Handle) -> None:
    global _fork_hook
    with _live_lock:
        _live.add(h)
        if not _fork_hook and hasattr(os, "register_at_fork"):
            _fork_hook = True
            os.register_at_fork(after_in_child=_after_fork_in_child)


def _after_fork_in_child() -> None:
    """A child's handles start from nothing: the parent's counts are sent by the parent.
    The locks are new too: a parent thread may have held one at fork time."""
    global _live_lock, _drain_lock
    _live_lock, _drain_lock = threading.Lock(), threading.Lock()
    for h in list(_live):
        h._reset()  # type: ignore[attr-defined]


def drain_into(queue: Any, flushing: bool = False) -> None:
    """Queue, on `queue`'s deque, the deltas of every summing handle bound to it; the
    caller is the one that drains that deque (the committer, a forwarder's thread).
    A full deque leaves the sums in the handles for the next round, except when
    `flushing` (flush, stop): then they go in anyway, one tuple per handle at most."""
    with _live_lock:
        handles = [h for h in _live if h._queue is queue]
    if not handles:
        return
    if queue.refused:  # stopping: from now on a call is counted as `stopped`, as record()'s
        for h in handles:
            h._bound = _UNBOUND
    with _drain_lock:
        now = _time()
        for h in handles:
            h._drain(queue, now, queue.capacity + len(handles) if flushing else queue.capacity)
    if len(queue.records) >= queue._signal_at:
        queue._signal()


def _start_ticking(committer: Committer) -> None:
    """Once per owner's committer: its loop emits the handles' deltas every interval."""
    with _live_lock:
        if committer in _ticking or committer.refused is not None or committer._loop is None:
            return
        _ticking.add(committer)
    with contextlib.suppress(RuntimeError):  # its loop is closed: it stopped
        committer._loop.call_soon_threadsafe(_tick, committer)


def _tick(committer: Committer) -> None:
    """On the owner's loop: emit the handles' deltas every commit interval, until it stops."""
    if committer.refused is not None:
        return
    drain_into(committer)
    assert committer._loop is not None
    committer._loop.call_later(max(committer.commit_interval_s, MIN_TICK_S), _tick, committer)


def counter_handle(name: str, *, tags: dict[str, str] | None = None) -> CounterHandle:
    """A pre-bound counter on the process-wide agent: `h.inc()` / `h.inc(n)`."""
    return CounterHandle(name, tags)


def gauge_handle(name: str, *, tags: dict[str, str] | None = None) -> GaugeHandle:
    """A pre-bound gauge on the process-wide agent: `h.set(value)`."""
    return GaugeHandle(name, tags)


def histogram_handle(name: str, *, tags: dict[str, str] | None = None) -> HistogramHandle:
    """A pre-bound histogram on the process-wide agent: `h.observe(value)`."""
    return HistogramHandle(name, tags)
