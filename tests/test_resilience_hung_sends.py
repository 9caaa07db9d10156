"""A hung send is cut, and the breaker sees it (issue 18, item 5).

- the `timeout` policy ends an attempt whose cleanup ignores the first cancel (asyncpg
  waits up to its command timeout, shielded, to release a connection to a server that
  stopped answering): it cancels again until the attempt ends, and raises a
  RetryableError from a TimeoutError, leaving no cancel pending on the task;
- `retry` gives a timed-out batch `max_timeouts` attempts (default 2), not `max_attempts`;
- the breaker counts a timeout as a failure, but an error raised while the task is being
  cancelled (the agent stopping) is no failure;
- against PostgreSQL behind a TCP proxy that turns into a blackhole (accepts, never
  answers): the default chain opens the breaker (status and /api/v1/sinks show it),
  /readyz names the sink as degraded, nothing is lost (the backlog waits in the journal
  and the DLQ, and reaches the real database once the proxy forwards again), and stop()
  ends within its bound, also in the middle of a hung send, without counting a failure.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path

import aiohttp
import pytest

from agent.config import DEFAULT_POLICIES
from agent.errors import RetryableError
from agent.plugin.base import PluginContext
from agent.runtime import SHUTDOWN_GRACE_S
from plugins.circuit_breaker import CircuitBreakerOptions, CircuitBreakerPolicy
from plugins.retry import RetryOptions, RetryPolicy, timed_out
from plugins.timeout import TimeoutOptions, TimeoutPolicy
from tests.conftest_supabase import PgTable
from tests.helpers import await_until, post_events, start_agent


def ctx(name: str = "pg") -> PluginContext:
    return PluginContext(name, "agent-1", Path("."), logging.getLogger("test"), lambda events: None)


# -- the timeout policy --------------------------------------------------------------


async def test_a_cancelled_attempt_stuck_in_its_cleanup_is_cancelled_again_until_it_ends() -> None:
    policy = TimeoutPolicy("pg", TimeoutOptions(timeout_s=0.05))
    release = asyncio.get_running_loop().create_future()  # what a shielded cleanup waits for

    async def send() -> None:
        try:
            await asyncio.sleep(3600)  # the server never answers
        finally:
            await asyncio.shield(release)  # like asyncpg's Pool.release: the first cancel does not end it

    with pytest.raises(RetryableError) as err:
        await asyncio.wait_for(policy.call(send), 60)  # a generous bound: only a second cancel ends it
    assert timed_out(err.value) and "timed out after 0.05s" in str(err.value)
    assert not release.done(), "the policy returned without waiting for the stuck cleanup"
    assert asyncio.current_task().cancelling() == 0, "no cancel of the policy's is left pending"
    await asyncio.sleep(0)  # and none is delivered later either
    release.set_result(None)


async def test_a_sink_that_turns_the_cancel_into_its_own_error_still_times_out_cleanly() -> None:
    policy = TimeoutPolicy("pg", TimeoutOptions(timeout_s=0.05))

    async def send() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise ConnectionResetError("connection was closed in the middle of operation") from None

    with pytest.raises(RetryableError) as err:
        await policy.call(send)
    assert timed_out(err.value)
    assert asyncio.current_task().cancelling() == 0
    await asyncio.sleep(0.01)  # the worker goes on: no cancel lands on its next await


async def test_a_stop_during_a_timed_out_attempt_stays_a_cancel() -> None:
    policy = TimeoutPolicy("pg", TimeoutOptions(timeout_s=0.05))
    release = asyncio.get_running_loop().create_future()

    async def send() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            await asyncio.shield(release)

    task = asyncio.ensure_future(policy.call(send))
    await await_until(
        lambda: policy._inflight and next(iter(policy._inflight.values())).expired, what="the attempt to time out"
    )
    task.cancel()  # the agent stops while the attempt hangs in its cleanup
    with pytest.raises(asyncio.CancelledError):
        await task
    release.set_result(None)


# -- retry: timeouts get max_timeouts attempts ---------------------------------------


async def test_a_batch_that_keeps_timing_out_gets_max_timeouts_attempts_then_reaches_the_breaker() -> None:
    c = ctx()
    timeout = TimeoutPolicy("pg", TimeoutOptions(timeout_s=0.02), c)
    retry = RetryPolicy("pg", RetryOptions(initial_backoff_ms=1, max_backoff_ms=2), c)  # max_attempts 6
    breaker = CircuitBreakerPolicy("pg", CircuitBreakerOptions(failure_threshold=2, reset_timeout_s=3600), c)
    attempts = 0

    async def hang() -> None:
        nonlocal attempts
        attempts += 1
        await asyncio.sleep(3600)

    def call() -> object:
        return breaker.call(lambda: retry.call(lambda: timeout.call(hang)))

    for _ in range(2):
        with pytest.raises(RetryableError) as err:
            await call()
        assert timed_out(err.value)
    assert attempts == 2 * 2, "two attempts per batch (RetryOptions.max_timeouts), not max_attempts"
    assert c.stats["retries_timed_out"] == 2 and c.stats["breaker_state"] == "open"


async def test_other_retryable_errors_still_get_max_attempts() -> None:
    c = ctx()
    retry = RetryPolicy("pg", RetryOptions(max_attempts=4, initial_backoff_ms=1, max_backoff_ms=2), c)
    attempts = 0

    async def refused() -> None:
        nonlocal attempts
        attempts += 1
        raise RetryableError("connection refused")

    with pytest.raises(RetryableError):
        await retry.call(refused)
    assert attempts == 4 and c.stats["retries_timed_out"] == 0


# -- the breaker: a stop is no failure -----------------------------------------------


async def test_an_error_raised_while_the_agent_stops_is_not_a_breaker_failure() -> None:
    c = ctx()
    breaker = CircuitBreakerPolicy("pg", CircuitBreakerOptions(failure_threshold=1, reset_timeout_s=3600), c)
    started = asyncio.Event()

    async def send() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise RetryableError("postgres: connection closed") from None  # the sink turned the cancel into this

    task = asyncio.ensure_future(breaker.call(send))
    await started.wait()
    task.cancel()
    with pytest.raises(RetryableError):
        await task
    assert breaker.state == "closed" and breaker.failures == 0

    async def timed_out_send() -> None:
        raise RetryableError("pg: timed out after 10s") from TimeoutError()

    with pytest.raises(RetryableError):
        await breaker.call(timed_out_send)
    assert breaker.state == "open", "a timeout is a failure"


# -- a real PostgreSQL behind a proxy that can turn into a blackhole -----------------


class BlackholeProxy:
    """Forwards TCP to a real server until `blackhole()`: from then on it accepts
    connections and never answers, and open connections go silent both ways (the
    network ate the packets). `forward()` lets traffic through again."""

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.port = 0
        self.accepted = 0
        self.silent = False
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> BlackholeProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for w in self._writers:
            w.transport.abort()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def blackhole(self) -> None:
        self.silent = True

    def forward(self) -> None:
        """Traffic flows again; connections made while silent were never answered, so they are cut."""
        self.silent = False
        for w in [w for w in self._writers if getattr(w, "held", False)]:
            w.transport.abort()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.append(writer)
        if self.silent:
            writer.held = True  # type: ignore[attr-defined]
            return
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        self._writers.append(up_writer)
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.get_running_loop().create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                while self.silent:  # swallowed: neither side hears from the other
                    await asyncio.sleep(0.05)
                dst.write(data)
                await dst.drain()
        except OSError:
            pass
        finally:
            dst.transport.abort()


def pg_sink(table: PgTable, port: int, **extra: object) -> dict[str, object]:
    """The postgres sink through the proxy, with the default chain."""
    base, _, db = table.dsn.rpartition("/")
    user_host = base.rsplit("@", 1)[0]
    return {
        "type": "postgres",
        "dsn": f"{user_host}@127.0.0.1:{port}/{db}",
        "table": table.table,
        "connect_timeout_s": 2.0,
        "policies": list(DEFAULT_POLICIES),
        **extra,
    }


def undelivered(db: Path, sink: str) -> int:
    """Events journaled past `sink`'s persisted cursor (what a restart would deliver)."""
    with sqlite3.connect(db) as conn:
        (cursor,) = conn.execute("SELECT seq FROM cursors WHERE sink = ?", (sink,)).fetchone()
        (n,) = conn.execute("SELECT coalesce(sum(count), 0) FROM journal WHERE seq > ?", (cursor,)).fetchone()
    return n


