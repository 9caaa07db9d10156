"""The loss ledger: one counter per (reason, sink) for every event the agent drops.

Counting is thread-safe (record() drops happen on the caller's thread). The journal
persists the ledger, so it survives restarts.
"""

from __future__ import annotations

import threading

# Reasons used by the core; plugins may add their own.
INTAKE_FULL = "intake_full"
INVALID = "invalid"
JOURNAL_FULL = "journal_full"
DLQ_EXPIRED = "dlq_expired"
DLQ_PURGED = "dlq_purged"
DLQ_FULL = "dlq_full"
SHUTDOWN_TIMEOUT = "shutdown_timeout"
NOT_STARTED = "not_started"
STOPPED = "stopped"  # record() after stop()
START_FAILED = "start_failed"  # record() on an agent whose start() raised, or left queued by it
DISK_ERROR = "disk_error"
JOURNAL_CORRUPT = "journal_corrupt"  # journaled events in a segment that no longer decodes, or unreadable
STREAM_DROPPED = "stream_dropped"  # live-stream events a slow WebSocket client missed (still journaled)


class LossLedger:
    """Counts drops by reason and (optionally) sink."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[tuple[str, str], int] = {}
        self._dirty: set[tuple[str, str]] = set()

    def add(self, reason: str, n: int = 1, sink: str = "") -> None:
        """Count n events dropped for `reason` (and `sink`, when one sink lost them)."""
        if n <= 0:
            return
        key = (reason, sink)
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + n
            self._dirty.add(key)

    def load(self, rows: list[tuple[str, str, int]]) -> None:
        """Restore persisted counts (added to anything counted before the load)."""
        with self._lock:
            for reason, sink, n in rows:
                key = (reason, sink)
                self._counts[key] = self._counts.get(key, 0) + n

    def take_dirty(self) -> list[tuple[str, str, int]]:
        """Counts changed since the last call, for persistence."""
        with self._lock:
            out = [(r, s, self._counts[(r, s)]) for r, s in self._dirty]
            self._dirty.clear()
        return out

    def mark_dirty(self, keys: list[tuple[str, str]]) -> None:
        """Mark counters for persistence again (after a failed write)."""
        with self._lock:
            self._dirty.update(keys)

    def snapshot(self) -> dict[tuple[str, str], int]:
        """A copy of every counter."""
        with self._lock:
            return dict(self._counts)

    def total(self) -> int:
        """All events dropped, for every reason."""
        with self._lock:
            return sum(self._counts.values())

    def by_reason(self) -> dict[str, int]:
        """Totals per reason, summed over sinks."""
        out: dict[str, int] = {}
        for (reason, _), n in self.snapshot().items():
            out[reason] = out.get(reason, 0) + n
        return out
