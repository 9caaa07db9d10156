"""The journal: every accepted event, durably, until every sink has confirmed it.

Each group commit is one row, a *segment*: a msgpack array of events numbered
first_seq..seq, with a checksum per event (agent/storage/segment.py). Event seqs
are never reused. Each sink has a cursor (the last event seq it confirmed); segments
at or below every active sink's cursor are compacted.
The payload size is capped by `max_bytes`: `drop_oldest` deletes the oldest segments
(their events counted as `journal_full`), `reject` refuses new batches with
JournalFullError.

Recent segments are also kept decoded in memory (the tail), so sinks that keep up
never read back from SQLite; a sink catching up after an outage or a restart reads
segments from the database.

A segment read back that no longer decodes (damaged bytes), or whose events do not
match its seqs, is moved to the `journal_quarantine` table with its bytes. Its events
whose own checksum still holds go back into the journal (one row per run of consecutive
ones); only the others are counted under `journal_corrupt`, and every sink reads on past
the hole (`read_batch` says how far a cursor may move). A cursor that is not a plausible seq
is reset to the start of the journal: its sink receives again what is still stored.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence

from agent import losses
from agent.errors import JournalFullError
from agent.event import Event
from agent.losses import LossLedger
from agent.storage import segment
from agent.storage.database import Database
from agent.storage.salvage import NEW_SINKS_FROM

log = logging.getLogger("sidecar_agent.journal")

SEGMENT_OVERHEAD = 40  # approximate bytes per segment row beyond its body
TAIL_EVENTS = 50_000  # decoded events kept in memory for sinks that keep up
DECODED_CACHE = 8  # segments read back from SQLite, kept decoded for sequential readers
COMPACT_CHUNK = 500  # segments deleted per transaction

Segment = tuple[int, int, list[Event]]  # (first_seq, last_seq, events)
_ROW_BYTES = "length(body) + coalesce(length(frames), 0)"
_UPSERT_CURSOR = "INSERT INTO cursors (sink, seq) VALUES (?, ?) ON CONFLICT (sink) DO UPDATE SET seq = excluded.seq"


def _nothing() -> None:
    pass


class Journal:
    """Append, read after a cursor, move cursors, compact, cap."""

    def __init__(self, db: Database, ledger: LossLedger, *, max_bytes: int, overflow: str = "drop_oldest") -> None:
        self.db = db
        self.ledger = ledger
        self.max_bytes = max_bytes
        self.overflow = overflow
        self.last_seq = 0
        self.first_seq = 1  # lowest event seq that may still be stored
        self.rows = 0  # events stored
        self.segments = 0
        self.bytes = 0
        self.cursors: dict[str, int] = {}
        self._dirty_cursors: set[str] = set()
        self._waiters: set[asyncio.Event] = set()
        self.on_advance: Callable[[], None] = _nothing  # told when a cursor moves (Agent.flush waits on it)
        self._tail: deque[Segment] = deque()
        self._tail_events = 0
        self._decoded: OrderedDict[int, Segment] = OrderedDict()
        self.disk_error: str | None = None
        self.quarantined = 0  # segments moved to journal_quarantine by this process
        self._new_sinks_from: int | None = None  # after a salvage that lost cursors: see attach()
        self._append_lock = asyncio.Lock()  # seqs are assigned in memory: one append at a time
        self._freed = False  # rows were deleted since the last reclaim: the freelist may be large

    async def open(self) -> None:
        """Read sequence, size, cursors and the persisted loss ledger."""
        rows = await self.db.fetchall("SELECT seq FROM sqlite_sequence WHERE name = 'journal'")
        ((segments, count, size, low, high),) = await self.db.fetchall(
            f"SELECT count(*), coalesce(sum(count), 0), coalesce(sum({_ROW_BYTES}), 0), min(first_seq), max(seq)"
            " FROM journal"
        )
        self.last_seq = max(rows[0][0] if rows and isinstance(rows[0][0], int) else 0, high or 0)
        self.segments, self.rows = segments, count
        self.bytes = size + segments * SEGMENT_OVERHEAD
        self.first_seq = low if low is not None else self.last_seq + 1
        self.cursors = {}
        for sink, seq in await self.db.fetchall("SELECT sink, seq FROM cursors"):
            if not isinstance(seq, int) or not 0 <= seq <= self.last_seq:
                # Damaged: the sink's real position is unknown. Resending what is still
                # journaled (duplicates) is safe; guessing a later position could lose events.
                log.error("cursor of sink %r is not a valid seq (%r): it receives the journal again", sink, seq)
                seq = self.first_seq - 1
                self._dirty_cursors.add(str(sink))
            self.cursors[str(sink)] = seq
        meta = await self.db.fetchall("SELECT value FROM meta WHERE key = ?", (NEW_SINKS_FROM,))
        if meta:
            self._new_sinks_from = int(meta[0][0])
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
                # After a salvage whose cursors could not all be read, a sink without one
                # starts at the salvaged journal's start (it may receive some events again).
                start = self.last_seq if self._new_sinks_from is None else min(self._new_sinks_from, self.last_seq)
                self.cursors[name] = start
                self._dirty_cursors.add(name)

    def advance(self, sink: str, seq: int) -> None:
        """Record that `sink` confirmed everything up to `seq` (persisted at checkpoint)."""
        if seq > self.cursors.get(sink, 0):
            self.cursors[sink] = seq
            self._dirty_cursors.add(sink)
            self.on_advance()

    def lag(self, sink: str) -> int:
        """Events journaled but not yet confirmed by `sink`."""
        cursor = max(self.cursors.get(sink, self.last_seq), self.first_seq - 1)
        return max(0, self.last_seq - cursor)

    def waiter(self) -> asyncio.Event:
        """An Event set whenever new events are committed."""
        ev = asyncio.Event()
        self._waiters.add(ev)
        return ev

    # -- writing -------------------------------------------------------------------

    async def append(self, events: list[Event]) -> tuple[int, int]:
        """Commit events as one segment; return their (first, last) seq.

        This commit is the acknowledgement point. Raises JournalFullError under the
        `reject` policy, sqlite3.Error on disk failure (nothing is committed then).
        """
        async with self._append_lock:
            return await self._append(events)

    async def _append(self, events: list[Event]) -> tuple[int, int]:
        body, frames = segment.encode(events)
        size = len(body) + len(frames or b"") + SEGMENT_OVERHEAD  # frames None: format 0 (bench baseline)
        if self.bytes + size > self.max_bytes:
            if self.overflow == "reject":
                raise JournalFullError(f"journal is full ({self.bytes} of {self.max_bytes} bytes)")
            await self._drop_oldest(self.bytes + size - int(self.max_bytes * 0.9))
        first, last = self.last_seq + 1, self.last_seq + len(events)
        # Cursors that moved ride along in the same transaction (no extra fsync), so after a
        # crash a sink re-receives at most what it confirmed since the last commit.
        moved = [(s, self.cursors[s]) for s in self._dirty_cursors if s in self.cursors]
        async with self.db.tx() as conn:
            await conn.execute(
                "INSERT INTO journal (seq, first_seq, count, body, frames) VALUES (?, ?, ?, ?, ?)",
                (last, first, len(events), body, frames),
            )
            if moved:
                await conn.executemany(_UPSERT_CURSOR, moved)
        for sink, seq in moved:
            if self.cursors.get(sink) == seq:
                self._dirty_cursors.discard(sink)
        self.last_seq = last
        self.rows += len(events)
        self.segments += 1
        self.bytes += size
        self.disk_error = None
        self._tail.append((first, last, events))
        self._tail_events += len(events)
        while self._tail_events > TAIL_EVENTS and len(self._tail) > 1:
            self._tail_events -= len(self._tail.popleft()[2])
        for ev in self._waiters:
            ev.set()
        return first, last

    async def _drop_oldest(self, need: int) -> int:
        """Delete the oldest segments until `need` bytes are free; count their events as lost."""
        if self.segments == 0 or need <= 0:
            return 0
        avg = max(1, self.bytes // self.segments)
        n = min(self.segments, need // avg + 1)
        async with self.db.tx() as conn:
            deleted = list(
                await conn.execute_fetchall(
                    "DELETE FROM journal WHERE seq IN (SELECT seq FROM journal ORDER BY seq LIMIT ?)"
                    f" RETURNING seq, count, {_ROW_BYTES}",
                    (n,),
                )
            )
        dropped = self._forget(deleted)
        log.warning("journal over its cap: dropped the %d oldest events", dropped)
        self.ledger.add(losses.JOURNAL_FULL, dropped)
        return dropped

    def _forget(self, deleted: Sequence[Sequence[int]]) -> int:
        """Account for deleted segments (seq, count, bytes); returns their events."""
        if not deleted:
            return 0
        self._freed = True
        events = sum(c for _, c, _ in deleted)
        self.rows -= events
        self.segments -= len(deleted)
        self.bytes -= sum(n for _, _, n in deleted) + SEGMENT_OVERHEAD * len(deleted)
        upto = max(s for s, _, _ in deleted)
        self.first_seq = max(self.first_seq, upto + 1)
        while self._tail and self._tail[0][1] <= upto:
            self._tail_events -= len(self._tail.popleft()[2])
        for seq in [s for s in self._decoded if s <= upto]:
            del self._decoded[seq]
        return events

    async def free_space(self) -> int:
        """After a disk-full error: drop the oldest tenth (counted) so writes can go on."""
        async with self._append_lock:
            return await self._drop_oldest(max(1, self.bytes // 10))

    # -- reading -------------------------------------------------------------------

    async def read(self, after: int, limit: int) -> list[tuple[int, Event]]:
        """Up to `limit` (seq, event) pairs with seq > after, oldest first."""
        return (await self.read_batch(after, limit))[0]

    async def read_batch(self, after: int, limit: int) -> tuple[list[tuple[int, Event]], int]:
        """Up to `limit` (seq, event) pairs with seq > after, oldest first, and the seq a
        reader's cursor may move to once it has them: past the last pair, and past any
        quarantined segment (a hole) behind them, so a hole never stalls a sink."""
        after = max(after, self.first_seq - 1)
        known = self.last_seq  # committed before the reads below begin: they see it
        if after >= known:
            return [], after
        if self._tail and self._tail[0][0] <= after + 1:
            segments: list[Segment] = [s for s in self._tail if s[1] > after]
            upto = known
        else:
            segments, upto = await self._read_segments(after, limit, known)
        out: list[tuple[int, Event]] = []
        for first, _last, events in segments:
            start = max(0, after + 1 - first)
            for i in range(start, len(events)):
                out.append((first + i, events[i]))
                if len(out) >= limit:
                    return out, first + i
        return out, max(upto, out[-1][0] if out else after)

    async def _read_segments(self, after: int, limit: int, known: int) -> tuple[list[Segment], int]:
        """Segments after `after` from the database, and how far they (with any holes
        left by quarantined segments) reach: `known` when nothing is stored past them."""
        found: list[Segment] = []
        need, cursor = limit, after
        while need > 0:
            rows = await self.db.fetchall("SELECT seq FROM journal WHERE seq > ? ORDER BY seq LIMIT 16", (cursor,))
            if not rows:
                return found, max(cursor, known)
            for (seq,) in rows:
                seg = self._decoded.get(seq)
                if seg is None:
                    got = await self.db.fetchall(
                        "SELECT first_seq, seq, count, body, frames FROM journal WHERE seq = ?", (seq,)
                    )
                    if not got:
                        continue  # compacted meanwhile
                    first, last, count, body, frames = got[0]
                    try:
                        seg = (first, last, segment.decode(first, last, count, body, frames))
                    except segment.CorruptSegment as exc:
                        await self._quarantine(seq, first, count, body, frames, str(exc))
                        break  # read on from `cursor`: the intact events are rows of their own now
                    self._decoded[seq] = seg
                    while len(self._decoded) > DECODED_CACHE:
                        self._decoded.popitem(last=False)
                found.append(seg)
                need -= seg[1] - max(seg[0] - 1, after)
                cursor = seq
                if need <= 0:
                    break
        return found, cursor

    async def _quarantine(
        self, seq: int, first: int, count: int, body: bytes, frames: bytes | None, error: str
    ) -> None:
        """Move a segment that does not decode to journal_quarantine (bytes kept), put back
        its events that still read (segment.recover: one row per run of consecutive ones)
        and count the rest under `journal_corrupt`. Idempotent: of two readers, one moves it."""
        runs, lost = segment.recover(first, seq, count, body, frames)
        rows = [(start + len(evs) - 1, start, len(evs), *segment.encode(evs)) for start, evs in runs]
        async with self.db.tx() as conn:
            gone = list(
                await conn.execute_fetchall(f"DELETE FROM journal WHERE seq = ? RETURNING {_ROW_BYTES}", (seq,))
            )
            if gone:
                await conn.execute(
                    "INSERT INTO journal_quarantine (seq, first_seq, count, body, frames, error, quarantined)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        seq,
                        first,
                        lost,
                        body if isinstance(body, bytes) else b"",
                        frames if isinstance(frames, bytes) else None,
                        error[:2000],
                        time.time(),
                    ),
                )
                await conn.executemany(
                    "INSERT INTO journal (seq, first_seq, count, body, frames) VALUES (?, ?, ?, ?, ?)", rows
                )
        if not gone:
            return
        kept = sum(n for _, _, n, _, _ in rows)
        self.rows += kept - (count if isinstance(count, int) else 0)
        self.segments += len(rows) - 1
        self.bytes += sum(len(b) + len(f) + SEGMENT_OVERHEAD for _, _, _, b, f in rows)
        self.bytes -= (gone[0][0] or 0) + SEGMENT_OVERHEAD
        if isinstance(first, int) and first <= self.first_seq:
            self.first_seq = rows[0][1] if rows else seq + 1
        self._decoded.pop(seq, None)
        self._freed = True
        self.quarantined += 1
        self.ledger.add(losses.JOURNAL_CORRUPT, lost)
        log.error(
            "journal segment %s..%s does not decode (%s): moved to journal_quarantine; %d of its events still"
            " read and stay journaled, %d counted as %s",
            first,
            seq,
            error,
            kept,
            lost,
            losses.JOURNAL_CORRUPT,
        )

    # -- housekeeping --------------------------------------------------------------

    async def checkpoint(self) -> None:
        """Persist moved cursors and changed loss counters, compact, and give free pages back."""
        dirty = [(s, self.cursors.get(s)) for s in self._dirty_cursors]
        self._dirty_cursors.clear()
        counts = self.ledger.take_dirty()
        salvaged = self._new_sinks_from is not None and bool(self.cursors)
        if dirty or counts or salvaged:
            try:
                async with self.db.tx() as conn:
                    if salvaged:  # every attached sink's start is about to be persisted
                        await conn.execute("DELETE FROM meta WHERE key = ?", (NEW_SINKS_FROM,))
                    for sink, seq in dirty:
                        if seq is None:
                            await conn.execute("DELETE FROM cursors WHERE sink = ?", (sink,))
                        else:
                            await conn.execute(_UPSERT_CURSOR, (sink, seq))
                    await conn.executemany(
                        "INSERT INTO losses (reason, sink, count) VALUES (?, ?, ?)"
                        " ON CONFLICT (reason, sink) DO UPDATE SET count = excluded.count",
                        counts,
                    )
            except Exception:
                # Keep them dirty so the next checkpoint retries.
                self._dirty_cursors.update(s for s, _ in dirty)
                self.ledger.mark_dirty([(r, s) for r, s, _ in counts])
                raise
            if salvaged:
                self._new_sinks_from = None
        await self.compact()
        if self._freed:  # give space back once a backlog has drained (bounded steps; see Database.reclaim)
            self._freed = False
            self._freed = not await self.db.reclaim()

    async def compact(self) -> int:
        """Delete segments every active sink has confirmed. Returns how many events went."""
        upto = min(self.cursors.values()) if self.cursors else self.last_seq
        total = 0
        while self.segments and self.first_seq <= upto:
            async with self.db.tx() as conn:
                # One call into aiosqlite's thread (execute_fetchall), never execute() then
                # fetchall(): a cancel between the two would leave the DELETE ... RETURNING
                # unfinished, and SQLite then refuses every later COMMIT on this connection
                # ("SQL statements in progress"), the shutdown's checkpoint included.
                deleted = list(
                    await conn.execute_fetchall(
                        "DELETE FROM journal WHERE seq IN (SELECT seq FROM journal WHERE seq <= ? ORDER BY seq LIMIT ?)"
                        f" RETURNING seq, count, {_ROW_BYTES}",
                        (upto, COMPACT_CHUNK),
                    )
                )
            if not deleted:
                break  # the rest of the oldest segment is still needed by some sink
            total += self._forget(deleted)
            await asyncio.sleep(0)  # let intake commit between chunks
        return total

    def stats(self) -> dict[str, float | int | str | None]:
        """Figures for status and /metrics."""
        return {
            "rows": self.rows,
            "segments": self.segments,
            "bytes": self.bytes,
            "max_bytes": self.max_bytes,
            "last_seq": self.last_seq,
            "first_seq": self.first_seq,
            "disk_error": self.disk_error,
            "quarantined_segments": self.quarantined,
            "checked_at": time.time(),
        }
