"""Built-in policy `timeout`: bound each attempt; a timeout becomes a RetryableError.

Implementation note: ``asyncio.timeout`` schedules (and cancels) one timer handle per
call. Because a policy's timeout is constant, deadlines of its in-flight attempts
arrive in order, so one watchdog timer per policy suffices: each call only inserts
itself into an ordered dict, and the watchdog, armed for the earliest deadline,
cancels expired attempts and re-arms for the next. The expiry is detected the way
asyncio.timeout does it (``Task.uncancel`` against the cancel count seen at entry),
so a cancellation from outside stays a CancelledError.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import msgspec

from agent.plugin import BasePolicy, PluginContext, RegisterComponent, RetryableError, hookimpl

T = TypeVar("T")


class TimeoutOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`timeout = { timeout_s = 10 }`: the limit for one attempt, in seconds."""

    timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0


class _Attempt:
    __slots__ = ("deadline", "expired", "task")

    def __init__(self, deadline: float, task: asyncio.Task[Any]) -> None:
        self.deadline = deadline
        self.task = task
        self.expired = False


class TimeoutPolicy(BasePolicy):
    """Cancel an attempt after `timeout_s` and raise RetryableError("timed out after Xs")."""

    def __init__(self, name: str, options: TimeoutOptions, ctx: PluginContext | None = None) -> None:
        self.name = name
        self.timeout_s = options.timeout_s
        self._message = f"{name}: timed out after {options.timeout_s:g}s"
        self._inflight: dict[int, _Attempt] = {}  # insertion order == deadline order
        self._seq = 0
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop: asyncio.AbstractEventLoop | None = None

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        if task is None:  # not inside a task: nothing to cancel; fall back
            async with asyncio.timeout(self.timeout_s):
                return await fn()
        cancelling = task.cancelling()
        self._seq = key = self._seq + 1
        attempt = _Attempt(loop.time() + self.timeout_s, task)
        self._inflight[key] = attempt
        if self._timer is None or self._timer_loop is not loop:
            self._arm(loop, attempt.deadline)
        try:
            return await fn()
        except asyncio.CancelledError:
            if attempt.expired and task.uncancel() <= cancelling:
                raise RetryableError(self._message) from None
            raise
        finally:
            del self._inflight[key]

    def _arm(self, loop: asyncio.AbstractEventLoop, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_loop = loop
        self._timer = loop.call_at(when, self._fire, loop)

    def _fire(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        for attempt in self._inflight.values():
            if attempt.deadline > now:
                self._arm(loop, attempt.deadline)
                return
            if not attempt.expired:
                attempt.expired = True
                attempt.task.cancel()


@hookimpl
def register_policies(register: RegisterComponent) -> None:
    register("timeout", TimeoutPolicy, options=TimeoutOptions)
