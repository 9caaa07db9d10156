"""A shutdown that always ends (issue 18, item 2).

- (a cancel that reaches the history store inside its write, and an agent stopped while
  its store sink writes: tests/test_store_bounds.py, since the write runs in a thread);
- a sink that ignores its cancel cannot hold stop(): it is abandoned past the bound;
- `sidecar-agent run` with 200,000 events just acked, SIGTERM at once: the process exits
  by itself within the bound, every round, and nothing acked is lost (each sink has it,
  or it waits in the journal past the sink's persisted cursor; after a restart the jsonl
  sink has all of it). Rounds and events: SIDECAR_TEST_SHUTDOWN_ROUNDS (default 20 in CI,
  where CI is set, as the issue asks; 5 otherwise) and SIDECAR_TEST_SHUTDOWN_EVENTS
  (default 200000). The first round stops with shutdown_timeout_s = 5 as in the issue's
  probes; the others with 1 s, which keeps 20 rounds inside CI's time budget and still
  cancels the sinks while they are far behind, inside their writes (the race that hung);
- a blackholed PostgreSQL (a TCP server that accepts and never answers): the process
  exits within the bound, and after a restart the backlog reaches the sink.

Bounds are asserted as generous multiples (a busy 2-core machine must not fail them);
the figures are printed.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import sqlite3
import subprocess
import time
import types
import uuid
from pathlib import Path

import aiohttp
import msgspec

from agent.event import Event
from agent.runtime import SHUTDOWN_GRACE_S
from tests.helpers import (
    agent_config,
    await_until,
    free_port,
    jsonl_sink,
    read_jsonl,
    spawn,
    wait_healthy,
    write_toml,
)
from tests.plugins_for_tests import STATE

ROUNDS = int(os.environ.get("SIDECAR_TEST_SHUTDOWN_ROUNDS", "20" if os.environ.get("CI") else "5"))
EVENTS = int(os.environ.get("SIDECAR_TEST_SHUTDOWN_EVENTS", "200000"))
TIMEOUT_S = 5.0  # shutdown_timeout_s in these tests, as in the issue's probes
BOUND_S = TIMEOUT_S + SHUTDOWN_GRACE_S
QUICK_TIMEOUT_S = 1.0  # shutdown_timeout_s of the 200k rounds after the first
GENEROUS = 4  # the asserted limit is this multiple of the bound (plus process start-up slack)


async def test_a_sink_that_swallows_its_cancel_is_abandoned_within_the_bound(tmp_path: Path) -> None:
    STATE.reset()
    from agent.runtime import Agent

    agent = Agent(agent_config(tmp_path / "data", {"deaf": {"type": "deaf"}}, agent={"shutdown_timeout_s": 0.5},
                               dashboard={"store": False}), plugins=[_deaf_plugin()])
    await agent.start()
    agent.record("x", 1)
    await await_until(lambda: _DeafSink.sending, what="the deaf sink to be inside send()")
    t0 = time.monotonic()
    await asyncio.wait_for(agent.stop(), (0.5 + SHUTDOWN_GRACE_S) * GENEROUS + 10)
    took = time.monotonic() - t0
    print(f"\nstop with a sink that ignores cancels: {took:.2f}s, abandoned {agent.abandoned}")
    assert "sink:deaf" in agent.abandoned
    assert took <= (0.5 + SHUTDOWN_GRACE_S) * GENEROUS
    _DeafSink.release.set()  # let the leftover task end (it is no longer awaited by anyone)
    with sqlite3.connect(tmp_path / "data" / "agent.db") as conn:
        (cursor,) = conn.execute("SELECT seq FROM cursors WHERE sink = 'deaf'").fetchone()
        (count,) = conn.execute("SELECT coalesce(sum(count), 0) FROM journal WHERE seq > ?", (cursor,)).fetchone()
    assert count == 1  # not confirmed: it waits in the journal for the next start


class _DeafSink:
    """Swallows every cancel while sending (as a buggy plugin or library might)."""

    sending = False
    release = asyncio.Event()

    def __init__(self, name: str, options: object, ctx: object) -> None:
        pass

    async def start(self) -> None:
        _DeafSink.sending = False
        _DeafSink.release = asyncio.Event()

    async def send(self, events: list[Event]) -> None:
        _DeafSink.sending = True
        while not _DeafSink.release.is_set():
            try:
                await _DeafSink.release.wait()
            except asyncio.CancelledError:
                continue
        raise RuntimeError("released")

    async def close(self) -> None:
        pass


def _deaf_plugin() -> types.ModuleType:
    from agent.plugin.hookspecs import hookimpl

    module = types.ModuleType("deaf_sink_plugin")

    @hookimpl
    def register_sinks(register):  # type: ignore[no-untyped-def]
        register("deaf", _DeafSink)

    module.register_sinks = register_sinks  # type: ignore[attr-defined]
    return module


# -- a real `sidecar-agent run`, SIGTERM right after 200k acked events ------------------


@functools.cache
def encoded_batches(total: int, batch: int) -> tuple[bytes, ...]:
    """JSON bodies of `total` events with ids, `batch` per body: made once and posted in
    every round (each round has a data dir of its own), so rounds spend their time in the agent."""
    return tuple(
        json.dumps([{"id": str(uuid.uuid4()), "name": "load", "value": float(i), "tags": {"c": str(i % 7)}}
                    for i in range(start, min(total, start + batch))]).encode()
        for start in range(0, total, batch)
    )


async def post_all(port: int, total: int, clients: int = 4, batch: int = 1000) -> list[str]:
    """POST `total` events in batches of `batch` from `clients` concurrent clients; every
    batch must get its 202. Returns the acked ids."""
    url = f"http://127.0.0.1:{port}/api/v1/events"
    acked: list[str] = []
    bodies = iter(encoded_batches(total, batch))

    async def client(http: aiohttp.ClientSession) -> None:
        for body in bodies:
            async with http.post(url, data=body, headers={"Content-Type": "application/json"}) as r:
                assert r.status == 202, await r.text()
                acked.extend((await r.json())["ids"])

    async with aiohttp.ClientSession() as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    assert len(acked) == total
    return acked


async def sigterm_and_wait(proc: subprocess.Popen[bytes], log: Path, bound: float) -> float:
    """SIGTERM; wait for the process to exit by itself (never killed here); return how long it took."""
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        rc = await asyncio.wait_for(asyncio.to_thread(proc.wait), bound * GENEROUS + 10)
    except TimeoutError:
        proc.kill()
        raise AssertionError(f"still running {bound * GENEROUS + 10:.0f}s after SIGTERM:\n{log.read_text()[-3000:]}")
    took = time.monotonic() - t0
    assert rc == 0, log.read_text()[-3000:]
    return took


class _Id(msgspec.Struct):
    """An event's id alone (its other fields are skipped, not decoded)."""

    id: str


