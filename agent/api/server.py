"""The HTTP server: the app on TCP (HTTPS with `server.tls_cert`) and an optional Unix
socket, with connection bounds and TLS certificates re-read when their files change.

aiohttp closes an idle keep-alive connection after `keepalive_timeout`, but has no
deadline for a request's headers and no connection cap: a ConnectionGuard wraps each
connection's protocol for those (issue 18: 500 slowloris connections were held for ever).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import stat
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from agent.api.view import AgentView
from agent.config import ServerSection
from agent.errors import AgentError

log = logging.getLogger("sidecar_agent.api")

_REFUSED_BODY = b'{"error": "too many connections (server.max_connections); retry shortly"}'
REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s" % (len(_REFUSED_BODY), _REFUSED_BODY)
)
TIMED_OUT = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
_WARN_EVERY_S = 10.0


class ServerStartError(AgentError):
    """The HTTP server cannot start: the address is taken, or the TLS files are unusable.
    The message names the address or file and the config key."""


class ConnectionGuard:
    """Counts open connections, answers 503 past `max_connections`, and closes (408) a
    connection whose first request's headers are not complete within `header_timeout_s`.
    Later requests on a kept-alive connection are bounded by aiohttp's keepalive_timeout,
    which closes a connection that has not sent a whole request head by then."""

    def __init__(self, max_connections: int, header_timeout_s: float) -> None:
        self.max_connections = max_connections
        self.header_timeout_s = header_timeout_s
        self.active = 0
        self.refused = 0
        self.header_timeouts = 0
        self._warned = 0.0

    def wrap(self, factory: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        return lambda: _Guarded(factory(), self)

    def warn(self, what: str) -> None:
        now = time.monotonic()
        if now - self._warned > _WARN_EVERY_S:  # a flood would otherwise log a line per connection
            self._warned = now
            log.warning(
                "HTTP: %s (%d open, %d refused, %d header timeouts so far)",
                what,
                self.active,
                self.refused,
                self.header_timeouts,
            )


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol for one connection, behind the guard's cap and header deadline."""

    def __init__(self, inner: asyncio.Protocol, guard: ConnectionGuard) -> None:
        self.inner: asyncio.Protocol | None = inner
        self.guard = guard
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.tail = b""  # the last bytes seen, to find a head's end split across reads
        self.started = False  # some of a request head arrived

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        g = self.guard
        assert isinstance(transport, asyncio.Transport)
        if g.active >= g.max_connections:
            g.refused += 1
            self.inner = None
            transport.write(REFUSED)
            g.warn(f"connection cap {g.max_connections} reached, new connections refused")
            # Closing now with the client's request unread would send a reset, which can
            # destroy the 503 before it is read: half-close, drain, and close on the
            # client's EOF or after a second (the fd is held that long at most).
            if transport.can_write_eof():
                transport.write_eof()
                self.timer = asyncio.get_running_loop().call_later(1.0, transport.close)
            else:
                transport.close()
            return
        g.active += 1
        self.transport = transport
        self.timer = asyncio.get_running_loop().call_later(g.header_timeout_s, self._late)
        assert self.inner is not None
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self.timer is not None:
            self.started = True
            seen = self.tail + data
            if b"\r\n\r\n" in seen:
                self.timer.cancel()
                self.timer = None
                self.tail = b""
            else:
                self.tail = seen[-3:]
        if self.inner is not None:
            self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received() if self.inner is not None else None  # refused: False closes

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.inner is not None:
            self.guard.active -= 1
            inner, self.inner = self.inner, None
            inner.connection_lost(exc)

    def _late(self) -> None:
        self.timer = None
        self.guard.header_timeouts += 1
        self.guard.warn(f"closed a connection that sent no complete request head in {self.guard.header_timeout_s}s")
        if self.transport is not None and not self.transport.is_closing():
            # A 408 only to a client that began a request: a browser's idle pre-opened
            # connection is closed silently, as it would be after any idle time.
            if self.started:
                self.transport.write(TIMED_OUT)
            self.transport.close()


class _GuardedSite(web.BaseSite):
    """A listener whose connections go through the guard: TCP (host, port) or a Unix socket."""

    def __init__(
        self,
        runner: web.BaseRunner,
        guard: ConnectionGuard,
        *,
        host: str | None = None,
        port: int = 0,
        sock: socket.socket | None = None,
        ssl_context: ssl.SSLContext | None = None,
        handshake_timeout: float = 10.0,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=512)
        self.guard, self.host, self.port, self.sock = guard, host, port, sock
        self.handshake_timeout = handshake_timeout

    @property
    def name(self) -> str:
        if self.sock is not None:
            return f"unix:{self.sock.getsockname()}"
        return f"{'https' if self._ssl_context else 'http'}://{self.host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        assert self._runner.server is not None
        factory = self.guard.wrap(self._runner.server)
        if self.sock is not None:
            self._server = await loop.create_unix_server(factory, sock=self.sock, backlog=self._backlog)
            return
        tls: dict[str, Any] = {}
        if self._ssl_context is not None:
            tls = {"ssl": self._ssl_context, "ssl_handshake_timeout": self.handshake_timeout}
        self._server = await loop.create_server(
            factory, self.host, self.port, backlog=self._backlog, reuse_address=True, **tls
        )
        self.port = self._server.sockets[0].getsockname()[1]


# -- TLS ---------------------------------------------------------------------------------


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """A server context with the cert chain and key loaded; ServerStartError naming the
    file and key on any problem (missing, unreadable, not PEM, key not matching)."""
    for path, k in ((cert, "server.tls_cert"), (key, "server.tls_key")):
        try:
            with open(path, "rb"):
                pass
        except OSError as exc:
            raise ServerStartError(f"{k}: cannot read {path}: {exc.strerror}") from None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(ctx, cert, key)
    return ctx


