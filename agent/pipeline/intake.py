"""Intake: the bounded, non-blocking hand-off into the agent, and the group committer.

One object owns the way in. `record()` appends a tuple to its deque from any thread
(no lock, no allocation beyond the tuple); sources' `emit()` appends their Events to
the same deque, so one capacity rule holds for both; HTTP `submit()` queues a batch
whose future resolves after its commit. The committer drains all of it, checks every
event with event.check() (off the caller's thread: record() and sources count what it
refuses as `invalid`), and commits to the journal in one transaction per window
(`commit_interval_ms`) or as soon as `commit_batch` events wait. It is the only writer
of journal segments.

Waking without losing a wake-up, and without a timeout to cover for one:
`_signal_at` is the deque length at which record() must signal. The committer sets it
to 1 ("wake me on the first record") just before it drains; the first record() to
reach it raises it to `commit_batch` and wakes the committer, the first to reach that
raises it past any length and cuts the commit window short. The raise (re-checked)
and the reset happen under `_signal_lock`, so a stale raise never overwrites a reset;
the fast path reads `_signal_at` without it. Why no record() is left waiting: under
the GIL, deque.append and len() are atomic and a thread's append precedes its own read
of `_signal_at`. If the length it sees is below the threshold, either the committer
drained since the append (the record went with it), or another caller raised the
threshold after the committer's last reset and so scheduled a wake-up after that
reset. The reset and the clearing of `_wake` happen on the loop with no await between
them and callbacks run only between steps, so that wake-up reaches a committer that
will drain again, after this read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sqlite3
import time
from collections.abc import Callable
from typing import Any

from agent import losses
from agent.cardinality import SeriesLimit
from agent.errors import JournalFullError
from agent.event import KINDS, MAX_FUTURE_S, MAX_NAME, MAX_TAGS, Event, assign_ids, check, default_kind
from agent.losses import LossLedger
from agent.pipeline.journal import Journal
from agent.pipeline.recording import NEVER, Recorded, RecordQueue

log = logging.getLogger("sidecar_agent.intake")
_time = time.time
_isfinite = math.isfinite


class Deferred:
    """record()'s `data` finished where the queue is drained, off the caller's thread: a
    subclass's __call__ returns the data (agent.log_handler formats tracebacks this way)."""

    __slots__ = ()

    def __call__(self) -> dict[str, Any]:
        raise NotImplementedError


def event_from_record(t: Recorded, agent_id: str, ts_max: float | None = None, pid: str | None = None) -> Event:
    """Turn one record() tuple into a checked Event; raises ValueError when it is not one.
    `pid` is added as the tag `pid` unless the caller set one or the tags are full."""
    name, value, kind, tags, ts, data, session_id = t
    # The common call (ASCII name and tags, a float value, no data) is checked inline: the
    # same rules as check(), without its general cases. On a machine with the GIL this work
    # competes with the host's threads, so it is most of what record() costs a hot loop.
    # Anything else, or anything that fails here, takes the full path below, so the same
    # event gets the same answer (and error) either way.
    if (
        data is None
        and session_id is None
        and ts_max is not None
        and name.__class__ is str
        and 0 < len(name) <= MAX_NAME
        and name.isascii()
        and value.__class__ is float
        and _isfinite(value)
        and ts.__class__ is float
        and 0.0 <= ts <= ts_max
        and (kind is None or kind in KINDS)
        and agent_id.isascii()
    ):
        if tags is None:
            checked: dict[str, str] | None = {} if pid is None else {"pid": pid}
        elif tags.__class__ is dict and len(tags) < MAX_TAGS:
            checked = {}
            for k, v in tags.items():
                if k.__class__ is not str or v.__class__ is not str or not (k.isascii() and v.isascii()):
                    checked = None
                    break
                checked[k] = v
            if checked is not None and pid is not None and "pid" not in checked:
                checked["pid"] = pid
        else:
            checked = None
        if checked is not None:
            return Event(
                name=name,
                kind="gauge" if kind is None else kind,
                value=value,
                ts=ts,
                tags=checked,
                source="app",
                agent_id=agent_id,
                session_id=None,
                data=None,
            )
    if isinstance(data, Deferred):
        data = data()
    if tags:
        if not isinstance(tags, dict):
            raise ValueError(f"tags must be a dict, got {type(tags).__name__}")
        tags = {str(k): str(v) for k, v in tags.items()}  # a copy: the caller may reuse its dict
        if pid is not None and "pid" not in tags and len(tags) < MAX_TAGS:
            tags["pid"] = pid
    elif pid is not None:
        tags = {"pid": pid}
    return check(
        Event(
            name=name,
            kind=default_kind(value) if kind is None else kind,
            value=value,
            ts=ts,
            tags=tags or {},
            source="app",
            agent_id=agent_id,
            session_id=None if session_id is None else str(session_id),
            data=data,
        ),
        ts_max,
    )


