"""Typed application keys: all state the aiohttp app holds."""

from __future__ import annotations

import weakref

from aiohttp import web

from agent.api.view import AgentView

AGENT = web.AppKey("agent", AgentView)
WEBSOCKETS = web.AppKey("websockets", weakref.WeakSet[web.WebSocketResponse])
