"""WebSocket /api/v1/stream: committed events, live, filtered on the server.

The client may send `{"subscribe": {"names": [...], "prefixes": [...], "sources": [...],
"kinds": [...], "session_id": "..."}}` at any time. Messages to the client are
`{"type": "events", "events": [...]}` and, when it fell behind,
`{"type": "dropped", "count": n}` (events dropped from its queue, oldest first, since
the last message; see agent.pipeline.stream). Browser Origins must match the server's
host or `server.allowed_origins`.
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit

import msgspec
from aiohttp import WSMsgType, web

from agent.api.keys import AGENT, WEBSOCKETS
from agent.pipeline.stream import Subscription

MESSAGE_BYTES = 256 * 1024  # about this much JSON per message, so a message is never the whole queue


def origin_allowed(request: web.Request) -> bool:
    """Non-browser clients send no Origin; browsers must come from this host or the allow-list."""
    origin = request.headers.get("Origin")
    if not origin:
        return True
    allowed = request.app[AGENT].config.server.allowed_origins
    if origin in allowed or "*" in allowed:
        return True
    return urlsplit(origin).netloc == request.host


def _apply(sub: Subscription, spec: dict) -> None:
    sub.names = frozenset(spec.get("names") or ())
    sub.prefixes = tuple(spec.get("prefixes") or ())
    sub.sources = frozenset(spec.get("sources") or ())
    sub.kinds = frozenset(spec.get("kinds") or ())
    sub.session_id = spec.get("session_id")


async def stream(request: web.Request) -> web.StreamResponse:
    """Upgrade to a WebSocket and stream committed events."""
    if not origin_allowed(request):
        return web.json_response({"error": "origin not allowed"}, status=403)
    ws = web.WebSocketResponse(heartbeat=20, max_msg_size=64 * 1024)
    await ws.prepare(request)
    agent = request.app[AGENT]
    hub = agent.stream
    request.app[WEBSOCKETS].add(ws)
    sub = hub.subscribe(Subscription(max_bytes=agent.config.server.stream_client_max_bytes, ledger=agent.ledger))
    sender = asyncio.create_task(_send_loop(ws, sub))
    try:
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            try:
                spec = msgspec.json.decode(msg.data)
                if isinstance(spec, dict) and isinstance(spec.get("subscribe"), dict):
                    _apply(sub, spec["subscribe"])
                    await ws.send_str('{"type":"subscribed"}')
            except (msgspec.DecodeError, TypeError):
                await ws.send_str('{"type":"error","error":"expected {\\"subscribe\\": {...}}"}')
    finally:
        hub.unsubscribe(sub)
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await sender
    return ws


async def _send_loop(ws: web.WebSocketResponse, sub: Subscription) -> None:
    """Send queued events as they come. While a send waits on a client that does not
    read, new events queue (and the oldest drop) in `sub`, never in the socket's buffer."""
    reported = 0
    while not ws.closed:
        await sub.ready.wait()
        batch = sub.take(MESSAGE_BYTES)
        if sub.dropped != reported:
            await ws.send_str(f'{{"type":"dropped","count":{sub.dropped - reported}}}')
            reported = sub.dropped
        if batch:
            await ws.send_str(_events_message(batch))


def _events_message(batch: list[bytes]) -> str:
    return '{"type":"events","events":[' + b",".join(batch).decode() + "]}"


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/stream", stream)
