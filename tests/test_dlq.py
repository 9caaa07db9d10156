"""The dead-letter queue end to end: bisection of poison batches (live and replayed),
retryable failures parked and replayed exactly once, manual replay (HTTP and CLI, live
and offline, queued for the next start), purge, TTL expiry and the per-sink cap
counted in the ledger, pagination."""

from __future__ import annotations

import asyncio
import collections
import json
import sqlite3
import sys
from pathlib import Path

import aiohttp
import pytest

from agent import losses
from tests.helpers import await_until, free_port, make_agent, post_events, subprocess_env, write_toml
from tests.plugins_for_tests import STATE

FAST = {"commit_interval_ms": 2, "shutdown_timeout_s": 1}


@pytest.fixture(autouse=True)
def _reset():
    STATE.reset()
    yield
    STATE.reset()


async def pending_ids(agent, sink: str) -> set[str]:
    """Ids of the events in `sink`'s pending DLQ entries."""
    return {ev.id for e in await agent.dlq.entries(sink=sink, status="pending") for ev in await agent.dlq.events(e.id)}


async def cli(tmp_path: Path, port: int, *args: str) -> dict:
    """Run `sidecar-agent dlq ...` as a subprocess against the same data dir."""
    cfg = write_toml(tmp_path / "cli.toml", {"agent": {"data_dir": str(tmp_path / "data")}, "server": {"port": port}})
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.cli", "dlq", *args, "--config", str(cfg), "--json",
        env=subprocess_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    return json.loads(out)


async def test_poison_events_are_bisected_only_offenders_reach_the_dlq(tmp_path):
    agent = make_agent(tmp_path / "data", {"pg": {"type": "poison", "batch_size": 64}}, agent=FAST)
    async with agent:
        items = [{"name": "poison" if i in (3, 17, 18, 40) else "ok", "value": i} for i in range(50)]
        ids = await post_events(agent, items)
        assert await agent.flush(5)
        bad = {ids[i] for i in (3, 17, 18, 40)}
        assert sorted(STATE.ids("pg")) == sorted(set(ids) - bad)  # the rest delivered, once each
        entries = await agent.dlq.entries(sink="pg")
        assert len(entries) == 4 and all(e.count == 1 and e.error_class == "PermanentError" for e in entries)
        parked = {ev.id for e in entries for ev in await agent.dlq.events(e.id)}
        assert parked == bad
        assert agent.dlq.depth("pg") == 4
        assert agent.journal.cursors["pg"] == agent.journal.last_seq  # the cursor moved on
        assert agent.ledger.total() == 0  # parked, not lost


async def test_retryable_failure_parks_then_auto_replays_exactly_once(tmp_path):
    agent = make_agent(tmp_path / "data", {"api": {"type": "flaky", "batch_size": 10}}, agent=FAST,
                       dlq={"replay_per_s": 100})
    STATE.down.add("api")
    async with agent:
        ids = []
        for k in range(3):
            ids += await post_events(agent, [{"name": "m", "value": k * 10 + i} for i in range(10)])
        await await_until(lambda: agent.journal.cursors["api"] == agent.journal.last_seq, what="cursor to move on")
        assert STATE.ids("api") == []
        assert agent.dlq.depth("api") == 30
        entries = await agent.dlq.entries(sink="api", status="pending")
        assert entries and all(e.error_class == "RetryableError" for e in entries)
        STATE.down.clear()  # the sink recovers; the next live batch proves it healthy
        ids += await post_events(agent, [{"name": "after", "value": 1}])
        await await_until(lambda: agent.dlq.depth("api") == 0 and len(STATE.ids("api")) == 31, what="replay")
        counts = collections.Counter(STATE.ids("api"))
        assert set(counts) == set(ids) and max(counts.values()) == 1  # everything, exactly once
        assert all(e.status == "delivered" for e in await agent.dlq.entries(sink="api"))
        assert agent.ledger.total() == 0


