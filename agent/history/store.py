"""The local history store behind the dashboard: raw events plus per-minute and per-hour
roll-ups in their own SQLite file (`data_dir/store.db`, WAL).

- Raw events are kept `raw_retention_s` (default 24 h), roll-ups `minute_retention_s`
  (7 d) and `hour_retention_s` (90 d).
- Idempotent by event id: a batch first learns which ids are already stored; only new
  events are inserted and folded into the roll-ups, in the same transaction, so a
  re-delivered batch changes nothing. Events older than the raw window are skipped
  (counted in `stats["skipped_old"]`): once their raw row is gone their id could no
  longer be checked, and counting them twice would be worse than not storing them.
- Roll-up rows are keyed by (bucket, series) and hold count, valued count, sum, min,
  max and, for gauges and histograms, a mergeable quantile sketch (agent.history.sketch).
- Nothing runs on the event loop: writes, compaction and the size cap run in one writer
  thread (agent.history.writer), queries and their aggregation in reader threads
  (agent.history.query), each thread with its own sqlite3 connection. The loop only
  awaits them, so a heavy `/api/v1/series` never stalls ingest.
- A size cap (`max_bytes`): past it, the oldest raw events go first, then the oldest
  per-minute and per-hour roll-ups (`stats["trimmed_rows"]`, `["trimmed_bytes"]`, a log line).
- Compaction deletes expired rows in small chunks, each its own short transaction, so
  writes interleave with it and are never held up for long.
- The schema is versioned: `MIGRATIONS` (agent.history.schema) are applied in order by
  agent.storage.migrations.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from agent.event import Event
from agent.history import query
from agent.history.schema import LEVELS, MIGRATIONS, tagset_key
from agent.history.writer import SKETCH_KINDS, Writer, connect
from agent.storage.migrations import migrate

__all__ = ["AGGS", "LEVELS", "MIGRATIONS", "SKETCH_KINDS", "STORE_FILE", "HistoryStore", "decode_cursor", "tagset_key"]

STORE_FILE = "store.db"
AGGS = ("avg", "sum", "min", "max", "count", "p50", "p90", "p95", "p99", "rate", "quantile")
# `rate`: growth per second per step (query.increases: deltas summed, running totals reset-aware).
# `quantile` (with q): for a Prometheus-style `<name>_bucket` with `le` tags, the q-quantile
# estimated from the buckets' growth per step (query.bucket_quantile), never an average across `le`.
MAX_POINTS = 2000
READERS = 2  # reader threads: a slow query leaves one for the rest
PROGRESS_STEPS = 10_000  # SQLite VM steps between a reader's checks whether the store is closing
T = TypeVar("T")


class HistoryStore:
    """Write batches, answer history queries, compact and cap in the background."""

    def __init__(
        self,
        path: Path,
        *,
        raw_retention_s: float = 86400,
        minute_retention_s: float = 7 * 86400,
        hour_retention_s: float = 90 * 86400,
        max_bytes: int | None = None,
        log: logging.Logger | None = None,
    ) -> None:
        self.path = Path(path)
        self.retention = {"raw": raw_retention_s, "minute": minute_retention_s, "hour": hour_retention_s}
        self.max_bytes = max_bytes
        self.log = log or logging.getLogger("sidecar_agent.history")
        self.stats: dict[str, int] = {
            "stored": 0,
            "duplicates": 0,
            "skipped_old": 0,
            "compacted": 0,
            "trims": 0,
            "trimmed_rows": 0,
            "trimmed_bytes": 0,
            "bytes": 0,  # in use at the last check against the cap
            "max_bytes": max_bytes or 0,
        }
        self.writer: Writer | None = None
        self._write_pool: ThreadPoolExecutor | None = None
        self._read_pool: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._closing = False

    # -- lifecycle ---------------------------------------------------------------------

    async def open(self) -> None:
        """Open the file, apply pending migrations (SchemaVersionError if it is newer), load the catalogue."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        try:
            await conn.execute("PRAGMA journal_mode=WAL")
            await conn.execute("PRAGMA busy_timeout=5000")
            await migrate(conn, MIGRATIONS, f"history store {self.path}")
        finally:
            with contextlib.suppress(Exception):  # never replace what is propagating (a cancel)
                await conn.close()
        self._closing = False
        self._write_pool = ThreadPoolExecutor(1, thread_name_prefix="store-write")
        self._read_pool = ThreadPoolExecutor(READERS, thread_name_prefix="store-read")
        try:
            self.writer = await self._in_writer(Writer, self.path, self.stats, self.log, self.max_bytes)
        except BaseException:
            with contextlib.suppress(Exception):
                await self.close()  # the sink retries its start: leave no thread behind
            raise

    async def close(self) -> None:
        """Stop queries (a running one is interrupted), finish the write in progress, close."""
        self._closing = True
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.closing = True
        with self._readers_lock:
            for conn in self._readers:
                conn.interrupt()
        pools = [p for p in (self._write_pool, self._read_pool) if p is not None]
        if writer is not None and self._write_pool is not None:
            await asyncio.get_running_loop().run_in_executor(self._write_pool, writer.close)
        self._write_pool = self._read_pool = None
        # Jobs still queued run to their end (a query stops at once: the store is closing);
        # cancelling them would raise CancelledError in callers that were never cancelled.
        for pool in pools:
            await asyncio.to_thread(pool.shutdown, True)  # waited for off the loop
        with self._readers_lock:
            for conn in self._readers:
                conn.close()
            self._readers.clear()

    async def _in_writer(self, fn: Callable[..., T], *args: Any) -> T:
        if self._write_pool is None:
            raise ValueError("the history store is closed")
        return await asyncio.get_running_loop().run_in_executor(self._write_pool, fn, *args)

    async def _in_reader(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(connection, *args) in a reader thread, on that thread's own connection."""
        if self._read_pool is None:
            raise ValueError("the history store is closed")
        return await asyncio.get_running_loop().run_in_executor(self._read_pool, self._with_reader, fn, args)

    def _with_reader(self, fn: Callable[..., T], args: tuple[Any, ...]) -> T:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = connect(self.path, readonly=True)
            # close() interrupts what runs; this also stops a statement that starts after it.
            conn.set_progress_handler(lambda: self._closing, PROGRESS_STEPS)
            with self._readers_lock:
                self._readers.append(conn)
        return fn(conn, *args)

    # -- writing -----------------------------------------------------------------------

    async def write(self, events: list[Event], now: float | None = None) -> int:
        """Store a batch (one transaction in the writer thread); returns how many events were new.
        A cancel leaves the thread to finish the transaction: it commits or rolls back whole."""
        writer = self.writer
        if writer is None:
            raise ValueError("the history store is closed")
        now = time.time() if now is None else now
        new = await self._in_writer(writer.write, events, now - self.retention["raw"])
        if self.max_bytes is not None:
            await self._in_writer(writer.trim, self.max_bytes)
        return new

    # -- compaction --------------------------------------------------------------------

    async def compact(self, now: float | None = None) -> int:
        """Delete expired raw events and roll-ups in chunks; returns rows deleted."""
        writer = self.writer
        if writer is None:
            raise ValueError("the history store is closed")
        now = time.time() if now is None else now
        total = 0
        plans = [("raw", "seq", "ts", now - self.retention["raw"])]
        plans += [(f"rollup_{lv}", "bucket, sid", "bucket", now - self.retention[lv]) for lv, _ in LEVELS]
        hours = 0
        for table, key, col, cutoff in plans:
            while True:
                n = await self._in_writer(writer.compact_chunk, table, key, col, cutoff)
                total += n
                hours += n if table == "rollup_hour" else 0
                if n == 0 or self._closing:
                    break
        if hours:  # every event has an hour row, kept longest: a series is gone with its last one
            total += await self._in_writer(writer.drop_orphan_series)
        self.stats["compacted"] += total
        if self.max_bytes is not None:
            await self._in_writer(writer.trim, self.max_bytes)
        return total

    async def used_bytes(self) -> int:
        """Bytes of store.db in use (what the size cap is compared with)."""
        assert self.writer is not None
        return await self._in_writer(self.writer.used_bytes)

    # -- queries -----------------------------------------------------------------------

    async def _fetch(self, sql: str, args: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        """Rows of any read-only query, from a reader thread."""
        params = tuple(args)
        return await self._in_reader(lambda conn: [tuple(r) for r in conn.execute(sql, params)])

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
        for col, val in (("source", source), ("agent_id", agent), ("session_id", session)):
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
        out = await self._in_reader(query.events, where, args, limit, name)
        nxt = f"{out[-1]['ts']!r}~{out[-1]['id']}" if len(out) == limit else None
        return out, nxt

    def names(self) -> list[dict[str, Any]]:
        """The catalogue: every name with its kind, tag keys, last value and count."""
        if self.writer is None:
            return []
        with self.writer.names_lock:
            entries = [(n, k, sorted(keys), lv, lt, c) for n, (k, keys, lv, lt, c) in self.writer.names.items()]
        return [
            {"name": n, "kind": k, "tag_keys": keys, "last_value": lv, "last_ts": lt, "count": c}
            for n, k, keys, lv, lt, c in sorted(entries)
        ]

    def choose_level(self, start: float, end: float, step: float, now: float) -> tuple[str, int]:
        """The coarsest level no coarser than `step` whose data reaches back to `start`
        (raw events: their retention, or where the size cap trimmed them)."""
        raw_from = now - self.retention["raw"]
        if self.writer is not None:
            raw_from = max(raw_from, self.writer.raw_floor)
        if step < 60 and start >= raw_from:
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
        q: float | None = None,
    ) -> dict[str, Any]:
        """Aggregate `name` over [start, end) in `step`-second buckets; `t` and `v` arrays
        cover every bucket (v is None where there is no data). `name` None takes every
        name (meaningful with agg "count": the overview's events/s). The query and the
        aggregation run in a reader thread."""
        now = time.time() if now is None else now
        span = max(1.0, end - start)
        step = step or max(1.0, span / 300)
        step = max(step, span / MAX_POINTS)
        level, res = self.choose_level(start, end, step, now)
        step = max(res, math.ceil(step / res) * res)
        first = math.floor(start / step) * step
        nb = math.ceil((end - first) / step)
        if agg in ("rate", "quantile") and name is not None:
            running = self.kind_of(name) == "gauge"
            if running and level != "raw" and self._raw_reaches(first, now):
                level = "raw"  # a running total's resets are only seen in its raw values
            return await self._growth(name, agg, q, level, first, end, step, nb, running, tags or {})

        def run(conn: sqlite3.Connection) -> list[float | None]:
            cells = query.series_cells(
                conn,
                level=level,
                name=name,
                tags=tags or {},
                first=first,
                end=end,
                step=step,
                nb=nb,
                agg=agg,
                closing=lambda: self._closing,
            )
            return [query.value_of(c, agg) for c in cells]

        values = await self._in_reader(run)
        return {
            "name": name,
            "agg": agg,
            "level": level,
            "step": step,
            "from": first,
            "to": first + nb * step,
            "t": [first + i * step for i in range(nb)],
            "v": values,
        }

    def kind_of(self, name: str) -> str | None:
        """The kind a name was recorded with (None if never)."""
        if self.writer is None:
            return None
        with self.writer.names_lock:
            entry = self.writer.names.get(name)
        return entry[0] if entry else None

    def _raw_reaches(self, start: float, now: float) -> bool:
        floor = now - self.retention["raw"]
        if self.writer is not None:
            floor = max(floor, self.writer.raw_floor)
        return start >= floor

    async def _growth(
        self,
        name: str,
        agg: str,
        q: float | None,
        level: str,
        first: float,
        end: float,
        step: float,
        nb: int,
        running: bool,
        tags: dict[str, str],
    ) -> dict[str, Any]:
        """`rate` and bucket `quantile` answers: both start from each step's growth."""

        def run(conn: sqlite3.Connection) -> list[float | None]:
            grown = query.increases(
                conn,
                level=level,
                name=name,
                tags=tags,
                first=first,
                end=end,
                step=step,
                nb=nb,
                running=running,
                key=query.le_of if agg == "quantile" else (lambda _t: None),
                closing=lambda: self._closing,
            )
            if agg == "rate":
                row = grown.get(None) or [None] * nb
                return [None if v is None else v / step for v in row]
            bounds = {query.parse_le(le): row for le, row in grown.items()}
            per_le = {b: row for b, row in bounds.items() if b is not None}
            out: list[float | None] = []
            for i in range(nb):
                counts = {b: v for b, row in per_le.items() if (v := row[i]) is not None}
                out.append(query.bucket_quantile(q if q is not None else 0.5, counts) if counts else None)
            return out

        values = await self._in_reader(run)
        out = {"name": name, "agg": agg, "level": level, "step": step, "from": first, "to": first + nb * step}
        if agg == "quantile":
            out["q"] = q
        return {**out, "t": [first + i * step for i in range(nb)], "v": values}


def decode_cursor(cursor: str) -> tuple[float, str]:
    """Parse a cursor from `events()`; raises ValueError when malformed."""
    ts, sep, eid = cursor.partition("~")
    if not sep or not eid:
        raise ValueError("malformed cursor")
    return float(ts), eid
