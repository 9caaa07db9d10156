"""Versioned schemas of agent.db and store.db: a data dir written by release 0.1.0 is
upgraded and delivers its backlog; a newer file is refused; steps are transactional."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

import aiosqlite
import pytest

from agent.errors import SchemaVersionError
from agent.history import store as history
from agent.history.store import HistoryStore
from agent.runtime import Agent
from agent.storage import database
from agent.storage.database import Database
from agent.storage.migrations import Migration, current_version, migrate
from tests.helpers import journal_ids

FIXTURE = Path(__file__).parent / "fixtures" / "datadir_v0_1_0"
TS0 = 1_780_000_000.0  # the fixture's timestamps (see tests/fixtures/make_datadir_v0_1_0.py)
FOREVER_H = 1e6  # the fixture's events are older than any default retention


def copy_fixture(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    shutil.copytree(FIXTURE, data)
    return data


def fixture_config(data: Path, out: Path) -> dict:
    """The sinks the 0.1.0 fixture was written with, now able to deliver."""
    keep = {"retention_h": FOREVER_H, "minute_retention_h": FOREVER_H, "hour_retention_h": FOREVER_H}
    return {
        "agent": {"data_dir": str(data), "commit_interval_ms": 2},
        "server": {"enabled": False},
        "sinks": {"store": {**keep, "policies": []}, "out": {"type": "jsonl", "path": str(out), "policies": []}},
    }


def sql(path: Path, query: str) -> list[tuple]:
    with sqlite3.connect(path) as conn:
        return conn.execute(query).fetchall()


def schema_of(path: Path) -> list[tuple]:
    return sql(path, "SELECT type, name, sql FROM sqlite_master WHERE name NOT LIKE 'schema_migrations%' ORDER BY name")


def versions(path: Path) -> list[tuple]:
    return sql(path, "SELECT version, name, applied_at FROM schema_migrations ORDER BY version")


async def test_release_0_1_0_data_dir_is_upgraded_and_delivers_its_backlog(tmp_path: Path) -> None:
    data, out = copy_fixture(tmp_path), tmp_path / "out.jsonl"
    pending = journal_ids(data / "agent.db")
    assert len(pending) == 50  # undelivered to "out" when 0.1.0 stopped
    old_schema = {f: schema_of(data / f) for f in ("agent.db", "store.db")}

    async with Agent(fixture_config(data, out)) as agent:
        assert await agent.flush(10)
    delivered = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert sorted(delivered) == sorted(pending)  # each once, nothing else

    async with Agent(fixture_config(data, out)) as agent:  # a second start sends nothing again
        assert await agent.flush(10)
    assert len(out.read_text().splitlines()) == 50

    for file, steps in (("agent.db", database.MIGRATIONS), ("store.db", history.MIGRATIONS)):
        assert [v for v, _, _ in versions(data / file)] == list(range(1, len(steps) + 1))
        if len(steps) == 1:  # step 1 recognises 0.1.0's tables and changes none of them
            assert schema_of(data / file) == old_schema[file]

    store = HistoryStore(data / "store.db", raw_retention_s=FOREVER_H * 3600)
    await store.open()
    try:
        got, _ = await store.events(name="fixture.pending", limit=100)
        assert sorted(e["id"] for e in got) == sorted(pending)
        got, _ = await store.events(name="fixture.delivered", limit=100)
        assert len(got) == 20  # delivered by 0.1.0 itself
        series = await store.series("fixture.pending", TS0, TS0 + 3600, 60, "count", now=TS0 + 3600)
        assert series["level"] == "minute" and sum(v or 0 for v in series["v"]) == 50
        assert {n["name"] for n in store.names()} == {"fixture.delivered", "fixture.pending"}
    finally:
        await store.close()


async def open_database(data: Path) -> None:
    db = Database(data)
    try:
        await db.open()
    finally:
        await db.close()


async def open_store(data: Path) -> None:
    store = HistoryStore(data / "store.db")
    try:
        await store.open()
    finally:
        await store.close()


@pytest.mark.parametrize(("file", "opener", "steps"), [
    ("agent.db", open_database, database.MIGRATIONS),
    ("store.db", open_store, history.MIGRATIONS),
])
async def test_a_file_from_a_newer_release_is_refused_not_downgraded(tmp_path, file, opener, steps) -> None:
    data = copy_fixture(tmp_path)
    await opener(data)
    future = len(steps) + 1
    with sqlite3.connect(data / file) as conn:
        conn.execute("INSERT INTO schema_migrations VALUES (?, 'from the future', 0)", (future,))
    before = schema_of(data / file), versions(data / file)

    with pytest.raises(SchemaVersionError) as err:
        await opener(data)
    assert (err.value.found, err.value.known) == (future, len(steps))
    msg = str(err.value)
    assert str(data / file) in msg and f"version {future}" in msg and f"up to {len(steps)}" in msg
    assert (schema_of(data / file), versions(data / file)) == before
    assert sorted(p.name for p in data.iterdir() if "corrupt" in p.name) == []  # not quarantined either


async def test_an_agent_on_a_newer_data_dir_fails_to_start_with_that_error(tmp_path: Path) -> None:
    data = copy_fixture(tmp_path)
    await open_database(data)
    with sqlite3.connect(data / "agent.db") as conn:
        conn.execute("INSERT INTO schema_migrations VALUES (99, 'from the future', 0)")
    agent = Agent(fixture_config(data, tmp_path / "out.jsonl"))
    with pytest.raises(SchemaVersionError, match="version 99"):
        await agent.start()
    assert agent.state == "failed"
    await open_store(data)  # the data dir was released: nothing else is holding it
    assert not (tmp_path / "out.jsonl").exists()


async def test_opening_twice_migrates_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    await open_database(data)
    await open_store(data)
    first = {f: (schema_of(data / f), versions(data / f)) for f in ("agent.db", "store.db")}
    await open_database(data)
    await open_store(data)
    assert {f: (schema_of(data / f), versions(data / f)) for f in ("agent.db", "store.db")} == first


async def test_migrate_applies_only_the_missing_steps_in_order(tmp_path: Path) -> None:
    calls: list[int] = []

    async def backfill(conn: aiosqlite.Connection) -> None:
        calls.append(await current_version(conn))
        await conn.execute("INSERT INTO t (a) VALUES (2)")

    steps = [Migration(1, "create t", "CREATE TABLE t (a INTEGER); -- a comment; with a semicolon\n"),
             Migration(2, "backfill", backfill)]
    async with aiosqlite.connect(tmp_path / "x.db", isolation_level=None) as conn:
        assert await migrate(conn, steps[:1], "x.db") == 1
        assert await migrate(conn, steps, "x.db") == 2
        assert await migrate(conn, steps, "x.db") == 2
        assert calls == [1]  # step 2 ran once, on a file at version 1
        assert await conn.execute_fetchall("SELECT a FROM t") == [(2,)]


@pytest.mark.parametrize("bad", [
    "CREATE TABLE half (a); INSERT INTO no_such_table VALUES (1);",
    "oops",
])
async def test_a_failing_step_rolls_back_and_keeps_the_version(tmp_path: Path, bad) -> None:
    data = copy_fixture(tmp_path)
    await open_database(data)  # at the latest version
    before = schema_of(data / "agent.db"), versions(data / "agent.db")

    async with aiosqlite.connect(data / "agent.db", isolation_level=None) as conn:
        with pytest.raises(sqlite3.OperationalError):
            await migrate(conn, [*database.MIGRATIONS, Migration(len(database.MIGRATIONS) + 1, "broken", bad)],
                          "agent.db")
        assert not conn.in_transaction
    assert (schema_of(data / "agent.db"), versions(data / "agent.db")) == before


async def test_a_failing_first_step_leaves_a_0_1_0_file_as_it_was(tmp_path: Path) -> None:
    data = copy_fixture(tmp_path)
    before = schema_of(data / "agent.db")

    async def broken(conn: aiosqlite.Connection) -> None:
        await conn.execute("CREATE TABLE half (a)")
        raise RuntimeError("step failed")

    async with aiosqlite.connect(data / "agent.db", isolation_level=None) as conn:
        with pytest.raises(RuntimeError):
            await migrate(conn, [Migration(1, "broken", broken)], "agent.db")
        assert await current_version(conn) == 0  # no version table was left behind
    assert schema_of(data / "agent.db") == before


async def test_a_new_step_upgrades_an_old_file_when_the_agent_opens_it(tmp_path: Path, monkeypatch) -> None:
    # How a later release changes a table: it appends a step, and a 0.1.0 file gets 1 then 2.
    data = copy_fixture(tmp_path)
    step = Migration(len(database.MIGRATIONS) + 1, "dlq note", "ALTER TABLE dlq ADD COLUMN note TEXT;")
    monkeypatch.setattr(database, "MIGRATIONS", [*database.MIGRATIONS, step])
    await open_database(data)
    assert [v for v, _, _ in versions(data / "agent.db")] == list(range(1, len(database.MIGRATIONS) + 1))
    assert "note" in [c[1] for c in sql(data / "agent.db", "PRAGMA table_info(dlq)")]
    assert len(journal_ids(data / "agent.db")) == 50


async def test_a_corrupt_file_is_still_moved_aside_and_a_fresh_one_starts_at_the_latest_version(tmp_path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "agent.db").write_bytes(b"not a database" * 500)
    db = Database(data)
    try:
        await db.open()
        assert db.recovered_from is not None and Path(db.recovered_from).exists()
    finally:
        await db.close()
    assert [v for v, _, _ in versions(data / "agent.db")] == list(range(1, len(database.MIGRATIONS) + 1))
