"""Crash and failure behaviour with real processes, files and sockets:
(a) kill -9 at random moments under HTTP load loses no acknowledged event;
(b) SIGTERM under load loses nothing and exits 0;
(c) a corrupt database file is moved aside and the agent starts fresh;
(d) a full disk: a real small tmpfs (mount -t tmpfs, needs root) AND injected
    SQLITE_FULL at the storage layer (deterministic, exact counts);
(e) a sink that hangs forever stalls neither intake nor the other sink.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import random
import re
import signal
import sqlite3
import subprocess
import uuid
from pathlib import Path

import aiohttp
import pytest

from agent import losses
from tests.helpers import (
    agent_config,
    await_until,
    free_port,
    journal_events,
    journal_ids,
    jsonl_sink,
    losses_in_db,
    make_agent,
    post_raw,
    spawn,
    wait_healthy,
    write_toml,
)
from tests.plugins_for_tests import STATE


@pytest.fixture(autouse=True)
def _reset():
    STATE.reset()
    yield
    STATE.reset()


# -- a real `sidecar-agent run` subprocess -------------------------------------------


def write_config(tmp: Path, port: int) -> Path:
    cfg = agent_config(tmp / "data", {"out": jsonl_sink(tmp / "out.jsonl")}, agent={"shutdown_timeout_s": 10},
                       server={"port": port})
    return write_toml(tmp / "agent.toml", cfg)


def delivered(path: Path) -> tuple[collections.Counter, int]:
    """Ids in the jsonl file (with multiplicity) and the number of torn lines."""
    ids: collections.Counter = collections.Counter()
    torn = 0
    if path.exists():
        for line in path.read_bytes().splitlines():
            try:
                ids[json.loads(line)["id"]] += 1
            except ValueError:
                torn += 1
    return ids, torn


async def stream(port: int, acked: set[str], stop: asyncio.Event, batch: int = 50) -> None:
    """POST batches with client ids until stopped; remember ids that got a 202."""
    url = f"http://127.0.0.1:{port}/api/v1/events"
    async with aiohttp.ClientSession() as http:
        while not stop.is_set():
            items = [{"id": str(uuid.uuid4()), "name": "load", "value": i} for i in range(batch)]
            try:
                async with http.post(url, json=items) as r:
                    if r.status == 202:
                        ids = (await r.json())["ids"]
                        assert ids == [i["id"] for i in items]
                        acked.update(ids)
            except (TimeoutError, aiohttp.ClientError):
                await asyncio.sleep(0.01)  # the agent is gone (killed or stopping)


async def all_delivered(out: Path, acked: set[str], timeout: float = 15.0) -> collections.Counter:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        ids, _ = delivered(out)
        missing = acked - ids.keys()
        if not missing:
            return ids
        if loop.time() > end:
            raise AssertionError(f"{len(missing)} acknowledged ids never delivered, e.g. {sorted(missing)[:3]}")
        await asyncio.sleep(0.05)


ROUNDS = 20


async def test_kill_9_under_load_loses_no_acknowledged_event(tmp_path):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    port = free_port()
    cfg, log, out = write_config(tmp_path, port), tmp_path / "agent.log", tmp_path / "out.jsonl"
    acked: set[str] = set()
    proc = spawn(cfg, log)
    try:
        for rnd in range(ROUNDS):
            await wait_healthy(port, proc, log)
            await all_delivered(out, acked)  # after each restart, everything acked so far is there
            stop = asyncio.Event()
            clients = [asyncio.create_task(stream(port, acked, stop)) for _ in range(2)]
            before = len(acked)
            await await_until(lambda: len(acked) > before, what="a batch acked in this round")  # load is on
            await asyncio.sleep(rng.uniform(0, 0.6))
            proc.kill()  # SIGKILL at a random moment, requests in flight
            await asyncio.to_thread(proc.wait)
            stop.set()
            await asyncio.gather(*clients)
            proc = spawn(cfg, log)
        await wait_healthy(port, proc, log)
        ids = await all_delivered(out, acked)
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.to_thread(proc.wait)
    _, torn = delivered(out)
    dups = sum(n - 1 for n in ids.values() if n > 1)
    print(f"\nkill -9 x{ROUNDS} (seed {seed}): {len(acked)} acked ids, all delivered; "
          f"{len(ids)} distinct ids in the file, {dups} duplicate lines, {torn} torn lines")
    assert rc == 0
    assert len(acked) >= ROUNDS * 50  # at least one batch acked in every round


async def test_sigterm_under_load_loses_nothing(tmp_path):
    port = free_port()
    cfg, log, out = write_config(tmp_path, port), tmp_path / "agent.log", tmp_path / "out.jsonl"
    proc = spawn(cfg, log)
    acked: set[str] = set()
    try:
        await wait_healthy(port, proc, log)
        stop = asyncio.Event()
        clients = [asyncio.create_task(stream(port, acked, stop)) for _ in range(3)]
        await await_until(lambda: len(acked) >= 150, what="the load to be on")  # not a wall-clock guess
        proc.send_signal(signal.SIGTERM)  # while the clients keep sending
        rc = await asyncio.wait_for(asyncio.to_thread(proc.wait), 30)
        stop.set()
        await asyncio.gather(*clients)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert rc == 0, log.read_text()[-3000:]
    ids, torn = delivered(out)
    assert acked and not (acked - ids.keys())  # every 202'd id is in the file, without a restart
    assert torn == 0
    assert losses_in_db(tmp_path / "data" / "agent.db") == {}  # the ledger is empty
    with sqlite3.connect(tmp_path / "data" / "agent.db") as conn:
        (cursor,) = conn.execute("SELECT seq FROM cursors WHERE sink = 'out'").fetchone()
        (last,) = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'journal'").fetchone()
    assert cursor == last  # the persisted cursor says everything was delivered
    print(f"\nSIGTERM under load: {len(acked)} acked, all delivered, "
          f"{sum(n - 1 for n in ids.values())} duplicates")


# -- corruption ----------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["whole_file", "pages"])
async def test_corrupt_database_is_moved_aside(tmp_path, caplog, damage):
    data = tmp_path / "data"
    async with make_agent(data, {"mem": {"type": "memory"}}) as agent:
        for i in range(2000):
            agent.record("before", i, data={"pad": "x" * 100})
        assert await agent.flush(5)
    db_file = data / "agent.db"
    size = db_file.stat().st_size
    assert size > 16384
    with open(db_file, "r+b") as f:
        if damage == "whole_file":
            f.write(os.urandom(size))
        else:  # keep the header, garble pages in the middle
            f.seek(4096)
            f.write(os.urandom(size - 8192))
    caplog.set_level(logging.ERROR, logger="sidecar_agent.db")
    async with make_agent(data, {"mem": {"type": "memory"}}) as agent:
        async with aiohttp.ClientSession() as http:
            async with http.get(agent.server_url + "/api/v1/status") as r:
                moved = (await r.json())["database"]["recovered_from"]
            assert moved and re.search(r"agent\.db\.corrupt-\d{8}T\d{6}", moved)
            assert Path(moved).exists() and Path(moved).stat().st_size == size  # kept for forensics
            assert any("corrupt" in r.getMessage() and moved in r.getMessage() for r in caplog.records)
            async with http.post(agent.server_url + "/api/v1/events", json=[{"name": "after"}]) as r:
                assert r.status == 202  # a fresh database works
        assert await agent.flush(5)


# -- a full disk ---------------------------------------------------------------------


FILL = [{"name": "fill", "value": i, "data": {"pad": "p" * 300}} for i in range(10)]  # one POST's worth


@pytest.fixture
def tmpfs(tmp_path):
    """A 1 MB tmpfs (real ENOSPC). Needs root and mount rights; skipped otherwise (the
    injected-SQLITE_FULL tests below always run)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


