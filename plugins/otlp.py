"""`otlp` source: OTLP/HTTP metrics and logs on a listener of its own (default 127.0.0.1:4318).

`POST /v1/metrics` and `POST /v1/logs` take protobuf (`application/x-protobuf`) or JSON
(`application/json`, the OTLP JSON mapping: hex trace and span ids), optionally gzip.
The answers are the OTLP/HTTP spec's: 200 (in the request's encoding) only after the
events are in the journal, with `partial_success` naming the points or records the agent
refused; 400 for a body that does not decode; 413 over `max_body_bytes` (compressed or
not); 415 for another content type; 429 when the intake is full and 503 when the journal
is full or the agent is stopping, both with Retry-After (the exporters retry on them).
How metrics and logs become events is in docs/otlp.md and plugins/otlp_mapping.py.
Needs the `otlp` extra (opentelemetry-proto).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import zlib
from collections.abc import AsyncIterator
from typing import Annotated, Any

import msgspec
from aiohttp import web

from agent.plugin import (
    Emit,
    IntakeFullError,
    JournalFullError,
    PluginContext,
    PluginError,
    RegisterComponent,
    ThrottledLog,
    bind_with_retry,
    hookimpl,
)

# Loss ledger reason: a cumulative series forgotten at the `max_series` cap; its next
# point is only a base, so at most one interval's increase of it is never emitted.
SERIES_EVICTED = "otlp_series_evicted"
PROTOBUF = "application/x-protobuf"
JSON = "application/json"
RETRY_AFTER_S = "1"
REJECTED_POINTS = "rejected_data_points"


class OtlpOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"  # OTLP has no authentication here: anyone who can reach it can send
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 4318  # 0: any free port (see status)
    max_body_bytes: Annotated[int, msgspec.Meta(gt=0)] = 8 * 1024 * 1024  # as sent and after gunzip
    max_series: Annotated[int, msgspec.Meta(gt=0)] = 100_000  # cumulative series remembered for deltas
    # Resource attributes that become tags ("*": all); service.name always does.
    resource_tags: list[str] | None = None


class BadRequest(ValueError):
    """A body that cannot be decoded (400) or is too large (413)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class OtlpSource:
    """Serves OTLP/HTTP until cancelled; each export is journaled before it is answered."""

    def __init__(self, name: str, options: OtlpOptions, ctx: PluginContext) -> None:
        # Imported here, not at module import: the embedded agent loads every built-in, and
        # only an agent that configures this source needs opentelemetry-proto (the `otlp` extra).
        from . import otlp_mapping

        if ctx.submit is None:
            raise PluginError("the otlp source needs an agent's durable submit (PluginContext.submit)")
        self.mapping = otlp_mapping
        self.options = options
        self.ctx = ctx
        self.submit = ctx.submit
        tags = otlp_mapping.DEFAULT_RESOURCE_TAGS if options.resource_tags is None else options.resource_tags
        self.mapper = otlp_mapping.Mapper(tags, options.max_series, started_ns=time.time_ns())
        # One export with cumulative points per resource at a time: the state it stages is
        # kept only after its commit, and the next one's deltas must be taken from that.
        # Other resources (other processes), gauges, delta sums and logs do not wait.
        self._resource_locks = KeyLocks()
        self.warn = ThrottledLog(ctx.log)
        self.stats = ctx.stats
        self.stats.update(
            address=None,
            error=None,
            requests=0,
            bad_requests=0,
            refused=0,
            events=0,
            rejected=0,
            series=0,
            series_evicted=0,
        )

    async def run(self, emit: Emit) -> None:
        app = web.Application(client_max_size=self.options.max_body_bytes)
        app.router.add_post("/v1/metrics", self._metrics)
        app.router.add_post("/v1/logs", self._logs)
        # auto_decompress off: the body is gunzipped here, bounded by max_body_bytes (aiohttp's
        # own would inflate a gzip bomb before any limit applies).
        runner = web.AppRunner(app, access_log=None, handle_signals=False, auto_decompress=False)
        await runner.setup()
        try:
            await self._listen(runner)
            host, port = runner.addresses[0][:2]  # the bound address (port 0 picks one)
            self.stats["address"] = f"{host}:{port}"
            self.ctx.log.info("otlp listening on http://%s:%d", host, port)
            await asyncio.Event().wait()  # until cancelled
        finally:
            await runner.cleanup()

    async def _listen(self, runner: web.AppRunner) -> web.TCPSite:
        """Bind; a taken address is retried with backoff, one WARNING per try (as statsd does)."""

        async def bind() -> web.TCPSite:
            site = web.TCPSite(runner, self.options.host, self.options.port)
            await site.start()
            return site

        where = f"{self.options.host}:{self.options.port}"
        return await bind_with_retry(bind, where, self.stats, self.ctx.log, "otlp")

    # -- handlers ------------------------------------------------------------------

    async def _metrics(self, request: web.Request) -> web.Response:
        m = self.mapping
        decoded = await self._decode(request, m.ExportMetricsServiceRequest)
        if isinstance(decoded, web.Response):
            return decoded
        req, encoding = decoded
        async with self._resource_locks.hold(m.stateful_resources(req)):
            # Off the loop: a large export is many points of Python work. The locks make this
            # the only reader of its resources' state, which _keep() changes on the loop.
            events, staged, errors = await asyncio.to_thread(self.mapper.metrics, req)
            answer = await self._commit(events, errors, encoding, m.ExportMetricsServiceResponse, REJECTED_POINTS)
            if staged and answer.status == 200:
                self._keep(staged)
            return answer

    def _keep(self, staged: dict[Any, Any]) -> None:
        before = self.mapper.evicted
        self.mapper.commit(staged)
        if self.mapper.evicted > before:
            self.ctx.lost(SERIES_EVICTED, self.mapper.evicted - before)
            self.stats["series_evicted"] = self.mapper.evicted
        self.stats["series"] = len(self.mapper.last)

    async def _logs(self, request: web.Request) -> web.Response:
        m = self.mapping
        decoded = await self._decode(request, m.ExportLogsServiceRequest)
        if isinstance(decoded, web.Response):
            return decoded
        req, encoding = decoded
        events = await asyncio.to_thread(self.mapper.logs, req)
        return await self._commit(events, [], encoding, m.ExportLogsServiceResponse, "rejected_log_records")

    async def _decode(self, request: web.Request, message: type) -> tuple[Any, str] | web.Response:
        self.stats["requests"] += 1
        encoding = request.content_type
        if encoding not in (PROTOBUF, JSON):
            self.stats["bad_requests"] += 1
            return _status(415, f"unsupported content type {encoding!r}: send {PROTOBUF} or {JSON}", JSON)
        try:
            body = await self._body(request)
            try:
                return await asyncio.to_thread(self.mapping.decode, body, encoding, message), encoding
            except ValueError as exc:
                raise BadRequest(str(exc)) from None
        except BadRequest as exc:
            self.stats["bad_requests"] += 1
            self.warn("otlp: refused a request to %s (%d): %s", request.path, exc.status, exc)
            return _status(exc.status, str(exc), encoding)

    async def _body(self, request: web.Request) -> bytes:
        limit = self.options.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise BadRequest(f"body is larger than the limit of {limit} bytes", 413)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise BadRequest(f"body is larger than the limit of {limit} bytes", 413) from None
        coding = request.headers.get("Content-Encoding", "identity").lower()
        if coding == "gzip":
            inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)
            try:
                body = inflater.decompress(body, limit)  # never more than the limit in memory
            except zlib.error as exc:
                raise BadRequest(f"gzip body does not decompress: {exc}") from None
            if inflater.unconsumed_tail:
                raise BadRequest(f"body is larger than the limit of {limit} bytes once decompressed", 413)
            if not inflater.eof:
                raise BadRequest("gzip body is truncated")
        elif coding != "identity":
            raise BadRequest(f"unsupported Content-Encoding {coding!r} (gzip or none)", 415)
        return body

    async def _commit(self, events: list, errors: list[str], encoding: str, response: type, field: str) -> web.Response:
        """Journal the events, then answer 200 with partial_success, or 429/503 (nothing taken)."""
        try:
            refused = await self.submit(events) if events else []
        except IntakeFullError as exc:
            self.stats["refused"] += 1
            return _status(429, str(exc), encoding, retry_after=True)
        except JournalFullError as exc:
            self.stats["refused"] += 1
            return _status(503, str(exc), encoding, retry_after=True)
        errors = errors + refused
        self.stats["events"] += len(events) - len(refused)
        self.stats["rejected"] += len(errors)
        answer = response()
        if errors:
            setattr(answer.partial_success, field, len(errors))
            shown = "; ".join(errors[:10]) + (f"; and {len(errors) - 10} more" if len(errors) > 10 else "")
            answer.partial_success.error_message = shown
        return self.mapping.encode(answer, encoding, 200)


