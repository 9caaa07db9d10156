"""Built-in policy `retry`: exponential backoff with full jitter, bounded by a retry budget.

Only RetryableError is retried. PermanentError, any other exception, cancellation and
CircuitOpenError (an inner breaker refusing) escape at once. A retry waits
``uniform(0, min(max_backoff, initial * 2**n))`` ("full jitter"), and at least the
error's ``retry_after`` hint; if that wait would end past ``max_elapsed_s`` since the
first attempt, the error escapes instead (with its hint intact, for the caller).

Timed-out attempts get fewer chances: once `max_timeouts` attempts of one batch have
timed out (a RetryableError raised from a TimeoutError, as the `timeout` policy raises
it), the error escapes. One slow answer is retried; a sink that hangs is not a blip, and
retrying it six times (60 s at the default timeout) only keeps the breaker outside from
seeing it fail.

The retry budget caps retries across calls: over a sliding ``budget_window_s`` the
policy allows ``budget_min_retries + budget_ratio * requests`` retries, so a sink
that is down cannot multiply the load on it. When the budget is spent the last
RetryableError escapes.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import msgspec

from agent.plugin import (
    BasePolicy,
    CircuitOpenError,
    PluginContext,
    RegisterComponent,
    RetryableError,
    Throttle,
    hookimpl,
    probing,
)

T = TypeVar("T")

log = logging.getLogger("sidecar_agent.retry")
WARN_EVERY_S = 60.0  # at most one "will be retried" WARNING per sink this often (a down sink fails every call)

_MAX_EXP = 62  # 2**62 * any sane initial exceeds any cap; avoids float overflow


class RetryOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`retry = { max_attempts = 6, initial_backoff_ms = 200, max_backoff_ms = 30000 }`."""

    max_attempts: Annotated[int, msgspec.Meta(ge=1)] = 6
    initial_backoff_ms: Annotated[float, msgspec.Meta(ge=0)] = 200.0
    max_backoff_ms: Annotated[float, msgspec.Meta(ge=0)] = 30_000.0
    max_elapsed_s: Annotated[float, msgspec.Meta(gt=0)] = 120.0
    budget_ratio: Annotated[float, msgspec.Meta(ge=0)] = 0.2
    budget_window_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    budget_min_retries: Annotated[int, msgspec.Meta(ge=0)] = 10
    max_timeouts: Annotated[int, msgspec.Meta(ge=1)] = 2  # timed-out attempts per batch before it gives up


# -- pure functions (property-tested in tests/test_backoff_props.py) -----------------


def backoff_ceiling(retry_index: int, initial_s: float, max_s: float) -> float:
    """The upper bound of the jittered wait before retry number `retry_index` (0-based)."""
    if retry_index >= _MAX_EXP:
        return max_s
    return min(max_s, initial_s * (2.0**retry_index))


def retry_delay(
    retry_index: int,
    initial_s: float,
    max_s: float,
    u: float,
    *,
    retry_after: float | None = None,
    elapsed_s: float = 0.0,
    max_elapsed_s: float = float("inf"),
) -> float | None:
    """Seconds to wait before the next attempt, or None to give up.

    `u` is a uniform sample in [0, 1). The wait is full jitter
    ``u * backoff_ceiling(...)``, raised to `retry_after` when the server asked for
    more; None when waiting would end after `max_elapsed_s` since the first attempt.
    """
    delay = u * backoff_ceiling(retry_index, initial_s, max_s)
    if retry_after is not None and retry_after > delay:
        delay = retry_after
    if elapsed_s + delay > max_elapsed_s:
        return None
    return delay


def timed_out(exc: BaseException) -> bool:
    """Whether `exc` reports a timed-out attempt: raised from a TimeoutError (asyncio's too)."""
    return isinstance(exc.__cause__, TimeoutError)


# -- the retry budget ------------------------------------------------------------------


