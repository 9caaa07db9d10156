"""The local history store behind the dashboard: raw events plus per-minute and per-hour
roll-ups in their own SQLite file (`data_dir/store.db`, WAL).

- Raw events are kept `raw_retention_s` (default 24 h), roll-ups `minute_retention_s`
  (7 d) and `hour_retention_s` (90 d).
- Idempotent by event id: a batch first learns which ids are already stored; only new
  events are inserted and folded into the roll-ups, in the same transaction, so a
  re-delivered batch changes nothing. Events older than the raw window are skipped
  (counted in `stats["skipped_old"]`): once their raw row is gone their id could no
  longer be checked, and counting them twice would be worse than not storing them.
- Roll-up rows are keyed by (name, tag set, bucket) and hold count, valued count, sum,
  min, max and, for gauges and histograms, a mergeable quantile sketch (agent.history.sketch).
- Compaction deletes expired rows in small chunks, each its own short transaction, so
  writes interleave with it and are never held up for long.
- The schema is versioned: `MIGRATIONS` are applied in order by agent.storage.migrations.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiosqlite

from agent.event import Event
from agent.history.sketch import Sketch
from agent.storage.migrations import Migration, migrate

STORE_FILE = "store.db"
SKETCH_KINDS = frozenset({"gauge", "histogram"})
LEVELS = (("minute", 60), ("hour", 3600))
AGGS = ("avg", "sum", "min", "max", "count", "p50", "p95", "p99")
MAX_POINTS = 2000
COMPACT_CHUNK = 5000
ID_CHUNK = 500

# Release 0.1.0's schema, exactly: its files have these tables and no version table.
SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS events (
    id TEXT PRIMARY KEY, ts REAL NOT NULL, name TEXT NOT NULL, kind TEXT NOT NULL,
    value REAL, source TEXT NOT NULL, agent_id TEXT NOT NULL, session_id TEXT,
    tags TEXT NOT NULL, data TEXT
);
CREATE INDEX IF NOT EXISTS events_ts ON events (ts);
CREATE INDEX IF NOT EXISTS events_name_ts ON events (name, ts);
CREATE INDEX IF NOT EXISTS events_session_ts ON events (session_id, ts) WHERE session_id IS NOT NULL;
CREATE TABLE IF NOT EXISTS names (
    name TEXT PRIMARY KEY, kind TEXT NOT NULL, tag_keys TEXT NOT NULL,
    last_value REAL, last_ts REAL NOT NULL, count INTEGER NOT NULL
);
"""
ROLLUP_SCHEMA = """
CREATE TABLE IF NOT EXISTS rollup_{level} (
    name TEXT NOT NULL, tagset TEXT NOT NULL, bucket INTEGER NOT NULL,
    n INTEGER NOT NULL, vn INTEGER NOT NULL, sum REAL NOT NULL, mn REAL, mx REAL, sketch BLOB,
    PRIMARY KEY (name, tagset, bucket)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS rollup_{level}_bucket ON rollup_{level} (bucket);
"""
# Append new steps; never edit one that has shipped.
MIGRATIONS = [
    Migration(
        1, "initial schema (release 0.1.0)", SCHEMA_V1 + "".join(ROLLUP_SCHEMA.format(level=lv) for lv, _ in LEVELS)
    ),
]


def tagset_key(tags: dict[str, str]) -> str:
    """The canonical JSON of a tag set (sorted keys, compact), used as a roll-up key."""
    return json.dumps(tags, sort_keys=True, separators=(",", ":"))


class _Agg:
    """One roll-up cell being built from a batch."""

    __slots__ = ("mn", "mx", "n", "sketch", "sum", "vn")

    def __init__(self, with_sketch: bool) -> None:
        self.n = self.vn = 0
        self.sum = 0.0
        self.mn: float | None = None
        self.mx: float | None = None
        self.sketch = Sketch() if with_sketch else None

    def add(self, v: float | None) -> None:
        self.n += 1
        if v is None or not math.isfinite(v):
            return
        self.vn += 1
        self.sum += v
        self.mn = v if self.mn is None else min(self.mn, v)
        self.mx = v if self.mx is None else max(self.mx, v)
        if self.sketch is not None:
            self.sketch.add(v)


