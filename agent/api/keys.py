"""Typed application keys: all state the aiohttp app holds."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    pass

AGENT = web.AppKey("agent", "Agent")
WEBSOCKETS = web.AppKey("websockets", "weakref.WeakSet[web.WebSocketResponse]")