_segment_ids = msgspec.msgpack.Decoder(list[_Id])
_line_id = msgspec.json.Decoder(_Id)


def undelivered_in_journal(db: Path, sink: str) -> set[str]:
    """Ids journaled after `sink`'s persisted cursor: what the next start delivers to it."""
    with sqlite3.connect(db) as conn:
        (cursor,) = conn.execute("SELECT seq FROM cursors WHERE sink = ?", (sink,)).fetchone()
        out: set[str] = set()
        for first, body in conn.execute("SELECT first_seq, body FROM journal WHERE seq > ? ORDER BY seq", (cursor,)):
            for i, e in enumerate(_segment_ids.decode(body)):
                if first + i > cursor:
                    out.add(e.id)
    return out


def jsonl_ids(path: Path) -> set[str]:
    """Ids in a jsonl sink's file (complete lines only, as read_jsonl), decoding only the ids."""
    if not path.exists():
        return set()
    raw = path.read_bytes()
    return {_line_id.decode(line).id for line in raw[: raw.rfind(b"\n") + 1].splitlines() if line.strip()}


def stored_ids(store_db: Path) -> set[str]:
    if not store_db.exists():
        return set()
    with sqlite3.connect(store_db) as conn:
        return {i for (i,) in conn.execute("SELECT id FROM events")}


def losses(db: Path) -> dict[tuple[str, str], int]:
    with sqlite3.connect(db) as conn:
        return {(r, s): n for r, s, n in conn.execute("SELECT reason, sink, count FROM losses") if n}