class HistoryStore:
    """Write batches, answer history queries, compact in the background."""

    def __init__(
        self,
        path: Path,
        *,
        raw_retention_s: float = 86400,
        minute_retention_s: float = 7 * 86400,
        hour_retention_s: float = 90 * 86400,
    ) -> None:
        self.path = Path(path)
        self.retention = {"raw": raw_retention_s, "minute": minute_retention_s, "hour": hour_retention_s}
        self.writer: aiosqlite.Connection | None = None
        self.reader: aiosqlite.Connection | None = None
        self.stats: dict[str, int] = {"stored": 0, "duplicates": 0, "skipped_old": 0, "compacted": 0}
        self._names: dict[str, list[Any]] = {}  # name -> [kind, tag_keys(set), last_value, last_ts, count]
        self._write_lock = asyncio.Lock()

    # -- lifecycle ---------------------------------------------------------------------

    async def open(self) -> None:
        """Open the file, apply pending migrations (SchemaVersionError if it is newer), load the catalogue."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.writer = await self._connect()
        try:
            await migrate(self.writer, MIGRATIONS, f"history store {self.path}")
        except BaseException:
            with contextlib.suppress(Exception):  # never replace what is propagating (a cancel)
                await self.close()  # the sink retries its start: leave no connection behind
            raise
        self.reader = await self._connect()
        async with self.reader.execute("SELECT name, kind, tag_keys, last_value, last_ts, count FROM names") as cur:
            for name, kind, keys, last_value, last_ts, count in await cur.fetchall():
                self._names[name] = [kind, set(json.loads(keys)), last_value, last_ts, count]

    async def _connect(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute("PRAGMA synchronous=NORMAL")  # a derived cache: the journal is the record
        await conn.execute("PRAGMA busy_timeout=5000")
        return conn

    async def close(self) -> None:
        for conn in (self.reader, self.writer):
            if conn is not None:
                await conn.close()
        self.reader = self.writer = None

    # -- writing -----------------------------------------------------------------------

    async def write(self, events: list[Event], now: float | None = None) -> int:
        """Store a batch; returns how many events were new."""
        assert self.writer is not None
        now = time.time() if now is None else now
        oldest = now - self.retention["raw"]
        fresh: dict[str, Event] = {}
        old = 0
        for e in events:
            if e.ts < oldest:
                old += 1
            elif e.id not in fresh:
                fresh[e.id] = e
        async with self._write_lock:
            conn = self.writer
            try:
                # Inside the try: a cancel landing on BEGIN's await does not stop BEGIN from
                # running in aiosqlite's thread, and the transaction must not stay open.
                await conn.execute("BEGIN IMMEDIATE")
                ids = list(fresh)
                for i in range(0, len(ids), ID_CHUNK):
                    chunk = ids[i : i + ID_CHUNK]
                    q = f"SELECT id FROM events WHERE id IN ({','.join('?' * len(chunk))})"
                    async with conn.execute(q, chunk) as cur:
                        for (eid,) in await cur.fetchall():
                            del fresh[eid]
                new = list(fresh.values())
                if new:
                    await conn.executemany(
                        "INSERT OR IGNORE INTO events"
                        " (id, ts, name, kind, value, source, agent_id, session_id, tags, data)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        [
                            (
                                e.id,
                                e.ts,
                                e.name,
                                e.kind,
                                _finite(e.value),
                                e.source,
                                e.agent_id,
                                e.session_id,
                                tagset_key(e.tags),
                                json.dumps(e.data) if e.data is not None else None,
                            )
                            for e in new
                        ],
                    )
                    for level, width in LEVELS:
                        await self._fold(conn, level, width, new)
                    await self._catalogue(conn, new)
                await conn.execute("COMMIT")
            except BaseException:
                # Never let the ROLLBACK's own error replace what is propagating: a cancel
                # that lands while COMMIT runs in aiosqlite's thread finds no transaction
                # left to roll back ("cannot rollback - no transaction is active"), and a
                # CancelledError turned into an sqlite3.Error would be swallowed as a
                # retryable failure, so stop() would wait for this sink forever.
                with contextlib.suppress(sqlite3.Error, ValueError):
                    await asyncio.shield(conn.execute("ROLLBACK"))
                raise
        self.stats["stored"] += len(new)
        self.stats["skipped_old"] += old
        self.stats["duplicates"] += len(events) - old - len(new)
        return len(new)

    async def _fold(self, conn: aiosqlite.Connection, level: str, width: int, events: list[Event]) -> None:
        cells: dict[tuple[str, str, int], _Agg] = {}
        for e in events:
            key = (e.name, tagset_key(e.tags), int(e.ts // width) * width)
            cell = cells.get(key)
            if cell is None:
                cell = cells[key] = _Agg(e.kind in SKETCH_KINDS)
            cell.add(e.value)
        table = f"rollup_{level}"
        rows = []
        for (name, tagset, bucket), c in cells.items():
            blob = None
            if c.sketch is not None:
                async with conn.execute(
                    f"SELECT sketch FROM {table} WHERE name=? AND tagset=? AND bucket=?", (name, tagset, bucket)
                ) as cur:
                    old = await cur.fetchone()
                if old is not None and old[0]:
                    c.sketch.merge(Sketch.from_bytes(old[0]))
                blob = c.sketch.to_bytes()
            rows.append((name, tagset, bucket, c.n, c.vn, c.sum, c.mn, c.mx, blob))
        await conn.executemany(
            f"INSERT INTO {table} (name, tagset, bucket, n, vn, sum, mn, mx, sketch) VALUES (?,?,?,?,?,?,?,?,?)"
            " ON CONFLICT (name, tagset, bucket) DO UPDATE SET n = n + excluded.n, vn = vn + excluded.vn,"
            " sum = sum + excluded.sum, mn = min(coalesce(mn, excluded.mn), coalesce(excluded.mn, mn)),"
            " mx = max(coalesce(mx, excluded.mx), coalesce(excluded.mx, mx)),"
            " sketch = coalesce(excluded.sketch, sketch)",
            rows,
        )

    async def _catalogue(self, conn: aiosqlite.Connection, events: list[Event]) -> None:
        touched = set()
        for e in events:
            entry = self._names.get(e.name)
            if entry is None:
                entry = self._names[e.name] = [e.kind, set(), None, 0.0, 0]
            entry[0] = e.kind
            entry[1].update(e.tags)
            entry[4] += 1
            if e.ts >= entry[3]:
                entry[2], entry[3] = _finite(e.value), e.ts
            touched.add(e.name)
        await conn.executemany(
            "INSERT OR REPLACE INTO names (name, kind, tag_keys, last_value, last_ts, count) VALUES (?,?,?,?,?,?)",
            [(n, k, json.dumps(sorted(keys)), lv, lt, c) for n in touched for k, keys, lv, lt, c in [self._names[n]]],
        )

    # -- compaction --------------------------------------------------------------------

    async def compact(self, now: float | None = None) -> int:
        """Delete expired raw events and roll-ups in chunks; returns rows deleted."""
        assert self.writer is not None
        now = time.time() if now is None else now
        total = 0
        plans = [("events", "rowid", "ts", now - self.retention["raw"])]
        plans += [(f"rollup_{lv}", "name, tagset, bucket", "bucket", now - self.retention[lv]) for lv, _ in LEVELS]
        for table, key, col, cutoff in plans:
            while True:
                async with self._write_lock:
                    cur = await self.writer.execute(
                        f"DELETE FROM {table} WHERE ({key}) IN (SELECT {key} FROM {table} WHERE {col} < ? LIMIT ?)",
                        (cutoff, COMPACT_CHUNK),
                    )
                    n = cur.rowcount
                total += n
                if n < COMPACT_CHUNK:
                    break
                await asyncio.sleep(0)  # let a waiting batch in between chunks
        self.stats["compacted"] += total
        return total

    # -- queries -----------------------------------------------------------------------

    async def _fetch(self, sql: str, args: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        assert self.reader is not None
        async with self.reader.execute(sql, tuple(args)) as cur:
            return [tuple(row) for row in await cur.fetchall()]

    async def events(
        self,
        *,
        name: str | None = None,
        source: str | None = None,
        agent: str | None = None,
        session: str | None = None,
        start: float | None = None,
        end: float | None = None,
        cursor: str | None = None,
        limit: int = 100,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Raw events, newest first; returns (events, next cursor or None)."""
        where: list[str] = []
        args: list[Any] = []
        for col, val in (("name", name), ("source", source), ("agent_id", agent), ("session_id", session)):
            if val is not None:
                where.append(f"{col} = ?")
                args.append(val)
        if start is not None:
            where.append("ts >= ?")
            args.append(start)
        if end is not None:
            where.append("ts < ?")
            args.append(end)
        if cursor:
            cts, cid = decode_cursor(cursor)
            where.append("(ts < ? OR (ts = ? AND id < ?))")
            args += [cts, cts, cid]
        sql = "SELECT id, ts, name, kind, value, source, agent_id, session_id, tags, data FROM events"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY ts DESC, id DESC LIMIT ?"
        rows = await self._fetch(sql, [*args, limit])
        out = [
            {
                "id": r[0],
                "ts": r[1],
                "name": r[2],
                "kind": r[3],
                "value": r[4],
                "source": r[5],
                "agent_id": r[6],
                "session_id": r[7],
                "tags": json.loads(r[8]),
                "data": json.loads(r[9]) if r[9] else None,
            }
            for r in rows
        ]
        nxt = f"{rows[-1][1]!r}~{rows[-1][0]}" if len(rows) == limit else None
        return out, nxt

    def names(self) -> list[dict[str, Any]]:
        """The catalogue: every name with its kind, tag keys, last value and count."""
        return [
            {"name": n, "kind": k, "tag_keys": sorted(keys), "last_value": lv, "last_ts": lt, "count": c}
            for n, (k, keys, lv, lt, c) in sorted(self._names.items())
        ]

    def choose_level(self, start: float, end: float, step: float, now: float) -> tuple[str, int]:
        """The coarsest level no coarser than `step` whose retention reaches back to `start`."""
        if step < 60 and start >= now - self.retention["raw"]:
            return "raw", 1
        if step < 3600 and start >= now - self.retention["minute"]:
            return "minute", 60
        return "hour", 3600

    async def series(
        self,
        name: str | None,
        start: float,
        end: float,
        step: float | None = None,
        agg: str = "avg",
        tags: dict[str, str] | None = None,
        now: float | None = None,
    ) -> dict[str, Any]:
        """Aggregate `name` over [start, end) in `step`-second buckets; `t` and `v` arrays
        cover every bucket (v is None where there is no data). `name` None takes every
        name (meaningful with agg "count": the overview's events/s)."""
        now = time.time() if now is None else now
        span = max(1.0, end - start)
        step = step or max(1.0, span / 300)
        step = max(step, span / MAX_POINTS)
        level, res = self.choose_level(start, end, step, now)
        step = max(res, math.ceil(step / res) * res)
        first = math.floor(start / step) * step
        nb = math.ceil((end - first) / step)
        cells: list[_Agg | None] = [None] * nb
        want_sketch = agg.startswith("p")
        tag_sql, tag_args = "", []
        col = "tags" if level == "raw" else "tagset"
        for k, v in (tags or {}).items():
            tag_sql += f" AND json_extract({col}, ?) = ?"
            tag_args += [f'$."{k}"', v]
        by_name, name_args = ("", []) if name is None else ("name = ? AND ", [name])
        if level == "raw" and agg == "count":
            # Counted in SQL: a count over busy minutes is many rows to bring into Python
            # (300k for 5 minutes at 1000 events/s), and this runs for every dashboard load.
            rows = await self._fetch(
                f"SELECT CAST((ts - ?) / ? AS INTEGER) AS i, COUNT(*) FROM events"
                f" WHERE {by_name}ts >= ? AND ts < ?{tag_sql} GROUP BY i",
                [first, step, *name_args, first, end, *tag_args],
            )
            for i, n in rows:
                if 0 <= i < nb:
                    cell = cells[i] = _Agg(False)
                    cell.n = n
        elif level == "raw":
            rows = await self._fetch(
                f"SELECT ts, value FROM events WHERE {by_name}ts >= ? AND ts < ?{tag_sql}",
                [*name_args, first, end, *tag_args],
            )
            for ts, value in rows:
                i = int((ts - first) // step)
                if 0 <= i < nb:
                    cell = cells[i] or _Agg(want_sketch)
                    cells[i] = cell
                    cell.add(value)
        else:
            rows = await self._fetch(
                f"SELECT bucket, n, vn, sum, mn, mx, {'sketch' if want_sketch else 'NULL'} FROM rollup_{level}"
                f" WHERE {by_name}bucket >= ? AND bucket < ?{tag_sql}",
                [*name_args, first, end, *tag_args],
            )
            for bucket, n, vn, total, mn, mx, blob in rows:
                i = int((bucket - first) // step)
                if not 0 <= i < nb:
                    continue
                cell = cells[i] or _Agg(want_sketch)
                cells[i] = cell
                cell.n += n
                cell.vn += vn
                cell.sum += total
                if mn is not None:
                    cell.mn = mn if cell.mn is None else min(cell.mn, mn)
                if mx is not None:
                    cell.mx = mx if cell.mx is None else max(cell.mx, mx)
                if want_sketch and cell.sketch is not None and blob:
                    cell.sketch.merge(Sketch.from_bytes(blob))
        return {
            "name": name,
            "agg": agg,
            "level": level,
            "step": step,
            "from": first,
            "to": first + nb * step,
            "t": [first + i * step for i in range(nb)],
            "v": [_value_of(c, agg) for c in cells],
        }


def _value_of(c: _Agg | None, agg: str) -> float | None:
    if c is None:
        return None
    if agg == "count":
        return c.n
    if c.vn == 0:
        return None
    if agg == "sum":
        return c.sum
    if agg == "avg":
        return c.sum / c.vn
    if agg == "min":
        return c.mn
    if agg == "max":
        return c.mx
    q = {"p50": 0.5, "p95": 0.95, "p99": 0.99}[agg]
    est = c.sketch.quantile(q) if c.sketch is not None else None
    if est is None or c.mn is None or c.mx is None:
        return None
    return min(c.mx, max(c.mn, est))  # the sketch's error never leaves the observed range


def _finite(v: float | None) -> float | None:
    return v if v is not None and math.isfinite(v) else None


def decode_cursor(cursor: str) -> tuple[float, str]:
    """Parse a cursor from `events()`; raises ValueError when malformed."""
    ts, sep, eid = cursor.partition("~")
    if not sep or not eid:
        raise ValueError("malformed cursor")
    return float(ts), eid
