"""Feature flags over HTTP: list, set, clear, health."""

from __future__ import annotations

import msgspec
from aiohttp import web

from agent.api.keys import AGENT
from agent.api.security import authorized
from agent.flags import FlagError, UnknownFlagError


def _service(request: web.Request):
    flags = request.app[AGENT].flags
    if flags is None:
        raise web.HTTPServiceUnavailable(reason="flags are not loaded yet")
    return flags


def actor(request: web.Request) -> str:
    """Who made a change: the token holder or a client address, and the tool if it says."""
    token = request.app[AGENT].config.server.token
    who = "token" if token and authorized(request) else f"http:{request.remote}"
    tool = request.headers.get("X-Sidecar-Actor")
    return f"{tool} ({who})" if tool else who


async def list_flags(request: web.Request) -> web.Response:
    """GET /api/v1/flags: every flag with its value, layer and definition, plus the audit trail."""
    flags = _service(request)
    return web.json_response({"flags": flags.describe(), "audit": flags.audit(100)})


async def put_flag(request: web.Request) -> web.Response:
    """PUT /api/v1/flags/{name}: body is a JSON value; 400 with the reason when invalid."""
    flags = _service(request)
    name = request.match_info["name"]
    try:
        value = msgspec.json.decode(await request.read())
    except msgspec.DecodeError:
        return web.json_response({"error": f"flag {name}: the body must be a JSON value, e.g. true or 25"}, status=400)
    try:
        return web.json_response(flags.set(name, value, actor(request)))
    except UnknownFlagError as exc:
        return web.json_response({"error": str(exc)}, status=404)
    except FlagError as exc:
        return web.json_response({"error": str(exc)}, status=400)


async def delete_flag(request: web.Request) -> web.Response:
    """DELETE /api/v1/flags/{name}: clear the runtime override."""
    flags = _service(request)
    name = request.match_info["name"]
    try:
        removed = flags.clear(name, actor(request))
    except UnknownFlagError as exc:
        return web.json_response({"error": str(exc)}, status=404)
    if name in flags:
        return web.json_response({**flags.describe_flag(name), "cleared": removed})
    return web.json_response({"name": name, "cleared": removed})


async def flag_health(request: web.Request) -> web.Response:
    """GET /api/v1/flags/health: contradictions between flags and config."""
    problems = _service(request).health()
    return web.json_response({"ok": not problems, "problems": problems})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/flags", list_flags)
    app.router.add_get("/api/v1/flags/health", flag_health)
    app.router.add_put("/api/v1/flags/{name}", put_flag)
    app.router.add_delete("/api/v1/flags/{name}", delete_flag)
