"""Salvage instead of silent loss (issue 18, item 3). Each test corrupts bytes on purpose.

- a segment's body (bytes overwritten in the file, inside one event or across two;
  quick_check still passes): the segment is quarantined with its bytes, every other
  event of it is still delivered (per-event checksums, segment format 1) and exactly the
  damaged ones are counted as journal_corrupt; every sink moves past the hole,
  /api/v1/sinks answers 200, and the journal compacts past it. A format-0 segment (as
  0.1.0 wrote them, no per-event checksums) still costs its whole row;
- the file header (agent.db is quarantined at open): the new start salvages every
  segment and cursor from the quarantined file and delivers them, nothing counted;
  with a damaged segment as well, only its damaged events are counted;
- pages in the middle of the file: what still reads is delivered, and every acked event
  that is not is counted under journal_corrupt (none silently lost);
- a cursor row: garbled bytes in the cursors page, or a value no seq can be: that sink
  receives what is still journaled again, nothing lost or counted.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from agent import losses
from agent.event import Event
from agent.storage.database import DB_FILE
from tests.helpers import agent_config, await_until, jsonl_sink, post_events, read_jsonl

SINKS = ("out", "b")


def backlog_config(data: Path) -> dict[str, Any]:
    """Two sinks that never confirm: everything acked stays journaled for them."""
    return agent_config(data, {n: {"type": "hang"} for n in SINKS}, agent={"shutdown_timeout_s": 0.3},
                        dashboard={"store": False})


def delivering_config(data: Path, tmp: Path) -> dict[str, Any]:
    return agent_config(data, {n: jsonl_sink(tmp / f"{n}.jsonl") for n in SINKS}, dashboard={"store": False})


def agent_on(cfg: dict[str, Any]):  # type: ignore[no-untyped-def]
    from agent.runtime import Agent
    from tests import plugins_for_tests

    return Agent(cfg, plugins=[plugins_for_tests])


async def make_backlog(data: Path, segments: int = 8, per: int = 500) -> list[list[str]]:
    """`segments` POSTs of `per` events (one journal segment each), never delivered."""
    acked: list[list[str]] = []
    async with agent_on(backlog_config(data)) as agent:
        for k in range(segments):
            acked.append(await post_events(agent, [{"name": f"seg{k}", "value": i, "data": {"pad": "x" * 40}}
                                                   for i in range(per)]))
    with sqlite3.connect(data / DB_FILE) as conn:
        assert conn.execute("SELECT count(*) FROM journal").fetchone()[0] == segments  # one segment per POST
    return acked


def event_spans(body: bytes) -> list[tuple[int, int]]:
    """The byte range of each event in a segment body (a msgpack array of events), found
    by encoding them one at a time: independent of how the journal frames them."""
    parts = [msgspec.msgpack.encode(e) for e in msgspec.msgpack.decode(body, type=list[Event])]
    start = len(body) - sum(map(len, parts))  # after the array header
    spans = []
    for p in parts:
        spans.append((start, start + len(p)))
        start += len(p)
    return spans


def damage_segment(db: Path, index: int, n: int = 36, event: int | None = None) -> tuple[int, int, list[int]]:
    """Overwrite `n` bytes of the index-th segment's body, in the file itself (found by its
    bytes: a body spans overflow pages): in the middle of the body, or inside its event
    number `event`. Returns (seq, count, positions in the segment of the events hit)."""
    with sqlite3.connect(db) as conn:
        seq, count, body = conn.execute("SELECT seq, count, body FROM journal ORDER BY seq LIMIT 1 OFFSET ?",
                                        (index,)).fetchone()
    spans = event_spans(body)
    if event is None:
        at_body = len(body) // 2
    else:
        lo, hi = spans[event]
        assert hi - lo > n + 2
        at_body = (lo + hi - n) // 2
    hit = [i for i, (lo, hi) in enumerate(spans) if lo < at_body + n and at_body < hi]
    raw = db.read_bytes()
    piece = body[at_body - 24: at_body + n]  # with some bytes before it: an event's own bytes may repeat
    at = raw.find(piece)
    assert at > 0 and raw.count(piece) == 1
    with open(db, "r+b") as f:
        f.seek(at + 24)
        f.write(b"\xc1" * n)  # 0xc1: a byte msgpack never uses
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA quick_check").fetchone()[0] == "ok"  # SQLite sees nothing wrong
    return seq, count, hit


def delivered(tmp: Path, sink: str) -> set[str]:
    """Ids in the sink's file so far (complete lines only: see read_jsonl)."""
    return {e["id"] for e in read_jsonl(tmp / f"{sink}.jsonl")}


