"""The nats sink and source against a real nats-server with JetStream.

The shared server (127.0.0.1:4222, started by .ci/run) serves the sink and source tests,
each on a stream and subject of its own; the fan-in test starts a private nats-server on a
free port with its own store dir, so it can restart it without disturbing anyone. NATS is
required: if it is unreachable the tests FAIL (never skip).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from collections.abc import AsyncIterator

import msgspec
import nats
import pytest
from agent.builtin_plugins.nats import CONTENT_TYPE, NatsSink, NatsSinkOptions, subject_matches
from nats.js.errors import NotFoundError

from agent.errors import PermanentError, RetryableError
from agent.event import Event
from tests.helpers import (
    await_until,
    free_port,
    journal_events,
    make_ctx,
    make_events,
    start_agent,
)

SHARED_URL = os.environ.get("SIDECAR_TEST_NATS_URL", "nats://127.0.0.1:4222")


def _require(url: str) -> None:
    host, port = url.rsplit("/", 1)[-1].split(":")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as exc:
        pytest.fail(f"nats-server -js is required for these tests and is unreachable at {url}: {exc}", pytrace=False)


@pytest.fixture
async def stream() -> AsyncIterator[tuple[str, str]]:
    """A stream and subject name of this test's own on the shared server; deleted afterwards."""
    _require(SHARED_URL)
    tag = uuid.uuid4().hex[:10]
    name, subject = f"T_{tag}", f"test.{tag}"
    yield name, subject
    nc = await nats.connect(SHARED_URL)
    with contextlib.suppress(NotFoundError):
        await nc.jetstream().delete_stream(name)
    await nc.close()


async def _stream_msgs(url: str, name: str) -> int:
    nc = await nats.connect(url)
    try:
        return (await nc.jetstream().stream_info(name)).state.messages
    finally:
        await nc.close()


# -- the sink --------------------------------------------------------------------------


async def test_sink_creates_the_stream_and_a_resent_batch_is_stored_once(stream):
    name, subject = stream
    sink = NatsSink("nats", NatsSinkOptions(url=SHARED_URL, stream=name, subject=subject), make_ctx("nats"))
    await sink.start()
    try:
        events = make_events(300)
        await sink.send(events)
        await sink.send(events[100:])  # a retry after a lost PubAck: the server drops repeats by Nats-Msg-Id
        assert await _stream_msgs(SHARED_URL, name) == 300
        assert sink.ctx.stats["duplicates"] == 200
    finally:
        await sink.close()
    # What is stored is the event in our codec, under its id.
    nc = await nats.connect(SHARED_URL)
    try:
        msg = await nc.jetstream().get_msg(name, 1)
        assert msg.headers and msg.headers["Content-Type"] == CONTENT_TYPE
        assert msg.headers["Nats-Msg-Id"] == events[0].id
        assert msgspec.msgpack.decode(msg.data, type=Event) == events[0]
    finally:
        await nc.close()


async def test_sink_refuses_a_stream_that_does_not_capture_its_subject(stream):
    name, subject = stream
    nc = await nats.connect(SHARED_URL)
    await nc.jetstream().add_stream(name=name, subjects=[f"{subject}.other"])
    await nc.close()
    sink = NatsSink("nats", NatsSinkOptions(url=SHARED_URL, stream=name, subject=subject), make_ctx("nats"))
    with pytest.raises(PermanentError, match="captures"):
        await sink.start()
    await sink.close()


async def test_sink_without_a_server_is_retryable():
    url = f"nats://127.0.0.1:{free_port()}"
    sink = NatsSink("nats", NatsSinkOptions(url=url, connect_timeout_s=1), make_ctx("nats"))
    await sink.start()  # logs, does not fail: the journal holds the backlog
    with pytest.raises(RetryableError):
        await sink.send(make_events(3))
    await sink.close()


def test_subject_matching():
    assert subject_matches("a.*", "a.b") and subject_matches("a.>", "a.b.c") and subject_matches("a.b", "a.b")
    assert not subject_matches("a.*", "a.b.c") and not subject_matches("a.>", "a") and not subject_matches("a.b", "a")


# -- the source ------------------------------------------------------------------------


async def test_source_commits_before_acking_and_keeps_ids_and_agent_ids(stream, tmp_path):
    name, subject = stream
    sink = NatsSink("nats", NatsSinkOptions(url=SHARED_URL, stream=name, subject=subject), make_ctx("nats"))
    edge = make_events(50)
    for e in edge:
        e.agent_id = "edge-7"
    await sink.send(edge)
    nc = await nats.connect(SHARED_URL)
    await nc.publish(subject, b"\xc1 not msgpack", headers={"Content-Type": CONTENT_TYPE})
    await nc.close()
    await sink.close()

    src = {"type": "nats", "url": SHARED_URL, "stream": name, "subject": subject, "durable": "c", "ack_wait_s": 30}
    agent = await start_agent(tmp_path / "c", agent={"id": "collector"}, sources={"in": src})
    try:
        await await_until(lambda: agent.ledger.by_reason().get("nats_undecodable") == 1, what="the bad message counted")
        ids = {e.id for e in edge}
        await await_until(
            lambda: ids <= {e.id for e in journal_events(agent.db.path)}, what="every event journaled", timeout=30
        )
        got = {e.id: e for e in journal_events(agent.db.path) if e.id in ids}
        assert {e.agent_id for e in got.values()} == {"edge-7"}
        assert [(got[e.id].ts, got[e.id].tags) for e in edge] == [(e.ts, e.tags) for e in edge]
        # All acked: nothing left pending on the consumer.
        nc = await nats.connect(SHARED_URL)
        try:

            async def pending() -> int:
                ci = await nc.jetstream().consumer_info(name, "c")
                return ci.num_ack_pending + ci.num_pending

            for _ in range(200):
                if await pending() == 0:
                    break
                await asyncio.sleep(0.05)
            assert await pending() == 0
        finally:
            await nc.close()
    finally:
        await agent.stop()
