"""Built-in policy `circuit_breaker`: stop calling a sink that keeps failing.

States: closed -> (failure_threshold consecutive failures) -> open -> (reset_timeout_s)
-> half_open -> one probe -> closed on success | open again on failure.

Why not purgatory's state machine as is: purgatory 3.0.1's half-open state admits
every request, counts CancelledError as a failure, treats an excluded exception as a
*success* (an excluded CancelledError during half-open would close the circuit) and
reads wall-clock time inside the model, so tests cannot inject a clock. This module
keeps the state machine (single probe, outcome rules, injectable clock, a lock-free
fast path when closed) and uses purgatory's storage -- its ``AsyncRedisUnitOfWork``
repository, with purgatory's key layout and state names -- when ``redis_url`` is set,
so a fleet of agents shares one breaker per ``circuit`` name (and purgatory-based
services reading the same keys agree with it).

Outcome rules: RetryableError (including timeouts mapped to it) and unexpected
exceptions are failures. PermanentError means the remote answered, so it counts as
a success for the breaker (it resets the failure count; a half-open probe that gets
one closes the circuit). CancelledError is neutral: it neither fails nor succeeds,
and a cancelled probe frees the probe slot, leaving the circuit half-open. So is any
error raised while the calling task is being cancelled (a sink that turns the cancel of
a stop into an error of its own): stopping the agent is not the sink failing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

import msgspec

from agent.plugin import (
    BasePolicy,
    CircuitOpenError,
    PermanentError,
    PluginContext,
    RegisterComponent,
    Throttle,
    hookimpl,
    probing,
)

T = TypeVar("T")
log = logging.getLogger("sidecar_agent.circuit_breaker")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
STATE_CODES = {CLOSED: 0, OPEN: 1, HALF_OPEN: 2}
EVENT_NAME = "sidecar_agent.breaker"
WARN_EVERY_S = 60.0  # at most one breaker-open and one failed-attempt WARNING per sink this often
# purgatory's state names, used in the shared (Redis) store
_TO_PURGATORY = {CLOSED: "closed", OPEN: "opened", HALF_OPEN: "half-opened"}


class CircuitBreakerOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`circuit_breaker = { failure_threshold = 5, reset_timeout_s = 30 }`."""

    failure_threshold: Annotated[int, msgspec.Meta(ge=1)] = 5
    reset_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    # Share breaker state across agents through Redis (purgatory's storage).
    redis_url: str | None = None
    # The shared circuit's name; default "sidecar_agent.<sink name>".
    circuit: str | None = None


class RedisBreakerStore:
    """Shared breaker state in Redis, through purgatory's AsyncRedisUnitOfWork.

    Keys (purgatory's layout): ``cbr::<circuit>`` (JSON: name, threshold, ttl, state,
    opened_at as epoch seconds) and ``cbr::<circuit>::failure_count``. We add
    ``cbr::<circuit>::probe`` (SET NX PX) so only one agent in the fleet probes.
    """

    def __init__(self, url: str, circuit: str, threshold: int, ttl: float) -> None:
        from purgatory import AsyncRedisUnitOfWork
        from purgatory.domain.model import Context

        self.uow = AsyncRedisUnitOfWork(url)
        # Typed as the abstract repository; the Redis one has `redis` and `prefix`.
        self.repo: Any = self.uow.contexts
        self.circuit = circuit
        self._context = Context(circuit, threshold, ttl)
        self._ready = False

    async def _ensure(self) -> None:
        if not self._ready:
            await self.uow.initialize()
            if await self.repo.get(self.circuit) is None:
                await self.repo.register(self._context)
            self._ready = True

    async def load(self) -> tuple[str, float | None, int]:
        """(state, opened_at, failure_count) as shared now."""
        await self._ensure()
        ctx = await self.repo.get(self.circuit)
        if ctx is None:
            return CLOSED, None, 0
        state = {v: k for k, v in _TO_PURGATORY.items()}.get(ctx.state, CLOSED)
        return state, ctx.opened_at, int(ctx.failure_count or 0)

    async def save_state(self, state: str, opened_at: float | None) -> None:
        await self._ensure()
        await self.repo.update_state(self.circuit, _TO_PURGATORY[state], opened_at)
        if state == CLOSED:
            await self.repo.reset_failure(self.circuit)

    async def add_failure(self) -> int:
        """Increment the shared failure count and return it."""
        await self._ensure()
        return int(await self.repo.redis.incr(f"{self.repo.prefix}{self.circuit}::failure_count"))

    async def reset_failures(self) -> None:
        await self._ensure()
        await self.repo.reset_failure(self.circuit)

    async def acquire_probe(self, lease_s: float) -> bool:
        await self._ensure()
        key = f"{self.repo.prefix}{self.circuit}::probe"
        return bool(await self.repo.redis.set(key, "1", nx=True, px=max(1, int(lease_s * 1000))))

    async def release_probe(self) -> None:
        await self.repo.redis.delete(f"{self.repo.prefix}{self.circuit}::probe")

    async def close(self) -> None:
        await self.repo.redis.aclose()


