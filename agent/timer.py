"""The recording helpers every recorder offers over its own `record()`: `counter`,
`gauge`, `histogram` and `timer` (which times a block or a function and records the
seconds as a histogram). The Agent and a Forwarder share them through `Recorder`."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import Any, Protocol

from agent.pipeline.recording import RecordFn


class _Records(Protocol):
    @property
    def record(self) -> RecordFn: ...


class Recorder:
    """Mixin: `counter`, `gauge`, `histogram` and `timer` over the class's `record()`."""

    def counter(self: _Records, name: str, value: float = 1, *, tags: dict[str, str] | None = None, **kw: Any) -> None:
        """Record a counter increment."""
        self.record(name, value, kind="counter", tags=tags, **kw)

    def gauge(self: _Records, name: str, value: float, *, tags: dict[str, str] | None = None, **kw: Any) -> None:
        """Record a gauge reading."""
        self.record(name, value, kind="gauge", tags=tags, **kw)

    def histogram(self: _Records, name: str, value: float, *, tags: dict[str, str] | None = None, **kw: Any) -> None:
        """Record one observation of a distribution."""
        self.record(name, value, kind="histogram", tags=tags, **kw)

    def timer(self: _Records, name: str, *, tags: dict[str, str] | None = None) -> Timer:
        """A context manager and decorator recording elapsed seconds as a histogram."""
        return Timer(self, name, tags)


class Timer:
    """Times a block or a function; records seconds as a histogram."""

    def __init__(self, agent: _Records, name: str, tags: dict[str, str] | None) -> None:
        self.agent, self.name, self.tags = agent, name, tags
        self._t0 = 0.0

    def __enter__(self) -> Timer:
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.agent.record(self.name, time.perf_counter() - self._t0, kind="histogram", tags=self.tags)

    def __call__(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        if asyncio.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def awrapper(*a: Any, **kw: Any) -> Any:
                with Timer(self.agent, self.name, self.tags):
                    return await fn(*a, **kw)

            return awrapper

        @functools.wraps(fn)
        def wrapper(*a: Any, **kw: Any) -> Any:
            with Timer(self.agent, self.name, self.tags):
                return fn(*a, **kw)

        return wrapper
