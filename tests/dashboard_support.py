"""Helpers for the dashboard tests: an agent on a free port, and a stand-in for the flag
wiring main adds (`agent.flags` + /api/v1/flags routes) when it is not there yet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from agent.errors import FlagError
from agent.flags import FlagService, UnknownFlagError, core_flags
from agent.runtime import Agent


def agent_config(data_dir: Path, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {"agent": {"id": "test-agent", "data_dir": str(data_dir), "commit_interval_ms": 2.0},
                           "server": {"port": 0}, "sources": {}}
    for k, v in extra.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return cfg


def install_flags(agent: Agent) -> None:
    """Give the agent a FlagService and the flag routes, unless the runtime already does."""
    if getattr(agent, "flags", None) is not None or hasattr(Agent, "flags"):
        return
    sinks = [*agent.config.sinks, "store"]
    svc = FlagService(core_flags(sinks), agent.config.flags, {}, agent.config.agent.data_dir,
                      emit=lambda events: agent.emit(events), config_origin=agent.config.origin)
    agent.flags = svc  # type: ignore[attr-defined]

    async def list_flags(request: web.Request) -> web.Response:
        return web.json_response({"flags": svc.describe()})

    async def put_flag(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            value = msgspec.json.decode(await request.read())
            return web.json_response(svc.set(name, value, actor="http"))
        except UnknownFlagError as exc:
            return web.json_response({"error": str(exc)}, status=404)
        except (FlagError, msgspec.DecodeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)

    async def delete_flag(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        try:
            svc.clear(name, actor="http")
        except UnknownFlagError as exc:
            return web.json_response({"error": str(exc)}, status=404)
        return web.json_response(svc.describe_flag(name))

    async def flag_health(request: web.Request) -> web.Response:
        return web.json_response({"problems": svc.health()})

    agent.host.routes += [
        ("GET", "/api/v1/flags", list_flags, False, "tests"),
        ("GET", "/api/v1/flags/health", flag_health, False, "tests"),
        ("PUT", "/api/v1/flags/{name}", put_flag, True, "tests"),
        ("DELETE", "/api/v1/flags/{name}", delete_flag, True, "tests"),
    ]


async def start_agent(data_dir: Path, **extra: Any) -> Agent:
    agent = Agent(agent_config(data_dir, **extra))
    install_flags(agent)
    await agent.start()
    assert agent.server_url, agent.server_error
    return agent
