"""POST /api/v1/events: JSON object or array, NDJSON, or msgpack; 202 only after commit."""

from __future__ import annotations

import time

from aiohttp import web

from agent.api.keys import AGENT
from agent.errors import JournalFullError
from agent.event import InvalidEvent, decode_input, json_encoder, normalize

MAX_ERRORS_SHOWN = 100


async def post_events(request: web.Request) -> web.Response:
    """Validate every item; accept all (202 after the journal commit) or none (400)."""
    agent = request.app[AGENT]
    if agent.committer is None or not agent.committer.accepting:
        return web.json_response({"error": "agent is not accepting events"}, status=503, headers={"Retry-After": "1"})
    limit = agent.config.server.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        return _too_large(limit)
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        return _too_large(limit)
    try:
        items, bad = decode_input(body, request.content_type)
    except InvalidEvent as exc:
        return web.json_response(
            {"error": exc.message, "errors": [{"index": exc.index, "error": exc.message}]}, status=400
        )
    if bad or not items:
        errors = [{"index": b.index, "error": b.message} for b in bad[:MAX_ERRORS_SHOWN]]
        if not items and not bad:
            errors = [{"index": -1, "error": "no events in the body"}]
        return web.json_response(
            {"error": f"{len(bad)} invalid item(s); nothing was accepted", "errors": errors, "accepted": 0},
            status=400,
        )
    now = time.time()
    ts_max = now + agent.config.agent.max_future_s
    events = []
    for i, item in enumerate(items):
        try:
            events.append(normalize(item, source="http", agent_id=agent.id, now=now, ts_max=ts_max))
        except ValueError as exc:
            bad.append(InvalidEvent(i, str(exc)))
    if bad:
        errors = [{"index": b.index, "error": b.message} for b in bad[:MAX_ERRORS_SHOWN]]
        return web.json_response(
            {"error": f"{len(bad)} invalid item(s); nothing was accepted", "errors": errors, "accepted": 0},
            status=400,
        )
    try:
        await agent.committer.submit(events)
    except JournalFullError as exc:
        return web.json_response({"error": str(exc)}, status=503, headers={"Retry-After": "1"})
    body = json_encoder.encode({"accepted": len(events), "ids": [e.id for e in events]})
    return web.Response(body=body, status=202, content_type="application/json")


def _too_large(limit: int) -> web.Response:
    return web.json_response({"error": f"body is larger than the limit of {limit} bytes"}, status=413)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/v1/events", post_events)
