"""Salvage from a quarantined agent.db: what can still be read goes into the fresh one.

When `Database.open` finds agent.db corrupt, it moves the file aside and starts a fresh
one; then `salvage_into` reads the file moved aside (a copy of it: the original is kept
as found) and copies into the fresh database, in order:

- every journal segment that still decodes, with its seqs (the high-water mark too, so
  seqs are never reused); a segment that does not decode goes to `journal_quarantine`
  with its bytes, and what still reads in it (each event whose checksum holds, see
  segment.py) goes back into the journal; only the rest is counted under `journal_corrupt`;
- every cursor that is still a plausible seq. If the cursors table cannot be read whole,
  a sink without a cursor starts at the salvaged journal's start (meta key
  `journal.new_sinks_from`): it may receive events again, it loses none;
- the loss ledger, and the DLQ entries whose events still decode (others are counted
  under `journal_corrupt` for their sink);
- events that were journaled but whose rows cannot be read at all are counted under
  `journal_corrupt` too: the seqs not covered by any readable segment, between the
  lowest readable cursor and the old high-water mark (an estimate when those are lost).

A file whose 100-byte header is damaged is read through a copy with a rebuilt header
(the page size is found by trying each one). Pages SQLite cannot read are skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import losses
from agent.event import stored_batch_decoder
from agent.storage import segment

if TYPE_CHECKING:
    from agent.storage.database import Database

log = logging.getLogger("sidecar_agent.db")

SALVAGE_KEY = "salvage"  # meta key: the last salvage's report (JSON)
NEW_SINKS_FROM = "journal.new_sinks_from"  # meta key: where a sink without a cursor starts (Journal.attach)
PAGE_SIZES = (4096, 1024, 2048, 8192, 16384, 32768, 65536, 512)
_DLQ_COLUMNS = (
    "sink, events, count, error_class, error, attempts, first_attempt, last_attempt, status, created, updated"
)


@dataclass
class Report:
    """What a salvage found; kept in the fresh file's meta table and shown in status."""

    source: str
    segments: int = 0  # copied into the fresh journal
    events: int = 0
    corrupt_segments: int = 0  # moved to journal_quarantine
    corrupt_events: int = 0
    unreadable_events: int = 0  # journaled, but no readable row holds them
    cursors: dict[str, int] = field(default_factory=dict)
    cursors_lost: bool = False
    dlq_entries: int = 0
    header_rebuilt: bool = False
    error: str | None = None  # why nothing (more) could be read

    @property
    def lost(self) -> int:
        return self.corrupt_events + self.unreadable_events


@dataclass
class _Found:
    report: Report
    last_seq: int = 0
    segments: list[tuple[int, int, int, bytes, bytes | None]] = field(default_factory=list)  # journal rows
    corrupt: list[tuple[int, int, int, bytes, bytes | None, str]] = field(default_factory=list)
    losses: list[tuple[str, str, int]] = field(default_factory=list)
    dlq: list[tuple[Any, ...]] = field(default_factory=list)


async def salvage_into(db: Database, source: str) -> Report:
    """Copy what can be read from the quarantined file `source` into `db` (open, migrated,
    fresh). Never raises for what it cannot read; the report says what it found."""
    found = await asyncio.to_thread(read_quarantined, Path(source))
    await _write(db, found)
    r = found.report
    log.error(
        "salvaged from %s: %d segments (%d events) back in the journal, %d cursors%s; "
        "%d events counted as %s (%d in %d damaged segments, %d unreadable)%s",
        source,
        r.segments,
        r.events,
        len(r.cursors),
        " (some cursors lost: those sinks start at the salvaged journal's start)" if r.cursors_lost else "",
        r.lost,
        losses.JOURNAL_CORRUPT,
        r.corrupt_events,
        r.corrupt_segments,
        r.unreadable_events,
        f"; {r.error}" if r.error else "",
    )
    return r


# -- reading the quarantined file (in a thread) -------------------------------------


def read_quarantined(source: Path) -> _Found:
    """Everything still readable in `source`, read from a copy in a temporary directory."""
    found = _Found(Report(str(source)))
    with tempfile.TemporaryDirectory(prefix="sidecar-salvage-") as tmp:
        copy = Path(tmp) / "agent.db"
        try:
            shutil.copyfile(source, copy)
            for suffix in ("-wal",):  # the WAL may hold the last commits
                side = Path(str(source) + suffix)
                if side.exists():
                    shutil.copyfile(side, Path(str(copy) + suffix))
            conn = _open(copy, found.report)
        except (OSError, sqlite3.Error) as exc:
            found.report.error = f"cannot read {source}: {exc}"
            return found
        try:
            _read(conn, found)
        finally:
            conn.close()
    return found