async def test_sigterm_right_after_200k_acked_events_always_ends_and_loses_nothing(tmp_path: Path) -> None:
    took: list[float] = []
    for rnd in range(ROUNDS):
        port = free_port()
        tmp = tmp_path / f"r{rnd}"
        tmp.mkdir()
        out = tmp / "out.jsonl"
        timeout = TIMEOUT_S if rnd == 0 else QUICK_TIMEOUT_S
        cfg = write_toml(tmp / "agent.toml", agent_config(
            tmp / "data", {"out": jsonl_sink(out)}, agent={"shutdown_timeout_s": timeout}, server={"port": port}))
        log = tmp / "agent.log"
        proc = spawn(cfg, log)
        try:
            await wait_healthy(port, proc, log)
            acked = set(await post_all(port, EVENTS))
            took.append(await sigterm_and_wait(proc, log, timeout + SHUTDOWN_GRACE_S))  # at once: sinks far behind
        finally:
            if proc.poll() is None:
                proc.kill()
        db = tmp / "data" / "agent.db"
        jsonl = jsonl_ids(out)
        assert not acked - jsonl - undelivered_in_journal(db, "out"), f"round {rnd}: acked ids lost for out"
        store = stored_ids(tmp / "data" / "store.db")
        assert not acked - store - undelivered_in_journal(db, "store"), f"round {rnd}: acked ids lost for store"
        assert losses(db) == {}
        if rnd == ROUNDS - 1:  # the next start delivers the backlog
            proc = spawn(cfg, log)
            try:
                await wait_healthy(port, proc, log)
                await await_until(lambda: acked <= jsonl_ids(out), timeout=300,
                                  interval=0.5, what="the jsonl backlog delivered after the restart")
                took.append(await sigterm_and_wait(proc, log, timeout + SHUTDOWN_GRACE_S))
            finally:
                if proc.poll() is None:
                    proc.kill()
    print(f"\nSIGTERM after {EVENTS} acked events x{ROUNDS} (+1 after restart): stop took "
          f"{', '.join(f'{t:.2f}' for t in took)} s (bound {BOUND_S:.0f} s in round 1, "
          f"{QUICK_TIMEOUT_S + SHUTDOWN_GRACE_S:.0f} s after it, + process exit)")


# -- a blackholed PostgreSQL ---------------------------------------------------------


class Blackhole:
    """Accepts TCP connections and never answers (nor closes them)."""

    def __init__(self) -> None:
        self.port = 0
        self.accepted = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Blackhole:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.append(writer)

    async def __aexit__(self, *exc: object) -> None:
        for w in self._writers:
            w.transport.abort()
        assert self._server is not None
        self._server.close()


async def test_a_blackholed_postgres_cannot_hold_the_stop(tmp_path: Path) -> None:
    port = free_port()
    out, backlog, log = tmp_path / "out.jsonl", tmp_path / "pg-backlog.jsonl", tmp_path / "agent.log"
    async with Blackhole() as hole:
        pg = {"type": "postgres", "dsn": f"postgresql://sidecar@127.0.0.1:{hole.port}/db",
              "policies": ["timeout", "retry", "circuit_breaker"], "connect_timeout_s": 60.0}
        cfg = write_toml(tmp_path / "agent.toml", agent_config(
            tmp_path / "data", {"out": jsonl_sink(out), "pg": pg}, agent={"shutdown_timeout_s": TIMEOUT_S},
            server={"port": port}, dashboard={"store": False}))
        proc = spawn(cfg, log)
        try:
            await wait_healthy(port, proc, log)
            acked = set(await post_all(port, 5000, clients=2))
            await await_until(lambda: acked <= {e["id"] for e in read_jsonl(out)}, timeout=60,
                              what="the jsonl sink to have everything (the agent is working)")
            assert hole.accepted, "the postgres sink never reached the blackhole"
            took = await sigterm_and_wait(proc, log, BOUND_S)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert acked <= undelivered_in_journal(tmp_path / "data" / "agent.db", "pg")
    # The next start delivers the backlog: the same sink name (its cursor), now a jsonl file.
    write_toml(tmp_path / "agent.toml", agent_config(
        tmp_path / "data", {"out": jsonl_sink(out), "pg": jsonl_sink(backlog)},
        agent={"shutdown_timeout_s": TIMEOUT_S}, server={"port": port}, dashboard={"store": False}))
    proc = spawn(cfg, log)
    try:
        await wait_healthy(port, proc, log)
        await await_until(lambda: acked <= {e["id"] for e in read_jsonl(backlog)}, timeout=60,
                          what="the backlog delivered after the restart")
        again = await sigterm_and_wait(proc, log, BOUND_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    print(f"\nblackholed postgres: stop took {took:.2f} s (bound {BOUND_S:.0f} s); after the restart {again:.2f} s")
    assert losses(tmp_path / "data" / "agent.db") == {}