async def get(agent, path: str) -> tuple[int, Any]:  # type: ignore[no-untyped-def]
    async with aiohttp.ClientSession() as http:
        async with http.get(agent.server_url + path) as r:
            return r.status, await r.json()


@pytest.mark.parametrize("where", ["inside_one_event", "across_events"])
async def test_a_damaged_segment_costs_only_its_damaged_events(tmp_path: Path, where: str) -> None:
    data = tmp_path / "data"
    acked = await make_backlog(data)
    seq, count, hit = damage_segment(data / DB_FILE, 3, event=250 if where == "inside_one_event" else None)
    assert len(hit) == 1 if where == "inside_one_event" else len(hit) >= 2
    damaged = {acked[3][i] for i in hit}
    expected = {i for ids in acked for i in ids} - damaged  # the rest of segment 3 too
    async with agent_on(delivering_config(data, tmp_path)) as agent:
        status, body = await get(agent, "/api/v1/sinks")  # reads at the cursors: must not 500
        assert status == 200, body
        for sink in SINKS:
            await await_until(lambda s=sink: delivered(tmp_path, s) >= expected, what=f"{sink} past the damage")
        assert await agent.flush(10)  # every cursor reaches the end: the hole does not stall them
        status, body = await get(agent, "/api/v1/sinks")
        assert status == 200 and all(s["lag_events"] == 0 for s in body["sinks"])
        assert agent.ledger.by_reason().get(losses.JOURNAL_CORRUPT) == len(hit)  # exactly the damaged ones
        await agent.journal.checkpoint()
        assert agent.journal.segments == 0  # compacted past the hole
        status, body = await get(agent, "/api/v1/losses")
        assert body["by_reason"][losses.JOURNAL_CORRUPT] == len(hit)
    for sink in SINKS:
        assert not delivered(tmp_path, sink) & damaged
        assert len(read_jsonl(tmp_path / f"{sink}.jsonl")) == len(expected)  # each once
    with sqlite3.connect(data / DB_FILE) as conn:
        rows = conn.execute("SELECT seq, count, body, error FROM journal_quarantine").fetchall()
        assert conn.execute("SELECT count FROM losses WHERE reason = ?", (losses.JOURNAL_CORRUPT,)).fetchone() == (
            len(hit),)
    assert len(rows) == 1 and rows[0][:2] == (seq, len(hit)) and count == len(acked[3])
    assert b"\xc1" * 36 in rows[0][2] and rows[0][3]  # the bytes kept as found, with the error


async def test_a_damaged_format_0_segment_costs_its_whole_row(tmp_path: Path) -> None:
    """Rows written before segment format 1 (0.1.0, migration 3) have no per-event checksums:
    they still read, and a damaged one is quarantined and counted whole, as before."""
    data = tmp_path / "data"
    acked = await make_backlog(data, segments=4)
    conn = sqlite3.connect(data / DB_FILE, isolation_level=None)
    conn.execute("UPDATE journal SET frames = NULL")  # what rows from before migration 3 look like
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # into the file, which is what gets damaged
    conn.close()
    _, count, _ = damage_segment(data / DB_FILE, 2)
    expected = {i for k, ids in enumerate(acked) if k != 2 for i in ids}
    async with agent_on(delivering_config(data, tmp_path)) as agent:
        for sink in SINKS:
            await await_until(lambda s=sink: delivered(tmp_path, s) >= expected, what=f"{sink} past the damage")
        assert await agent.flush(10)
        assert agent.ledger.by_reason().get(losses.JOURNAL_CORRUPT) == count == len(acked[2])
    for sink in SINKS:
        assert not delivered(tmp_path, sink) & set(acked[2])