class RetryBudget:
    """Retries allowed over a sliding window, kept in `buckets` ring slots (cheap per call).

    allowed = min_retries + ratio * requests_in_window; a retry is permitted while
    retries_in_window < allowed. The window slides one bucket at a time.
    """

    __slots__ = ("_bucket", "_n", "_req", "_ret", "_width", "min_retries", "ratio", "window_s")

    def __init__(self, ratio: float, window_s: float, min_retries: int, buckets: int = 10) -> None:
        self.ratio = ratio
        self.min_retries = min_retries
        self.window_s = window_s
        self._n = buckets
        self._width = window_s / buckets
        self._req = [0] * buckets
        self._ret = [0] * buckets
        self._bucket = 0  # absolute bucket number of the newest slot

    def _advance(self, now: float) -> int:
        b = int(now / self._width)
        cur = self._bucket
        if b != cur:
            if b - cur >= self._n or b < cur:
                for i in range(self._n):
                    self._req[i] = self._ret[i] = 0
            else:
                for k in range(cur + 1, b + 1):
                    i = k % self._n
                    self._req[i] = self._ret[i] = 0
            self._bucket = b
        return b % self._n

    def record_request(self, now: float) -> None:
        self._req[self._advance(now)] += 1

    def try_spend(self, now: float) -> bool:
        """Take one retry from the budget if there is one."""
        i = self._advance(now)
        if sum(self._ret) < self.min_retries + self.ratio * sum(self._req):
            self._ret[i] += 1
            return True
        return False

    def state(self, now: float) -> dict[str, Any]:
        self._advance(now)
        requests, retries = sum(self._req), sum(self._ret)
        allowed = self.min_retries + self.ratio * requests
        return {
            "window_s": self.window_s,
            "requests": requests,
            "retries": retries,
            "allowed": allowed,
            "remaining": max(0.0, allowed - retries),
        }


class RetryPolicy(BasePolicy):
    """Retries RetryableError with full-jitter backoff, Retry-After, elapsed cap and budget."""

    def __init__(
        self,
        name: str,
        options: RetryOptions,
        ctx: PluginContext | None = None,
        *,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.name = name
        self.options = options
        self.max_attempts = options.max_attempts
        self._initial = options.initial_backoff_ms / 1000.0
        self._max = options.max_backoff_ms / 1000.0
        self._max_elapsed = options.max_elapsed_s
        self._max_timeouts = options.max_timeouts
        self.budget = RetryBudget(options.budget_ratio, options.budget_window_s, options.budget_min_retries)
        self._sleep, self._clock, self._rand = sleep, clock, rand
        self.stats: dict[str, Any] = ctx.stats if ctx is not None else {}
        self.stats.setdefault("retries", 0)
        self.stats.setdefault("retries_budget_exhausted", 0)
        self.stats.setdefault("retries_gave_up", 0)
        self.stats.setdefault("retries_timed_out", 0)  # batches given up after max_timeouts timeouts
        self._warned = Throttle(WARN_EVERY_S, clock)  # "will be retried" WARNINGs

    def budget_state(self) -> dict[str, Any]:
        """The budget's window, requests, retries, allowed and remaining, now."""
        return self.budget.state(self._clock())

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        start = self._clock()
        self.budget.record_request(start)
        try:
            return await fn()
        except CircuitOpenError:
            raise
        except RetryableError as exc:
            if self.max_attempts <= 1 or probing.get():
                raise
            return await self._retry(fn, start, exc)

    async def _retry(self, fn: Callable[[], Awaitable[T]], start: float, exc: RetryableError) -> T:
        stats = self.stats
        attempt = 1
        timeouts = 1 if timed_out(exc) else 0
        while True:
            if timeouts >= self._max_timeouts:
                stats["retries_timed_out"] += 1
                raise exc
            now = self._clock()
            delay = retry_delay(
                attempt - 1,
                self._initial,
                self._max,
                self._rand(),
                retry_after=exc.retry_after,
                elapsed_s=now - start,
                max_elapsed_s=self._max_elapsed,
            )
            if delay is None:
                stats["retries_gave_up"] += 1
                raise exc
            if not self.budget.try_spend(now):
                stats["retries_budget_exhausted"] += 1
                raise exc
            stats["retries"] += 1
            self._warn_retry(now, attempt, delay, exc)
            await self._sleep(delay)
            attempt += 1
            try:
                return await fn()
            except CircuitOpenError:
                raise
            except RetryableError as again:
                exc = again
                timeouts += timed_out(again)
                if attempt >= self.max_attempts:
                    stats["retries_gave_up"] += 1
                    raise

    def _warn_retry(self, now: float, attempt: int, delay: float, exc: BaseException) -> None:
        """A failed attempt that will be retried is a WARNING, at most once a minute per sink
        (with how many were held back), so a failing sink is visible before anything is parked."""
        allowed = self._warned.allow(now=now)
        if allowed is None:
            return
        more = f" ({allowed[0]} more since the last such line)" if allowed[0] else ""
        log.warning(
            "sink %s: attempt %d of %d failed, retrying in %.2gs: %s%s",
            self.name,
            attempt,
            self.max_attempts,
            delay,
            exc,
            more,
        )


@hookimpl
def register_policies(register: RegisterComponent) -> None:
    register("retry", RetryPolicy, options=RetryOptions)
