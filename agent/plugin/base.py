"""What plugins implement and what they are given.

Sources, sinks and policies are objects with async methods. Their factories are
registered through the hooks in agent.plugin.hookspecs and called as
``factory(name, options, ctx)``: `name` is the instance name from config, `options`
is the plugin's own msgspec Struct decoded from its config table, and `ctx` is a
PluginContext.
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime as _dt
import email.utils
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import msgspec

from agent.event import Event
from agent.flags.definition import Flag
from agent.history.board import HistoryBoard
from agent.losses import LossLedger
from agent.plugin.throttle import Throttle

T = TypeVar("T")

# True while a circuit breaker is sending its half-open probe. Policies that would
# multiply requests (retry) read it and make a single attempt instead, so a probe is
# exactly one request to the sink whatever the chain order.
probing: contextvars.ContextVar[bool] = contextvars.ContextVar("sidecar_agent_probing", default=False)

Emit = Callable[[list[Event]], None]
"""Hand events to the agent. Missing id, ts, source and agent_id are filled in."""

Submit = Callable[[list[Event]], Awaitable[list[str]]]
"""Hand events to the agent durably: returns after their journal commit. Missing id, ts,
source and agent_id are filled in; events that fail the agent's checks are left out and
one error per such event is returned (the caller tells its sender; nothing is counted as
lost). Raises IntakeFullError when the intake is full and JournalFullError when the
journal is full or the agent is stopping: nothing was taken, the sender may retry."""


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
    """Wraps one attempt (or a sequence of attempts) at a sink call.

    A policy may also define ``async def close(self) -> None`` (connections, tasks): the
    agent calls it once at stop, after the sink is closed. BasePolicy gives a no-op one.
    """

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T: ...


class BasePolicy:
    """Convenience base: a no-op close()."""

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        raise NotImplementedError

    async def close(self) -> None:
        return None


@dataclass
class PluginContext:
    """What the agent gives a plugin instance."""

    name: str
    agent_id: str
    data_dir: Path
    log: logging.Logger
    emit: Emit
    # The durable way in, for sources that ack their senders (see Submit); None in a
    # context built outside an agent.
    submit: Submit | None = None
    # Free-form gauges a plugin exposes at /metrics and /api/v1/status, e.g. breaker state.
    stats: dict[str, Any] = field(default_factory=dict)
    # The agent's loss ledger. A context built outside an agent (tests, benchmarks) gets
    # a private one, so a plugin can always count its drops.
    ledger: LossLedger = field(default_factory=LossLedger)
    # Objects the plugin instances of one agent share (never across agents): e.g. one
    # concurrency limit for several sinks. Keys start with the plugin's own name.
    shared: dict[str, Any] = field(default_factory=dict)
    # Where a sink publishes the agent's history store for the dashboard's HTTP API.
    history: HistoryBoard = field(default_factory=HistoryBoard)

    def lost(self, reason: str, n: int = 1) -> None:
        """Count n events this plugin dropped (e.g. unparsable input) in the loss ledger."""
        self.ledger.add(reason, n)

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
        when = when.replace(tzinfo=_dt.UTC)
    now = now or _dt.datetime.now(_dt.UTC)
    return max(0.0, (when - now).total_seconds())


class ThrottledLog:
    """Logs a recurring problem at most once per `every_s` seconds, with a count of the rest.

    For plugins that see bad input at network rates (a malformed StatsD line per packet,
    a failing scrape target): every occurrence is counted elsewhere, the log only
    needs enough to diagnose, and must not flood.
    """

    def __init__(
        self,
        log: logging.Logger,
        every_s: float = 10.0,
        level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.log, self.level = log, level
        self._throttle = Throttle(every_s, clock)

    def __call__(self, msg: str, *args: Any) -> None:
        allowed = self._throttle.allow()
        if allowed is None:
            return
        if allowed[0]:
            msg += f" (and {allowed[0]} more like it since the last message)"
        self.log.log(self.level, msg, *args)


class RegisterComponent(Protocol):
    """The callback `register_sources`, `register_sinks` and `register_policies` pass:
    ``register(type_name, factory, options=OptionsStruct)``; `factory(name, options, ctx)`
    returns the source, sink or policy instance."""

    def __call__(self, type_name: str, factory: Callable[..., Any], options: type[msgspec.Struct] = ...) -> None: ...


class RegisterFlag(Protocol):
    """The callback `register_flags` passes: ``register(flag)`` with an ``agent.plugin.Flag``."""

    def __call__(self, flag: Flag) -> None: ...


class RegisterRoute(Protocol):
    """The callback `register_routes` passes: ``register(method, path, handler, mutating=False)``."""

    def __call__(self, method: str, path: str, handler: Callable[..., Any], mutating: bool = ...) -> None: ...