@pytest.mark.parametrize("overflow", ["drop_oldest", "reject"])
async def test_real_full_disk_on_tmpfs(tmpfs, overflow):
    """Method: a real 1 MB tmpfs, grown to 16 MB with `mount -o remount` when space returns."""
    agent = make_agent(tmpfs / "data", {"stuck": {"type": "hang"}},
                       agent={"overflow": overflow, "shutdown_timeout_s": 0.3})
    async with agent, aiohttp.ClientSession() as http:
        codes = collections.Counter()
        for _ in range(300):
            answer = await post_raw(agent, FILL, session=http)
            status, retry_after = answer.status, answer.headers.get("Retry-After")
            codes[status] += 1
            if status == 503:
                assert retry_after
                break
        assert codes[202] > 0 and codes[503] == 1, codes  # the disk filled up; the client was told
        assert agent.state == "running" and agent.journal.disk_error
        async with http.get(agent.server_url + "/readyz") as r:
            assert r.status == 503 and "journal" in (await r.json())["problems"][0]
        for i in range(9):
            agent.record("late", i)
        await await_until(lambda: not agent.committer.records, what="the committer to take the records")
        await agent.committer.drain(5)
        # Whether SQLite can still delete on a full disk depends on how full its WAL is:
        # either drop_oldest made room and the events were stored, or they are counted.
        stored = sum(e.name == "late" for e in journal_events(agent.db.path))
        assert stored + agent.ledger.by_reason().get(losses.DISK_ERROR, 0) == 9
        subprocess.run(["mount", "-o", "remount,size=16m", str(tmpfs)], check=True)  # space returns
        status = (await post_raw(agent, FILL, session=http)).status
        assert status == 202 and agent.journal.disk_error is None
        async with http.get(agent.server_url + "/readyz") as r:
            assert r.status == 200


