"""`agent.timer(...)`: times a block or a function and records the seconds as a histogram."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Callable
from typing import Any, Protocol


class _Records(Protocol):
    def record(
        self, name: str, value: float | None = None, *, kind: str | None = None, tags: dict[str, str] | None = None
    ) -> None: ...


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
