"""What plugins implement and what they are given.

Sources, sinks and policies are objects with async methods. Their factories are
registered through the hooks in agent.hookspecs and called as
``factory(name, options, ctx)``: `name` is the instance name from config, `options`
is the plugin's own msgspec Struct decoded from its config table, and `ctx` is a
PluginContext.
"""

from __future__ import annotations

import asyncio
import datetime as _dt
import email.utils
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import msgspec

from .event import Event

T = TypeVar("T")

Emit = Callable[[list[Event]], None]
"""Hand events to the agent. Missing id, ts, source and agent_id are filled in."""


class NoOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Options struct for plugins that take no settings."""


@runtime_checkable
class Source(Protocol):
    """Produces events until cancelled."""

    async def run(self, emit: Emit) -> None: ...


@runtime_checkable
class Sink(Protocol):
    """Receives batches of events. `send` raises RetryableError or PermanentError."""

    async def start(self) -> None: ...

    async def send(self, events: list[Event]) -> None: ...

    async def close(self) -> None: ...


@runtime_checkable
class Policy(Protocol):
    """Wraps one attempt (or a sequence of attempts) at a sink call."""

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T: ...


@dataclass
class PluginContext:
    """What the agent gives a plugin instance."""

    name: str
    agent_id: str
    data_dir: Path
    log: logging.Logger
    emit: Emit
    # Free-form gauges a plugin exposes at /metrics and /api/v1/status, e.g. breaker state.
    stats: dict[str, Any] = field(default_factory=dict)

    def event(self, name: str, value: float | None = None, *, kind: str = "event", **data: Any) -> None:
        """Emit one of the agent's own events (e.g. a breaker state change)."""
        self.emit([Event(name=name, kind=kind, value=value, source=f"agent.{self.name}", data=data or None)])


class PollingSource:
    """Base class for sources that sample something every `interval_s` seconds.

    Subclasses implement `collect()`, returning a list of events.
    """

    interval_s: float = 10.0

    async def collect(self) -> list[Event]:
        raise NotImplementedError

    async def run(self, emit: Emit) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            events = await self.collect()
            if events:
                emit(events)
            next_at += self.interval_s
            await asyncio.sleep(max(0.0, next_at - loop.time()))


class BaseSink:
    """Convenience base: no-op start/close."""

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def send(self, events: list[Event]) -> None:
        raise NotImplementedError


def parse_retry_after(value: str | None, now: _dt.datetime | None = None) -> float | None:
    """Seconds to wait from an HTTP Retry-After header (delta-seconds or HTTP date), or None.

    For sinks mapping a 429/503 onto ``RetryableError(retry_after=...)``.
    """
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=_dt.timezone.utc)
    now = now or _dt.datetime.now(_dt.timezone.utc)
    return max(0.0, (when - now).total_seconds())
