"""The history store's write side, run in the store's one writer thread with its own
plain sqlite3 connection: a whole batch is one call into the thread and one transaction,
so it costs one thread hop instead of one per statement, and none of it runs on the loop.

`store.db` is a derived cache (the journal is the record, and a batch not confirmed is
sent again), so it is written with `synchronous=NORMAL`: a power loss may lose its last
transactions, which the sink's cursor then delivers again.
"""

from __future__ import annotations

import json
import logging
import math
import sqlite3
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from agent.event import Event
from agent.history.schema import LEVELS, tagset_key
from agent.history.sketch import Sketch, merge_bytes

_isfinite = math.isfinite

SKETCH_KINDS = frozenset({"gauge", "histogram"})
ID_CHUNK = 500
CHUNK = 5000  # rows per compaction or trim transaction: writes interleave with them
TRIM_TO = 0.9  # a trim brings the store down to this share of its cap
TRIM_MIN_ROWS = 100
SERIES_CACHE = 65_536  # series ids remembered (about 150 bytes each); a miss costs one indexed SELECT
# A batch with many series dirties pages all over the roll-up and index trees. Checkpoint
# after 64 MiB of WAL instead of SQLite's 4 MiB, so a page rewritten by many batches is
# copied into store.db once per checkpoint, not once per batch (measured: a third fewer
# bytes written per event at 200k series, twice the events/s); the WAL file is cut back
# to that size after a checkpoint. With a small size cap, the WAL gets at most 1/8 of it.
WAL_MAX_BYTES = 64 * 1024 * 1024
# The writer's page cache, in KiB (SQLite's default is 2 MiB): the id and series indexes
# take random inserts and lookups, and with 200k series they outgrow 2 MiB, so every
# batch would wait on reads. Memory is only taken as the file grows.
WRITER_CACHE_KIB = 32 * 1024


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection to store.db for one thread of the store."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")  # a derived cache: the journal is the record
    conn.execute("PRAGMA busy_timeout=5000")
    if readonly:
        conn.execute("PRAGMA query_only=1")
    else:
        conn.execute(f"PRAGMA cache_size=-{WRITER_CACHE_KIB}")
        conn.create_function("sketch_merge", 2, merge_bytes, deterministic=True)
    return conn


class Cell:
    """One roll-up cell being built from a batch."""

    __slots__ = ("mn", "mx", "n", "sketch", "sum", "vn")

    def __init__(self, with_sketch: bool) -> None:
        self.n = self.vn = 0
        self.sum = 0.0
        self.mn: float | None = None
        self.mx: float | None = None
        self.sketch = Sketch() if with_sketch else None

    def merge(self, other: Cell) -> None:
        """Add another cell of the same series (a finer level's) into this one."""
        self.n += other.n
        self.vn += other.vn
        self.sum += other.sum
        if other.mn is not None and (self.mn is None or other.mn < self.mn):
            self.mn = other.mn
        if other.mx is not None and (self.mx is None or other.mx > self.mx):
            self.mx = other.mx
        if self.sketch is not None and other.sketch is not None:
            self.sketch.merge(other.sketch)

    def add_many(self, values: list[float | None]) -> None:
        """Add a batch's values at once (None, NaN and infinities count in `n` only)."""
        self.n += len(values)
        ok = [v for v in values if v is not None and _isfinite(v)]
        if not ok:
            return
        self.vn += len(ok)
        self.sum += sum(ok)
        low, high = min(ok), max(ok)
        self.mn = low if self.mn is None or low < self.mn else self.mn
        self.mx = high if self.mx is None or high > self.mx else self.mx
        if self.sketch is not None:
            self.sketch.add_many(ok)

    def add(self, v: float | None) -> None:
        self.n += 1
        if v is None or not math.isfinite(v):
            return
        self.vn += 1
        self.sum += v
        self.mn = v if self.mn is None or v < self.mn else self.mn
        self.mx = v if self.mx is None or v > self.mx else self.mx
        if self.sketch is not None:
            self.sketch.add(v)


def finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


