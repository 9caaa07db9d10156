"""Never stuck, never silent (issue 18, item 5): bounded live-stream queues and readiness.

- A live-stream (WebSocket) client's queue is bounded in bytes: clients that connect and
  never read, while events flow, keep at most `stream_client_max_bytes` queued on the
  server; the oldest go first and each is counted as `stream_dropped` (ledger, /metrics,
  status); a client that reads still gets fresh events, and the sink gets every event.
- /readyz and status name a sink that lags (its oldest undelivered event older than
  `ready_max_lag_s`) or fails (breaker open, or every batch dead-lettered), as `degraded`.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp

from agent.config import DEFAULT_POLICIES
from agent.event import Event, json_encoder
from agent.losses import STREAM_DROPPED, LossLedger
from agent.pipeline.stream import StreamHub, Subscription
from agent.table import ddl as migrations
from tests.conftest_supabase import PgTable
from tests.helpers import await_until, jsonl_sink, post_events, read_jsonl, start_agent
from tests.plugins_for_tests import STATE

# -- the queue itself ----------------------------------------------------------------


def test_a_full_queue_drops_its_oldest_events_and_counts_each() -> None:
    ledger = LossLedger()
    hub = StreamHub()
    events = [Event(id=f"id-{i:03d}", name="m", value=1.0, ts=1e9) for i in range(100)]  # one size
    size = len(json_encoder.encode(events[0]))
    sub = hub.subscribe(Subscription(max_bytes=10 * size + size // 2, ledger=ledger))
    picky = hub.subscribe(Subscription(names=frozenset({"other"}), max_bytes=size, ledger=ledger))
    for i in range(0, 100, 7):
        hub.publish(events[i : i + 7])
        assert sub.queued_bytes <= sub.max_bytes
    kept = [json.loads(b)["id"] for b in sub.queue]
    assert kept == [f"id-{i:03d}" for i in range(90, 100)], "the newest ten stay, oldest first"
    assert sub.dropped == hub.dropped == 90 and ledger.by_reason() == {STREAM_DROPPED: 90}
    assert not picky.queue and picky.dropped == 0  # filtered out is not dropped
    taken = sub.take(3 * size)
    assert [json.loads(b)["id"] for b in taken] == ["id-090", "id-091", "id-092"]
    assert sub.queued_bytes == 7 * size and sub.ready.is_set()
    sub.take(1 << 20)
    assert sub.queued_bytes == 0 and not sub.ready.is_set()


def test_an_event_larger_than_the_bound_is_dropped_not_queued() -> None:
    ledger = LossLedger()
    sub = Subscription(max_bytes=100, ledger=ledger)
    assert sub.put([b"x" * 500]) == 1
    assert sub.queued_bytes == 0 and not sub.queue and ledger.by_reason() == {STREAM_DROPPED: 1}


# -- real clients that never read ----------------------------------------------------

BOUND = 1024 * 1024  # more than one commit of the events below, so a client that reads keeps up
PAD = "p" * 900  # about 1 KiB of JSON per event, so the stream outgrows socket buffers quickly
ROUNDS, PER_ROUND = 40, 500


async def test_clients_that_never_read_stay_bounded_and_lose_only_their_view(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    agent = await start_agent(
        tmp_path / "data",
        {"out": jsonl_sink(out)},
        dashboard={"store": False},
        server={"stream_client_max_bytes": BOUND},
    )
    url = agent.server_url.replace("http://", "ws://") + "/api/v1/stream"
    try:
        async with aiohttp.ClientSession() as http:
            # Never read: aiohttp's client stops reading the socket once its own small buffer is full.
            stuck = [await http.ws_connect(url, autoping=False) for _ in range(5)]
            reader = await http.ws_connect(url, max_msg_size=0)
            await await_until(lambda: len(agent.stream.subscriptions) == 6, what="six subscriptions")
            seen: list[str] = []
            dropped_msgs = 0

            async def read() -> None:
                nonlocal dropped_msgs
                async for msg in reader:
                    body = json.loads(msg.data)
                    if body["type"] == "events":
                        seen.extend(e["name"] for e in body["events"])
                    elif body["type"] == "dropped":
                        dropped_msgs += 1

            reading = asyncio.create_task(read())
            stuck_subs = [s for s in agent.stream.subscriptions]  # all six; the reader's stays near empty
            after_put: list[int] = []  # every client's queued bytes right after each publish

            def watch(sub: Subscription) -> None:
                put = sub.put

                def counted(encoded: list[bytes]) -> int:
                    n = put(encoded)
                    after_put.append(sub.queued_bytes)
                    return n

                sub.put = counted  # type: ignore[method-assign]

            for sub in stuck_subs:
                watch(sub)
            for r in range(ROUNDS):
                for i in range(PER_ROUND):
                    agent.record("flow", float(r * PER_ROUND + i), data={"pad": PAD})
                await asyncio.sleep(0.02)
            agent.record("last.one", 1.0)
            await await_until(lambda: "last.one" in seen, timeout=60, what="the reading client to get the newest event")
            most = max(after_put)
            dropped = agent.ledger.by_reason().get(STREAM_DROPPED, 0)
            assert len(agent.stream.subscriptions) == 6, "a stuck client was disconnected before the checks"
            queued_now = [s.queued_bytes for s in stuck_subs]

            # The server side never held more than the bound for any client, yet it was used.
            assert 0 < most <= BOUND, most
            assert all(q <= BOUND for q in queued_now), queued_now
            # Every stuck client lost events, counted one by one in the ledger.
            assert dropped == agent.stream.dropped > 0
            assert dropped == sum(s.dropped for s in stuck_subs)
            assert sum(1 for s in stuck_subs if s.dropped) >= 5

            # The counts are visible where the other reasons are.
            async with http.get(agent.server_url + "/metrics") as r:
                text = await r.text()
            assert f'sidecar_agent_events_lost_total{{reason="{STREAM_DROPPED}",sink=""}}' in text
            async with http.get(agent.server_url + "/api/v1/status") as r:
                status = await r.json()
            assert status["losses"][STREAM_DROPPED] >= dropped
            assert status["stream"]["clients"] == 6 and status["stream"]["dropped"] >= dropped
            assert status["stream"]["queued_bytes"] <= 6 * BOUND

            # A stuck client that starts reading gets told what it missed, then the newest events.
            late = stuck[0]
            names: list[str] = []
            told = 0
            while "last.one" not in names:
                body = json.loads((await asyncio.wait_for(late.receive(), 60)).data)
                if body["type"] == "dropped":
                    told += body["count"]
                elif body["type"] == "events":
                    names.extend(e["name"] for e in body["events"])
            assert told > 0 and names[-1] == "last.one"
            reader_got = seen.count("flow")
            print(
                f"\nmost queued for one client: {most} bytes (bound {BOUND}); stream_dropped: {dropped}; "
                f"the reading client got {reader_got} of {ROUNDS * PER_ROUND} ({dropped_msgs} drop notices); "
                f"a late reader was told of {told} and got {len(names)} events"
            )
            reading.cancel()
            for ws in [*stuck, reader]:
                await ws.close()

        # The sink lost nothing: the journal and the sinks are not the stream.
        total = ROUNDS * PER_ROUND
        await await_until(
            lambda: sum(1 for e in read_jsonl(out) if e["name"] == "flow") == total,
            timeout=120,
            what="every event in the jsonl sink",
        )
        assert set(agent.ledger.by_reason()) == {STREAM_DROPPED}
    finally:
        await agent.stop()


# -- readiness: a sink that fails every batch ----------------------------------------


async def test_a_postgres_sink_on_an_unmigrated_database_is_degraded_by_name(tmp_path: Path, pg_table: PgTable) -> None:
    """Issue 17's case: the table does not exist, so every batch is dead-lettered; health
    must not say ready then, and must name the sink."""
    sink = {
        "type": "postgres",
        "dsn": pg_table.dsn,
        "table": "no_such_table_" + pg_table.table,
        "policies": list(DEFAULT_POLICIES),
        "batch_size": 10,
    }
    agent = await start_agent(tmp_path / "data", {"pg": sink}, dashboard={"store": False})
    try:
        async with aiohttp.ClientSession() as http:
            for i in range(3):
                await post_events(agent, [{"name": "orders", "value": i}], session=http)
            await await_until(lambda: agent.dlq.depth("pg") >= 3, timeout=60, what="the batches dead-lettered")

            async def readyz() -> tuple[int, dict]:
                async with http.get(agent.server_url + "/readyz") as r:
                    return r.status, await r.json()

            code, body = await readyz()
            assert code == 200 and body["ready"] is True  # intake works; a k8s probe keeps routing to it
            assert body["status"] == "degraded"
            (pg,) = body["degraded"]
            assert pg["sink"] == "pg" and pg["reasons"] == ["failing"]
            assert "no_such_table" in pg["detail"] and "dead-lettered" in pg["detail"]
            assert any(p.startswith("sink pg is degraded") for p in body["problems"])
            async with http.get(agent.server_url + "/api/v1/status") as r:
                status = await r.json()
            assert status["readiness"]["status"] == "degraded"
            assert status["readiness"]["degraded"][0]["sink"] == "pg"

            # Migrated, the sink recovers: the DLQ replays and readiness says ready again.
            await migrations.apply(pg_table.dsn, "public", sink["table"])
            await await_until(lambda: agent.dlq.depth("pg") == 0, timeout=120, what="the DLQ replayed")
            code, body = await readyz()
            assert (code, body["status"], body["degraded"]) == (200, "ready", [])
    finally:
        await agent.stop()
    assert agent.ledger.total() == 0


async def test_a_lagging_sink_is_degraded_by_name_unless_switched_off(tmp_path: Path) -> None:
    STATE.reset()
    agent = await start_agent(
        tmp_path / "data",
        {"stuck": {"type": "hang"}, "ok": {"type": "memory"}},
        dashboard={"store": False},
        server={"ready_max_lag_s": 0.5},
    )
    try:
        agent.record("work", 1.0)
        await await_until(lambda: "work" in {e.name for e in STATE.delivered.get("ok", [])}, what="delivery to ok")
        async with aiohttp.ClientSession() as http:

            async def readyz() -> dict:
                async with http.get(agent.server_url + "/readyz") as r:
                    assert r.status == 200
                    return await r.json()

            body: dict = {}
            for _ in range(600):  # the event ages past 0.5 s while the hung sink holds it
                body = await readyz()
                if body["status"] == "degraded":
                    break
                await asyncio.sleep(0.05)
            (stuck,) = body["degraded"]
            assert stuck["sink"] == "stuck" and stuck["reasons"] == ["lagging"] and stuck["lag_events"] >= 1
            assert stuck["lag_s"] > 0.5 and "events behind" in stuck["detail"]

            # Switched off by its flag, its backlog waits on purpose: not degraded.
            agent.flags.set("sinks.stuck.enabled", False, "test")
            body = await readyz()
            assert (body["status"], body["degraded"]) == ("ready", [])
    finally:
        await agent.stop()


# -- the dashboard's health card, in a real Chromium ----------------------------------

from tests.test_dashboard_browser import TIMEOUT_MS, agents, browser, open_page  # noqa: E402, F401  (fixtures)


async def test_the_overview_health_card_says_degraded_naming_the_failing_sink(
    agents,  # noqa: F811 (an imported fixture)
    open_page,  # noqa: F811 (an imported fixture)
    pg_table: PgTable,
) -> None:
    agent = await agents(
        sinks={
            "pg": {
                "type": "postgres",
                "dsn": pg_table.dsn,
                "table": "missing_" + pg_table.table,
                "policies": list(DEFAULT_POLICIES),
            }
        }
    )
    await post_events(agent, [{"name": "orders", "value": 1}])
    await await_until(lambda: agent.dlq.depth("pg") >= 1, timeout=60, what="the batch dead-lettered")
    page = await open_page(agent.server_url + "/")
    await page.wait_for_selector("#health.warn", timeout=TIMEOUT_MS)
    text = await page.text_content("#health")
    assert text == "degraded: pg (failing)", text
    assert "sink pg is degraded" in (await page.get_attribute("#health", "title") or "")
