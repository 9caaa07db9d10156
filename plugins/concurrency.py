"""Built-in policy `concurrency`: at most `max_in_flight` calls into the sink at once."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import msgspec

from agent.hookspecs import hookimpl
from agent.plugin_api import PluginContext

T = TypeVar("T")


class ConcurrencyOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`concurrency = { max_in_flight = 4 }`."""

    max_in_flight: Annotated[int, msgspec.Meta(gt=0)] = 4


class ConcurrencyPolicy:
    """An asyncio.Semaphore around the wrapped call; excess callers wait their turn."""

    def __init__(self, name: str, options: ConcurrencyOptions, ctx: PluginContext | None = None) -> None:
        self.name = name
        self.max_in_flight = options.max_in_flight
        self._sem = asyncio.Semaphore(options.max_in_flight)

    @property
    def in_flight(self) -> int:
        """Calls currently holding a slot."""
        return self.max_in_flight - self._sem._value  # noqa: SLF001 - no public accessor

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        async with self._sem:
            return await fn()


@hookimpl
def register_policies(register):
    register("concurrency", ConcurrencyPolicy, options=ConcurrencyOptions)
