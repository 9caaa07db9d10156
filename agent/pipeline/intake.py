"""Intake: the bounded, non-blocking hand-off into the agent, and the group committer.

`record()` appends a tuple to a deque from any thread (no lock, no allocation beyond
the tuple) and wakes the loop only when the deque goes from empty to non-empty.
The Committer drains that deque, source batches and HTTP ingest requests, turns them
into Events, and commits them to the journal in one transaction per window
(`commit_interval_ms`) or per `commit_batch` events. HTTP requests are acknowledged
only after that commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from agent import losses
from agent.errors import JournalFullError
from agent.event import KINDS, Event, assign_ids, default_kind
from agent.pipeline.journal import Journal
from agent.losses import LossLedger

log = logging.getLogger("sidecar_agent.intake")

# A record() call as stored in the deque: (name, value, kind, tags, ts, data, session_id).
Recorded = tuple[Any, Any, Any, Any, float, Any, Any]


def event_from_record(t: Recorded, agent_id: str) -> Event:
    """Validate one record() tuple; raises ValueError/TypeError when it is not an event."""
    name, value, kind, tags, ts, data, session_id = t
    if type(name) is not str or not name or len(name) > 255:
        raise ValueError(f"name must be a non-empty string of at most 255 characters, got {name!r}")
    if value is not None:
        value = float(value)
    if kind is None:
        kind = default_kind(value)
    elif kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")
    if tags:
        tags = {str(k): str(v) for k, v in tags.items()}
    if data is not None and not isinstance(data, dict):
        raise TypeError(f"data must be a dict, got {type(data).__name__}")
    if session_id is not None:
        session_id = str(session_id)
    return Event(
        name=name, kind=kind, value=value, ts=ts, tags=tags or {}, source="app",
        agent_id=agent_id, session_id=session_id, data=data,
    )


class Committer:
    """Drains intake into the journal with group commit."""

    def __init__(
        self,
        journal: Journal,
        ledger: LossLedger,
        *,
        agent_id: str,
        capacity: int,
        commit_batch: int,
        commit_interval_s: float,
        on_commit: Callable[[list[Event]], None],
    ) -> None:
        self.journal = journal
        self.ledger = ledger
        self.agent_id = agent_id
        self.capacity = capacity
        self.commit_batch = commit_batch
        self.commit_interval_s = commit_interval_s
        self.on_commit = on_commit
        self.records: deque[Recorded] = deque()
        self.batches: list[tuple[list[Event], asyncio.Future[None] | None]] = []
        self.pending_events = 0
        self.committed = 0
        self.commits = 0
        self.accepting = True
        # The reason counted for events whose journal write is cancelled part-way (a stop or
        # a failed start whose deadline passed); the agent sets it before cancelling.
        self.cancel_reason = losses.SHUTDOWN_TIMEOUT
        self._wake = asyncio.Event()
        self._commit_lock = asyncio.Lock()
        self._loop = asyncio.get_running_loop()

    # -- producers -------------------------------------------------------------------

    def wake_threadsafe(self) -> None:
        """Called from record() on another thread when the deque was empty."""
        try:
            self._loop.call_soon_threadsafe(self._wake.set)
        except RuntimeError:  # loop closed: the agent is stopping, the event is counted below
            pass

    def submit(self, events: list[Event]) -> asyncio.Future[None]:
        """Queue a batch (HTTP ingest); the future resolves after its journal commit."""
        fut: asyncio.Future[None] = self._loop.create_future()
        if not self.accepting:
            fut.set_exception(JournalFullError("the agent is shutting down"))
            return fut
        self.batches.append((events, fut))
        self.pending_events += len(events)
        self._wake.set()
        return fut

    def emit(self, events: list[Event]) -> None:
        """Queue events from a source or the agent itself (in the loop thread)."""
        if not self.accepting:
            self.ledger.add(losses.SHUTDOWN_TIMEOUT, len(events))
            return
        if self.pending_events + len(events) > self.capacity:
            self.ledger.add(losses.INTAKE_FULL, len(events))
            return
        self.batches.append((events, None))
        self.pending_events += len(events)
        self._wake.set()

    # -- the loop --------------------------------------------------------------------

    async def run(self) -> None:
        """Commit whatever arrives, forever (cancelled at shutdown after a final flush)."""
        while True:
            if not self.records and not self.batches:
                self._wake.clear()
                # The timeout is a safety net for a wake-up lost to a race in record().
                # (asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation.)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(0.25):
                        await self._wake.wait()
                continue
            if len(self.records) + self.pending_events < self.commit_batch:
                await asyncio.sleep(self.commit_interval_s)  # gather a group
            await self.commit_once()

    async def commit_once(self) -> int:
        """Drain everything queued right now into one journal commit."""
        # One commit at a time, so drain() can wait for one that is in flight.
        async with self._commit_lock:
            return await self._commit_queued()

    async def _commit_queued(self) -> int:
        n = len(self.records)
        popleft = self.records.popleft
        recorded = [popleft() for _ in range(n)]
        batches, self.batches, self.pending_events = self.batches, [], 0
        events: list[Event] = []
        invalid = 0
        for t in recorded:
            try:
                events.append(event_from_record(t, self.agent_id))
            except (TypeError, ValueError) as exc:
                invalid += 1
                if invalid == 1:
                    log.warning("record() got an invalid event, dropped: %s", exc)
        if invalid:
            self.ledger.add(losses.INVALID, invalid)
        futures: list[asyncio.Future[None]] = []
        unacked = len(events)  # events with no future: lost if the commit fails
        for batch, fut in batches:
            for e in batch:
                if not e.agent_id:
                    e.agent_id = self.agent_id
                if not e.ts:
                    e.ts = time.time()
            events.extend(batch)
            if fut is None:
                unacked += len(batch)
            else:
                futures.append(fut)
        if not events:
            return 0
        assign_ids(events)
        try:
            await self._append(events)
        except asyncio.CancelledError:
            # The write was abandoned, its outcome unknown (it may still land): these events
            # were taken off the queues, so count them here or nobody will. HTTP callers get
            # the same 503 as a full journal.
            self.ledger.add(self.cancel_reason, unacked)
            for fut in futures:
                if not fut.done():
                    fut.set_exception(JournalFullError("the agent is stopping"))
            raise
        except Exception as exc:
            reason = losses.JOURNAL_FULL if isinstance(exc, JournalFullError) else losses.DISK_ERROR
            self.ledger.add(reason, unacked)
            for fut in futures:
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, JournalFullError) else JournalFullError(str(exc)))
            return 0
        self.committed += len(events)
        self.commits += 1
        for fut in futures:
            if not fut.done():
                fut.set_result(None)
        self.on_commit(events)
        return len(events)

    async def _append(self, events: list[Event]) -> None:
        try:
            await self.journal.append(events)
        except sqlite3.Error as exc:
            # Disk full or an I/O error: fall back to the overflow policy, never crash.
            self.journal.disk_error = f"{type(exc).__name__}: {exc}"
            log.error("journal write failed: %s", exc)
            if self.journal.overflow == "drop_oldest" and self.journal.rows:
                await self.journal.free_space()
                await self.journal.append(events)
            else:
                raise

    async def drain(self, timeout: float | None = None) -> bool:
        """Wait until everything queued before this call is committed."""
        self._wake.set()
        try:
            async with asyncio.timeout(timeout):
                while self.records or self.batches:
                    await self.commit_once()
                # The loop may have taken the last items and be committing them right now.
                async with self._commit_lock:
                    pass
            return True
        except TimeoutError:
            return False