class DiskFull:
    """Makes the journal's INSERTs fail with SQLITE_FULL `fail` more times."""

    def __init__(self, agent) -> None:
        self.fail = 0
        writer = agent.db.writer
        real = writer.execute

        async def execute(sql, params=None):
            if sql.startswith("INSERT INTO journal") and self.fail > 0:
                self.fail -= 1
                raise sqlite3.OperationalError("database or disk is full")
            return await real(sql, params)

        writer.execute = execute


async def test_injected_disk_full_drop_oldest_frees_space_and_counts(tmp_path):
    """Method: SQLITE_FULL injected into the writer's INSERTs (exact, deterministic)."""
    agent = make_agent(tmp_path, {"stuck": {"type": "hang"}}, agent={"shutdown_timeout_s": 0.3})
    async with agent:
        disk = DiskFull(agent)
        async with aiohttp.ClientSession() as http:
            for _ in range(10):
                assert (await post_raw(agent, FILL, session=http)).status == 202
            disk.fail = 1  # one failure: the oldest rows are dropped, the retry commits
            assert (await post_raw(agent, FILL, session=http)).status == 202
            dropped = agent.ledger.by_reason()[losses.JOURNAL_FULL]
            assert dropped > 0 and agent.journal.rows == 110 - dropped
            assert len(journal_ids(agent.db.path)) == 110 - dropped
            disk.fail = 2  # the retry fails too: HTTP gets 503, record() drops are counted
            answer = await post_raw(agent, FILL, session=http)
            status, retry_after = answer.status, answer.headers.get("Retry-After")
            assert status == 503 and retry_after
            disk.fail = 2
            for i in range(5):
                agent.record("lost", i)
            await await_until(lambda: agent.ledger.by_reason().get(losses.DISK_ERROR) == 5, what="disk_error count")
            assert agent.state == "running"
            assert (await post_raw(agent, FILL, session=http)).status == 202  # space is back
            assert agent.journal.disk_error is None
            stored = len(journal_ids(agent.db.path))
            by = agent.ledger.by_reason()
            assert stored + by[losses.JOURNAL_FULL] == 120  # every acked event stored or counted
            assert by[losses.DISK_ERROR] == 5


async def test_injected_disk_full_reject_gives_503_and_recovers(tmp_path):
    agent = make_agent(tmp_path, {"mem": {"type": "memory"}}, agent={"overflow": "reject"})
    async with agent:
        disk = DiskFull(agent)
        async with aiohttp.ClientSession() as http:
            assert (await post_raw(agent, FILL, session=http)).status == 202
            disk.fail = 1
            answer = await post_raw(agent, FILL, session=http)
            status, retry_after = answer.status, answer.headers.get("Retry-After")
            assert status == 503 and retry_after == "1"
            disk.fail = 1
            agent.record("lost", 1)
            await await_until(lambda: agent.ledger.total() == 1, what="the record() drop to be counted")
            assert agent.ledger.by_reason() == {losses.DISK_ERROR: 1}
            assert (await post_raw(agent, FILL, session=http)).status == 202
            async with http.get(agent.server_url + "/readyz") as r:
                assert r.status == 200
        assert await agent.flush(5)
        assert len(STATE.ids("mem")) == 20


# -- a hanging sink ------------------------------------------------------------------


async def test_hanging_sink_stalls_neither_intake_nor_the_other_sink(tmp_path):
    agent = make_agent(tmp_path, {"stuck": {"type": "hang"}, "mem": {"type": "memory", "batch_size": 50}},
                       agent={"shutdown_timeout_s": 0.3})
    async with agent:
        acked: list[str] = []
        async with aiohttp.ClientSession() as http:
            for k in range(20):
                items = [{"name": "m", "value": k * 25 + i} for i in range(25)]
                async with http.post(agent.server_url + "/api/v1/events", json=items) as r:
                    assert r.status == 202
                    acked += (await r.json())["ids"]
                agent.record("rec", k)
        await await_until(lambda: len(STATE.ids("mem")) == 520, what="the healthy sink to deliver everything")
        assert set(acked) <= set(STATE.ids("mem"))
        assert agent.journal.last_seq == 520 and agent.journal.cursors["mem"] == 520
        assert agent.journal.cursors["stuck"] == 0 and agent.journal.lag("stuck") == 520
        assert STATE.calls["stuck"] == 1  # its one send() is still hanging
        assert agent.workers["stuck"].describe()["state"] == "sending"
