"""The record() fast path, shared by the owner's intake (pipeline.intake.Committer) and a
forwarder (forwarding.forwarder.Forwarder): a tuple appended to a bounded deque from any
thread, and a threshold wake-up that cannot be lost (pipeline/intake.py's docstring
gives the argument). Each subclass says how it is woken (`_wake_up`) and re-arms the
threshold (`_rearm`) just before it drains."""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from typing import Any, Protocol

from agent import losses
from agent.losses import LossLedger

# A record() call as stored in the deque: (name, value, kind, tags, ts, data, session_id).
Recorded = tuple[Any, Any, Any, Any, float, Any, Any]
NEVER = 1 << 62  # a _signal_at no deque reaches
_time = time.time


class RecordFn(Protocol):
    """The signature of record()."""

    def __call__(
        self,
        name: str,
        value: float | None = None,
        *,
        kind: str | None = None,
        tags: dict[str, str] | None = None,
        ts: float | None = None,
        data: dict[str, Any] | None = None,
        session_id: str | None = None,
    ) -> None: ...


class RecordQueue:
    """A bounded deque record() appends to, and the wake-up of whoever drains it."""

    def __init__(self, ledger: LossLedger, *, capacity: int, commit_batch: int, signal_at: int) -> None:
        self.ledger = ledger
        self.capacity = capacity
        self.commit_batch = commit_batch
        # The producing process, tagged as `pid` on each recorded event where the deque is
        # drained, off the caller's thread. Taken here, not at import: a process forked
        # before it started an agent must not tag its parent's pid.
        self.pid_tag = str(os.getpid())
        self.records: deque[Any] = deque()  # at most `capacity` wait
        # None while accepting; once closed, the ledger reason for a refused record().
        self.refused: str | None = None
        self._signal_at = signal_at  # the deque length at which record() must signal
        # Re-entrant: a signal handler may call record() while its thread holds the lock.
        self._signal_lock = threading.RLock()

    def record(
        self,
        name: str,
        value: float | None = None,
        *,
        kind: str | None = None,
        tags: dict[str, str] | None = None,
        ts: float | None = None,
        data: dict[str, Any] | None = None,
        session_id: str | None = None,
    ) -> None:
        """Record one event. Thread-safe, non-blocking; counted as `intake_full` when full.
        (agent.embed.record inlines this body for speed: change both alike.)
        It is checked later, off the caller's thread; what fails is counted as `invalid`."""
        q = self.records
        if len(q) >= self.capacity or self.refused:
            self.ledger.add(self.refused or losses.INTAKE_FULL)
            return
        q.append((name, value, kind, tags, ts or _time(), data, session_id))
        if len(q) >= self._signal_at:
            self._signal()

    def _signal(self) -> None:
        """The deque reached `_signal_at`: wake the drain, or cut its window short."""
        with self._signal_lock:
            n = len(self.records)
            if n < self._signal_at:  # drained meanwhile, or another caller signalled
                return
            self._signal_at = self.commit_batch if n < self.commit_batch else NEVER
        self._wake_up(n)

    def _rearm(self) -> None:
        """Before a drain: the next record() signals again (never after the drain)."""
        with self._signal_lock:
            self._signal_at = 1

    def _wake_up(self, n: int) -> None:
        """Wake whoever drains the deque, which holds `n` records."""
        raise NotImplementedError
