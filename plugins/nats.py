"""`nats` sink: events published to a NATS JetStream stream, one message per event.

Each message carries the event in the agent's msgpack codec (header `Content-Type:
application/vnd.sidecar-agent.event+msgpack`) and `Nats-Msg-Id: <event id>`, so the server
drops a message it already stored within the stream's duplicate window: a batch sent again
after a lost PubAck, a retry or a restart is not stored twice. A batch is published as
many async publishes awaited together; it counts as delivered only when every PubAck is
back. Beyond the duplicate window a repeat can reach the stream; the collectors' sinks
(Postgres, Supabase) drop it by event id (docs/scale-out.md).

The stream is created when it is missing (`create_stream`), or checked to fit: it must
capture `subject` and deduplicate. Connection loss, timeouts and a JetStream that is not
answering raise RetryableError; a refused request (bad subject, message too large, no
permission) raises PermanentError, so the core's bisection parks only the offending event.

nats-py is an optional dependency (`pip install 'sidecar-agent[nats]'`), imported when a
sink or source of this type starts. The connection options are shared with the `nats`
source (plugins/nats_source.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec

from agent.plugin import BaseSink, Event, PermanentError, PluginContext, RegisterComponent, RetryableError, hookimpl

if TYPE_CHECKING:
    from nats.aio.client import Client
    from nats.js import JetStreamContext

CONTENT_TYPE = "application/vnd.sidecar-agent.event+msgpack"
MSG_ID = "Nats-Msg-Id"

_encoder = msgspec.msgpack.Encoder()


class NatsConnection(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Where and how to reach NATS; shared by the sink and the source."""

    url: str = "nats://127.0.0.1:4222"  # several servers: comma-separated
    stream: str = "SIDECAR_EVENTS"
    subject: str = "sidecar.events"
    user: str | None = None
    password: str | None = None
    token: str | None = None
    creds_file: str | None = None  # a .creds file (JWT + NKey seed; needs the nkeys package)
    tls_ca: str | None = None  # CA bundle to verify the server; any tls_* option turns TLS on
    tls_cert: str | None = None  # client certificate (mutual TLS), with tls_key
    tls_key: str | None = None
    connect_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    request_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0  # a batch's PubAcks, a stream lookup


class NatsSinkOptions(NatsConnection, kw_only=True, forbid_unknown_fields=True):
    """`[sinks.NAME]` with `type = "nats"`."""

    create_stream: bool = True  # create the stream when missing; when False it must exist
    stream_subjects: list[str] = []  # the subjects a created stream captures (default: [subject])
    replicas: Annotated[int, msgspec.Meta(ge=1, le=5)] = 1
    storage: Literal["file", "memory"] = "file"
    max_bytes: int = -1  # stream limits for a created stream; -1: unlimited
    max_msgs: int = -1
    max_age_s: Annotated[float, msgspec.Meta(ge=0)] = 0.0  # 0: kept until limits apply
    duplicate_window_s: Annotated[float, msgspec.Meta(gt=0)] = 120.0
    max_pending: Annotated[int, msgspec.Meta(gt=0)] = 4000  # async publishes awaiting a PubAck, per sink


def load_nats() -> Any:
    """The nats package, or a PermanentError saying how to install it."""
    try:
        import nats
    except ImportError as exc:
        raise PermanentError("the nats plugin needs nats-py: pip install 'sidecar-agent[nats]'") from exc
    return nats


def _tls(o: NatsConnection) -> ssl.SSLContext | None:
    if not (o.tls_ca or o.tls_cert or o.tls_key):
        return None
    ctx = ssl.create_default_context(cafile=o.tls_ca)
    if o.tls_cert:
        ctx.load_cert_chain(o.tls_cert, o.tls_key)
    return ctx


