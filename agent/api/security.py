"""Who may talk to the HTTP API (docs/security.md): one middleware ahead of every route.

1. The Host header must name this server (421 otherwise): no DNS rebinding.
2. A mutating request from a foreign browser Origin is refused (403), and one with a
   CORS-simple content type (a form or text/plain, which a page may send cross-site
   without a preflight) gets 415: no cross-site writes, token or not.
3. With `server.token` set, every /api/ route, the WebSocket, every mutating request and
   /metrics (unless `server.metrics_public`) need it: as `Authorization: Bearer`,
   `X-Sidecar-Token`, or, for reads only, the dashboard's session cookie (POST
   /api/v1/session), which is how a browser's WebSocket carries it.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from aiohttp import web

from agent.api.keys import AGENT
from agent.config import ServerSection

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
# What a page may send cross-origin without a CORS preflight (the Fetch standard's list).
SIMPLE_TYPES = frozenset({"text/plain", "application/x-www-form-urlencoded", "multipart/form-data"})
OPEN_PATHS = frozenset({"/healthz", "/readyz"})  # probes: never a token, never a Host check
SESSION_COOKIE = "sidecar_session"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers or None)


# -- 1. Host ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def host_name(header: str) -> str:
    """The name in a Host header, without port or brackets, lower case."""
    h = header.strip().lower()
    if h.startswith("["):
        return h[1 : h.find("]")] if "]" in h else h[1:]
    if h.count(":") == 1:
        h = h.split(":", 1)[0]
    return h.rstrip(".")


def host_allowed(name: str, server: ServerSection) -> bool:
    """Loopback names, any IP literal (a rebinding page's Host is always its own domain
    name, as webpack-dev-server reasons), the configured host and `server.allowed_hosts`
    (`*` for any, `.example.com` for it and its subdomains)."""
    return _host_allowed(name, server.host.lower(), tuple(server.allowed_hosts))


@functools.lru_cache(maxsize=256)  # a memo of a pure function: a client sends one Host again and again
def _host_allowed(name: str, host: str, allowed_hosts: tuple[str, ...]) -> bool:
    if not name or name == "localhost" or name.endswith(".localhost") or name == host:
        return True
    try:
        ipaddress.ip_address(name.split("%", 1)[0])
        return True
    except ValueError:
        pass
    for allowed in allowed_hosts:
        a = allowed.lower().rstrip(".")
        if a == "*" or a == name or (a.startswith(".") and (name == a[1:] or name.endswith(a))):
            return True
    return False


def _over_unix_socket(request: web.Request) -> bool:
    """A Unix socket is reached by processes with file access, never by a browser page."""
    sock = request.transport.get_extra_info("socket") if request.transport is not None else None
    return sock is not None and sock.family == socket.AF_UNIX


# -- 2. Origin and content type ----------------------------------------------------------


def origin_allowed(request: web.Request) -> bool:
    """No Origin (curl, SDKs, the CLI) is fine; a browser's must be this server or listed."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    allowed = request.app[AGENT].config.server.allowed_origins
    if origin in allowed or "*" in allowed:
        return True
    return origin != "null" and urlsplit(origin).netloc.lower() == request.host.lower()


def simple_content_type(request: web.Request) -> str | None:
    """The request's content type when it is one a page may send cross-site unpreflighted."""
    ctype = request.headers.get("Content-Type", "").split(";", 1)[0].strip().lower()
    return ctype if ctype in SIMPLE_TYPES else None


# -- 3. The token ------------------------------------------------------------------------


def session_value(token: str) -> str:
    """The session cookie's value: derived from the token, so the cookie never holds it and
    a changed token ends every session."""
    return hmac.new(token.encode(), b"sidecar-agent dashboard session", hashlib.sha256).hexdigest()


def presented_token(request: web.Request) -> str:
    auth = request.headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.headers.get("X-Sidecar-Token", "")


def authorized(request: web.Request, *, cookie: bool = False) -> bool:
    """True when no token is configured or the request carries it (`cookie`: the session
    cookie counts too, which only reads allow)."""
    token = request.app[AGENT].config.server.token
    if not token:
        return True
    if hmac.compare_digest(presented_token(request).encode(), token.encode()):
        return True
    session = request.cookies.get(SESSION_COOKIE, "")
    return cookie and bool(session) and hmac.compare_digest(session.encode(), session_value(token).encode())


def unauthorized() -> web.Response:
    return _error(
        401, "unauthorized: send the token as 'Authorization: Bearer <token>'", **{"WWW-Authenticate": "Bearer"}
    )


def needs_token(request: web.Request) -> bool:
    path = request.path
    if path in OPEN_PATHS:
        return False
    if request.method in MUTATING or path.startswith("/api/"):
        return True
    return path == "/metrics" and not request.app[AGENT].config.server.metrics_public


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Host, then a write's Origin, then the token, then a write's content type."""
    server = request.app[AGENT].config.server
    if request.path not in OPEN_PATHS:
        name = host_name(request.headers.get("Host", ""))
        if not host_allowed(name, server) and not _over_unix_socket(request):
            return _error(421, f"host {name!r} is not served here: add it to server.allowed_hosts")
    mutating = request.method in MUTATING
    if mutating and not origin_allowed(request):
        return _error(403, f"origin {request.headers['Origin']!r} may not change this agent (server.allowed_origins)")
    if needs_token(request) and not authorized(request, cookie=request.method in ("GET", "HEAD")):
        return unauthorized()
    ctype = simple_content_type(request) if mutating else None
    if ctype is not None:
        return _error(
            415,
            f"Content-Type {ctype} is not accepted here: send application/json"
            " (events also take application/x-ndjson or application/msgpack)",
        )
    return await handler(request)


# -- the dashboard's session ---------------------------------------------------------------


async def open_session(request: web.Request) -> web.Response:
    """POST /api/v1/session (with the token): set the session cookie the dashboard's reads
    and WebSocket carry; a browser cannot put a header on a WebSocket."""
    token = request.app[AGENT].config.server.token
    resp = web.json_response({"session": bool(token)})
    if token:
        resp.set_cookie(
            SESSION_COOKIE, session_value(token), httponly=True, samesite="Strict", secure=request.secure, path="/"
        )
    return resp


async def close_session(request: web.Request) -> web.Response:
    """DELETE /api/v1/session: forget the session cookie."""
    resp = web.json_response({"session": False})
    resp.del_cookie(SESSION_COOKIE, path="/")
    return resp


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/v1/session", open_session)
    app.router.add_delete("/api/v1/session", close_session)
