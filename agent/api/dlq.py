"""The dead-letter queue over HTTP: list (paginated), replay, purge."""

from __future__ import annotations

import msgspec
from aiohttp import web

from agent.api.keys import AGENT
from agent.storage.dlq import STATUSES


def _filters(request: web.Request) -> tuple[str | None, str | None]:
    sink = request.query.get("sink") or None
    status = request.query.get("status") or None
    if status is not None and status not in STATUSES:
        raise web.HTTPBadRequest(reason=f"status must be one of {', '.join(STATUSES)}")
    agent = request.app[AGENT]
    if sink is not None and sink not in agent.workers:
        raise web.HTTPNotFound(reason=f"no sink named {sink!r}")
    return sink, status


async def list_dlq(request: web.Request) -> web.Response:
    """GET /api/v1/dlq?sink=&status=&limit=&before=: entries newest first."""
    agent = request.app[AGENT]
    sink, status = _filters(request)
    try:
        limit = min(int(request.query.get("limit", "100")), 1000)
        before = int(request.query["before"]) if "before" in request.query else None
    except ValueError:
        raise web.HTTPBadRequest(reason="limit and before must be integers") from None
    assert agent.dlq is not None
    entries = await agent.dlq.entries(sink=sink, status=status, limit=limit, before=before)
    return web.json_response(
        {
            "entries": msgspec.to_builtins(entries),
            "next": entries[-1].id if len(entries) == limit else None,
            "pending_events": agent.dlq.depth(sink),
        }
    )


async def replay(request: web.Request) -> web.Response:
    """POST /api/v1/dlq/replay?sink=: replay pending entries now, one after another, as fast as the sink takes them."""
    agent = request.app[AGENT]
    sink, _ = _filters(request)
    names = [sink] if sink else list(agent.workers)
    for name in names:
        agent.workers[name].request_replay()
    assert agent.dlq is not None
    return web.json_response({"replaying": names, "pending_events": agent.dlq.depth(sink)}, status=202)


async def purge(request: web.Request) -> web.Response:
    """DELETE /api/v1/dlq?sink=&status=: purge entries; purged events are counted as lost."""
    agent = request.app[AGENT]
    sink, status = _filters(request)
    assert agent.dlq is not None
    n = await agent.dlq.purge(sink=sink, status=status or "pending")
    return web.json_response({"purged_events": n})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/dlq", list_dlq)
    app.router.add_post("/api/v1/dlq/replay", replay)
    app.router.add_delete("/api/v1/dlq", purge)
