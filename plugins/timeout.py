"""Built-in policy `timeout`: bound each attempt; a timeout becomes a RetryableError."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import msgspec

from agent.errors import RetryableError
from agent.hookspecs import hookimpl
from agent.plugin_api import PluginContext

T = TypeVar("T")


class TimeoutOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`timeout = { timeout_s = 10 }`: the limit for one attempt, in seconds."""

    timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0


class TimeoutPolicy:
    """Cancel an attempt after `timeout_s` and raise RetryableError("timed out after Xs").

    A cancellation that comes from outside (shutdown, a caller's own deadline) stays a
    CancelledError; only this policy's own expiry is converted.
    """

    def __init__(self, name: str, options: TimeoutOptions, ctx: PluginContext | None = None) -> None:
        self.name = name
        self.timeout_s = options.timeout_s
        self._message = f"{name}: timed out after {options.timeout_s:g}s"

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        loop = asyncio.get_running_loop()
        cm = asyncio.timeout_at(loop.time() + self.timeout_s)
        try:
            async with cm:
                return await fn()
        except TimeoutError:
            if cm.expired():
                raise RetryableError(self._message) from None
            raise


@hookimpl
def register_policies(register):
    register("timeout", TimeoutPolicy, options=TimeoutOptions)