def _load(ctx: ssl.SSLContext, cert: str, key: str) -> None:
    try:
        ctx.load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if "MISMATCH" in str(reason).upper():
            raise ServerStartError(f"server.tls_key: {key} is not the key of the certificate in {cert}") from None
        raise ServerStartError(
            f"server.tls_cert / server.tls_key: {cert} and {key} must be a PEM certificate and its key ({reason})"
        ) from None
    except OSError as exc:
        raise ServerStartError(f"server.tls_cert / server.tls_key: cannot read them: {exc.strerror}") from None


class CertReloader:
    """Re-reads the certificate and key into the live context when either file changes.

    `load_cert_chain` on a context in use applies to the connections made after it; a new
    pair is first loaded into a scratch context, since a failed load can leave a context
    with the new certificate and the old key. A bad or half-written pair is logged and the
    old one kept; the next change is tried again."""

    def __init__(self, ctx: ssl.SSLContext, cert: str, key: str) -> None:
        self.ctx, self.cert, self.key = ctx, cert, key
        self.stamp = self._stamp()
        self.reloads = 0

    def _stamp(self) -> tuple[tuple[int, int, int], ...] | None:
        try:
            return tuple((s.st_mtime_ns, s.st_size, s.st_ino) for s in (os.stat(self.cert), os.stat(self.key)))
        except OSError:
            return None

    def check(self) -> bool:
        """Reload if the files changed; True when a new pair was loaded."""
        stamp = self._stamp()
        if stamp is None or stamp == self.stamp:
            return False
        self.stamp = stamp
        try:
            tls_context(self.cert, self.key)
            _load(self.ctx, self.cert, self.key)
        except ServerStartError as exc:
            log.warning("TLS files changed but were not loaded (the old certificate stays): %s", exc)
            return False
        self.reloads += 1
        log.info("TLS certificate reloaded from %s", self.cert)
        return True

    async def run(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.check()


# -- the server --------------------------------------------------------------------------


def _unix_listener(path: str) -> socket.socket:
    """A bound Unix socket with mode 0660, chmod-ed before it listens (no window in which
    anyone may connect). A stale socket file is replaced; any other file is not."""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise ServerStartError(f"server.unix_socket: {path} exists and is not a socket")
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise ServerStartError(f"server.unix_socket: cannot replace {path}: {exc.strerror or exc}") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o660)
    except OSError as exc:
        sock.close()
        raise ServerStartError(f"server.unix_socket: cannot listen on {path}: {exc.strerror or exc}") from None
    return sock


def _reason(exc: OSError) -> str:
    """asyncio's bind error says the address twice; the errno's text is enough."""
    return os.strerror(exc.errno).lower() if exc.errno else str(exc)


class HttpServer:
    """The agent's aiohttp app on its listeners; `start()` returns the base URL."""

    def __init__(self, agent: AgentView) -> None:
        self.agent = agent
        cfg: ServerSection = agent.config.server
        self.cfg = cfg
        self.guard = ConnectionGuard(cfg.max_connections, cfg.header_timeout_s)
        self.runner: web.AppRunner | None = None
        self.reloader: CertReloader | None = None
        self._reload_task: asyncio.Task[None] | None = None
        self.unix_path: str | None = None

    async def start(self) -> str:
        from agent.api import create_app

        cfg = self.cfg
        if bool(cfg.tls_cert) != bool(cfg.tls_key):
            raise ServerStartError(
                f"server.{'tls_cert' if cfg.tls_key else 'tls_key'}: TLS needs both tls_cert and tls_key"
            )
        ctx = tls_context(cfg.tls_cert, cfg.tls_key) if cfg.tls_cert and cfg.tls_key else None
        # keepalive_timeout is aiohttp's: an idle kept-alive connection closes after it.
        runner = web.AppRunner(
            create_app(self.agent), access_log=None, shutdown_timeout=1.0, keepalive_timeout=cfg.keepalive_timeout_s
        )
        await runner.setup()
        self.runner = runner
        try:
            site = _GuardedSite(
                runner,
                self.guard,
                host=cfg.host,
                port=cfg.port,
                ssl_context=ctx,
                handshake_timeout=cfg.header_timeout_s,
            )
            try:
                await site.start()
            except OSError as exc:
                raise ServerStartError(
                    f"cannot listen on {cfg.host}:{cfg.port} (server.host, server.port): {_reason(exc)}"
                ) from None
            if cfg.unix_socket:
                await _GuardedSite(runner, self.guard, sock=_unix_listener(cfg.unix_socket)).start()
                self.unix_path = cfg.unix_socket
        except BaseException:
            await self.cleanup()
            raise
        if ctx is not None and cfg.tls_cert and cfg.tls_key:
            self.reloader = CertReloader(ctx, cfg.tls_cert, cfg.tls_key)
            self._reload_task = asyncio.create_task(self.reloader.run(cfg.tls_reload_s), name="tls-reload")
        host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
        return f"{'https' if ctx else 'http'}://{host}:{site.port}"

    async def cleanup(self) -> None:
        """Stop listening, let open requests finish (bounded by the runner), stop reloading."""
        if self._reload_task is not None:
            self._reload_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reload_task
            self._reload_task = None
        if self.runner is not None:
            runner, self.runner = self.runner, None
            await runner.cleanup()
        if self.unix_path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.unix_path)
            self.unix_path = None
