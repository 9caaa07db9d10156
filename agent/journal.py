"""The journal: every accepted event, durably, until every sink has confirmed it.

Rows are (seq, msgpack body). Each sink has a cursor (the last seq it confirmed);
rows at or below every active sink's cursor are compacted. The payload size is capped
by `max_bytes`: `drop_oldest` deletes the oldest rows (counted as `journal_full`),
`reject` refuses new batches with JournalFullError.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time

from . import losses
from .db import Database
from .errors import JournalFullError
from .losses import LossLedger

log = logging.getLogger("sidecar_agent.journal")

ROW_OVERHEAD = 16  # approximate bytes per row beyond its body (rowid, record header, cell pointer)
COMPACT_CHUNK = 20_000


class Journal:
    """Append, read after a cursor, move cursors, compact, cap."""

    def __init__(
        self, db: Database, ledger: LossLedger, *, max_bytes: int, overflow: str = "drop_oldest"
    ) -> None:
        self.db = db
        self.ledger = ledger
        self.max_bytes = max_bytes
        self.overflow = overflow
        self.last_seq = 0
        self.first_seq = 1  # lowest seq that may still be stored
        self.rows = 0
        self.bytes = 0
        self.cursors: dict[str, int] = {}
        self._dirty_cursors: set[str] = set()
        self._waiters: set[asyncio.Event] = set()
        self.disk_error: str | None = None
        self._append_lock = asyncio.Lock()  # seqs are assigned in memory: one append at a time

    async def open(self) -> None:
        """Read sequence, size, cursors and the persisted loss ledger."""
        rows = await self.db.fetchall("SELECT seq FROM sqlite_sequence WHERE name = 'journal'")
        self.last_seq = rows[0][0] if rows else 0
        (count, size, low), = await self.db.fetchall(
            "SELECT count(*), coalesce(sum(length(body)), 0), min(seq) FROM journal"
        )
        self.rows, self.bytes = count, size + count * ROW_OVERHEAD
        self.first_seq = low if low is not None else self.last_seq + 1
        self.cursors = {s: q for s, q in await self.db.fetchall("SELECT sink, seq FROM cursors")}
        self.ledger.load([(r, s, n) for r, s, n in await self.db.fetchall("SELECT reason, sink, count FROM losses")])

    # -- sinks ---------------------------------------------------------------------

    def attach(self, sinks: list[str]) -> None:
        """Set the active sinks. A new sink starts at the end of the journal; cursors of
        sinks no longer configured are forgotten (they would block compaction forever)."""
        for name in list(self.cursors):
            if name not in sinks:
                del self.cursors[name]
                self._dirty_cursors.add(name)
        for name in sinks:
            if name not in self.cursors:
                self.cursors[name] = self.last_seq
                self._dirty_cursors.add(name)

    def advance(self, sink: str, seq: int) -> None:
        """Record that `sink` confirmed everything up to `seq` (persisted at checkpoint)."""
        if seq > self.cursors.get(sink, 0):
            self.cursors[sink] = seq
            self._dirty_cursors.add(sink)

    def lag(self, sink: str) -> int:
        """Events journaled but not yet confirmed by `sink`."""
        cursor = max(self.cursors.get(sink, self.last_seq), self.first_seq - 1)
        return max(0, self.last_seq - cursor)

    def waiter(self) -> asyncio.Event:
        """An Event set whenever new rows are committed."""
        ev = asyncio.Event()
        self._waiters.add(ev)
        return ev

    # -- writing -------------------------------------------------------------------

    async def append(self, bodies: list[bytes]) -> tuple[int, int]:
        """Commit bodies in one transaction; return their (first, last) seq.

        This commit is the acknowledgement point. Raises JournalFullError under the
        `reject` policy, sqlite3.Error on disk failure (nothing is committed then).
        """
        async with self._append_lock:
            return await self._append(bodies)

    async def _append(self, bodies: list[bytes]) -> tuple[int, int]:
        size = sum(map(len, bodies)) + ROW_OVERHEAD * len(bodies)
        if self.bytes + size > self.max_bytes:
            if self.overflow == "reject":
                raise JournalFullError(f"journal is full ({self.bytes} of {self.max_bytes} bytes)")
            await self._drop_oldest(self.bytes + size - int(self.max_bytes * 0.9))
        first = self.last_seq + 1
        rows = list(zip(range(first, first + len(bodies)), bodies))
        async with self.db.tx() as conn:
            await conn.executemany("INSERT INTO journal (seq, body) VALUES (?, ?)", rows)
        self.last_seq = first + len(bodies) - 1
        self.rows += len(bodies)
        self.bytes += size
        self.disk_error = None
        for ev in self._waiters:
            ev.set()
        return first, self.last_seq

    async def _drop_oldest(self, need: int) -> int:
        """Delete the oldest rows until `need` bytes are free; count them as lost."""
        if self.rows == 0 or need <= 0:
            return 0
        avg = max(1, self.bytes // self.rows)
        n = min(self.rows, need // avg + 1)
        async with self.db.tx() as conn:
            cur = await conn.execute(
                "DELETE FROM journal WHERE seq IN (SELECT seq FROM journal ORDER BY seq LIMIT ?)"
                " RETURNING seq, length(body)",
                (n,),
            )
            deleted = await cur.fetchall()
        self._forget(deleted)
        log.warning("journal over its cap: dropped the %d oldest events", len(deleted))
        self.ledger.add(losses.JOURNAL_FULL, len(deleted))
        return len(deleted)

    def _forget(self, deleted: list[tuple[int, int]]) -> None:
        if not deleted:
            return
        self.rows -= len(deleted)
        self.bytes -= sum(n for _, n in deleted) + ROW_OVERHEAD * len(deleted)
        self.first_seq = max(self.first_seq, max(s for s, _ in deleted) + 1)

    async def free_space(self) -> int:
        """After a disk-full error: drop the oldest tenth (counted) so writes can go on."""
        async with self._append_lock:
            return await self._drop_oldest(max(1, self.bytes // 10))

    # -- reading -------------------------------------------------------------------

    async def read(self, after: int, limit: int) -> list[tuple[int, bytes]]:
        """Rows with seq > after, oldest first."""
        return await self.db.fetchall(
            "SELECT seq, body FROM journal WHERE seq > ? ORDER BY seq LIMIT ?", (after, limit)
        )

    # -- housekeeping --------------------------------------------------------------

    async def checkpoint(self) -> None:
        """Persist moved cursors and changed loss counters, then compact."""
        dirty = [(s, self.cursors.get(s)) for s in self._dirty_cursors]
        self._dirty_cursors.clear()
        counts = self.ledger.take_dirty()
        if dirty or counts:
            try:
                async with self.db.tx() as conn:
                    for sink, seq in dirty:
                        if seq is None:
                            await conn.execute("DELETE FROM cursors WHERE sink = ?", (sink,))
                        else:
                            await conn.execute(
                                "INSERT INTO cursors (sink, seq) VALUES (?, ?)"
                                " ON CONFLICT (sink) DO UPDATE SET seq = excluded.seq",
                                (sink, seq),
                            )
                    await conn.executemany(
                        "INSERT INTO losses (reason, sink, count) VALUES (?, ?, ?)"
                        " ON CONFLICT (reason, sink) DO UPDATE SET count = excluded.count",
                        counts,
                    )
            except sqlite3.Error:
                # Keep them dirty so the next checkpoint retries.
                self._dirty_cursors.update(s for s, _ in dirty)
                self.ledger.mark_dirty([(r, s) for r, s, _ in counts])
                raise
        await self.compact()

    async def compact(self) -> int:
        """Delete rows every active sink has confirmed. Returns how many were deleted."""
        upto = min(self.cursors.values()) if self.cursors else self.last_seq
        total = 0
        while self.first_seq <= upto:
            async with self.db.tx() as conn:
                cur = await conn.execute(
                    "DELETE FROM journal WHERE seq >= ? AND seq <= ? RETURNING seq, length(body)",
                    (self.first_seq, min(upto, self.first_seq + COMPACT_CHUNK - 1)),
                )
                deleted = await cur.fetchall()
            self._forget(deleted)
            self.first_seq = max(self.first_seq, min(upto, self.first_seq + COMPACT_CHUNK - 1) + 1)
            total += len(deleted)
            await asyncio.sleep(0)  # let intake commit between chunks
        return total

    def stats(self) -> dict[str, float | int | str | None]:
        """Figures for status and /metrics."""
        return {
            "rows": self.rows,
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
            "last_seq": self.last_seq,
            "first_seq": self.first_seq,
            "disk_error": self.disk_error,
            "checked_at": time.time(),
        }