class Committer(RecordQueue):
    """The intake: owns the queue (record(), emit(), submit()) and drains it into the journal."""

    def __init__(
        self,
        ledger: LossLedger,
        *,
        agent_id: str,
        capacity: int,
        commit_batch: int,
        commit_interval_s: float,
        on_commit: Callable[[list[Event]], None],
        max_future_s: float = MAX_FUTURE_S,
        max_series_per_name: int = 2000,
    ) -> None:
        super().__init__(ledger, capacity=capacity, commit_batch=commit_batch, signal_at=NEVER)  # none before open()
        self.max_future_s = max_future_s  # check(): how far ahead of now a ts may be
        self.agent_id = agent_id
        self.commit_interval_s = commit_interval_s
        self.on_commit = on_commit
        # Every way in passes _commit_queued: the cardinality cap is applied there (agent/cardinality.py).
        self.series = SeriesLimit(max_series_per_name)
        self.journal: Journal | None = None  # set by open(); until then records wait
        # self.records holds record() tuples and source Events, in arrival order.
        self.batches: list[tuple[list[Event], asyncio.Future[None]]] = []  # HTTP, acked after commit
        self.pending_events = 0  # events in self.batches
        self.committed = 0
        self.commits = 0
        self.wakeups = 0  # times record() or emit() woke the committer (tests, status)
        # The reason counted for events whose journal write is cancelled part-way (a stop or
        # a failed start whose deadline passed); close() sets it.
        self.cancel_reason = losses.SHUTDOWN_TIMEOUT
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()  # something to commit
        self._full = asyncio.Event()  # a full batch: stop gathering
        self._commit_lock = asyncio.Lock()

    @property
    def accepting(self) -> bool:
        return self.refused is None

    # -- producers -------------------------------------------------------------------

    def emit(self, events: list[Event]) -> None:
        """Queue events from a source or the agent itself (on the loop thread); checked
        on the committer like record()'s, under the same capacity."""
        if self.refused:
            self.ledger.add(losses.SHUTDOWN_TIMEOUT, len(events))
            return
        if len(self.records) + len(events) > self.capacity:
            self.ledger.add(losses.INTAKE_FULL, len(events))
            return
        self.records.extend(events)
        if len(self.records) >= self._signal_at:
            self._signal()

    def submit(self, events: list[Event]) -> asyncio.Future[None]:
        """Queue a checked batch (HTTP ingest); the future resolves after its journal commit."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.refused:
            fut.set_exception(JournalFullError("the agent is shutting down"))
            return fut
        self.batches.append((events, fut))
        self.pending_events += len(events)
        self._on_signal()
        return fut

    def _wake_up(self, n: int) -> None:
        # RuntimeError: the loop is closed, the agent stopped (discard() counted the queue).
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(self._on_signal)  # type: ignore[union-attr]

    def _on_signal(self) -> None:
        # On the loop thread.
        self.wakeups += 1
        self._wake.set()
        if len(self.records) + self.pending_events >= self.commit_batch:
            self._full.set()

    # -- the loop --------------------------------------------------------------------

    def open(self, journal: Journal) -> None:
        """Attach the journal and this loop; what was recorded before is committed next."""
        self.journal = journal
        self._loop = asyncio.get_running_loop()
        self._rearm()
        if self.records:
            self._on_signal()

    async def run(self) -> None:
        """Commit whatever arrives, forever (cancelled at shutdown after a final drain).
        Safe to call again after it raised (the agent's supervisor restarts it): what is
        still queued is committed first."""
        if self.records or self.batches:
            self._wake.set()
        while True:
            await self._wake.wait()  # no timeout: see the module docstring
            if len(self.records) + self.pending_events < self.commit_batch:
                try:  # gather a group, until the window ends or the batch is full
                    async with asyncio.timeout(self.commit_interval_s):
                        await self._full.wait()
                except TimeoutError:
                    pass
            await self.commit_once()

    async def commit_once(self) -> int:
        """Drain everything queued right now into one journal commit."""
        # One commit at a time, so drain() can wait for one that is in flight.
        async with self._commit_lock:
            return await self._commit_queued()

    def _take(self) -> tuple[list[Event], list[tuple[list[Event], asyncio.Future[None]]]]:
        """Take everything queued, after re-arming the wake-up (never the other way round)."""
        self._rearm()
        self._wake.clear()
        self._full.clear()
        popleft = self.records.popleft
        taken = [popleft() for _ in range(len(self.records))]
        batches, self.batches, self.pending_events = self.batches, [], 0
        events: list[Event] = []
        invalid: list[str] = []
        now = _time()
        ts_max = now + self.max_future_s
        for t in taken:
            try:
                if isinstance(t, Event):  # from a source
                    if not t.agent_id:
                        t.agent_id = self.agent_id
                    if not t.ts:
                        t.ts = now
                    events.append(check(t, ts_max))
                else:
                    events.append(event_from_record(t, self.agent_id, ts_max, self.pid_tag))
            except (TypeError, ValueError) as exc:  # TypeError: a record() call's odd tags or str()
                invalid.append(str(exc))
        if invalid:
            self.ledger.add(losses.INVALID, len(invalid))
            log.warning("%d invalid event(s) dropped, e.g. %s", len(invalid), invalid[0])
        return events, batches

    async def _commit_queued(self) -> int:
        events, batches = self._take()
        futures: list[asyncio.Future[None]] = []
        unacked = len(events)  # events with no future: lost if the commit fails
        for batch, fut in batches:
            events.extend(batch)
            futures.append(fut)
        if not events:
            return 0
        self.series.apply(events)
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
        assert self.journal is not None
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
        if self.journal is None:  # never opened: nothing can be committed
            return not (self.records or self.batches)
        from agent import handles  # here, not at import: agent.handles imports this module

        handles.drain_into(self, flushing=True)  # what counter/gauge handles summed in place goes in this drain
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

    def close(self, reason: str) -> None:
        """Refuse new events from now on: record() counts them as `stopped`, or as
        `start_failed` when `reason` is that; a write cut off later counts as `reason`."""
        self.cancel_reason = reason
        self.refused = losses.START_FAILED if reason == losses.START_FAILED else losses.STOPPED

    def discard(self) -> int:
        """Count what is still queued (not committed by the deadline) as lost; returns it."""
        left = len(self.records) + self.pending_events
        self.records.clear()
        for _, fut in self.batches:
            if not fut.done():
                fut.set_exception(JournalFullError("the agent is stopping"))
        self.batches, self.pending_events = [], 0
        self.ledger.add(self.cancel_reason, left)
        return left
