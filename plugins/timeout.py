"""Built-in policy `timeout`: bound each attempt; a timeout becomes a RetryableError.

The attempt is cancelled at its deadline and the RetryableError is raised ``from`` a
TimeoutError, which is how the `retry` policy tells a timed-out attempt from other
failures (see its `max_timeouts`). A cancelled attempt can still hang in its own
cleanup: asyncpg, for one, waits up to its command timeout to release a connection to a
server that stopped answering (shielded from the first cancel). So an attempt that has
not ended RECANCEL_S after its cancel is cancelled again, and again, until it ends: a
hung send really ends close to `timeout_s`, and the breaker outside sees it fail.

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

RECANCEL_S = 0.5  # a timed-out attempt still running this long after its cancel is cancelled again


class TimeoutOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`timeout = { timeout_s = 10 }`: the limit for one attempt, in seconds."""

    timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0


class _Attempt:
    __slots__ = ("cancels", "deadline", "done", "expired", "recancel", "task")

    def __init__(self, deadline: float, task: asyncio.Task[Any]) -> None:
        self.deadline = deadline
        self.task = task
        self.expired = False
        self.done = False
        self.cancels = 0  # task.cancel() calls made by this policy, each undone by an uncancel()
        self.recancel: asyncio.TimerHandle | None = None


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
            result = await fn()
        except BaseException:
            # Our cancels are withdrawn whatever the attempt raised (it may have turned the
            # cancel into an error of its own): one left pending would stop the worker.
            if self._withdraw(attempt, cancelling):
                await _absorb(task, cancelling)
                raise RetryableError(self._message) from TimeoutError(self._message)
            raise  # not ours, or a cancel from outside (shutdown) came too: it stays a cancel
        finally:
            del self._inflight[key]
        if attempt.cancels:  # timed out, yet it returned (it swallowed the cancel, or beat it)
            self._withdraw(attempt, cancelling)
            await _absorb(task, cancelling)
        return result

    @staticmethod
    def _withdraw(attempt: _Attempt, cancelling: int) -> bool:
        """End the attempt's re-cancels and withdraw its cancels; True when it timed out
        and no cancel from outside is pending (so it is a timeout, not a stop)."""
        attempt.done = True
        if attempt.recancel is not None:
            attempt.recancel.cancel()
        left = attempt.task.cancelling()
        for _ in range(attempt.cancels):
            left = attempt.task.uncancel()
        return attempt.expired and left <= cancelling

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
                self._cancel(loop, attempt)

    def _cancel(self, loop: asyncio.AbstractEventLoop, attempt: _Attempt) -> None:
        """Cancel a timed-out attempt, and again every RECANCEL_S while it has not ended."""
        if attempt.done:
            return
        attempt.cancels += 1
        attempt.task.cancel()
        attempt.recancel = loop.call_later(min(RECANCEL_S, self.timeout_s), self._cancel, loop, attempt)


async def _absorb(task: asyncio.Task[Any], cancelling: int) -> None:
    """Take delivery of a cancel of ours that was requested but not yet delivered (the
    attempt ended in the same step): on Python 3.11 `uncancel()` does not withdraw it, and it
    would land on the caller's next await. A cancel from outside still propagates."""
    try:
        await asyncio.sleep(0)
    except asyncio.CancelledError:
        if task.cancelling() > cancelling:
            raise


@hookimpl
def register_policies(register: RegisterComponent) -> None:
    register("timeout", TimeoutPolicy, options=TimeoutOptions)