async def test_manual_replay_over_http(tmp_path):
    agent = make_agent(tmp_path / "data", {"api": {"type": "flaky"}, "mem": {"type": "memory"}}, agent=FAST,
                       dlq={"replay_per_s": 100})
    STATE.down.add("api")
    async with agent:
        ids = await post_events(agent, [{"name": "m", "value": i} for i in range(20)])
        await await_until(lambda: agent.dlq.depth("api") == 20, what="the DLQ")
        assert sorted(STATE.ids("mem")) == sorted(ids)  # the other sink is not held up
        # Once a health probe has failed, the next one waits its backoff (1 s)...
        parked = STATE.calls["api"]
        await await_until(lambda: STATE.calls["api"] > parked, what="a health probe to fail")
        STATE.down.clear()
        # ...so with no live traffic nothing proves the sink healthy, and nothing replays by itself yet.
        assert agent.dlq.depth("api") == 20
        async with aiohttp.ClientSession() as http:
            async with http.post(agent.server_url + "/api/v1/dlq/replay?sink=api") as r:
                assert r.status == 202 and (await r.json())["replaying"] == ["api"]
            async with http.post(agent.server_url + "/api/v1/dlq/replay?sink=nope") as r:
                assert r.status == 404
        await await_until(lambda: agent.dlq.depth("api") == 0, what="manual replay")
        assert sorted(STATE.ids("api")) == sorted(ids)


async def test_cli_against_a_running_agent(tmp_path):
    port = free_port()
    agent = make_agent(tmp_path / "data", {"api": {"type": "flaky"}}, agent=FAST, server={"port": port},
                       dlq={"replay_per_s": 100})
    STATE.down.add("api")
    async with agent:
        ids = await post_events(agent, [{"name": "m", "value": i} for i in range(5)])
        await await_until(lambda: agent.dlq.depth("api") == 5, what="the DLQ")
        listed = await cli(tmp_path, port, "list")
        assert "offline" not in listed and listed["pending_events"] == 5
        assert {e["sink"] for e in listed["entries"]} == {"api"}
        STATE.down.clear()
        out = await cli(tmp_path, port, "replay", "--sink", "api")
        assert out["replaying"] == ["api"]
        await await_until(lambda: agent.dlq.depth("api") == 0, what="replay requested by the CLI")
        assert sorted(STATE.ids("api")) == sorted(ids)
        STATE.down.add("api")
        await post_events(agent, [{"name": "m", "value": i} for i in range(3)])
        await await_until(lambda: agent.dlq.depth("api") == 3, what="the DLQ")
        out = await cli(tmp_path, port, "purge", "--sink", "api")
        assert out == {"purged_events": 3}
        assert agent.ledger.snapshot() == {(losses.DLQ_PURGED, "api"): 3}


async def test_cli_offline_against_the_data_dir(tmp_path):
    data = tmp_path / "data"
    agent = make_agent(data, {"api": {"type": "flaky"}}, agent=FAST, dlq={"replay_per_s": 100})
    STATE.down.add("api")
    async with agent:
        ids = await post_events(agent, [{"name": "m", "value": i} for i in range(6)])
        await await_until(lambda: agent.dlq.depth("api") == 6, what="the DLQ")
    port = free_port()  # nothing listens there: the CLI works on the data dir
    listed = await cli(tmp_path, port, "list")
    assert listed["offline"] is True and sum(e["count"] for e in listed["entries"]) == 6
    out = await cli(tmp_path, port, "replay")
    assert out["offline"] is True and out["pending_events"] == 6 and out["queued"] == ["api"]
    # Restarted with the sink healthy and no new traffic, the agent replays what is pending.
    STATE.down.clear()
    agent = make_agent(data, {"api": {"type": "flaky"}}, agent=FAST, dlq={"replay_per_s": 100})
    async with agent:
        await await_until(lambda: agent.dlq.depth("api") == 0, what="replay after restart")
        assert sorted(STATE.ids("api")) == sorted(ids)
        STATE.down.add("api")
        await post_events(agent, [{"name": "m", "value": i} for i in range(4)])
        await await_until(lambda: agent.dlq.depth("api") == 4, what="the DLQ")
    out = await cli(tmp_path, port, "purge")
    assert out == {"purged_events": 4, "offline": True}
    agent = make_agent(data, {"api": {"type": "flaky"}}, agent=FAST)
    async with agent:
        assert agent.ledger.snapshot() == {(losses.DLQ_PURGED, "api"): 4}  # persisted by the CLI
        assert agent.dlq.depth() == 0


async def test_ttl_expiry_counts_dlq_expired(tmp_path):
    agent = make_agent(tmp_path / "data", {"api": {"type": "flaky"}}, agent=FAST, dlq={"ttl_hours": 0.1 / 3600})
    STATE.down.add("api")
    async with agent:
        await post_events(agent, [{"name": "m", "value": i} for i in range(7)])
        await await_until(lambda: agent.dlq.depth("api") == 7, what="the DLQ")
        await asyncio.sleep(0.15)
        assert await agent.dlq.expire() == 7
        assert agent.ledger.snapshot() == {(losses.DLQ_EXPIRED, "api"): 7}
        assert agent.dlq.depth() == 0
        entries = await agent.dlq.entries(sink="api")
        assert {e.status for e in entries} == {"expired"}
        for e in entries:
            assert await agent.dlq.events(e.id) == []  # bodies dropped, metadata kept