async def connect(o: NatsConnection, name: str, ctx: PluginContext) -> Client:
    """A NATS connection that reconnects forever; its state changes are logged and counted."""
    nats = load_nats()
    stats = ctx.stats

    async def on_error(exc: Exception) -> None:
        stats["last_error"] = f"{type(exc).__name__}: {exc}"[:300]

    async def on_disconnect() -> None:
        stats["connected"] = False
        if clients and clients[0].is_closed:
            return  # our own close(), not an outage
        ctx.log.warning("nats %s: disconnected from %s", name, o.url)

    async def on_reconnect() -> None:
        stats["connected"] = True
        stats["reconnects"] = stats.get("reconnects", 0) + 1
        ctx.log.info("nats %s: reconnected", name)

    clients: list[Client] = []  # for the callbacks, which run before connect() returns
    client: Client = await nats.connect(
        servers=[u.strip() for u in o.url.split(",") if u.strip()],
        name=f"sidecar-agent:{ctx.agent_id}:{name}",
        connect_timeout=o.connect_timeout_s,
        allow_reconnect=True,
        # nats-py retries a first connect forever when this is -1: fail it after one more try
        # per server (the caller retries on its own terms), then reconnect forever below.
        max_reconnect_attempts=1,
        reconnect_time_wait=0.5,
        user=o.user,
        password=o.password,
        token=o.token,
        user_credentials=o.creds_file,
        tls=_tls(o),
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        reconnected_cb=on_reconnect,
    )
    # Once connected, never give up on the server: the journal (sink) or JetStream (source)
    # holds the backlog meanwhile. nats-py reads this option on every reconnect.
    client.options["max_reconnect_attempts"] = -1
    clients.append(client)
    stats["connected"] = True
    return client


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: `*` one token, `>` one or more trailing tokens."""
    p, s = pattern.split("."), subject.split(".")
    for i, tok in enumerate(p):
        if tok == ">":
            return len(s) > i
        if i >= len(s) or (tok != "*" and tok != s[i]):
            return False
    return len(p) == len(s)


def map_nats_error(exc: BaseException) -> Exception:
    """Map a nats-py / OS error to RetryableError or PermanentError."""
    import nats.errors
    import nats.js.errors

    msg = f"nats: {type(exc).__name__}: {exc}"[:500]
    if isinstance(exc, nats.js.errors.APIError):
        code = exc.code or 0
        # 408 timeout, 429 too many requests, 503 JetStream unavailable or no quorum: transient.
        if code in (408, 429) or code >= 500 or isinstance(exc, nats.js.errors.ServiceUnavailableError):
            return RetryableError(msg)
        return PermanentError(msg)
    if isinstance(exc, (nats.errors.MaxPayloadError, nats.errors.BadSubjectError, nats.errors.AuthorizationError)):
        return PermanentError(msg)
    # Timeouts, no responders (stream not there yet, server restarting), closed or
    # reconnecting connections, stalled async publishes, OS errors: worth another try.
    return RetryableError(msg)


class NatsSink(BaseSink):
    """Publishes each batch to JetStream and returns when every PubAck is back."""

    # Publishes of several batches interleave on one connection; the server keeps order per
    # publisher only loosely anyway, and events carry their own ts.
    max_in_flight = 4

    def __init__(self, name: str, options: NatsSinkOptions, ctx: PluginContext) -> None:
        self.name, self.options, self.ctx = name, options, ctx
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self._stream_ok = False
        self._lock = asyncio.Lock()
        for key in ("published", "duplicates", "reconnects"):
            ctx.stats.setdefault(key, 0)
        ctx.stats.setdefault("connected", False)

    async def start(self) -> None:
        """Connect and check the stream; when NATS is down, log it and try again on send."""
        load_nats()
        try:
            await self._ready()
        except PermanentError:
            raise
        except Exception as exc:
            self.ctx.log.warning("nats sink %s: not ready yet (%s); will retry on send", self.name, exc)

    async def _ready(self) -> JetStreamContext:
        if self._js is not None and self._stream_ok:
            return self._js
        async with self._lock:
            try:
                if self._nc is None:
                    self._nc = await connect(self.options, self.name, self.ctx)
                    self._js = self._nc.jetstream(
                        timeout=self.options.request_timeout_s, publish_async_max_pending=self.options.max_pending
                    )
                assert self._js is not None
                if not self._stream_ok:
                    await self._ensure_stream(self._js)
                    self._stream_ok = True
            except (PermanentError, RetryableError):
                raise
            except Exception as exc:
                raise map_nats_error(exc) from exc
            return self._js

    async def _ensure_stream(self, js: JetStreamContext) -> None:
        """Create the stream if missing; otherwise check that it captures our subject."""
        from nats.js import api
        from nats.js.errors import NotFoundError

        o = self.options
        try:
            info = await js.stream_info(o.stream)
        except NotFoundError:
            if not o.create_stream:
                raise PermanentError(f"nats: stream {o.stream!r} does not exist and create_stream is false") from None
            cfg = api.StreamConfig(
                name=o.stream,
                subjects=o.stream_subjects or [o.subject],
                storage=api.StorageType.FILE if o.storage == "file" else api.StorageType.MEMORY,
                num_replicas=o.replicas,
                max_bytes=o.max_bytes,
                max_msgs=o.max_msgs,
                max_age=o.max_age_s,
                duplicate_window=o.duplicate_window_s,
            )
            await js.add_stream(cfg)
            self.ctx.log.info("nats sink %s: created stream %s (%s)", self.name, o.stream, cfg.subjects)
            return
        subjects = info.config.subjects or []
        if not any(subject_matches(p, o.subject) for p in subjects):
            raise PermanentError(f"nats: stream {o.stream!r} captures {subjects}, not the subject {o.subject!r}")
        if not info.config.duplicate_window:
            raise PermanentError(f"nats: stream {o.stream!r} has no duplicate window: repeats would be stored")

    async def send(self, events: list[Event]) -> None:
        if not events:
            return
        js = await self._ready()
        o = self.options
        futures: list[asyncio.Future[Any]] = []
        try:
            # No Nats-Expected-Stream header per message: the stream was checked to capture the
            # subject, and the server lets no other stream capture it (overlaps are refused).
            for e in events:
                headers = {MSG_ID: e.id, "Content-Type": CONTENT_TYPE}
                futures.append(await js.publish_async(o.subject, _encoder.encode(e), headers=headers))
            async with asyncio.timeout(o.request_timeout_s):
                acks = await asyncio.gather(*futures)
        except (PermanentError, RetryableError):
            raise
        except Exception as exc:
            if _no_stream(exc):
                self._stream_ok = False  # deleted or not yet there after a restart: look again
            raise map_nats_error(exc) from exc
        finally:
            for f in futures:  # a timed-out batch must not hold publish slots
                if not f.done():
                    f.cancel()
        self.ctx.stats["published"] += len(events)
        self.ctx.stats["duplicates"] += sum(1 for a in acks if a.duplicate)

    async def close(self) -> None:
        nc, self._nc, self._js = self._nc, None, None
        if nc is not None:
            # Closing anyway; nothing is in flight once the worker stopped.
            with contextlib.suppress(TimeoutError, OSError):
                await asyncio.wait_for(nc.close(), timeout=self.options.connect_timeout_s)


def _no_stream(exc: BaseException) -> bool:
    from nats.js.errors import NoStreamResponseError

    return isinstance(exc, NoStreamResponseError)


@hookimpl
def register_sinks(register: RegisterComponent) -> None:
    register("nats", NatsSink, options=NatsSinkOptions)