class KeyLocks:
    """One asyncio lock per key, made on demand and dropped once nobody holds or awaits it."""

    def __init__(self) -> None:
        self._locks: dict[Any, tuple[asyncio.Lock, int]] = {}

    @contextlib.asynccontextmanager
    async def hold(self, keys: list[Any]) -> AsyncIterator[None]:
        """Hold the locks of `keys`, taken in their sorted order (so two holders never deadlock)."""
        joined: list[Any] = []
        held: list[Any] = []
        try:
            for key in keys:
                lock, users = self._locks.get(key) or (asyncio.Lock(), 0)
                self._locks[key] = (lock, users + 1)
                joined.append(key)
                await lock.acquire()
                held.append(key)
            yield
        finally:
            for key in joined:
                lock, users = self._locks[key]
                if key in held:
                    lock.release()
                if users == 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


def _status(status: int, message: str, encoding: str, retry_after: bool = False) -> web.Response:
    """An error answer: a google.rpc.Status in the request's encoding (code 3 or 14, as the spec's examples)."""
    code = 3 if status < 429 else 14  # INVALID_ARGUMENT, UNAVAILABLE
    headers = {"Retry-After": RETRY_AFTER_S} if retry_after else None
    if encoding == PROTOBUF:
        text = message.encode()
        body = b"\x08" + _varint(code) + b"\x12" + _varint(len(text)) + text  # Status{code=1, message=2}
    else:
        body = json.dumps({"code": code, "message": message}).encode()
        encoding = JSON
    return web.Response(status=status, body=body, content_type=encoding, headers=headers)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


@hookimpl
def register_sources(register: RegisterComponent) -> None:
    register("otlp", OtlpSource, options=OtlpOptions)
