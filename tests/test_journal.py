"""The journal: append/read/cursors/compaction, AUTOINCREMENT seqs, the size cap and
its overflow policies (counted exactly), persistence of cursors and the loss ledger."""

from __future__ import annotations

import sqlite3

import aiohttp
import pytest

from agent import losses
from agent.errors import JournalFullError
from agent.event import Event
from agent.losses import LossLedger
from agent.pipeline.journal import Journal
from agent.storage.database import Database
from tests.helpers import await_until, make_agent


async def open_journal(tmp_path, **kw):
    db = Database(tmp_path)
    await db.open()
    ledger = LossLedger()
    j = Journal(db, ledger, max_bytes=kw.pop("max_bytes", 1 << 30), **kw)
    await j.open()
    return db, ledger, j


def bodies(n: int, size: int = 100, tag: bytes = b"x") -> list[Event]:
    """n events; the journal stores each append as one segment."""
    return [Event(name="e", value=1.0, data={"pad": (tag * size).decode()}) for _ in range(n)]


async def segment_bytes(tmp_path, n: int, size: int) -> int:
    """What one appended segment of n events costs against the cap."""
    db, _, j = await open_journal(tmp_path / "measure")
    await j.append(bodies(n, size))
    size_of = j.bytes
    await db.close()
    return size_of


async def test_append_read_cursor_compaction(tmp_path):
    db, _, j = await open_journal(tmp_path)
    j.attach(["a", "b"])
    assert await j.append(bodies(6)) == (1, 6)
    assert await j.append(bodies(4)) == (7, 10)
    assert await j.append(bodies(5)) == (11, 15)
    rows = await j.read(0, 100)
    assert [s for s, _ in rows] == list(range(1, 16))
    assert [s for s, _ in await j.read(12, 2)] == [13, 14]
    assert j.lag("a") == 15 and j.lag("b") == 15
    j.advance("a", 15)
    j.advance("b", 6)
    j.advance("b", 3)  # cursors never move back
    assert j.cursors["b"] == 6
    await j.checkpoint()  # compacts whole segments up to the slowest sink
    assert j.rows == 9 and j.segments == 2
    assert [s for s, _ in await j.read(0, 100)] == list(range(7, 16))
    assert j.lag("a") == 0 and j.lag("b") == 9
    await db.close()


async def test_seqs_never_reused_after_full_compaction(tmp_path):
    db, _, j = await open_journal(tmp_path)
    j.attach(["a"])
    await j.append(bodies(10))
    j.advance("a", 10)
    await j.checkpoint()
    assert j.rows == 0
    with sqlite3.connect(tmp_path / "agent.db") as conn:
        assert conn.execute("SELECT count(*) FROM journal").fetchone()[0] == 0
    assert await j.append(bodies(1)) == (11, 11)
    j.advance("a", 11)
    await j.checkpoint()
    await db.close()
    # After a reopen with an empty table the sequence still continues (sqlite_sequence).
    db, _, j = await open_journal(tmp_path)
    j.attach(["a"])
    assert j.rows == 0 and j.last_seq == 11
    assert await j.append(bodies(2)) == (12, 13)
    assert j.cursors["a"] == 11 and j.lag("a") == 2
    await db.close()


async def test_drop_oldest_counts_every_dropped_event_exactly(tmp_path):
    size = 200
    cap = 5 * await segment_bytes(tmp_path, 7, size) + 100
    db, ledger, j = await open_journal(tmp_path, max_bytes=cap, overflow="drop_oldest")
    j.attach(["slow"])  # never advances: nothing is compacted, only the cap drops rows
    appended = 0
    for i in range(30):
        await j.append(bodies(7, size, tag=bytes([65 + i % 26])))
        appended += 7
        assert j.bytes <= cap
    with sqlite3.connect(tmp_path / "agent.db") as conn:
        stored, low = conn.execute("SELECT sum(count), min(first_seq) FROM journal").fetchone()
    dropped = ledger.by_reason()[losses.JOURNAL_FULL]
    assert stored == j.rows
    assert dropped == appended - stored  # every event is either stored or counted
    assert low == dropped + 1  # the oldest went first
    assert j.lag("slow") == stored  # the lag no longer counts the dropped rows
    await db.close()


async def test_reject_raises_and_leaves_the_journal_unchanged(tmp_path):
    cap = await segment_bytes(tmp_path, 10, 100) + 50
    db, ledger, j = await open_journal(tmp_path, max_bytes=cap, overflow="reject")
    j.attach(["slow"])
    await j.append(bodies(10))
    with pytest.raises(JournalFullError):
        await j.append(bodies(1))
    assert j.rows == 10 and j.last_seq == 10
    assert ledger.total() == 0  # the journal raises; the caller decides what is lost
    await db.close()


