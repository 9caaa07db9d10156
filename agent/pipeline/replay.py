"""Replaying a sink's dead-letter queue, part of its SinkWorker (agent.pipeline.delivery).

Entries are replayed when the sink is healthy again, at a bounded rate (`replay_per_s`),
or at once on request (`request_replay`, the API's and CLI's replay). While the sink is
unhealthy one entry at a time is its health probe, at a backoff that doubles (up to 60 s,
or the sink's Retry-After) while it keeps failing. A replayed entry that fails
permanently is bisected like a live batch: what goes through is delivered, the rest goes
back to the queue as smaller entries.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from agent.errors import PermanentError, RetryableError
from agent.event import Event
from agent.pipeline.cancellation import cancelling
from agent.storage.dlq import DeadLetterQueue

Parts = list[tuple[list[Event], BaseException]]


class DlqReplay:
    """The replay half of a SinkWorker: its state, and the worker's send, bisect and
    outcome methods it uses (declared here, defined by SinkWorker)."""

    name: str
    dlq: DeadLetterQueue
    healthy: bool
    auto_replay: bool
    replay_interval: float
    stats: Any  # delivery.SinkStats (that module imports this one)

    def _init_replay(self, replay_per_s: float, auto_replay: bool) -> None:
        self.replay_interval = 1.0 / replay_per_s if replay_per_s > 0 else float("inf")
        self.auto_replay = auto_replay
        self._next_replay = 0.0
        self._probe_at = 0.0  # when an unhealthy sink may next try one DLQ entry
        self._probe_delay = 1.0
        self._replay_now = False

    def nudge(self) -> None:
        raise NotImplementedError

    async def _send(self, events: list[Event], tries: list[int] | None = None) -> None:
        raise NotImplementedError

    async def _bisect(self, events: list[Event], exc: BaseException) -> Parts:
        raise NotImplementedError

    def _succeeded(self, events: list[Event]) -> None:
        raise NotImplementedError

    def _failed(self, exc: BaseException) -> None:
        raise NotImplementedError

    def request_replay(self) -> None:
        """Replay this sink's DLQ now, even before a live batch proves it healthy."""
        self._replay_now = True
        self.nudge()

    async def _maybe_replay(self) -> bool:
        """Replay one DLQ entry if the sink is healthy and the rate allows."""
        now = time.monotonic()
        if not self.dlq.depth(self.name):
            return False
        if not self._replay_now and not (self.auto_replay and (self.healthy or now >= self._probe_at)):
            return False
        if now < self._next_replay and not self._replay_now:
            return False
        self._next_replay = now + self.replay_interval
        claimed = await self.dlq.claim(self.name)
        if claimed is None:
            self._replay_now = False
            return False
        entry_id, _, events = claimed
        try:
            failed = await self._replay(events)
        except (asyncio.CancelledError, KeyboardInterrupt):
            # The whole entry stays parked; halves already delivered may be sent again.
            await asyncio.shield(self.dlq.settle(entry_id, self.name, len(events), RetryableError("cancelled")))
            raise
        except Exception as exc:
            if cancelling():  # a cancel the sink turned into an error: parked as above
                await asyncio.shield(self.dlq.settle(entry_id, self.name, len(events), RetryableError("cancelled")))
                raise asyncio.CancelledError from exc
            self._failed(exc)
            self._replay_failed(exc)
            await self.dlq.settle(entry_id, self.name, len(events), exc)
            return False
        delivered = len(events) - sum(len(part) for part, _ in failed)
        self.stats.replayed += delivered
        if failed:
            await self.dlq.split(entry_id, self.name, delivered, failed)
            self._replay_failed(failed[0][1])
            return delivered > 0
        self._probe_delay = 1.0
        await self.dlq.settle(entry_id, self.name, len(events), None)
        if not self.dlq.depth(self.name):
            self._replay_now = False
        return True

    async def _replay(self, events: list[Event]) -> list[tuple[list[Event], BaseException]]:
        """Send a DLQ entry's events; several that fail permanently are bisected like a
        live batch. Returns the parts that still fail (empty when all were delivered)."""
        try:
            await self._send(events)
        except PermanentError as exc:
            if len(events) == 1:
                raise
            self._failed(exc)
            return await self._bisect(events, exc)
        self._succeeded(events)
        return []

    def _replay_failed(self, exc: BaseException) -> None:
        """A replay failed: end an explicit replay and back off the next probe."""
        self._replay_now = False
        wait = exc.retry_after if isinstance(exc, RetryableError) and exc.retry_after else self._probe_delay
        self._probe_at = time.monotonic() + wait
        self._probe_delay = min(self._probe_delay * 2, 60.0)