async def test_a_damaged_header_quarantines_the_file_and_everything_is_salvaged(tmp_path: Path) -> None:
    data = tmp_path / "data"
    acked = await make_backlog(data)
    with open(data / DB_FILE, "r+b") as f:
        f.write(os.urandom(100))  # the whole 100-byte header: not a database any more
    async with agent_on(delivering_config(data, tmp_path)) as agent:
        status, body = await get(agent, "/api/v1/status")
        salvage = body["database"]["salvage"]
        assert body["database"]["recovered_from"] and salvage["header_rebuilt"]
        assert salvage["segments"] == len(acked) and salvage["cursors"] == len(SINKS) and salvage["lost"] == 0
        everything = {i for ids in acked for i in ids}
        for sink in SINKS:
            await await_until(lambda s=sink: delivered(tmp_path, s) >= everything, what=f"{sink} salvaged backlog")
        assert await agent.flush(10)
        assert losses.JOURNAL_CORRUPT not in agent.ledger.by_reason()
        post = await post_events(agent, [{"name": "after"}])  # the fresh file goes on numbering after the old one
        await await_until(lambda: set(post) <= delivered(tmp_path, "out"), what="a new event delivered")
        assert agent.journal.last_seq > sum(len(ids) for ids in acked)


async def test_a_damaged_header_and_segment_counts_only_the_damaged_event(tmp_path: Path) -> None:
    data = tmp_path / "data"
    acked = await make_backlog(data)
    _, _, hit = damage_segment(data / DB_FILE, 5, event=100)
    with open(data / DB_FILE, "r+b") as f:
        f.write(b"\0" * 16)  # the magic string
    damaged = {acked[5][i] for i in hit}
    async with agent_on(delivering_config(data, tmp_path)) as agent:
        expected = {i for ids in acked for i in ids} - damaged  # salvage keeps the rest of segment 5 too
        for sink in SINKS:
            await await_until(lambda s=sink: delivered(tmp_path, s) >= expected, what=f"{sink} salvaged backlog")
        assert await agent.flush(10)
        assert agent.ledger.by_reason()[losses.JOURNAL_CORRUPT] == len(hit) == 1
        assert agent.db.salvage["lost"] == 1  # type: ignore[index,union-attr]
        rows = await agent.db.fetchall("SELECT count, origin, length(body) FROM journal_quarantine")  # type: ignore
        assert [(n, o) for n, o, _ in rows] == [(1, agent.db.recovered_from)] and rows[0][2] > 0  # type: ignore
    for sink in SINKS:
        assert not delivered(tmp_path, sink) & damaged


