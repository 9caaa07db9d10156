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

from agent.event import Event, json_encoder
from agent.losses import STREAM_DROPPED, LossLedger
from agent.pipeline.stream import StreamHub, Subscription
from tests.helpers import await_until, jsonl_sink, read_jsonl, start_agent

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

BOUND = 64 * 1024
PAD = "p" * 900  # about 1 KiB of JSON per event, so the stream outgrows socket buffers quickly
ROUNDS, PER_ROUND = 40, 500


async def test_clients_that_never_read_stay_bounded_and_lose_only_their_view(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    agent = await start_agent(tmp_path / "data", {"out": jsonl_sink(out)}, dashboard={"store": False},
                              server={"stream_client_max_bytes": BOUND})
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
            most = 0
            for r in range(ROUNDS):
                for i in range(PER_ROUND):
                    agent.record("flow", float(r * PER_ROUND + i), data={"pad": PAD})
                await asyncio.sleep(0.02)
                most = max(most, *(s.queued_bytes for s in stuck_subs))
            agent.record("last.one", 1.0)
            await await_until(lambda: "last.one" in seen, timeout=60, what="the reading client to get the newest event")
            most = max(most, *(s.queued_bytes for s in stuck_subs))
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
                assert (await r.json())["losses"][STREAM_DROPPED] >= dropped

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
            print(f"\nmost queued for one client: {most} bytes (bound {BOUND}); stream_dropped: {dropped}; "
                  f"a late reader was told of {told} and got {len(names)} events")
            reading.cancel()
            for ws in [*stuck, reader]:
                await ws.close()

        # The sink lost nothing: the journal and the sinks are not the stream.
        total = ROUNDS * PER_ROUND
        await await_until(lambda: sum(1 for e in read_jsonl(out) if e["name"] == "flow") == total, timeout=120,
                          what="every event in the jsonl sink")
        assert set(agent.ledger.by_reason()) == {STREAM_DROPPED}
    finally:
        await agent.stop()