async def test_http_list_pagination_and_purge(tmp_path):
    # auto_replay off: a probe replay in flight would hold an entry out of the purge.
    agent = make_agent(tmp_path / "data", {"pg": {"type": "poison"}}, agent=FAST, dlq={"auto_replay": False})
    async with agent:
        await post_events(agent, [{"name": "poison", "value": i} for i in range(7)] + [{"name": "ok"}])
        assert await agent.flush(5)
        seen, before, pages = [], None, 0
        async with aiohttp.ClientSession() as http:
            while True:
                q = "?limit=3" + (f"&before={before}" if before else "")
                async with http.get(agent.server_url + "/api/v1/dlq" + q) as r:
                    page = await r.json()
                pages += 1
                seen += [e["id"] for e in page["entries"]]
                assert page["pending_events"] == 7
                before = page["next"]
                if before is None:
                    break
            assert pages == 3 and len(seen) == 7 and seen == sorted(seen, reverse=True)
            async with http.get(agent.server_url + "/api/v1/dlq?status=bogus") as r:
                assert r.status == 400
            async with http.delete(agent.server_url + "/api/v1/dlq?sink=pg") as r:
                assert (await r.json()) == {"purged_events": 7}
            async with http.get(agent.server_url + "/api/v1/losses") as r:
                assert (await r.json())["by_reason"] == {losses.DLQ_PURGED: 7}
            async with http.get(agent.server_url + "/api/v1/dlq?status=purged&limit=100") as r:
                assert len((await r.json())["entries"]) == 7


async def test_purging_settled_entries_is_not_a_second_loss_and_failing_entries_rotate(tmp_path):
    from agent.errors import RetryableError
    from agent.event import Event
    from agent.losses import LossLedger
    from agent.storage.database import Database
    from agent.storage.dlq import DeadLetterQueue

    db = Database(tmp_path)
    await db.open()
    ledger = LossLedger()
    dlq = DeadLetterQueue(db, ledger, ttl_s=3600, max_events=1000)
    await dlq.open()
    first = await dlq.put("s", [Event(id="a", name="x")], RetryableError("down"), 1, 0.0)
    second = await dlq.put("s", [Event(id="b", name="x")], RetryableError("down"), 1, 0.0)
    entry_id, _, _ = await dlq.claim("s")
    assert entry_id == first
    await dlq.settle(entry_id, "s", 1, RetryableError("still down"))
    entry_id, _, _ = await dlq.claim("s")
    assert entry_id == second  # the entry that just failed goes to the back
    await dlq.settle(entry_id, "s", 1, None)
    assert await dlq.purge(sink="s", status="delivered") == 1
    assert ledger.total() == 0 and dlq.depth("s") == 1
    assert await dlq.purge(sink="s") == 1
    assert ledger.by_reason() == {"dlq_purged": 1} and dlq.depth("s") == 0
    await db.close()


async def test_dlq_cap_is_per_sink_and_evicts_only_that_sinks_oldest(tmp_path):
    sinks = {"a": {"type": "flaky", "batch_size": 4}, "b": {"type": "flaky", "batch_size": 4}}
    agent = make_agent(tmp_path / "data", sinks, agent=FAST, dlq={"max_events": 10, "auto_replay": False})
    STATE.down.update({"a", "b"})

    def settled() -> bool:
        return all(agent.journal.cursors[s] == agent.journal.last_seq for s in ("a", "b"))

    async with agent:
        first = []
        for k in range(2):
            first += await post_events(agent, [{"name": "m", "value": k * 4 + i} for i in range(4)])
        await await_until(settled, what="both sinks to park their batches")
        # 16 pending events in all, but each sink holds only 8 of its cap of 10: nothing goes.
        assert (agent.dlq.depth("a"), agent.dlq.depth("b")) == (8, 8)
        assert agent.ledger.total() == 0
        STATE.down.discard("b")
        later = await post_events(agent, [{"name": "m", "value": 8 + i} for i in range(4)])
        await await_until(settled, what="the third batch")
        # Sink a is over its own cap: only its oldest entries go, counted against it.
        lost = 12 - agent.dlq.depth("a")
        assert 2 <= lost and agent.dlq.depth("a") <= 10
        assert agent.ledger.snapshot() == {(losses.DLQ_FULL, "a"): lost}
        assert await pending_ids(agent, "a") == set((first + later)[lost:])
        # Sink b lost nothing: its 8 parked events wait, the third batch was delivered.
        assert agent.dlq.depth("b") == 8 and sorted(STATE.ids("b")) == sorted(later)
        assert await pending_ids(agent, "b") == set(first)


