"""agent.db gives space back after a backlog drains (issue 18, item 5: incremental vacuum).

- a new agent.db is made with auto_vacuum = INCREMENTAL; an older file (0.1.0's) is
  switched with one VACUUM at open, unless its live data is large (then it waits);
- a journal filled with a big backlog and then drained shrinks: the journal's checkpoint
  gives the free pages back in bounded steps, and the file on disk follows at the next
  WAL checkpoint;
- a real agent: a backlog held by a sink that never confirms, then delivered after a
  restart, and agent.db shrinks by itself (housekeeping), every event delivered once.

Sizes are asserted, never times.
"""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from agent.event import Event
from agent.losses import LossLedger
from agent.pipeline.journal import Journal
from agent.storage import database
from agent.storage.database import Database
from tests.helpers import await_until, jsonl_sink, make_agent, post_events, read_jsonl

FIXTURE = Path(__file__).parent / "fixtures" / "datadir_v0_1_0"


def pragmas(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as conn:
        return {p: conn.execute(f"PRAGMA {p}").fetchone()[0]
                for p in ("auto_vacuum", "page_count", "page_size", "freelist_count")}


def db_bytes(db: Path) -> int:
    """What SQLite says the database holds (pages x page size), WAL included."""
    p = pragmas(db)
    return p["page_count"] * p["page_size"]


def checkpoint_wal(db: Path) -> None:
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


async def test_a_new_agent_db_is_incremental(tmp_path: Path) -> None:
    db = Database(tmp_path)
    await db.open()
    await db.close()
    assert pragmas(tmp_path / "agent.db")["auto_vacuum"] == 2  # INCREMENTAL


async def test_a_0_1_0_agent_db_is_switched_at_open(tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(FIXTURE, data)
    assert pragmas(data / "agent.db")["auto_vacuum"] == 0
    db = Database(data)
    await db.open()
    await db.close()
    assert pragmas(data / "agent.db")["auto_vacuum"] == 2


async def test_a_large_old_agent_db_waits_for_a_smaller_journal(tmp_path: Path, monkeypatch) -> None:
    data = tmp_path / "data"
    shutil.copytree(FIXTURE, data)
    monkeypatch.setattr(database, "SWITCH_VACUUM_MAX_BYTES", 1024)  # the fixture's live data is more than this
    db = Database(data)
    await db.open()
    try:
        assert await db.reclaim()  # nothing to do on a file that is not incremental: never an error
    finally:
        await db.close()
    assert pragmas(data / "agent.db")["auto_vacuum"] == 0
    monkeypatch.setattr(database, "SWITCH_VACUUM_MAX_BYTES", 64 << 20)
    db = Database(data)
    await db.open()
    await db.close()
    assert pragmas(data / "agent.db")["auto_vacuum"] == 2


async def test_a_drained_backlog_gives_its_space_back(tmp_path: Path) -> None:
    db = Database(tmp_path)
    await db.open()
    try:
        journal = Journal(db, LossLedger(), max_bytes=1 << 30)
        await journal.open()
        journal.attach(["slow"])
        for _ in range(60):  # ~24 MB of segments, never confirmed
            await journal.append([Event(name="backlog", value=1.0, data={"pad": "p" * 400}) for _ in range(1000)])
        await journal.checkpoint()
        full = db_bytes(tmp_path / "agent.db")
        assert full > 20 << 20 and pragmas(tmp_path / "agent.db")["freelist_count"] < 100
        journal.advance("slow", journal.last_seq)  # the sink catches up: every segment is compacted
        await journal.checkpoint()
        assert journal.segments == 0
        for _ in range(100):  # bounded steps per checkpoint: as many checkpoints as it takes
            await journal.checkpoint()
            if db_bytes(tmp_path / "agent.db") < full // 5:
                break
        drained = db_bytes(tmp_path / "agent.db")
        assert drained < full // 5, (full, drained)
        # The journal goes on working in the smaller file.
        await journal.append([Event(name="after", value=1.0)])
        assert [e.name for _, e in await journal.read(journal.last_seq - 1, 10)] == ["after"]
    finally:
        await db.close()
    checkpoint_wal(tmp_path / "agent.db")
    assert (tmp_path / "agent.db").stat().st_size < full // 5  # the file on disk shrank too


async def test_the_agent_shrinks_agent_db_after_its_backlog_is_delivered(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "out.jsonl"
    acked: list[str] = []
    async with make_agent(data, {"out": {"type": "hang"}}, agent={"shutdown_timeout_s": 0.3},
                          dashboard={"store": False}) as agent:
        for _ in range(30):  # ~12 MB journaled, never confirmed by the hanging sink
            acked += await post_events(agent, [{"name": "backlog", "value": i, "data": {"pad": "p" * 400}}
                                               for i in range(1000)])
    full = db_bytes(data / "agent.db")
    assert full > 10 << 20
    async with make_agent(data, {"out": jsonl_sink(out)}, dashboard={"store": False}) as agent:
        await await_until(lambda: len(read_jsonl(out)) >= len(acked), timeout=120, interval=0.2,
                          what="the backlog delivered")
        await await_until(lambda: db_bytes(data / "agent.db") < full // 4, timeout=120, interval=0.2,
                          what="agent.db to give its space back")
        print(f"\nagent.db: {full >> 20} MiB with the backlog, {db_bytes(data / 'agent.db') >> 20} MiB after it")
    assert sorted(e["id"] for e in read_jsonl(out)) == sorted(acked)  # each once


@pytest.mark.parametrize("steps", [1, 3])
async def test_reclaim_is_bounded_per_call(tmp_path: Path, steps: int) -> None:
    db = Database(tmp_path)
    await db.open()
    try:
        async with db.tx() as conn:
            await conn.execute("CREATE TABLE filler (b BLOB)")
            await conn.executemany("INSERT INTO filler VALUES (zeroblob(4000))", [()] * 8000)
        async with db.tx() as conn:
            await conn.execute("DELETE FROM filler")
        before = pragmas(tmp_path / "agent.db")["freelist_count"]
        assert not await db.reclaim(max_steps=steps)  # more is left to give back
        after = pragmas(tmp_path / "agent.db")["freelist_count"]
        assert before - after == steps * database.RECLAIM_STEP_PAGES
        while not await db.reclaim():
            pass
        assert pragmas(tmp_path / "agent.db")["freelist_count"] < database.RECLAIM_MIN_PAGES
    finally:
        await db.close()