class CircuitBreakerPolicy(BasePolicy):
    """A circuit breaker whose half-open state admits exactly one probe at a time."""

    def __init__(
        self,
        name: str,
        options: CircuitBreakerOptions,
        ctx: PluginContext | None = None,
        *,
        clock: Callable[[], float] | None = None,
        store: RedisBreakerStore | None = None,
    ) -> None:
        self.name = name
        self.ctx = ctx
        self.threshold = options.failure_threshold
        self.reset_timeout_s = options.reset_timeout_s
        circuit = options.circuit or f"sidecar_agent.{name}"
        if store is None and options.redis_url:
            store = RedisBreakerStore(options.redis_url, circuit, self.threshold, self.reset_timeout_s)
        self._store = store
        # A shared store holds epoch timestamps, so the clock must be wall time then.
        self._clock = clock or (time.time if store is not None else time.monotonic)
        self.state = CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self._gen = 0  # bumped on every transition; outcomes of older calls are ignored
        self._probe_in_flight = False
        self._not_closed_since = 0.0
        self._open_total = 0.0
        self.stats: dict[str, Any] = ctx.stats if ctx is not None else {}
        # Throttled WARNINGs, one per kind ("failure", "open") per WARN_EVERY_S
        self._warned = Throttle(WARN_EVERY_S, clock or time.monotonic)
        # Declared figures (docs/resilience.md): /metrics serves `breaker_state_code` as
        # sidecar_agent_breaker_state and `breaker_open_seconds_total` as ..._open_seconds;
        # the latter is a callable, so every read includes the current open period.
        self.stats.update(
            breaker_state=CLOSED,
            breaker_state_code=STATE_CODES[CLOSED],
            breaker_transitions=0,
            breaker_open_seconds_total=self.open_seconds_total,
        )

    # -- reading state ---------------------------------------------------------------

    def open_seconds_total(self) -> float:
        """Seconds spent not closed (open or half-open), including the current period."""
        if self.state is CLOSED:
            return self._open_total
        return self._open_total + (self._clock() - self._not_closed_since)

    def retry_after(self) -> float:
        """Seconds until the breaker would admit a call (0 when closed)."""
        if self.state is OPEN:
            return max(0.0, self.opened_at + self.reset_timeout_s - self._clock())
        if self.state is HALF_OPEN and self._probe_in_flight:
            return self._probe_wait()
        return 0.0

    def snapshot(self) -> dict[str, Any]:
        """ctx.stats' breaker figures as values (open seconds include now)."""
        return {k: v() if callable(v) else v for k, v in self.stats.items() if k.startswith("breaker_")}

    # -- calls -----------------------------------------------------------------------

    async def call(self, fn: Callable[[], Awaitable[T]]) -> T:
        if self.state is not CLOSED or self._store is not None:
            return await self._call_slow(fn)
        # Fast path: closed, no shared store. No locks, no allocation.
        gen = self._gen
        try:
            result = await fn()
        except PermanentError:
            if self.failures:
                self._on_success(gen)
            raise
        except Exception as exc:
            if not _stopping():
                self._on_failure(gen, exc)
            raise
        if self.failures:
            self._on_success(gen)
        return result

    async def _call_slow(self, fn: Callable[[], Awaitable[T]]) -> T:
        store = self._store
        if store is not None:
            await self._sync_from_store(store)
        now = self._clock()
        if self.state is OPEN:
            remaining = self.opened_at + self.reset_timeout_s - now
            if remaining > 0:
                raise CircuitOpenError(f"{self.name}: circuit open", retry_after=remaining)
            self._transition(HALF_OPEN, now)
        if self.state is HALF_OPEN:
            if self._probe_in_flight:
                raise CircuitOpenError(
                    f"{self.name}: circuit half-open, probe in flight", retry_after=self._probe_wait()
                )
            if store is not None and not await self._store_op(store.acquire_probe(self.reset_timeout_s), True):
                raise CircuitOpenError(f"{self.name}: another agent is probing", retry_after=self._probe_wait())
            return await self._probe(fn)
        gen = self._gen
        try:
            result = await fn()
        except PermanentError:
            if self.failures:
                await self._on_success_shared(gen)
            raise
        except Exception as exc:
            if _stopping():
                raise
            if self._on_failure(gen, exc) is False and store is not None and gen == self._gen:
                shared = await self._store_op(store.add_failure(), 0)
                if shared >= self.threshold and self.state is CLOSED:
                    self._transition(OPEN, self._clock(), error=exc)
                    await self._store_op(store.save_state(OPEN, self.opened_at), None)
            elif store is not None and self.state is OPEN:
                await self._store_op(store.save_state(OPEN, self.opened_at), None)
            raise
        if self.failures:
            await self._on_success_shared(gen)
        return result

    async def _probe(self, fn: Callable[[], Awaitable[T]]) -> T:
        self._probe_in_flight = True
        gen = self._gen
        token = probing.set(True)
        try:
            result = await fn()
        except asyncio.CancelledError:
            raise  # neutral: stay half-open, the next call probes
        except PermanentError:
            await self._probe_done(gen, CLOSED)
            raise
        except Exception as exc:
            if not _stopping():
                await self._probe_done(gen, OPEN, exc)
            raise
        finally:
            probing.reset(token)
            self._probe_in_flight = False
        await self._probe_done(gen, CLOSED)
        return result

    async def _probe_done(self, gen: int, to: str, error: BaseException | None = None) -> None:
        if gen != self._gen:
            return
        self._transition(to, self._clock(), error=error)
        store = self._store
        if store is not None:
            await self._store_op(store.save_state(to, self.opened_at if to is OPEN else None), None)
            await self._store_op(store.release_probe(), None)

    def _probe_wait(self) -> float:
        return min(1.0, self.reset_timeout_s)

    # -- transitions -----------------------------------------------------------------

    def _on_failure(self, gen: int, error: BaseException) -> bool:
        """Count a failure from a call admitted while closed; True if it opened the circuit."""
        if gen != self._gen:
            return True  # stale: the state moved on while the call ran
        self.failures += 1
        if self.failures >= self.threshold:
            self._transition(OPEN, self._clock(), error=error)
            return True
        # With the default chain (timeout, retry, circuit_breaker: innermost first) a failure
        # here is a send that outlived its retries; placed inside `retry`, one attempt.
        self._warn(
            "failure",
            "sink %s: a send failed (%d in a row, the circuit opens at %d): %s%s",
            self.failures,
            self.threshold,
            error,
        )
        return False

    def _warn(self, kind: str, msg: str, *args: Any) -> None:
        """A WARNING at most once per WARN_EVERY_S for this sink and `kind`, with how many
        were held back since the last one: a sink failing every call must not flood the log."""
        allowed = self._warned.allow(kind)
        if allowed is None:
            return
        more = f" ({allowed[0]} more since the last such line)" if allowed[0] else ""
        log.warning(msg, self.name, *args, more)

    def _on_success(self, gen: int) -> None:
        if gen == self._gen:
            self.failures = 0

    async def _on_success_shared(self, gen: int) -> None:
        self._on_success(gen)
        if self._store is not None:
            await self._store_op(self._store.reset_failures(), None)

    def _transition(
        self, to: str, now: float, opened_at: float | None = None, error: BaseException | None = None
    ) -> None:
        frm = self.state
        if frm == to:
            return
        if frm is CLOSED:
            self._not_closed_since = now
        elif to is CLOSED:
            self._open_total += now - self._not_closed_since
        if to is OPEN:
            self.opened_at = now if opened_at is None else opened_at
        if to is CLOSED:
            self.failures = 0
        self.state = to
        self._gen += 1
        code = STATE_CODES[to]
        stats = self.stats
        stats["breaker_state"] = to
        stats["breaker_state_code"] = code
        stats["breaker_transitions"] += 1
        if to is OPEN:
            # Loud: the sink's deliveries stop for reset_timeout_s (a WARNING naming why, throttled).
            self._warn(
                "open",
                "sink %s: circuit breaker opened (%s -> open), no deliveries for %gs: %s%s",
                frm,
                self.reset_timeout_s,
                error if error is not None else "opened by another agent sharing the circuit",
            )
        else:
            log.info("sink %s: circuit %s -> %s", self.name, frm, to)
        if self.ctx is not None:
            self.ctx.event(EVENT_NAME, float(code), from_state=frm, to_state=to, sink=self.name)

    # -- shared store ----------------------------------------------------------------

    async def _sync_from_store(self, store: RedisBreakerStore) -> None:
        """Adopt what other agents decided: an opening, or a recovery."""
        loaded = await self._store_op(store.load(), None)
        if loaded is None:
            return
        shared_state, shared_opened_at, _ = loaded
        opened = shared_state in (OPEN, HALF_OPEN) and self.state is CLOSED
        reopened = shared_state == OPEN and self.state is HALF_OPEN and not self._probe_in_flight
        if opened or reopened:
            self._transition(OPEN, self._clock(), opened_at=shared_opened_at or self._clock())
        elif shared_state == CLOSED and self.state is not CLOSED and not self._probe_in_flight:
            self._transition(CLOSED, self._clock())

    async def _store_op(self, aw: Awaitable[Any], default: Any) -> Any:
        """Run a store call; if Redis is unreachable, log it and carry on locally."""
        try:
            return await aw
        except Exception as exc:  # the breaker must keep working without Redis
            log.warning("sink %s: circuit breaker store unavailable: %s", self.name, exc)
            self.stats["breaker_store_errors"] = self.stats.get("breaker_store_errors", 0) + 1
            return default

    async def close(self) -> None:
        """Close the shared store's connection, if any (the agent calls it at stop)."""
        if self._store is not None:
            await self._store_op(self._store.close(), None)


def _stopping() -> bool:
    """Whether the calling task is being cancelled (the agent stops): its errors are no verdict."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


@hookimpl
def register_policies(register: RegisterComponent) -> None:
    register("circuit_breaker", CircuitBreakerPolicy, options=CircuitBreakerOptions)
