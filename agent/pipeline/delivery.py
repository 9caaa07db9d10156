"""Per-sink delivery: one worker per sink reads the journal after its cursor, sends
through the sink's resilience chain, and moves the cursor only when the sink confirms.

Pipelined: up to `max_in_flight` batches per sink are sent at once (each by its own
task, each through the chain on its own, so retries, the breaker and the DLQ see one
request per batch), adapted by AIMD (agent.pipeline.inflight). The cursor moves in
journal order: a batch confirmed before an earlier one waits for it. The default comes
from the sink (its `max_in_flight` attribute, else 1: a sink must say its send() may run
concurrently); `[sinks.NAME] max_in_flight` overrides it.

Outcomes of a batch:
- delivered: the cursor moves past it;
- PermanentError: the batch is bisected so only the offending events reach the DLQ;
- RetryableError that escaped the chain (its budget is spent): the batch goes to the
  DLQ and the cursor moves on (no head-of-line blocking);
- CircuitOpenError: the worker waits for the breaker and sends the same batch again,
  so the journal, not memory, holds the backlog while a sink is down;
- the DLQ write itself fails (a full disk): the cursor stays, the worker backs off and
  reads the same batch again (parts already delivered or parked may go twice, none is lost).
Outcomes are per batch; the cursor moves past a batch once it and every earlier batch
ended delivered or parked. A failed DLQ write cancels the later batches in flight and
reads again from the cursor. DLQ entries are replayed when the sink is healthy again,
at a bounded rate; a replayed entry that fails permanently is bisected like a live batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agent.errors import CircuitOpenError, PermanentError, RetryableError
from agent.event import Event
from agent.flags import in_rollout
from agent.pipeline import deadletter_log
from agent.pipeline.batch_ranges import BatchRanges, aggregate_batch
from agent.pipeline.cancellation import raise_if_cancelling
from agent.pipeline.inflight import AdaptiveLimit, Batch, Window
from agent.pipeline.journal import Journal
from agent.pipeline.replay import DlqReplay
from agent.pipeline.resilience import Chain
from agent.plugin.base import PluginContext, Sink
from agent.storage.dlq import DeadLetterQueue

if TYPE_CHECKING:
    from agent.pipeline.supervisor import Supervised

log = logging.getLogger("sidecar_agent.delivery")

HOLD_INITIAL_S = 0.5  # backoff after a failed DLQ write, doubling up to HOLD_MAX_S
HOLD_MAX_S = 30.0

OWN_PREFIX = "sidecar_agent."  # names of the agent's own events


class DeadLetterWriteError(Exception):
    """Parking a failed batch in the DLQ failed (e.g. the disk is full): the batch was
    neither delivered nor parked, so the cursor must stay where it is."""


@dataclass
class SinkStats:
    """Counters for /api/v1/sinks and /metrics."""

    sent: int = 0
    batches: int = 0
    failed: int = 0
    attempts: int = 0
    dead_lettered: int = 0
    replayed: int = 0
    filtered: int = 0
    aggregated: int = 0  # raw events merged away by `aggregate` (sent as fewer rows)
    last_error: str | None = None
    last_success: float | None = None
    state: str = "starting"
    extra: dict[str, Any] = field(default_factory=dict)


class SinkWorker(DlqReplay):
    """Delivers the journal to one sink."""

    def __init__(
        self,
        name: str,
        sink: Sink,
        chain: Chain,
        ctx: PluginContext,
        journal: Journal,
        dlq: DeadLetterQueue,
        *,
        batch_size: int = 500,
        max_in_flight: int | None = None,
        aggregate_s: float | None = None,
        replay_per_s: float = 2.0,
        auto_replay: bool = True,
        enabled: Callable[[], bool] = lambda: True,
        rollout: Callable[[], float] = lambda: 100.0,
        plugin: str = "",
    ) -> None:
        self.name = name
        self.plugin = plugin
        self.sink = sink
        self.chain = chain
        self.ctx = ctx
        self.journal = journal
        self.dlq = dlq
        self.batch_size = batch_size
        # None: what the sink says it can take (see the module doc)
        self.limit = AdaptiveLimit(max_in_flight or int(getattr(sink, "max_in_flight", 1) or 1))
        # `aggregate`: the sink gets per-batch aggregates over persisted ranges (batch_ranges)
        self.aggregate_s = aggregate_s
        self._ranges = BatchRanges(journal.db, name) if aggregate_s else None
        # An aggregating sink lingers: it reads once batch_size events wait or the interval
        # has passed since the oldest unread one came (fewer, fuller batches: fewer rows),
        # unless hurry() asked for everything up to a seq (flush, stop).
        self._linger_at: float | None = None
        self._hurry_to = 0
        self._read_to = 0  # the journal is read up to here; the cursor trails the window
        self._window = Window()
        self._init_replay(replay_per_s, auto_replay)
        self.enabled = enabled
        self.rollout = rollout
        self.stats = SinkStats(extra=ctx.stats)
        self.healthy = False
        self.started = False
        self._starting: asyncio.Future[None] | None = None
        self._nudge = journal.waiter()  # set on every commit, flag change or replay request
        self._hold_delay = HOLD_INITIAL_S
        self._runs = 0  # run() calls: more than one means the supervisor restarted it
        self.supervision: Supervised | None = None  # set by the agent (status: restarting, restarts)

    def nudge(self) -> None:
        """Wake the worker (a flag changed, or a replay was requested)."""
        self._nudge.set()

    def hurry(self) -> None:
        """Deliver what is journaled now without lingering (flush() and stop() call it)."""
        self._hurry_to = self.journal.last_seq
        self.nudge()

    def _lingering(self) -> bool:
        """Whether an aggregating sink should wait before reading a small batch."""
        pending = self.journal.last_seq - self._read_to
        if not self.aggregate_s or pending <= 0 or pending >= self.batch_size or self._hurry_to > self._read_to:
            self._linger_at = None
            return False
        now = time.monotonic()
        if self._linger_at is None:
            self._linger_at = now + self.aggregate_s
        return now < self._linger_at

    # -- the loop --------------------------------------------------------------------

    async def run(self) -> None:
        """Deliver for ever. Safe to call again after it raised (the agent's supervisor
        restarts it): the sink is started once, and a DLQ entry a failed run had claimed
        goes back to pending. Batches still in flight when it ends are cancelled; their
        events stay in the journal past the cursor."""
        self._runs += 1
        if self._runs > 1:
            await self.dlq.release(self.name)
        if not self.started:
            await self._start_sink()
        # Pending DLQ entries (from an earlier run, or parked while the sink was sick) are
        # retried even without live traffic: one replay is the health probe, at a backoff
        # while it keeps failing; once one succeeds the rest replay at the configured rate.
        self._probe_at = time.monotonic()
        window = self._window = Window()
        try:
            while True:
                await self._step(window)
        finally:
            await window.cancel()

    async def _step(self, window: Window) -> None:
        """One turn of the loop: retire what ended, send more, wait for something to happen."""
        self._nudge.clear()
        if await self._retire(window):
            await self._maybe_replay()
        if not self.enabled():
            if window:  # let the batches already sent end; send no more
                await self._wait(window, more=False)
                return
            self.stats.state = "disabled"
            await self._nudge.wait()
            return
        read = await self._fill(window)
        if window:
            if window.in_flight():
                await self._wait(window, more=window.in_flight() < self.limit.current)
            return
        if read:
            return
        if self.stats.state not in ("open", "failing"):
            self.stats.state = "idle"
        if await self._maybe_replay():
            return
        timeout = None
        if self.dlq.depth(self.name) and self.auto_replay:
            timeout = self.replay_interval if self.healthy else max(0.05, self._probe_at - time.monotonic())
        if self._linger_at is not None:
            linger = max(0.0, self._linger_at - time.monotonic())
            timeout = linger if timeout is None else min(timeout, linger)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._nudge.wait()

    async def _fill(self, window: Window) -> bool:
        """Read and send batches while the limit allows. True if anything was read."""
        if not window:
            self._read_to = self.journal.cursors.get(self.name, 0)
        read = False
        ranges = self._ranges
        if ranges is not None:
            await ranges.load()
        while window.in_flight() < self.limit.current and len(window) < 4 * self.limit.maximum:
            after = self._read_to
            # An aggregating sink re-reads exactly the range it sent from here before, if any.
            known = ranges.get(after) if ranges is not None else None
            if known is None and self._lingering():
                return read
            self._linger_at = None
            rows, upto = await self.journal.read_batch(after, self.batch_size if known is None else known - after)
            if known is not None and (rows or upto >= known):
                rows = [r for r in rows if r[0] <= known]
                upto = known
            if not rows:
                if upto > self._read_to:  # only quarantined segments lay ahead (counted as journal_corrupt)
                    window.add(Batch(upto, None))
                    self._read_to = upto
                    read = True
                return read
            upto = max(upto, rows[-1][0])
            if ranges is not None and known is None:
                await ranges.persist(after, upto)  # before the first send: see batch_ranges
            task = asyncio.create_task(self._deliver_rows(rows, upto), name=f"sink:{self.name}:{upto}")
            window.add(Batch(upto, task))
            self._read_to = upto
            read = True
        return read

    async def _wait(self, window: Window, *, more: bool) -> None:
        """Until a batch's send ends or, when there is room for more (`more`), the journal grows."""
        waits: set[asyncio.Future[Any]] = set(window.pending())
        nudge = asyncio.ensure_future(self._nudge.wait()) if more else None
        if nudge is not None:
            waits.add(nudge)
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if nudge is not None:
                nudge.cancel()

    async def _retire(self, window: Window) -> bool:
        """Move the cursor past the batches at the front whose send ended, in order. A
        failed DLQ write cancels the rest and holds (they are read again from the cursor);
        any other error of a batch (a bug) ends run(), for the supervisor to restart it.
        True if the cursor moved."""
        moved = False
        while (batch := window.done_front()) is not None:
            task = batch.task
            if task is not None:
                exc = asyncio.CancelledError() if task.cancelled() else task.exception()
                if isinstance(exc, (DeadLetterWriteError, asyncio.CancelledError)):
                    await window.cancel()
                    if isinstance(exc, DeadLetterWriteError):
                        await self._hold(exc)
                    return moved
                if exc is not None:
                    raise exc
            self.journal.advance(self.name, batch.upto)
            self._hold_delay = HOLD_INITIAL_S
            moved = True
        return moved

    async def _start_sink(self) -> None:
        delay = 1.0
        while True:
            try:
                # Shielded: a stop that lands mid-start must not leave half-opened resources
                # (connections, threads) behind; close() waits for the start to finish.
                self._starting = asyncio.ensure_future(self.sink.start())
                await asyncio.shield(self._starting)
                self.started = True
                return
            except Exception as exc:
                raise_if_cancelling()
                self.stats.state = "failed"
                self.stats.last_error = f"start: {type(exc).__name__}: {exc}"
                log.error(
                    "sink %s (plugin %s) failed to start (retrying in %.0fs): %s",
                    self.name,
                    self.plugin or "?",
                    delay,
                    exc,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 60.0)

    async def _deliver_rows(self, rows: list[tuple[int, Event]], upto: int) -> None:
        """Send one batch read from the journal (the cursor goes to `upto` when it retires);
        aggregated first when the sink has `aggregate`."""
        # Events may be shared with other sinks and the live stream: sinks must not mutate them.
        events = [e for _, e in rows]
        percent = self.rollout()
        if percent < 100.0:
            # A stable hash of the id decides, so an event is always in or always out.
            # The agent's own events (flag audit, breaker changes) are never sampled out.
            chosen = [e for e in events if e.name.startswith(OWN_PREFIX) or in_rollout(e.id, percent)]
            self.stats.filtered += len(events) - len(chosen)
            events = chosen
        if events and self.aggregate_s:
            raw = len(events)
            first_seq, first = rows[0]  # with upto: the same persisted range on every re-send
            events = aggregate_batch(self.name, self.aggregate_s, first_seq, upto, first.id, events)
            self.stats.aggregated += raw - len(events)
        if events:
            self.stats.state = "sending"
            await self._deliver(events)

    async def _send(self, events: list[Event], tries: list[int] | None = None) -> None:
        """One request through the chain; `tries[0]` counts this request's attempts (the
        stats counter is shared by every batch in flight)."""

        def attempt() -> Awaitable[None]:
            self.stats.attempts += 1
            if tries is not None:
                tries[0] += 1
                if tries[0] == 2:  # a retry: the sink is struggling now, not when the batch ends
                    self.limit.congested()
            return self.sink.send(events)

        await self.chain.call(attempt)

    async def _deliver(self, events: list[Event]) -> None:
        """Send one live batch; on return it is delivered or in the DLQ."""
        first_attempt = time.time()
        while True:
            tries = [0]
            try:
                await self._send(events, tries)
            except CircuitOpenError as exc:
                # Wait for the breaker's probe slot; the batch stays ours (no DLQ).
                self.limit.congested()
                self.healthy = False
                self.stats.state = "open"
                await asyncio.sleep(max(0.05, exc.retry_after or 1.0))
                continue
            except PermanentError as exc:
                raise_if_cancelling()
                self._failed(exc)
                for part, error in await self._bisect(events, exc):
                    await self._dead_letter(part, error, 1, first_attempt)
                return
            except Exception as exc:  # RetryableError past its budget, or a sink bug
                raise_if_cancelling()
                if tries[0] <= 1:  # failed without a retry (a retry already counted as congestion)
                    self.limit.congested()
                self._failed(exc)
                if not isinstance(exc, RetryableError):
                    log.error("sink %s raised an unclassified error: %r", self.name, exc)
                await self._dead_letter(events, exc, tries[0], first_attempt)
                return
            if tries[0] == 1:
                self.limit.clean()
            self._succeeded(events)
            return

    async def _bisect(self, events: list[Event], exc: BaseException) -> list[tuple[list[Event], BaseException]]:
        """Split a batch that failed with `exc` (permanently): deliver the halves that go
        through and return the parts that do not, with their errors. A permanent failure
        is split down to single events; any other failure keeps its half whole."""
        if len(events) == 1:
            return [(events, exc)]
        failed: list[tuple[list[Event], BaseException]] = []
        mid = len(events) // 2
        for half in (events[:mid], events[mid:]):
            try:
                await self._send(half)
            except PermanentError as inner:
                raise_if_cancelling()
                failed += await self._bisect(half, inner)
            except Exception as inner:
                raise_if_cancelling()
                failed.append((half, inner))
            else:
                self._succeeded(half)
        return failed

    async def _dead_letter(self, events: list[Event], exc: BaseException, attempts: int, first: float) -> None:
        """Park a failed part of a live batch in the DLQ: the one place a batch is dead-lettered."""
        try:
            await self.dlq.put(self.name, events, exc, max(1, attempts), first)
        except Exception as put_exc:
            raise_if_cancelling()
            raise DeadLetterWriteError(f"{type(put_exc).__name__}: {put_exc}") from put_exc
        deadletter_log.report(self, len(events), exc)  # a WARNING naming the sink and the error, throttled
        self._probe_at = time.monotonic() + self._probe_delay  # the sink just failed: no instant replay
        self.stats.dead_lettered += len(events)

    async def _hold(self, exc: DeadLetterWriteError) -> None:
        """A failed batch could not be parked: keep the cursor, wait, then read it again."""
        self.healthy = False
        self.stats.state = "failing"
        self.stats.last_error = f"dead-letter write failed: {exc}"
        log.error(
            "sink %s: a failed batch could not be dead-lettered (%s); it stays journaled, retried in %.1fs",
            self.name,
            exc,
            self._hold_delay,
        )
        await asyncio.sleep(self._hold_delay)
        self._hold_delay = min(self._hold_delay * 2, HOLD_MAX_S)

    def _succeeded(self, events: list[Event]) -> None:
        self.stats.sent += len(events)
        self.stats.batches += 1
        self.stats.last_success = time.time()
        self.stats.state = "ok"
        self.healthy = True

    def _failed(self, exc: BaseException) -> None:
        self.stats.failed += 1
        self.stats.last_error = f"{type(exc).__name__}: {exc}"
        self.stats.state = "failing"
        self.healthy = False

    async def close(self) -> None:
        """Close the sink (after the worker task is done), also when a stop interrupted its
        start; then its policies (whether or not the sink ever started)."""
        starting = self._starting
        if starting is not None and not starting.done():
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(starting, 10)
        if self.started or (
            starting is not None and starting.done() and not starting.cancelled() and starting.exception() is None
        ):
            try:
                await self.sink.close()
            except Exception as exc:
                log.error("sink %s failed to close: %s", self.name, exc)
        await self.chain.close()

    def describe(self) -> dict[str, Any]:
        """State, counters and lag for /api/v1/sinks."""
        lag = self.journal.lag(self.name)
        s = self.stats
        sup = self.supervision
        return {
            "name": self.name,
            "plugin": self.plugin,
            # Never a stale "ok" for a worker that is down: the supervisor's state wins.
            "state": s.state if sup is None or sup.state == "running" else sup.state,
            "restarts": sup.restarts if sup is not None else 0,
            "enabled": self.enabled(),
            "rollout_percent": self.rollout(),
            "lag_events": lag,
            "in_flight": self._window.in_flight(),
            "max_in_flight": self.limit.maximum,
            "concurrency_limit": self.limit.current,
            "sent": s.sent,
            "failed": s.failed,
            "attempts": s.attempts,
            "retried": max(0, s.attempts - s.batches - s.failed),
            "dead_lettered": s.dead_lettered,
            "replayed": s.replayed,
            "filtered": s.filtered,
            "aggregate_s": self.aggregate_s,
            "aggregated": s.aggregated,
            "dlq_pending": self.dlq.depth(self.name),
            "last_error": s.last_error or self.dlq.last_error.get(self.name),
            "last_success": s.last_success,
            "policies": {k: _plain(v) for k, v in s.extra.items()},
        }


def _plain(v: Any) -> Any:
    return v() if callable(v) else v
