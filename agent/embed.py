"""Embedding in sync apps: `agent.start()` runs an Agent on its own loop in a daemon thread.

start() is idempotent and returns the Agent; record() and friends go straight to it.
After os.fork() the child starts clean (no agent; it may start its own). At
interpreter exit the agent stops gracefully.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import threading
from concurrent.futures import Future
from typing import Any

from agent import losses
from agent.losses import LossLedger
from agent.runtime import Agent

_lock = threading.Lock()
_agent: Agent | None = None
_thread: threading.Thread | None = None
_loop: asyncio.AbstractEventLoop | None = None
_hooks_installed = False
# Events recorded before start() (or after stop()): counted here, merged into the agent's ledger.
_early = LossLedger()


def _run(agent: Agent, ready: Future[Agent]) -> None:
    global _loop
    loop = asyncio.new_event_loop()
    _loop = loop
    asyncio.set_event_loop(loop)

    async def main() -> None:
        try:
            await agent.start()
        except BaseException as exc:
            ready.set_exception(exc)
            return
        ready.set_result(agent)
        await agent.wait_stopped()

    try:
        loop.run_until_complete(main())
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def _after_fork_in_child() -> None:
    # The agent's thread does not exist in the child: forget it so the child starts clean.
    global _agent, _thread, _loop, _lock
    _agent = _thread = _loop = None
    _lock = threading.Lock()


def start(config: Any = None, timeout: float = 30.0) -> Agent:
    """Start the process-wide agent (idempotent); config is a path, a dict or None."""
    global _agent, _thread, _hooks_installed
    with _lock:
        if _agent is not None and _agent.state in ("starting", "running"):
            return _agent
        agent = Agent(config)
        for (reason, sink), n in _early.snapshot().items():
            agent.ledger.add(reason, n, sink)
        _early.__init__()  # type: ignore[misc]
        ready: Future[Agent] = Future()
        thread = threading.Thread(target=_run, args=(agent, ready), name="sidecar-agent", daemon=True)
        thread.start()
        try:
            ready.result(timeout)
        except Exception as exc:
            if isinstance(exc, TimeoutError):  # still starting in its thread: it keeps its counts
                raise
            # The failed agent's ledger (the early counts and what its start lost) is
            # dropped with it: keep it for the next agent started in this process.
            for (reason, sink), n in agent.ledger.snapshot().items():
                _early.add(reason, n, sink)
            raise
        _agent, _thread = agent, thread
        if not _hooks_installed:
            _hooks_installed = True
            _register_exit_hook()
            if hasattr(os, "register_at_fork"):
                os.register_at_fork(after_in_child=_after_fork_in_child)
        return agent


def current() -> Agent | None:
    """The running process-wide agent, if any."""
    return _agent


def _call(coro_fn: Any, timeout: float) -> Any:
    agent, loop = _agent, _loop
    if agent is None or loop is None or loop.is_closed():
        return None
    fut = asyncio.run_coroutine_threadsafe(coro_fn(agent), loop)
    return fut.result(timeout + 1.0)


def flush(timeout: float = 10.0) -> bool:
    """Commit what was recorded and wait until every sink confirmed it (or timeout)."""
    return bool(_call(lambda a: a.flush(timeout), timeout))


def stop(timeout: float | None = None) -> None:
    """Stop the process-wide agent gracefully."""
    global _agent, _thread
    agent, thread = _agent, _thread
    if agent is None:
        return
    t = agent.config.agent.shutdown_timeout_s if timeout is None else timeout
    _call(lambda a: a.stop(t), t + 5.0)
    if thread is not None:
        thread.join(t + 5.0)
    _agent = _thread = None


def _register_exit_hook() -> None:
    # Stop before concurrent.futures shuts its thread pools down at exit: once it has,
    # asyncio.to_thread (used by sinks, and by aiohttp for DNS) raises RuntimeError and
    # the final flush would dead-letter every batch instead of delivering it. Plain atexit
    # handlers run too late for that; threading's exit hooks run first, newest first, so
    # ours (registered after concurrent.futures.thread's) runs before the pools close.
    import concurrent.futures.thread  # noqa: F401  (registers its own exit hook now)

    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        with contextlib.suppress(RuntimeError):  # already shutting down
            register(_stop_at_exit)
    atexit.register(_stop_at_exit)  # fallback; a no-op once the agent is stopped


def _stop_at_exit() -> None:
    if _agent is not None:
        stop()


def record(
    name: str,
    value: float | None = None,
    *,
    kind: str | None = None,
    tags: dict[str, str] | None = None,
    ts: float | None = None,
    data: dict[str, Any] | None = None,
    session_id: str | None = None,
) -> None:
    """Record an event on the process-wide agent; before start() it is counted as lost."""
    agent = _agent
    if agent is None:
        _early.add(losses.NOT_STARTED)
        return
    # Explicit keywords, not **kw: this is the hot path, and packing a dict per call
    # cost about half again as much as Agent.record itself (bench/record_overhead.py).
    agent.record(name, value, kind=kind, tags=tags, ts=ts, data=data, session_id=session_id)


def counter(name: str, value: float = 1, **kw: Any) -> None:
    """Record a counter increment on the process-wide agent."""
    record(name, value, kind="counter", **kw)


def gauge(name: str, value: float, **kw: Any) -> None:
    """Record a gauge reading on the process-wide agent."""
    record(name, value, kind="gauge", **kw)


def histogram(name: str, value: float, **kw: Any) -> None:
    """Record an observation on the process-wide agent."""
    record(name, value, kind="histogram", **kw)


class _LazyTimer:
    def __init__(self, name: str, tags: dict[str, str] | None) -> None:
        self.name, self.tags = name, tags

    def _timer(self) -> Any:
        from agent.timer import Timer

        return Timer(_Proxy(), self.name, self.tags)

    def __enter__(self) -> Any:
        self._t = self._timer()
        return self._t.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._t.__exit__(*exc)

    def __call__(self, fn: Any) -> Any:
        return self._timer()(fn)


class _Proxy:
    """Stands in for the agent in a Timer created before start()."""

    def record(self, *a: Any, **kw: Any) -> None:
        record(*a, **kw)


def timer(name: str, *, tags: dict[str, str] | None = None) -> Any:
    """Time a block or function on the process-wide agent (histogram of seconds)."""
    return _LazyTimer(name, tags)
