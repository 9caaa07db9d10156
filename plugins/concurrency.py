"""Built-in policy `concurrency`: at most `max_in_flight` calls into the sink at once,
or, with `group`, at most that many across every sink that names the same group."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import msgspec

from agent.plugin import BasePolicy, ConfigError, PluginContext, RegisterComponent, hookimpl

T = TypeVar("T")


class ConcurrencyOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`concurrency = { max_in_flight = 4, group = "pg-primary" }`."""

    max_in_flight: Annotated[int, msgspec.Meta(gt=0)] = 4
    # Sinks naming the same group share one limit (e.g. several sinks writing to one
    # database with few connections to spare). None: this sink's own limit.
    group: Annotated[str, msgspec.Meta(min_length=1)] | None = None

    @classmethod
    def check_together(cls, uses: list[tuple[str, ConcurrencyOptions]]) -> None:
        """Every sink of a group must give the same limit (the agent calls this with all
        sinks' options before anything starts, and check-config does)."""
        first: dict[str, tuple[str, int]] = {}  # group -> (sink, max_in_flight)
        for sink, options in uses:
            if options.group is not None:
                owner, limit = first.setdefault(options.group, (sink, options.max_in_flight))
                if limit != options.max_in_flight:
                    raise ConfigError(_clash(sink, options.group, limit, owner))


def _clash(sink: str, group: str, limit: int, owner: str) -> str:
    return (
        f"sinks.{sink}.concurrency.max_in_flight: group {group!r} is already limited to {limit} by sink "
        f"{owner}; every sink of a group must give the same limit"
    )


class _Limit:
    """A semaphore that knows its size, so in-flight calls can be reported."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.sem = asyncio.Semaphore(size)
        self.sinks: list[str] = []


class ConcurrencyPolicy(BasePolicy):
    """An asyncio.Semaphore around the wrapped call; excess callers wait their turn."""

    def __init__(self, name: str, options: ConcurrencyOptions, ctx: PluginContext | None = None) -> None:
        self.name = name
        self.max_in_flight = options.max_in_flight
        self.group = options.group
        if options.group is None or ctx is None:
            self._limit = _Limit(options.max_in_flight)
        else:
            # One limit per group per agent, in the agent's shared dict (no module globals).
            key = f"concurrency:{options.group}"
            limit = ctx.shared.get(key)
            if limit is None:
                limit = ctx.shared[key] = _Limit(options.max_in_flight)
            elif limit.size != options.max_in_flight:  # a policy built outside a checked plan
                raise ConfigError(_clash(name, options.group, limit.size, limit.sinks[0]))
            limit.sinks.append(name)
            self._limit = limit
        if ctx is not None:
            ctx.stats["concurrency_in_flight"] = lambda: self.in_flight

    @property
    def in_flight(self) -> int:
        """Calls currently holding a slot (the group's, when the limit is shared)."""
        return self._limit.size - self._limit.sem._value

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        async with self._limit.sem:
            return await fn()


@hookimpl
def register_policies(register: RegisterComponent) -> None:
    register("concurrency", ConcurrencyPolicy, options=ConcurrencyOptions)
