"""A fault-injecting HTTP server for resilience tests, and `TcpGate`, a TCP forwarder that can cut the network.

It runs a script of phases from the moment it starts (or from ``restart()``):

    FaultServer([Phase("healthy", 0.5), Phase("error", 1.5, status=503),
                 Phase("hang", 1.0), Phase("throttle", 0.5, retry_after=0.2),
                 Phase("healthy")])

- ``healthy``: 200 and the body's ids count as delivered;
- ``error``: the phase's `status` (default 503), no Retry-After;
- ``hang``: no answer until the phase ends (or the client gives up and disconnects);
- ``throttle``: 429 with ``Retry-After: <retry_after>`` seconds.

The last phase lasts forever. Every request is recorded with its arrival time
(``loop.time()``, so it compares with asyncio's clock and time.monotonic), the phase,
the status sent (None if the client went away first) and the event ids in its body
(a JSON array of objects with an ``id``, as tests/http_sink.py posts).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field

from aiohttp import web


@dataclass(frozen=True)
class Phase:
    kind: str  # healthy | error | hang | throttle
    duration_s: float | None = None  # None: until the end of the test
    status: int = 503
    retry_after: float | None = None


@dataclass
class Recorded:
    t: float  # loop.time() at arrival
    phase: str
    ids: list[str]
    status: int | None = None


@dataclass
class FaultServer:
    phases: list[Phase]
    path: str = "/ingest"
    requests: list[Recorded] = field(default_factory=list)
    t0: float = 0.0
    url: str = ""

    def __post_init__(self) -> None:
        self._runner: web.AppRunner | None = None

    # -- script ---------------------------------------------------------------------

    def restart(self) -> None:
        """Start the script over from its first phase, now."""
        self.t0 = asyncio.get_running_loop().time()

    def phase_at(self, t: float) -> tuple[int, Phase, float | None]:
        """(index, phase, absolute end time or None) for loop time `t`."""
        start = self.t0
        for i, phase in enumerate(self.phases):
            if phase.duration_s is None or t < start + phase.duration_s:
                return i, phase, None if phase.duration_s is None else start + phase.duration_s
            start += phase.duration_s
        return len(self.phases) - 1, self.phases[-1], None

    def window(self, kinds: set[str] | None = None) -> tuple[float, float]:
        """Absolute (start, end) of the span covering every phase whose kind is in
        `kinds` (default: everything that is not healthy)."""
        kinds = kinds or {"error", "hang", "throttle"}
        start, spans = self.t0, []
        for phase in self.phases:
            end = start + (phase.duration_s or 0.0)
            if phase.kind in kinds:
                spans.append((start, end))
            start = end
        return min(s for s, _ in spans), max(e for _, e in spans)

    def delivered_ids(self) -> set[str]:
        return {i for r in self.requests if r.status == 200 for i in r.ids}

    def between(self, start: float, end: float) -> list[Recorded]:
        return [r for r in self.requests if start <= r.t < end]

    # -- server ---------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        loop = asyncio.get_running_loop()
        now = loop.time()
        body = await request.read()
        try:
            ids = [str(item["id"]) for item in json.loads(body)]
        except (ValueError, TypeError, KeyError):
            ids = []
        _, phase, end = self.phase_at(now)
        rec = Recorded(now, phase.kind, ids)
        self.requests.append(rec)
        if phase.kind == "hang":
            await asyncio.sleep(max(0.0, (end or now + 60) - now))
            rec.status = 503
            return web.Response(status=503, text="hung")
        if phase.kind == "error":
            rec.status = phase.status
            return web.Response(status=phase.status, text="injected error")
        if phase.kind == "throttle":
            rec.status = 429
            headers = {"Retry-After": f"{phase.retry_after:g}"} if phase.retry_after is not None else {}
            return web.Response(status=429, text="slow down", headers=headers)
        rec.status = 200
        return web.json_response({"accepted": len(ids)})

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post(self.path, self._handle)
        # handler_cancellation: a client that times out cancels its hanging handler.
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}{self.path}"
        self.restart()
        return self.url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FaultServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class TcpGate:
    """A TCP forwarder in front of a real server (PostgreSQL, the Supabase emulator), so a
    test can cut the network without touching the server: ``close()`` drops every open
    connection and refuses new ones (connection reset), ``open()`` lets traffic through again.

        async with TcpGate("127.0.0.1", 5432) as gate:   # gate.port forwards to 5432
            gate.close(); ...; gate.open()
    """

    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.port = 0
        self.is_open = True
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> TcpGate:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def close(self) -> None:
        self.is_open = False
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    def open(self) -> None:
        self.is_open = True

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.is_open:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, up_writer))
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.get_running_loop().create_task(self._pipe(src, dst))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(dst)
            dst.transport.abort()