async def test_replayed_entry_with_poison_is_bisected_good_events_delivered_once(tmp_path):
    # An outage parks a whole batch; after recovery, its replay fails permanently on two
    # poison events. Bisection delivers the other 14 and keeps only the two, one per entry.
    agent = make_agent(tmp_path / "data", {"pg": {"type": "poison", "batch_size": 16}}, agent=FAST,
                       dlq={"replay_per_s": 100})
    STATE.down.add("pg")
    async with agent:
        ids = await post_events(agent, [{"name": "poison" if i in (5, 11) else "ok", "value": i} for i in range(16)])
        await await_until(lambda: agent.dlq.depth("pg") == 16, what="the outage to park the batch")
        # Any status: on a busy machine the sink's backoff probe (1 s after the outage parked it)
        # may be replaying it right now, and a pending-only query found nothing (2 of 10 runs).
        [parked] = await agent.dlq.entries(sink="pg")
        assert parked.count == 16 and parked.error_class == "RetryableError"
        STATE.down.clear()  # no new traffic: the sink's backoff probe replays the entry
        bad = {ids[5], ids[11]}
        await await_until(lambda: len(STATE.ids("pg")) == 14 and agent.dlq.depth("pg") == 2, what="bisected replay")
        counts = collections.Counter(STATE.ids("pg"))
        assert set(counts) == set(ids) - bad and max(counts.values()) == 1
        # The sink's probe may be replaying one of the two right now (and failing again): a
        # pending-only query found one entry on a busy machine, so a replaying one counts too.
        left = [e for e in await agent.dlq.entries(sink="pg") if e.status in ("pending", "replaying")]
        assert [e.count for e in left] == [1, 1]
        assert {e.error_class for e in left} == {"PermanentError"}
        assert all(e.created == parked.created and e.attempts > parked.attempts for e in left)  # TTL kept
        assert agent.workers["pg"].stats.replayed == 14
        assert agent.ledger.total() == 0
    # The two entries survive a restart; nothing else is pending or lost.
    agent = make_agent(tmp_path / "data", {"pg": {"type": "poison", "batch_size": 16}}, agent=FAST,
                       dlq={"auto_replay": False})
    async with agent:
        assert agent.dlq.depth("pg") == 2 and await pending_ids(agent, "pg") == bad
        assert agent.ledger.total() == 0


async def test_offline_replay_is_queued_for_the_next_start_even_with_auto_replay_off(tmp_path):
    data = tmp_path / "data"
    sinks = {"api": {"type": "flaky"}, "other": {"type": "flaky"}}
    agent = make_agent(data, sinks, agent=FAST, dlq={"auto_replay": False})
    STATE.down.update({"api", "other"})
    async with agent:
        ids = await post_events(agent, [{"name": "m", "value": i} for i in range(5)])
        await await_until(lambda: agent.dlq.depth("api") == 5 and agent.dlq.depth("other") == 5, what="the DLQ")
    out = await cli(tmp_path, free_port(), "replay", "--sink", "api")
    assert out["offline"] is True and out["queued"] == ["api"] and out["pending_events"] == 5
    with sqlite3.connect(data / "agent.db") as conn:  # the request is kept in the database
        assert conn.execute("SELECT count(*) FROM meta WHERE key LIKE 'dlq.%'").fetchone() == (1,)
    STATE.down.clear()
    agent = make_agent(data, sinks, agent=FAST, dlq={"auto_replay": False})
    async with agent:
        await await_until(lambda: agent.dlq.depth("api") == 0, what="the replay queued offline")
        assert sorted(STATE.ids("api")) == sorted(ids)
        assert agent.dlq.depth("other") == 5 and STATE.ids("other") == []  # not asked for: still parked
    with sqlite3.connect(data / "agent.db") as conn:  # the request was used up at that start
        assert conn.execute("SELECT count(*) FROM meta WHERE key LIKE 'dlq.%'").fetchone() == (0,)
    assert agent.ledger.total() == 0
