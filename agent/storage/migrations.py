"""Numbered schema migrations for the agent's own SQLite files (agent.db, store.db).

A file's version is the highest row of its `schema_migrations` table. A table rather
than `PRAGMA user_version`: `SELECT * FROM schema_migrations` shows which steps ran and
when, which is what one wants to see after an upgrade went wrong.

Step 1 of each file is the schema release 0.1.0 created (`CREATE ... IF NOT EXISTS`,
with no version table): on such a file, version 0, it changes nothing and stamps
version 1. Each step runs in its own transaction together with its version row, so a
step that fails leaves the file at the version before it. A file at a version newer
than the code knows is refused, never downgraded.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass

import aiosqlite

from agent.errors import SchemaVersionError

log = logging.getLogger("sidecar_agent.db")

VERSION_TABLE = """CREATE TABLE IF NOT EXISTS schema_migrations (
    version    INTEGER PRIMARY KEY,
    name       TEXT NOT NULL,
    applied_at REAL NOT NULL
)"""


@dataclass(frozen=True)
class Migration:
    """One numbered step: an SQL script, or a coroutine for changes SQL cannot express."""

    version: int
    name: str
    apply: str | Callable[[aiosqlite.Connection], Awaitable[None]]


async def current_version(conn: aiosqlite.Connection) -> int:
    """The file's schema version; 0 for a file without a version table (release 0.1.0, or new)."""
    if not await conn.execute_fetchall(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'schema_migrations'"
    ):
        return 0
    async with conn.execute("SELECT coalesce(max(version), 0) FROM schema_migrations") as cur:
        row = await cur.fetchone()
    return int(row[0]) if row else 0


async def migrate(conn: aiosqlite.Connection, steps: Sequence[Migration], file_label: str) -> int:
    """Bring the file behind `conn` (autocommit mode) to the last of `steps`; returns its version.

    Raises SchemaVersionError, naming `file_label` and both versions, when the file is newer.
    """
    latest = len(steps)
    assert [s.version for s in steps] == list(range(1, latest + 1)), f"{file_label}: steps must be numbered 1..N"
    while True:
        # The version is read inside the step's write transaction, so two openers of one
        # file cannot both apply the same step.
        try:
            await conn.execute("BEGIN IMMEDIATE")  # in the try: a cancel on its await must still roll back
            version = await current_version(conn)
            if version > latest:
                raise SchemaVersionError(file_label, version, latest)
            if version == latest:
                await conn.execute("COMMIT")
                return version
            step = steps[version]
            await conn.execute(VERSION_TABLE)
            if isinstance(step.apply, str):
                # Not executescript(): it would commit the open transaction first.
                for statement in _statements(step.apply):
                    await conn.execute(statement)
            else:
                await step.apply(conn)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                (step.version, step.name, time.time()),
            )
            await conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error, ValueError):  # never replaces what propagates
                await conn.execute("ROLLBACK")
            raise
        log.info("%s: applied schema migration %d (%s)", file_label, step.version, step.name)


def _statements(script: str) -> Iterator[str]:
    """Split an SQL script into statements: sqlite3 knows whether a `;` ends one (not in a comment or string)."""
    start = 0
    for i, char in enumerate(script):
        if char == ";" and sqlite3.complete_statement(script[start : i + 1]):
            yield script[start : i + 1]
            start = i + 1
    if script[start:].strip():
        yield script[start:]