async def test_reject_http_503_with_retry_after_and_record_drops_counted(tmp_path):
    agent = make_agent(tmp_path, {"stuck": {"type": "hang"}},
                       agent={"overflow": "reject", "max_journal_mb": 0.02, "shutdown_timeout_s": 0.5})  # ~20 KB
    async with agent:
        url = agent.server_url + "/api/v1/events"
        ok = rejected = 0
        async with aiohttp.ClientSession() as http:
            for i in range(200):
                batch = [{"name": "fill", "value": i, "data": {"pad": "p" * 200}} for _ in range(5)]
                async with http.post(url, json=batch) as resp:
                    if resp.status == 202:
                        ok += 1
                    else:
                        assert resp.status == 503
                        assert resp.headers["Retry-After"]
                        assert "full" in (await resp.json())["error"]
                        rejected += 1
                        break
        assert ok > 0 and rejected == 1
        rows_before = agent.journal.rows
        assert agent.ledger.total() == 0  # a 503 is not a loss: the client still holds the events
        for i in range(37):
            agent.record("dropped", i)
        await await_until(lambda: not agent.committer.records, what="the committer to take the records")
        await agent.committer.drain(5)
        assert agent.ledger.by_reason() == {losses.JOURNAL_FULL: 37}
        assert agent.journal.rows == rows_before


async def test_ledger_persisted_across_reopen(tmp_path):
    db, ledger, j = await open_journal(tmp_path)
    ledger.add(losses.JOURNAL_FULL, 5)
    ledger.add(losses.DLQ_PURGED, 3, "pg")
    await j.checkpoint()
    ledger.add(losses.JOURNAL_FULL, 2)
    await j.checkpoint()
    await db.close()
    db, ledger2, _ = await open_journal(tmp_path)
    assert ledger2.snapshot() == {(losses.JOURNAL_FULL, ""): 7, (losses.DLQ_PURGED, "pg"): 3}
    await db.close()


async def test_cursor_persisted_at_checkpoint_only(tmp_path):
    db, _, j = await open_journal(tmp_path)
    j.attach(["a", "b"])
    await j.append(bodies(10))
    j.advance("a", 4)
    j.advance("b", 9)
    await j.checkpoint()
    j.advance("a", 8)  # not checkpointed: after a crash, "a" resumes at 4 (at-least-once)
    await db.close()
    db, _, j = await open_journal(tmp_path)
    assert j.cursors == {"a": 4, "b": 9}
    j.attach(["a"])  # "b" is no longer configured: forgotten, so it cannot block compaction
    await j.checkpoint()
    assert [s for s, _ in await j.read(j.cursors["a"], 100)] == [5, 6, 7, 8, 9, 10]
    await db.close()
    db, _, j = await open_journal(tmp_path)
    assert j.cursors == {"a": 4}
    await db.close()


async def test_a_compaction_cancelled_after_its_delete_leaves_the_journal_writable(tmp_path):
    """Stopping cancels housekeeping wherever it is. A cancel that lands as compaction's
    DELETE ... RETURNING comes back from aiosqlite's thread used to leave that statement
    unfinished (its cursor kept alive by the cancelled task's traceback), and SQLite then
    refused every later COMMIT on the connection: the shutdown's checkpoint failed with
    "SQL statements in progress". The cancel is made to land exactly there."""
    import asyncio

    db, _, j = await open_journal(tmp_path)
    j.attach(["a"])
    for _ in range(20):
        await j.append(bodies(5, 10))
    writer = db.writer
    assert writer is not None

    def cancelled_after(call):
        async def wrapper(sql, *args):
            result = await call(sql, *args)  # done in the thread: whatever it leaves is left
            if sql.startswith("DELETE FROM journal"):
                raise asyncio.CancelledError  # `result` stays referenced by this frame
            return result

        return wrapper

    writer.execute = cancelled_after(writer.execute)  # type: ignore[method-assign]
    writer.execute_fetchall = cancelled_after(writer.execute_fetchall)  # type: ignore[method-assign]
    j.advance("a", j.last_seq)
    task = asyncio.create_task(j.compact())
    await asyncio.wait([task])  # as Agent.stop() waits: the task keeps its cancel's traceback
    del writer.execute, writer.execute_fetchall  # the instance attributes: back to the methods
    assert task.cancelled()
    await j.append(bodies(1, 10))  # a COMMIT: raised "SQL statements in progress"
    j.advance("a", j.last_seq)
    await j.checkpoint()
    await db.close()
    with sqlite3.connect(tmp_path / "agent.db") as conn:
        assert conn.execute("SELECT seq FROM cursors WHERE sink = 'a'").fetchone()[0] == j.last_seq
    del task