class Writer:
    """Batches, compaction and the size cap, on one connection, in the writer thread."""

    def __init__(self, path: Path, stats: dict[str, Any], log: logging.Logger, max_bytes: int | None) -> None:
        self.conn = connect(path)
        wal = min(WAL_MAX_BYTES, max_bytes // 8) if max_bytes else WAL_MAX_BYTES
        page = self.conn.execute("PRAGMA page_size").fetchone()[0]
        self.conn.execute(f"PRAGMA journal_size_limit={wal}")
        self.conn.execute(f"PRAGMA wal_autocheckpoint={max(64, wal // page)}")
        self.stats = stats
        self.log = log
        self.closing = False  # set from the loop: a trim stops between chunks
        self.sids: dict[str, int] = {}  # "name\0tags" -> series id, bounded (SERIES_CACHE)
        # name -> [kind, tag_keys(set), last_value, last_ts, count]; the loop reads it under the lock
        self.names: dict[str, list[Any]] = {}
        self.names_lock = threading.Lock()
        for name, kind, keys, last_value, last_ts, count in self.conn.execute(
            "SELECT name, kind, tag_keys, last_value, last_ts, count FROM names"
        ):
            self.names[name] = [kind, set(json.loads(keys)), last_value, last_ts, count]
        row = self.conn.execute("SELECT value FROM meta WHERE key = 'raw_floor'").fetchone()
        self.raw_floor: float = float(row[0]) if row else -math.inf  # raw events at or before it were trimmed

    def close(self) -> None:
        self.conn.close()

    # -- a batch ---------------------------------------------------------------------

    def write(self, events: list[Event], oldest: float) -> int:
        """Store a batch in one transaction; returns how many events were new."""
        oldest = max(oldest, math.nextafter(self.raw_floor, math.inf))
        fresh: dict[str, Event] = {}
        old = 0
        for e in events:
            if e.ts < oldest:
                old += 1
            elif e.id not in fresh:
                fresh[e.id] = e
        conn = self.conn
        added: list[str] = []  # series ids cached in this transaction (forgotten if it rolls back)
        try:
            conn.execute("BEGIN IMMEDIATE")
            ids = list(fresh)
            for i in range(0, len(ids), ID_CHUNK):
                chunk = ids[i : i + ID_CHUNK]
                for (eid,) in conn.execute(f"SELECT id FROM raw WHERE id IN ({','.join('?' * len(chunk))})", chunk):
                    del fresh[eid]
            new = list(fresh.values())
            if new:
                sids = self._series_ids(new, added)
                conn.executemany(
                    "INSERT INTO raw (id, ts, sid, kind, value, source, agent_id, session_id, data)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        (
                            e.id,
                            e.ts,
                            sid,
                            e.kind,
                            finite(e.value),
                            e.source,
                            e.agent_id,
                            e.session_id,
                            json.dumps(e.data) if e.data is not None else None,
                        )
                        for e, sid in zip(new, sids, strict=True)
                    ],
                )
                self._fold(new, sids)
                catalogue = self._catalogue(new)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            for key in added:
                self.sids.pop(key, None)
            raise
        if new:
            with self.names_lock:
                self.names.update(catalogue)
        self.stats["stored"] += len(new)
        self.stats["skipped_old"] += old
        self.stats["duplicates"] += len(events) - old - len(new)
        return len(new)

    def _series_ids(self, events: list[Event], added: list[str]) -> list[int]:
        """Each event's series id: from the cache, else looked up or created in `series`."""
        cache = self.sids
        out = []
        for e in events:
            tags = tagset_key(e.tags)
            key = e.name + "\0" + tags
            sid = cache.get(key)
            if sid is None:
                row = self.conn.execute("SELECT id FROM series WHERE name = ? AND tags = ?", (e.name, tags)).fetchone()
                if row is None:
                    cur = self.conn.execute("INSERT INTO series (name, tags) VALUES (?, ?)", (e.name, tags))
                    sid = cur.lastrowid
                    assert sid is not None
                    added.append(key)
                else:
                    sid = row[0]
                if len(cache) >= SERIES_CACHE:
                    for k in list(cache)[: SERIES_CACHE // 2]:  # the oldest half (dicts keep insertion order)
                        del cache[k]
                cache[key] = sid
            out.append(sid)
        return out

    def _fold(self, events: list[Event], sids: list[int]) -> None:
        """Fold a batch into every roll-up level: the finest from the events, each coarser
        one from the level below's cells (LEVELS' widths divide each other, so a cell lies
        within one coarser cell), which adds each value to a sketch once, not per level."""
        (finest, width), *coarser = LEVELS
        values: dict[tuple[int, int], list[Any]] = {}  # cell -> [its first kind, values...]
        for e, sid in zip(events, sids, strict=True):
            key = (int(e.ts // width) * width, sid)
            vs = values.get(key)
            if vs is None:
                vs = values[key] = [e.kind]
            vs.append(e.value)
        cells: dict[tuple[int, int], Cell] = {}
        for key, vs in values.items():
            cell = cells[key] = Cell(vs[0] in SKETCH_KINDS)
            cell.add_many(vs[1:])
        self._upsert(finest, cells)
        for level, width in coarser:
            merged: dict[tuple[int, int], Cell] = {}
            for (b, sid), c in cells.items():
                key = (b // width * width, sid)
                m = merged.get(key)
                if m is None:
                    merged[key] = c  # the finer level's rows are written already: reuse the cell
                else:
                    m.merge(c)
            cells = merged
            self._upsert(level, cells)

    def _upsert(self, level: str, cells: dict[tuple[int, int], Cell]) -> None:
        # Merging a cell that already has rows happens in SQL (sketch_merge on conflict):
        # no read-back per cell.
        self.conn.executemany(
            f"INSERT INTO rollup_{level} (bucket, sid, n, vn, sum, mn, mx, sketch) VALUES (?,?,?,?,?,?,?,?)"
            " ON CONFLICT (bucket, sid) DO UPDATE SET n = n + excluded.n, vn = vn + excluded.vn,"
            " sum = sum + excluded.sum, mn = min(coalesce(mn, excluded.mn), coalesce(excluded.mn, mn)),"
            " mx = max(coalesce(mx, excluded.mx), coalesce(excluded.mx, mx)),"
            " sketch = sketch_merge(sketch, excluded.sketch)",
            [
                (b, sid, c.n, c.vn, c.sum, c.mn, c.mx, c.sketch.to_bytes() if c.sketch is not None else None)
                for (b, sid), c in cells.items()
            ],
        )

    def _catalogue(self, events: list[Event]) -> dict[str, list[Any]]:
        """The names table updated for a batch; returns the entries to publish after COMMIT."""
        touched: dict[str, list[Any]] = {}
        for e in events:
            entry = touched.get(e.name)
            if entry is None:
                prev = self.names.get(e.name)
                entry = touched[e.name] = [e.kind, set(prev[1]), *prev[2:]] if prev else [e.kind, set(), None, 0.0, 0]
            entry[0] = e.kind
            entry[1].update(e.tags)
            entry[4] += 1
            if e.ts >= entry[3]:
                entry[2], entry[3] = finite(e.value), e.ts
        self.conn.executemany(
            "INSERT OR REPLACE INTO names (name, kind, tag_keys, last_value, last_ts, count) VALUES (?,?,?,?,?,?)",
            [(n, k, json.dumps(sorted(keys)), lv, lt, c) for n, (k, keys, lv, lt, c) in touched.items()],
        )
        return touched

    # -- compaction and the size cap -------------------------------------------------

    def compact_chunk(self, table: str, key: str, col: str, cutoff: float) -> int:
        """Delete up to CHUNK rows of `table` with `col` < cutoff; returns how many."""
        cur = self.conn.execute(
            f"DELETE FROM {table} WHERE ({key}) IN (SELECT {key} FROM {table} WHERE {col} < ? LIMIT ?)",
            (cutoff, CHUNK),
        )
        return cur.rowcount

    def used_bytes(self) -> int:
        """Bytes of store.db in use (its pages less the free list, which new rows reuse)."""
        pages = self.conn.execute("PRAGMA page_count").fetchone()[0]
        free = self.conn.execute("PRAGMA freelist_count").fetchone()[0]
        size = self.conn.execute("PRAGMA page_size").fetchone()[0]
        return int((pages - free) * size)

    def trim(self, cap: int) -> None:
        """Over `cap` bytes in use: delete the oldest raw events, then the oldest per-minute
        roll-ups, then the oldest per-hour ones, until under TRIM_TO of the cap."""
        before = used = self.stats["bytes"] = self.used_bytes()
        if used <= cap:
            return
        target = int(cap * TRIM_TO)
        rows = {"raw": 0, "rollup_minute": 0, "rollup_hour": 0}
        for table, col in (("raw", "ts"), ("rollup_minute", "bucket"), ("rollup_hour", "bucket")):
            per_row = 256.0  # bytes a deleted row gives back, learnt as it goes
            while used > target and not self.closing:
                # About as many rows as free what is over: a small cap is not emptied at once.
                want = min(CHUNK, max(TRIM_MIN_ROWS, int((used - target) / per_row) + 1))
                n = self._trim_chunk(table, col, want)
                if n == 0:
                    break
                rows[table] += n
                now_used = self.used_bytes()
                # Pages free up only once empty (index pages lag), so a chunk may free little.
                per_row = max(16.0, (used - now_used) / n)
                used = now_used
        if rows["rollup_hour"]:  # every event has an hour row: a series is gone with its last one
            rows["series"] = self.drop_orphan_series()
            used = self.used_bytes()
        freed = max(0, before - used)
        self.stats["bytes"] = used
        self.stats["trims"] += 1
        self.stats["trimmed_rows"] += sum(rows.values())
        self.stats["trimmed_bytes"] += freed
        self.log.warning(
            "history store over its cap (%.1f MB in use, cap %.1f MB): trimmed %d raw events, %d per-minute"
            " and %d per-hour roll-up rows, %d series (%.1f MB freed); raw events now start after %s",
            before / 1e6,
            cap / 1e6,
            rows["raw"],
            rows["rollup_minute"],
            rows["rollup_hour"],
            rows.get("series", 0),
            freed / 1e6,
            datetime.fromtimestamp(self.raw_floor, UTC).isoformat(timespec="seconds") if rows["raw"] else "-",
        )
        if used > cap:
            self.log.error("history store: still %.1f MB in use after trimming (cap %.1f MB)", used / 1e6, cap / 1e6)

    def drop_orphan_series(self) -> int:
        """Delete series no raw event or roll-up refers to any more; returns how many."""
        n = self.conn.execute(
            "DELETE FROM series WHERE NOT EXISTS (SELECT 1 FROM raw WHERE sid = series.id)"
            " AND NOT EXISTS (SELECT 1 FROM rollup_minute WHERE sid = series.id)"
            " AND NOT EXISTS (SELECT 1 FROM rollup_hour WHERE sid = series.id)"
        ).rowcount
        if n:
            self.sids.clear()  # some cached ids are gone; the rest are looked up again
        return n

    def _trim_chunk(self, table: str, col: str, rows: int) -> int:
        """Delete about the oldest `rows` rows of `table` (by `col`) in one transaction."""
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = conn.execute(f"SELECT {col} FROM {table} ORDER BY {col} LIMIT 1 OFFSET ?", (rows - 1,)).fetchone()
            if row is None:
                row = conn.execute(f"SELECT max({col}) FROM {table}").fetchone()
            cutoff = row[0] if row else None
            n = 0
            if cutoff is not None:
                n = conn.execute(f"DELETE FROM {table} WHERE {col} <= ?", (cutoff,)).rowcount
                if table == "raw":
                    # A re-delivered event at or before it would be folded into the roll-ups
                    # twice (its id is gone), so later writes skip it, as past the retention.
                    self.raw_floor = max(self.raw_floor, float(cutoff))
                    conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('raw_floor', ?)", (self.raw_floor,))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return n
