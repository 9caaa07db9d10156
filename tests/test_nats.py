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
import shutil
import signal
import socket
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from agent.builtin_plugins.nats import CONTENT_TYPE, NatsSink, NatsSinkOptions, map_nats_error, subject_matches
from agent.builtin_plugins.nats_source import NatsSource, NatsSourceOptions
from nats.js.errors import NotFoundError

from agent.errors import IntakeFullError, PermanentError, RetryableError
from agent.event import Event
from tests import test_sink_contract as contract
from tests.faultserver import TcpGate
from tests.helpers import (
    agent_config,
    await_until,
    free_port,
    journal_events,
    make_ctx,
    make_events,
    post_events,
    spawn,
    start_agent,
    wait_healthy,
    wait_http,
    wait_until,
    write_toml,
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


def test_error_mapping():
    from nats.errors import ConnectionClosedError, MaxPayloadError, TimeoutError
    from nats.js.errors import APIError, ServiceUnavailableError

    assert isinstance(map_nats_error(TimeoutError()), RetryableError)
    assert isinstance(map_nats_error(ConnectionClosedError()), RetryableError)
    assert isinstance(map_nats_error(ServiceUnavailableError(code=503)), RetryableError)
    assert isinstance(map_nats_error(MaxPayloadError()), PermanentError)
    assert isinstance(map_nats_error(APIError(code=400, description="bad request")), PermanentError)


def test_subject_matching():
    assert subject_matches("a.*", "a.b") and subject_matches("a.>", "a.b.c") and subject_matches("a.b", "a.b")
    assert not subject_matches("a.*", "a.b.c") and not subject_matches("a.>", "a") and not subject_matches("a.b", "a")


# -- the sink contract (tests/test_sink_contract.py), run here for the nats sink ----------------


@asynccontextmanager
async def open_nats(fixtures: dict[str, Any], tmp_path: Path) -> AsyncIterator[contract.Harness]:
    """The nats sink behind a TcpGate to the shared server, on a stream of its own; what
    landed is read back from the stream, message by message."""
    _require(SHARED_URL)
    tag = uuid.uuid4().hex[:10]
    name, subject = f"C_{tag}", f"contract.{tag}"
    async with TcpGate("127.0.0.1", int(SHARED_URL.rsplit(":", 1)[1])) as gate:

        async def read_back() -> contract.Landed:
            nc = await nats.connect(SHARED_URL)
            try:
                js = nc.jetstream()
                with contextlib.suppress(NotFoundError):
                    last = (await js.stream_info(name)).state.last_seq
                    msgs = [await js.get_msg(name, seq) for seq in range(1, last + 1)]
                    return [msgspec.to_builtins(msgspec.msgpack.decode(m.data or b"", type=Event)) for m in msgs]
                return []
            finally:
                await nc.close()

        options = {
            "url": f"nats://127.0.0.1:{gate.port}",
            "stream": name,
            "subject": subject,
            "request_timeout_s": 2,
            "connect_timeout_s": 2,
        }
        try:
            yield contract.Harness(
                "nats",
                options,
                read_back,
                gate=gate,
                unreachable=({"url": f"nats://127.0.0.1:{free_port()}", "connect_timeout_s": 1}, None),
            )
        finally:
            nc = await nats.connect(SHARED_URL)
            with contextlib.suppress(NotFoundError):
                await nc.jetstream().delete_stream(name)
            await nc.close()


NATS_KIND = contract.SinkKind("nats", open_nats, remote=True)


@pytest.fixture
async def harness(tmp_path: Path) -> AsyncIterator[contract.Harness]:
    async with open_nats({}, tmp_path) as h:
        yield h


async def test_contract_delivers_every_event_once_with_its_fields(harness):
    await contract.test_delivers_every_event_once_with_its_fields(harness)


async def test_contract_a_resent_batch_lands_each_id_once(harness):
    await contract.test_a_resent_batch_loses_nothing_and_an_idempotent_sink_lands_each_id_once(harness, NATS_KIND)


async def test_contract_an_outage_is_retryable_and_resends_lose_and_duplicate_nothing(harness):
    await contract.test_an_outage_is_retryable_and_resends_after_it_lose_and_duplicate_nothing(harness)


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
            ci = await nc.jetstream().consumer_info(name, "c")
            assert ci.config.max_ack_pending == 10_000  # the source's bound, set on the durable consumer

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


# -- fan-in: edges -> JetStream -> collectors -> Postgres ---------------------------------


class PrivateNats:
    """A nats-server -js of this test's own (free port, own store dir), restartable."""

    def __init__(self, store: Path, log: Path) -> None:
        binary = shutil.which("nats-server")
        if binary is None:
            pytest.fail("nats-server is required for this test and is not on PATH", pytrace=False)
        self.cmd = [binary, "-js", "-sd", str(store), "-a", "127.0.0.1", "-p", str(free_port())]
        self.url = f"nats://127.0.0.1:{self.cmd[-1]}"
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.cmd, stdout=out, stderr=subprocess.STDOUT)
        port = int(self.cmd[-1])
        wait_until(lambda: _connectable(port), timeout=30, what=f"nats-server on :{port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)


def _connectable(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture
def private_nats(tmp_path: Path) -> Iterator[PrivateNats]:
    server = PrivateNats(tmp_path / "js", tmp_path / "nats-server.log")
    server.start()
    yield server
    server.stop()


class Collector:
    """A collector agent in its own process: nats source -> postgres sink."""

    def __init__(self, i: int, root: Path, url: str, dsn: str, table: str) -> None:
        self.port = free_port()
        self.log = root / f"collector-{i}.log"
        source = {
            "type": "nats",
            "url": url,
            "stream": STREAM,
            "subject": SUBJECT,
            "durable": "collectors",
            "ack_wait_s": 2.0,
            "batch": 200,
            "max_ack_pending": 2000,
        }
        pg = {"type": "postgres", "dsn": dsn, "table": table}
        cfg = agent_config(
            root / f"collector-{i}",
            {"pg": pg},
            agent={"id": f"collector-{i}"},
            server={"port": self.port},
            sources={"in": source},
        )
        self.config = write_toml(root / f"collector-{i}.toml", cfg)
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self.proc = spawn(self.config, self.log)
        await wait_healthy(self.port, self.proc, self.log)

    def source_stats(self) -> dict[str, Any]:
        """The nats source's figures from the collector's /api/v1/status."""
        status = wait_http(f"http://127.0.0.1:{self.port}/api/v1/status", timeout=30)
        return next(c["stats"] for c in status["components"] if c["name"] == "in")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


STREAM, SUBJECT = "FANIN", "fanin.events"


def _edge_sink(url: str) -> dict[str, Any]:
    # A nats-server restart loses the PubAcks in flight: the batch times out and is sent
    # again (the server drops what it already stored by Nats-Msg-Id).
    return {
        "type": "nats",
        "url": url,
        "stream": STREAM,
        "subject": SUBJECT,
        "request_timeout_s": 3.0,
        "policies": ["retry"],
        "retry": {"max_attempts": 100, "initial_backoff_ms": 100, "max_backoff_ms": 1000},
    }


async def test_edges_to_jetstream_to_two_collectors_to_postgres_exactly_once(tmp_path, private_nats, pg_table):
    edges = [
        await start_agent(tmp_path / f"edge-{i}", {"js": _edge_sink(private_nats.url)}, agent={"id": f"edge-{i}"})
        for i in range(3)
    ]
    collectors = [Collector(i, tmp_path, private_nats.url, pg_table.dsn, pg_table.table) for i in range(2)]
    sent: dict[str, str] = {}  # event id -> the edge that acked it (202 after its journal commit)

    async def post_round(r: int, n: int = 150) -> None:
        for edge in edges:
            items = [{"name": "fanin", "value": float(k), "tags": {"round": str(r)}} for k in range(n)]
            for i in await post_events(edge, items):
                sent[i] = edge.id

    async def in_postgres() -> int:
        rows = await pg_table.fetch("SELECT count(DISTINCT id) AS n FROM {t} WHERE event_type = 'fanin'")
        return int(rows[0]["n"])

    async def wait_rows(at_least: int) -> None:
        for _ in range(1200):
            if await in_postgres() >= at_least:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"Postgres holds {await in_postgres()} of {at_least} events after 60 s")

    try:
        for c in collectors:
            await c.start()
        await post_round(1)
        await wait_rows(len(sent) // 3)
        collectors[0].kill()  # mid-stream: its fetched, unacked messages go to the other collector
        await post_round(2)
        await collectors[0].start()
        await post_round(3)
        private_nats.stop()  # mid-stream: PubAcks and acks in flight are lost
        round4 = asyncio.ensure_future(post_round(4))  # edges journal and keep trying meanwhile
        await asyncio.sleep(0.5)
        private_nats.start()
        await round4
        await post_round(5)
        await wait_rows(len(sent))

        counts = await pg_table.count_ids(list(sent))
        assert {i: n for i, n in counts.items() if n != 1} == {}
        rows = await pg_table.fetch("SELECT id::text AS id, agent_id FROM {t} WHERE event_type = 'fanin'")
        assert {r["id"]: r["agent_id"] for r in rows} == sent
        assert len(sent) == 3 * 5 * 150
        # The scenario happened: the surviving collector took a share and lived through the restart.
        survivor = collectors[1].source_stats()
        assert survivor["committed"] > 0 and survivor["reconnects"] >= 1, survivor
    finally:
        for c in collectors:
            c.stop()
        for edge in edges:
            await edge.stop()


async def test_source_naks_when_the_agent_is_full_and_jetstream_redelivers(stream):
    name, subject = stream
    sink = NatsSink("nats", NatsSinkOptions(url=SHARED_URL, stream=name, subject=subject), make_ctx("nats"))
    events = make_events(20)
    await sink.send(events)
    await sink.close()
    committed: list[str] = []
    refusals = 0

    async def submit(batch: list[Event]) -> list[str]:
        # The agent's durable way in, full the first time (as Agent.submit raises it).
        nonlocal refusals
        if refusals == 0:
            refusals += 1
            raise IntakeFullError("the intake holds 10 of 10 events")
        committed.extend(e.id for e in batch)
        return []

    ctx = make_ctx("in")
    ctx.submit = submit
    opts = NatsSourceOptions(
        url=SHARED_URL, stream=name, subject=subject, durable="full", fetchers=1, full_retry_s=0.2, ack_wait_s=30
    )
    task = asyncio.ensure_future(NatsSource("in", opts, ctx).run(ctx.emit))
    try:
        await await_until(lambda: ctx.stats.get("acked") == 20, timeout=30, what="every message acked")
        assert sorted(committed) == sorted(e.id for e in events) and refusals == 1
        assert ctx.stats["redelivered"] >= 1 and ctx.ledger.total() == 0  # kept by JetStream, nothing lost
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