def _open(copy: Path, report: Report) -> sqlite3.Connection:
    """A connection that can read the journal of `copy`, rebuilding its header if need be."""
    if _readable(copy):
        return sqlite3.connect(copy)
    wal = Path(str(copy) + "-wal").exists()
    original = copy.read_bytes()[:100]
    size = copy.stat().st_size
    for page in PAGE_SIZES:
        if size < page or size % page:
            continue
        with open(copy, "r+b") as f:
            f.write(_header(page, size // page, wal))
        if _readable(copy):
            report.header_rebuilt = True
            log.warning(
                "salvage: the file header of %s was damaged; read with a rebuilt one (page size %d)",
                report.source,
                page,
            )
            return sqlite3.connect(copy)
    with open(copy, "r+b") as f:
        f.write(original)
    raise sqlite3.DatabaseError("not readable as an SQLite database, even with a rebuilt header")


def _readable(path: Path) -> bool:
    try:
        with sqlite3.connect(path) as conn:
            conn.execute("SELECT 1 FROM journal LIMIT 1").fetchall()
        return True
    except sqlite3.Error:
        return False


def _header(page_size: int, pages: int, wal: bool) -> bytes:
    """A plain SQLite file header (https://www.sqlite.org/fileformat.html#the_database_header)."""
    h = bytearray(100)
    h[0:16] = b"SQLite format 3\x00"
    h[16:18] = (1 if page_size == 65536 else page_size).to_bytes(2, "big")
    h[18] = h[19] = 2 if wal else 1
    h[21:24] = bytes((64, 32, 32))
    h[24:28] = (1).to_bytes(4, "big")  # change counter
    h[28:32] = pages.to_bytes(4, "big")
    h[40:44] = (1).to_bytes(4, "big")  # schema cookie
    h[44:48] = (4).to_bytes(4, "big")  # schema format
    h[56:60] = (1).to_bytes(4, "big")  # UTF-8
    h[92:96] = (1).to_bytes(4, "big")  # version-valid-for = change counter: the page count holds
    major, minor, patch = sqlite3.sqlite_version_info
    h[96:100] = (major * 1_000_000 + minor * 1000 + patch).to_bytes(4, "big")
    return bytes(h)


def _keys(conn: sqlite3.Connection, sql: str, high: int) -> Iterator[tuple[Any, ...]]:
    """Rows of `sql` (selecting rows with key > ?, ordered by key, key first, LIMIT ?), in
    order, skipping the rows on pages SQLite cannot read: past a failure, rows are read one
    at a time, and past an unreadable one the next readable key is found by doubling the
    step, then narrowing back."""

    def rows(after: int, limit: int) -> list[tuple[Any, ...]] | None:
        try:
            return conn.execute(sql, (after, limit)).fetchall()
        except sqlite3.DatabaseError:
            return None

    after = -(1 << 62)
    while True:
        got = rows(after, 256)
        if got is None:
            got = rows(after, 1)  # the rows before the damage are still read
        if got == []:
            return
        if got:
            yield from got
            after = got[-1][0]
            continue
        bad, step, good = after, 1, None
        while bad + step <= high:
            if rows(bad + step, 1) is not None:
                good = bad + step
                break
            bad, step = bad + step, step * 2
        if good is None:
            return
        while good - bad > 1:
            mid = (good + bad) // 2
            if rows(mid, 1) is not None:
                good = mid
            else:
                bad = mid
        after = good


def _read(conn: sqlite3.Connection, found: _Found) -> None:
    r = found.report
    try:
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'journal'").fetchone()
        high = row[0] if row and isinstance(row[0], int) else 0
    except sqlite3.Error:
        high = 0
    high_hint = max(high, 1 << 40)  # how far _keys may probe past a damaged page
    covered: list[tuple[int, int]] = []
    try:  # a file from before migration 3 has no frames column: all its segments are format 0
        conn.execute("SELECT frames FROM journal LIMIT 0")
        columns = "body, frames"
    except sqlite3.Error:
        columns = "body, NULL"
    for seq, first, count in _keys(
        conn, "SELECT seq, first_seq, count FROM journal WHERE seq > ? ORDER BY seq LIMIT ?", high_hint
    ):
        frames = None
        try:
            body, frames = conn.execute(f"SELECT {columns} FROM journal WHERE seq = ?", (seq,)).fetchone()
        except sqlite3.Error as exc:
            body, error = b"", f"unreadable: {exc}"
        else:
            try:
                segment.decode(first, seq, count, body, frames)
                error = ""
            except segment.CorruptSegment as exc:
                error = str(exc)
        if isinstance(first, int) and isinstance(seq, int) and seq >= first:
            covered.append((first, seq))
        if error:
            # Every event whose own checksum holds is kept (format 1); only the rest is lost.
            runs, n = segment.recover(first, seq, count, body, frames)
            for start, events in runs:
                found.segments.append((start + len(events) - 1, start, len(events), *segment.encode(events)))
                r.segments += 1
                r.events += len(events)
            kept = body if isinstance(body, bytes) else b""
            frames = frames if isinstance(frames, bytes) else None
            found.corrupt.append((seq, first if isinstance(first, int) else seq, n, kept, frames, error))
            r.corrupt_segments += 1
            r.corrupt_events += n
        else:
            found.segments.append((seq, first, count, body, frames))
            r.segments += 1
            r.events += count
        high = max(high, seq if isinstance(seq, int) else 0)
    found.last_seq = high
    # Segments quarantined earlier in that file were counted then: their seqs are covered.
    try:
        for first, seq in conn.execute("SELECT first_seq, seq FROM journal_quarantine"):
            covered.append((first, seq))
    except sqlite3.Error:
        pass
    try:
        rows = conn.execute("SELECT sink, seq FROM cursors").fetchall()
    except sqlite3.Error as exc:
        rows = []
        r.cursors_lost = True
        log.error("salvage: the cursors of %s cannot be read (%s)", r.source, exc)
    for sink, seq in rows:
        if isinstance(sink, str) and isinstance(seq, int) and 0 <= seq <= high:
            r.cursors[sink] = seq
        else:
            r.cursors_lost = True
    with contextlib.suppress(sqlite3.Error):
        found.losses = [(a, b, n) for a, b, n in conn.execute("SELECT reason, sink, count FROM losses")]
    try:
        for entry in conn.execute(f"SELECT {_DLQ_COLUMNS} FROM dlq ORDER BY id"):
            try:
                stored_batch_decoder.decode(entry[1])
            except Exception:
                found.losses.append((losses.JOURNAL_CORRUPT, str(entry[0]), int(entry[2] or 0)))
                continue
            found.dlq.append(entry)
            r.dlq_entries += 1
    except sqlite3.Error as exc:
        log.error("salvage: the dead-letter queue of %s cannot be read whole (%s)", r.source, exc)
    # Journaled but in no readable row: the seqs no segment covers between the lowest
    # cursor (compaction removed only what every sink had) and the high-water mark.
    if r.cursors and not r.cursors_lost:
        low = min(r.cursors.values())
    elif covered:
        low = min(f for f, _ in covered) - 1
    else:
        low = high
    r.unreadable_events = max(0, high - low - _covered(covered, low, high))


def _covered(spans: list[tuple[int, int]], low: int, high: int) -> int:
    """How many seqs in (low, high] the spans cover."""
    total, reach = 0, low
    for first, last in sorted(spans):
        first, last = max(first, reach + 1), min(last, high)
        if last >= first:
            total += last - first + 1
            reach = last
    return total


# -- writing into the fresh database ------------------------------------------------


async def _write(db: Database, found: _Found) -> None:
    r = found.report
    lost: dict[tuple[str, str], int] = {}
    for reason, sink, n in found.losses:
        lost[(reason, sink)] = lost.get((reason, sink), 0) + n
    if r.lost:
        key = (losses.JOURNAL_CORRUPT, "")
        lost[key] = lost.get(key, 0) + r.lost
    now = time.time()
    async with db.tx() as conn:
        for i in range(0, len(found.segments), 500):
            await conn.executemany(
                "INSERT INTO journal (seq, first_seq, count, body, frames) VALUES (?, ?, ?, ?, ?)",
                found.segments[i : i + 500],
            )
        await conn.executemany(
            "INSERT INTO journal_quarantine (seq, first_seq, count, body, frames, error, origin, quarantined)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [(seq, first, n, body, fr, e[:2000], r.source, now) for seq, first, n, body, fr, e in found.corrupt],
        )
        if found.last_seq:  # seqs are never reused, also those of lost segments
            await conn.execute("DELETE FROM sqlite_sequence WHERE name = 'journal'")
            await conn.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('journal', ?)", (found.last_seq,))
        await conn.executemany("INSERT INTO cursors (sink, seq) VALUES (?, ?)", list(r.cursors.items()))
        if r.cursors_lost:
            start = min(row[1] for row in found.segments) - 1 if found.segments else found.last_seq
            await conn.execute(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (NEW_SINKS_FROM, str(start)),
            )
        await conn.executemany(
            "INSERT INTO losses (reason, sink, count) VALUES (?, ?, ?)",
            [(reason, sink, n) for (reason, sink), n in lost.items()],
        )
        await conn.executemany(
            f"INSERT INTO dlq ({_DLQ_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [(*e[:8], "pending" if e[8] == "replaying" else e[8], *e[9:]) for e in found.dlq],
        )
        await conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (SALVAGE_KEY, json.dumps({**asdict(r), "lost": r.lost, "at": now})),
        )