async def get(agent: object, path: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http, http.get(agent.server_url + path) as r:  # type: ignore[attr-defined]
        return r.status, await r.json()


async def test_a_blackholed_postgres_opens_the_breaker_shows_degraded_and_loses_nothing(
    tmp_path: Path, pg_table: PgTable
) -> None:
    async with BlackholeProxy("127.0.0.1", 5432) as proxy:
        # Short figures so it runs in seconds; the defaults are the same shape (10 s per attempt).
        sink = pg_sink(
            pg_table,
            proxy.port,
            timeout={"timeout_s": 1.0},
            retry={"initial_backoff_ms": 10, "max_backoff_ms": 50},
            circuit_breaker={"failure_threshold": 2, "reset_timeout_s": 1.0},
        )
        agent = await start_agent(
            tmp_path / "data", {"pg": sink}, dashboard={"store": False}, server={"ready_max_lag_s": 2.0}
        )
        try:
            agent.record("before", 1.0)
            await agent.flush()
            proxy.blackhole()
            ids = []
            for i in range(30):
                ids += await post_events(agent, {"name": "during", "value": i})
                await asyncio.sleep(0.05)

            def breaker() -> str:
                return agent.workers["pg"].describe()["policies"]["breaker_state"]

            await await_until(lambda: breaker() == "open", timeout=60, what="the breaker to open")
            _, status = await get(agent, "/api/v1/status")
            (pg,) = [s for s in status["sinks"] if s["name"] == "pg"]
            assert pg["policies"]["breaker_state"] in ("open", "half_open")
            assert "timed out" in pg["last_error"]

            async def degraded() -> dict | None:
                code, body = await get(agent, "/readyz")
                assert code == 200 and body["ready"], body  # intake still works: ready, but degraded
                return (
                    body
                    if body["status"] == "degraded"
                    and {"breaker_open", "lagging"}
                    <= set(next(d for d in body["degraded"] if d["sink"] == "pg")["reasons"])
                    else None
                )

            body = None
            for _ in range(600):
                if body := await degraded():
                    break
                await asyncio.sleep(0.05)
            assert body, "readyz never named pg as degraded (breaker open and lagging)"
            assert any(p.startswith("sink pg is degraded") for p in body["problems"])
            _, status = await get(agent, "/api/v1/status")
            assert status["readiness"]["status"] == "degraded"
            assert [d["sink"] for d in status["readiness"]["degraded"]] == ["pg"]

            # Nothing is lost: the batches that failed before the breaker opened are in the
            # DLQ, the rest waits in the journal; once the network is back all arrive.
            assert agent.ledger.total() == 0
            proxy.forward()
            await await_until(
                lambda: agent.journal.lag("pg") == 0 and agent.dlq.depth("pg") == 0,
                timeout=120,
                what="the backlog and the DLQ delivered after the network came back",
            )
            counts = await pg_table.count_ids(ids)
            assert set(counts.values()) == {1}, {i: n for i, n in counts.items() if n != 1}
            await await_until(lambda: breaker() == "closed", what="the breaker to close")
            code, body = await get(agent, "/readyz")
            assert (code, body["status"], body["degraded"]) == (200, "ready", [])
            assert agent.ledger.total() == 0
        finally:
            await asyncio.wait_for(agent.stop(), 4 * (agent.config.agent.shutdown_timeout_s + SHUTDOWN_GRACE_S))
        assert not agent.abandoned


async def test_stop_in_the_middle_of_a_hung_send_ends_in_its_bound_and_is_no_breaker_failure(
    tmp_path: Path, pg_table: PgTable
) -> None:
    async with BlackholeProxy("127.0.0.1", 5432) as proxy:
        sink = pg_sink(
            pg_table,
            proxy.port,
            timeout={"timeout_s": 600},  # the send hangs until the stop
            circuit_breaker={"failure_threshold": 1, "reset_timeout_s": 3600},
        )
        agent = await start_agent(
            tmp_path / "data", {"pg": sink}, dashboard={"store": False}, agent={"shutdown_timeout_s": 1.0}
        )
        agent.record("before", 1.0)
        await agent.flush()
        proxy.blackhole()
        accepted = proxy.accepted
        for i in range(20):
            agent.record("during", float(i))
        worker = agent.workers["pg"]
        await await_until(
            lambda: worker.stats.state == "sending" and worker.journal.lag("pg") > 0,
            what="a send in flight to the blackhole",
        )
        await asyncio.sleep(0.2)
        bound = agent.config.agent.shutdown_timeout_s + SHUTDOWN_GRACE_S
        await asyncio.wait_for(agent.stop(), 4 * bound)
        assert proxy.accepted >= accepted
        # The stop's cancel is not a failed batch: the breaker stayed closed, nothing was
        # dead-lettered, and the events wait in the journal for the next start.
        assert worker.describe()["policies"]["breaker_state"] == "closed"
        assert worker.stats.failed == 0 and worker.stats.dead_lettered == 0
        assert undelivered(tmp_path / "data" / "agent.db", "pg") >= 20
        assert agent.ledger.total() == 0
