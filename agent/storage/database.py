"""The agent's SQLite database (WAL): journal, cursors, loss ledger and DLQ share one file.

Opening runs `PRAGMA quick_check`; a corrupt file is moved aside (kept, with a
timestamp in its name) and a fresh one is created. The schema is versioned: `MIGRATIONS`
are applied in order by agent.storage.migrations. Writes go through `tx()`, which
serializes transactions on the single writer connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiosqlite

from agent.storage.dirlock import DataDirInUse, DataDirLock  # noqa: F401  (DataDirInUse: re-exported)
from agent.storage.migrations import Migration, migrate

log = logging.getLogger("sidecar_agent.db")

# Release 0.1.0's schema, exactly: its files have these tables and no version table.
SCHEMA_V1 = """
CREATE TABLE IF NOT EXISTS journal (
    -- One row per group commit (a segment): events first_seq..seq, in order.
    seq       INTEGER PRIMARY KEY AUTOINCREMENT,  -- the segment's last event seq; AUTOINCREMENT
                                                  -- keeps the high-water mark after compaction
    first_seq INTEGER NOT NULL,
    count     INTEGER NOT NULL,
    body      BLOB NOT NULL                       -- msgpack array of Events
);
CREATE TABLE IF NOT EXISTS cursors (
    sink TEXT PRIMARY KEY,
    seq  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS losses (
    reason TEXT NOT NULL,
    sink   TEXT NOT NULL DEFAULT '',
    count  INTEGER NOT NULL,
    PRIMARY KEY (reason, sink)
);
CREATE TABLE IF NOT EXISTS dlq (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    sink          TEXT NOT NULL,
    events        BLOB NOT NULL,     -- msgpack list of Event
    count         INTEGER NOT NULL,
    error_class   TEXT NOT NULL,
    error         TEXT NOT NULL,
    attempts      INTEGER NOT NULL,
    first_attempt REAL NOT NULL,
    last_attempt  REAL NOT NULL,
    status        TEXT NOT NULL DEFAULT 'pending',
    created       REAL NOT NULL,
    updated       REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS dlq_sink_status ON dlq (sink, status, id);
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""

# Segments that failed to decode, moved out of the journal with their bytes as found
# (for inspection); their events are counted under `journal_corrupt`.
SCHEMA_V2 = """
CREATE TABLE IF NOT EXISTS journal_quarantine (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    seq         INTEGER NOT NULL,   -- the segment's last event seq, as it was in the journal
    first_seq   INTEGER NOT NULL,
    count       INTEGER NOT NULL,   -- events counted as lost (the segment row's count)
    body        BLOB NOT NULL,      -- the bytes as found (empty if they could not be read)
    error       TEXT NOT NULL,
    origin      TEXT NOT NULL DEFAULT '',  -- '' (this file), or the quarantined file it was salvaged from
    quarantined REAL NOT NULL
);
"""

# Segment format 1 (agent/storage/segment.py): per-event offsets and checksums beside the
# body, so one damaged event costs only itself. NULL in rows written before: format 0,
# still read as it is (rows are never rewritten to change format).
SCHEMA_V3 = """
ALTER TABLE journal ADD COLUMN frames BLOB;
ALTER TABLE journal_quarantine ADD COLUMN frames BLOB;
"""

# Append new steps; never edit one that has shipped.
MIGRATIONS = [
    Migration(1, "initial schema (release 0.1.0)", SCHEMA_V1),
    Migration(2, "journal_quarantine: segments that failed to decode", SCHEMA_V2),
    Migration(3, "journal.frames: per-event checksums (segment format 1)", SCHEMA_V3),
]

DB_FILE = "agent.db"
# Giving space back (incremental auto-vacuum). A file made before it needs one VACUUM to
# switch, done at open when that copies little: past this much live data it waits for a
# start where the journal is smaller (VACUUM copies the live pages, not the free ones).
SWITCH_VACUUM_MAX_BYTES = 64 << 20
RECLAIM_MIN_PAGES = 1024  # a freelist smaller than this (or than a quarter of the file) is kept for reuse
RECLAIM_STEP_PAGES = 512  # pages given back per step: each step is one short write, between commits
WAL_SIZE_LIMIT = 16 << 20  # the WAL file is truncated back to this after a checkpoint


class Database:
    """Owns the writer and reader connections to the agent's SQLite file."""

    def __init__(self, data_dir: Path, *, sync: str = "full", cli: bool = False) -> None:
        self.path = Path(data_dir) / DB_FILE
        self.sync = sync
        self.writer: aiosqlite.Connection | None = None
        self.reader: aiosqlite.Connection | None = None
        self.recovered_from: str | None = None  # path of a corrupt file moved aside
        self.salvage: dict[str, object] | None = None  # what was salvaged from it (agent.storage.salvage)
        self._lock = asyncio.Lock()
        # Two agents on one data dir would corrupt each other's sequence numbers and
        # cursors, so the dir is exclusively locked for as long as the database is open.
        self.dir_lock = DataDirLock(Path(data_dir), cli=cli)

    async def open(self) -> None:
        """Lock the data dir (unless `dir_lock` is held already), open (checking integrity
        first), apply pending migrations, open the reader. A file from a newer release
        raises SchemaVersionError."""
        if not self.dir_lock.held:
            await self.dir_lock.acquire()
        if self.path.exists() and not await self._healthy():
            self._move_aside()
        self.writer = await self._connect()
        await migrate(self.writer, MIGRATIONS, f"agent database {self.path}")
        await self._switch_to_incremental_vacuum()
        if self.recovered_from is not None:
            await self._salvage(self.recovered_from)
        self.reader = await self._connect()

    async def _salvage(self, source: str) -> None:
        """Copy what still reads in the file moved aside into the fresh one (see salvage.py).
        A salvage that fails is logged; the fresh database is used either way."""
        from agent.storage.salvage import salvage_into

        try:
            report = await salvage_into(self, source)
        except Exception as exc:
            log.error("salvage from %s failed: %r; starting without its contents", source, exc, exc_info=True)
            self.salvage = {"source": source, "error": f"{type(exc).__name__}: {exc}"}
            return
        self.salvage = {
            "source": source,
            "segments": report.segments,
            "events": report.events,
            "cursors": len(report.cursors),
            "cursors_lost": report.cursors_lost,
            "dlq_entries": report.dlq_entries,
            "lost": report.lost,
            "header_rebuilt": report.header_rebuilt,
            "error": report.error,
        }

    async def _connect(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        # Before WAL mode: on a new file this is what makes it incremental (WAL writes the header).
        await conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        await conn.execute("PRAGMA journal_mode=WAL")
        await conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
        await conn.execute(f"PRAGMA synchronous={'FULL' if self.sync == 'full' else 'NORMAL'}")
        await conn.execute("PRAGMA busy_timeout=5000")
        return conn

    async def _switch_to_incremental_vacuum(self) -> None:
        """A file from before incremental auto-vacuum (0.1.0, or any made without it) needs one
        VACUUM to switch. Done here, at open, when the live data is small; otherwise logged and
        left for a later start (the journal is usually small once its backlog has drained)."""
        assert self.writer is not None
        if (await self._pragma("auto_vacuum")) == 2:
            return
        pages, free, size = [await self._pragma(p) for p in ("page_count", "freelist_count", "page_size")]
        live = (pages - free) * size
        if live > SWITCH_VACUUM_MAX_BYTES:
            log.warning(
                "%s: %d MiB of live data; switching to incremental auto-vacuum (one VACUUM) waits for a smaller"
                " journal at a later start",
                self.path,
                live >> 20,
            )
            return
        await self.writer.execute("VACUUM")  # applies auto_vacuum=INCREMENTAL (set by _connect)
        log.info(
            "%s: switched to incremental auto-vacuum (%d MiB before, %d MiB live)",
            self.path,
            pages * size >> 20,
            live >> 20,
        )

    async def _pragma(self, name: str) -> int:
        assert self.writer is not None
        rows = list(await self.writer.execute_fetchall(f"PRAGMA {name}"))
        return int(rows[0][0])

    async def reclaim(self, max_steps: int = 4) -> bool:
        """Give free pages back to the file system (incremental vacuum) when the freelist is
        large: at most `max_steps` steps of RECLAIM_STEP_PAGES, each a short write on its own
        (the committer's appends go in between). Returns False while some is left to give back.
        The file shrinks at the next WAL checkpoint."""
        assert self.writer is not None, "database is not open"
        for _ in range(max_steps):
            async with self._lock:
                pages, free = await self._pragma("page_count"), await self._pragma("freelist_count")
                if free < max(RECLAIM_MIN_PAGES, pages // 4) or await self._pragma("auto_vacuum") != 2:
                    return True
                # executescript steps the pragma to completion (execute() would free one page);
                # in autocommit mode it is a transaction of its own.
                await self.writer.executescript(f"PRAGMA incremental_vacuum({RECLAIM_STEP_PAGES});")
            await asyncio.sleep(0)
        return False

    async def _healthy(self) -> bool:
        try:
            async with aiosqlite.connect(self.path) as conn:
                rows = await conn.execute_fetchall("PRAGMA quick_check")
                ok = [r[0] for r in rows] == ["ok"]
                if ok:
                    await conn.execute_fetchall("SELECT count(*) FROM sqlite_master")
                return ok
        except sqlite3.DatabaseError as exc:
            log.error("database %s failed its integrity check: %s", self.path, exc)
            return False

    def _move_aside(self) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        self.path.rename(target)
        for suffix in ("-wal", "-shm"):
            side = self.path.with_name(self.path.name + suffix)
            if side.exists():
                side.rename(target.with_name(target.name + suffix))
        self.recovered_from = str(target)
        log.error("database %s was corrupt: moved aside to %s; starting on a fresh one", self.path, target)

    @contextlib.asynccontextmanager
    async def tx(self) -> AsyncIterator[aiosqlite.Connection]:
        """A write transaction on the writer connection, one at a time."""
        assert self.writer is not None, "database is not open"
        async with self._lock:
            try:
                # Inside the try: a cancel landing on BEGIN's await does not stop BEGIN from
                # running in aiosqlite's thread, and the transaction must not stay open.
                await self.writer.execute("BEGIN IMMEDIATE")
                yield self.writer
                await self.writer.execute("COMMIT")
            except BaseException:
                # Also covers a failed COMMIT (disk full): the transaction must not stay open.
                # Suppressed so the ROLLBACK's own error never replaces what propagates
                # (a CancelledError above all; see HistoryStore.write).
                with contextlib.suppress(sqlite3.Error, ValueError):
                    await self.writer.execute("ROLLBACK")
                raise

    async def fetchall(self, sql: str, params: tuple = ()) -> list[sqlite3.Row]:
        """A read on the reader connection (WAL lets it run beside writes)."""
        assert self.reader is not None, "database is not open"
        return list(await self.reader.execute_fetchall(sql, params))

    async def close(self) -> None:
        """Close both connections."""
        for conn in (self.reader, self.writer):
            if conn is not None:
                with contextlib.suppress(Exception):
                    await conn.close()
        self.reader = self.writer = None
        self.dir_lock.release()
