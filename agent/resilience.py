"""Resilience chain (placeholder until the policies land): composes policies around a sink call."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from .plugin_api import PluginContext


class Chain:
    """Policies composed once; `call(fn)` runs fn through them."""

    def __init__(self, policies: list[Any]) -> None:
        self.policies = policies

    async def call(self, fn: Callable[[], Awaitable[Any]]) -> Any:
        call = fn
        for p in self.policies:
            call = (lambda inner, pol: (lambda: pol.call(inner)))(call, p)
        return await call()


def build_chain(specs: list[tuple[str, Any, Any]], ctx: PluginContext) -> Chain:
    """Instantiate each (name, registration, options) and compose, first listed innermost."""
    return Chain([reg.factory(ctx.name, options, ctx) for _, reg, options in specs])
