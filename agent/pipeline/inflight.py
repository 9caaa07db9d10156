"""Pipelined delivery: the batches a sink worker has sent and not yet retired, and how
many it may have in flight at once.

`Window` holds batches in journal order. Each is sent by its own task; the worker
retires them from the front only, so a cursor never passes a batch that is still being
sent, retried or waited on, whatever later batches have already been confirmed.

`AdaptiveLimit` is AIMD (additive increase, multiplicative decrease), as TCP and
Vector's adaptive request concurrency do, between 1 and the sink's `max_in_flight`:
a request that is being retried, failed (not for its data: a PermanentError says nothing
about load) or met an open breaker halves the limit (once per round of requests: the
ones already in flight when it was cut do not cut it again); every clean request adds
1/limit, so a full round of clean requests adds one.
It starts at the maximum: the journal, not memory, holds the backlog, and a healthy sink
should see full concurrency at once after an outage.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass


class AdaptiveLimit:
    """How many requests a sink may have in flight now: AIMD between 1 and `maximum`."""

    __slots__ = ("_limit", "_quiet", "cuts", "maximum")

    def __init__(self, maximum: int) -> None:
        self.maximum = max(1, maximum)
        self._limit = float(self.maximum)
        self._quiet = 0  # outcomes to ignore after a cut: the requests that were in flight then
        self.cuts = 0

    @property
    def current(self) -> int:
        """The whole number of requests allowed in flight."""
        return max(1, int(self._limit))

    def clean(self) -> None:
        """A request succeeded at its first attempt."""
        self._quiet = max(0, self._quiet - 1)
        if self._limit < self.maximum:
            self._limit = min(float(self.maximum), self._limit + 1.0 / self._limit)

    def congested(self) -> None:
        """A request failed, is being retried or found the breaker open."""
        if self._quiet > 0:
            self._quiet -= 1
            return
        before = self.current
        self._limit = max(1.0, self._limit / 2)
        self._quiet = before - 1
        self.cuts += 1


@dataclass(slots=True)
class Batch:
    """One read of the journal: the task sending it (None when nothing was left to send,
    e.g. every event sampled out or only a quarantined hole) and the seq the cursor may
    move to once it and every batch before it are done."""

    upto: int
    task: asyncio.Task[None] | None


class Window:
    """Batches in journal order; retired from the front only."""

    def __init__(self) -> None:
        self._batches: deque[Batch] = deque()

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self) -> Iterator[Batch]:
        return iter(self._batches)

    def add(self, batch: Batch) -> None:
        self._batches.append(batch)

    def in_flight(self) -> int:
        """Batches whose send has not ended."""
        return sum(1 for b in self._batches if b.task is not None and not b.task.done())

    def pending(self) -> list[asyncio.Task[None]]:
        """The tasks still sending, oldest first."""
        return [b.task for b in self._batches if b.task is not None and not b.task.done()]

    def done_front(self) -> Batch | None:
        """The oldest batch if its send has ended (the next to retire), else None."""
        if self._batches and (self._batches[0].task is None or self._batches[0].task.done()):
            return self._batches.popleft()
        return None

    async def cancel(self) -> None:
        """Cancel every batch still sending and wait for them; the window is empty after.
        Their events stay in the journal past the cursor and are read again."""
        tasks = [b.task for b in self._batches if b.task is not None]
        for t in tasks:
            t.cancel()
        if tasks:  # the window keeps holding them meanwhile, should this wait be cancelled too
            await asyncio.wait(tasks)
        self._batches.clear()
        for t in tasks:  # retrieve outcomes so none is logged as "never retrieved"
            if not t.cancelled():
                t.exception()
