"""The owner's intake of forwarder batches (agent/forwarding/owner.py), spoken to over its
real Unix socket by a raw client, as a hostile or broken local process could.

Batches decode into events the cycle collector does not track (for speed); these tests
pin what must not change with that: every event is still checked as record()'s are
(refusals counted as `invalid`, the rest committed as sent), and a frame whose events do
not have the Event types is refused as a whole, with nothing committed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import msgspec

from agent.event import Event
from agent.forwarding import wire
from agent.forwarding.owner import serve_forwarders
from tests.helpers import await_until, jsonl_sink, make_agent, read_jsonl

GOOD_ID = "01a22d9e-99ae-7d8b-8233-6231e6460505"


async def _owner(tmp_path: Path) -> Any:
    agent_ = make_agent(
        tmp_path / "data",
        {"out": jsonl_sink(tmp_path / "out.jsonl")},
        server={"enabled": False},
        dashboard={"store": False},
    )
    await agent_.start()
    return agent_, await serve_forwarders(agent_)


async def _answers(reader: asyncio.StreamReader, n: int) -> list[wire.Message]:
    out = []
    while len(out) < n:
        size = wire.frame_length(await asyncio.wait_for(reader.readexactly(wire.HEADER.size), 60))
        out.append(wire.decode(await reader.readexactly(size)))
    return out


async def test_owner_checks_every_forwarded_event_and_counts_refusals(tmp_path):
    agent_, owner = await _owner(tmp_path)
    try:
        good = Event(id=GOOD_ID, name="ok", value=2.0, ts=1.0, tags={"pid": "4242"}, data={"k": [1, {"x": "y"}]})
        bad = [
            Event(id="01a22d9e-99ae-7d8b-8233-6231e6460506", name="", value=1.0, ts=1.0),  # empty name
            Event(id="01a22d9e-99ae-7d8b-8233-6231e6460507", name="n", value=float("nan"), ts=1.0),
            Event(id="not-a-uuid", name="n", value=1.0, ts=1.0),
            Event(id="01a22d9e-99ae-7d8b-8233-6231e6460508", name="n", value=1.0, ts=1e12),  # far future
            Event(id="01a22d9e-99ae-7d8b-8233-6231e6460509", name="n", kind="nope", ts=1.0),
        ]
        reader, writer = await asyncio.open_unix_connection(str(owner.path))
        writer.write(wire.encode(wire.Hello(pid=4242)))
        writer.write(wire.encode(wire.Batch(seq=1, events=[bad[0], good, *bad[1:]])))
        await writer.drain()
        _, ack = await _answers(reader, 2)
        writer.close()
        assert ack == wire.Ack(seq=1)
        assert agent_.ledger.by_reason() == {"invalid": len(bad)}
        assert await agent_.flush(60)
        rows = [r for r in read_jsonl(tmp_path / "out.jsonl") if r["name"] == "ok"]
        assert [(r["id"], r["value"], r["tags"], r["data"]) for r in rows] == [
            (GOOD_ID, 2.0, {"pid": "4242"}, {"k": [1, {"x": "y"}]})
        ]
        assert owner.peers[4242].events == 1
    finally:
        await owner.stop(1.0)
        await agent_.stop()


async def test_owner_drops_a_connection_whose_batch_has_the_wrong_types(tmp_path):
    agent_, owner = await _owner(tmp_path)
    try:
        reader, writer = await asyncio.open_unix_connection(str(owner.path))
        writer.write(wire.encode(wire.Hello(pid=4343)))
        # tags must map strings to strings: a frame with an int tag value does not decode.
        body = msgspec.msgpack.encode(
            {"t": "batch", "seq": 1, "events": [{"id": GOOD_ID, "name": "n", "ts": 1.0, "tags": {"a": 1}}]}
        )
        writer.write(wire.HEADER.pack(len(body)) + body)
        await writer.drain()
        await _answers(reader, 1)  # the owner's Hello
        assert await asyncio.wait_for(reader.read(), 60) == b""  # then the connection ends, no ack
        writer.close()
        await await_until(lambda: not owner.peers[4343].connected, 60, "the owner to drop the connection")
        assert owner.peers[4343].events == 0
        assert await agent_.flush(60)
        assert [r for r in read_jsonl(tmp_path / "out.jsonl") if r["name"] == "n"] == []
    finally:
        await owner.stop(1.0)
        await agent_.stop()
