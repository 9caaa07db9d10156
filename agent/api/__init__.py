"""The HTTP API and dashboard: one aiohttp application (see create_app)."""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import WSCloseCode, web

from agent.api import dlq, flags, health, history, ingest, openapi, security, stream, ui
from agent.api.keys import AGENT, WEBSOCKETS
from agent.api.view import AgentView

log = logging.getLogger("sidecar_agent.api")
_VARIABLE = re.compile(r"\{[^}]*\}")  # a {name} or {name:regex} in a route path

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _token_required(handler: Handler) -> Handler:
    """A plugin route registered with mutating=True needs the token whatever its method."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        return await handler(request) if security.authorized(request) else security.unauthorized()

    return guarded


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """JSON errors for the API, never an HTML traceback."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status >= 400 and request.path.startswith("/api/") and exc.content_type != "application/json":
            return web.json_response({"error": exc.reason}, status=exc.status, headers=_keep(exc.headers))
        raise
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return web.json_response({"error": "internal error (see the agent's log)"}, status=500)


def _keep(headers: object) -> dict[str, str]:
    h = dict(headers)  # type: ignore[call-overload]
    h.pop("Content-Type", None)
    h.pop("Content-Length", None)
    return h


async def _close_websockets(app: web.Application) -> AsyncIterator[None]:
    yield
    sockets = app[WEBSOCKETS]
    for ws in list(sockets):  # a copy: closing one removes it from the set
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"agent shutting down")


def create_app(agent: AgentView) -> web.Application:
    """The app factory: routes, middlewares and typed state for one Agent."""
    app = web.Application(
        middlewares=[error_middleware, security.middleware],
        client_max_size=agent.config.server.max_body_bytes,
    )
    app[AGENT] = agent
    app[WEBSOCKETS] = weakref.WeakSet()
    app.cleanup_ctx.append(_close_websockets)
    health.add_routes(app)
    ingest.add_routes(app)
    stream.add_routes(app)
    dlq.add_routes(app)
    flags.add_routes(app)
    history.add_routes(app)
    ui.add_routes(app)
    security.add_routes(app)
    openapi.add_routes(app)
    # Plugin routes come last: one that clashes with a core route (or another plugin's),
    # or that aiohttp refuses, marks its plugin failed and is skipped; the agent runs on.
    for method, path, handler, mutating, plugin in agent.host.routes:
        try:
            _refuse_clash(app, method, path)
            app.router.add_route(method, path, _token_required(handler) if mutating else handler)
        except (RuntimeError, ValueError) as exc:
            log.error("plugin %s: route %s %s not added: %s", plugin, method, path, exc)
            agent.host.mark_failed(plugin, ValueError(f"route {method} {path}: {exc}"))
    return app


def _refuse_clash(app: web.Application, method: str, path: str) -> None:
    """Refuse a plugin route that a served route would shadow or that would shadow one
    (aiohttp adds both silently, and which wins depends on its lookup index), and
    everything under the dashboard's /ui/."""
    if path.startswith("/ui/") or path == "/ui":
        raise ValueError("paths under /ui/ belong to the dashboard")
    method = method.upper()
    probe = _VARIABLE.sub("x", path)  # a concrete path the new route would serve
    for route in app.router.routes():
        resource = route.resource
        if resource is None or not (method == "*" or route.method in (method, "*")):
            continue
        match = getattr(resource, "_match", None)  # plain and dynamic resources have it
        if _VARIABLE.sub("{}", resource.canonical) == _VARIABLE.sub("{}", path) or (
            match is not None and match(probe) is not None
        ):
            raise ValueError(f"{route.method} {resource.canonical} already serves it")