async def test_garbled_pages_deliver_what_reads_and_count_the_rest(tmp_path: Path) -> None:
    data = tmp_path / "data"
    acked = await make_backlog(data, segments=12)
    db = data / DB_FILE
    size = db.stat().st_size
    with open(db, "r+b") as f:  # keep the first pages (header, schema, cursors), garble two runs later on
        for at in (size // 3, 2 * size // 3):
            f.seek(at - at % 4096)
            f.write(os.urandom(8192))
    everything = {i for ids in acked for i in ids}
    async with agent_on(delivering_config(data, tmp_path)) as agent:
        assert await agent.flush(20)
        counted = agent.ledger.by_reason().get(losses.JOURNAL_CORRUPT, 0)
        for sink in SINKS:
            missing = everything - delivered(tmp_path, sink)
            assert len(missing) <= counted, f"{sink}: {len(missing)} acked events neither delivered nor counted"
        print(f"\ngarbled pages: {len(everything - delivered(tmp_path, 'out'))} of {len(everything)} events lost, "
              f"{counted} counted as journal_corrupt; salvage {agent.db.salvage}")  # type: ignore[union-attr]


@pytest.mark.parametrize("damage", ["page_bytes", "text_value", "beyond_the_journal", "negative"])
async def test_a_damaged_cursor_resends_rather_than_loses(tmp_path: Path, damage: str) -> None:
    data = tmp_path / "data"
    acked = await make_backlog(data, segments=4)
    db = data / DB_FILE
    # One sink had confirmed half of it: its cursor is what gets damaged.
    conn = sqlite3.connect(db, isolation_level=None)
    half = conn.execute("SELECT seq FROM journal ORDER BY seq LIMIT 1 OFFSET 1").fetchone()[0]
    conn.execute("UPDATE cursors SET seq = ? WHERE sink = 'out'", (half,))
    (root,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'cursors'").fetchone()
    (page,) = conn.execute("PRAGMA page_size").fetchone()
    value = {"text_value": "garbage", "beyond_the_journal": 10**12, "negative": -5}.get(damage)
    if value is not None:
        conn.execute("UPDATE cursors SET seq = ? WHERE sink = 'out'", (value,))
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the WAL goes back into the file, which is what gets damaged
    conn.close()
    assert not Path(f"{db}-wal").exists() or Path(f"{db}-wal").stat().st_size == 0
    if damage == "page_bytes":  # the cells sit at the end of the cursors table's leaf page
        with open(db, "r+b") as f:
            f.seek(root * page - 48)
            f.write(b"\xff" * 48)
    async with agent_on(delivering_config(data, tmp_path)) as agent:
        everything = {i for ids in acked for i in ids}
        for sink in SINKS:
            await await_until(lambda s=sink: delivered(tmp_path, s) >= everything, what=f"{sink} has everything")
        assert await agent.flush(10)
        assert losses.JOURNAL_CORRUPT not in agent.ledger.by_reason()
        if damage == "page_bytes":  # the damage hit the cursor rows: the file was salvaged without them
            assert agent.db.salvage is not None and agent.db.salvage["cursors_lost"], agent.db.salvage  # type: ignore
        print(f"\ncursor damage {damage}: recovered_from={agent.db.recovered_from}, "  # type: ignore[union-attr]
              f"salvage={agent.db.salvage}")  # type: ignore[union-attr]


async def test_a_dlq_entry_that_does_not_decode_is_set_aside_and_counted(tmp_path: Path) -> None:
    from agent.errors import RetryableError
    from agent.losses import LossLedger
    from agent.storage.database import Database
    from agent.storage.dlq import DeadLetterQueue
    from tests.helpers import make_events

    db, ledger = Database(tmp_path), LossLedger()
    await db.open()
    try:
        dlq = DeadLetterQueue(db, ledger, ttl_s=3600, max_events=10_000)
        await dlq.open()
        bad = await dlq.put("s", make_events(7), RetryableError("down"), 1, 0.0)
        good = await dlq.put("s", make_events(3), RetryableError("down"), 1, 0.0)
        async with db.tx() as conn:
            await conn.execute("UPDATE dlq SET events = CAST(substr(events, 1, 20) || x'c1c1c1' AS BLOB) WHERE id = ?", (bad,))
        claimed = await dlq.claim("s")  # the damaged entry is set aside; the next one is claimed
        assert claimed is not None and claimed[0] == good and len(claimed[2]) == 3
        assert ledger.snapshot() == {(losses.JOURNAL_CORRUPT, "s"): 7}
        assert dlq.depth("s") == 3
        rows = await db.fetchall("SELECT status, length(events) FROM dlq WHERE id = ?", (bad,))
        assert rows[0][0] == "corrupt" and rows[0][1] > 0  # bytes kept
    finally:
        await db.close()
