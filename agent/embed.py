"""Embedding in sync apps: `agent.start()` runs an Agent on its own loop in a daemon thread.

start() is idempotent and returns the process's agent; record() and friends go straight
to it. One process owns a data dir (the data-dir lock: journal, sinks, sources, HTTP)
and listens on its Unix socket (agent.forwarding.owner); every other process calling
start() with the same data_dir gets a Forwarder (agent.forwarding.forwarder) with the
same recording API, whose events reach the owner's journal. A process forked after
start() gets a Forwarder at once (the at-fork hook), so pre-fork servers (gunicorn
--preload, multiprocessing with fork) need no code change. At interpreter exit the
agent stops gracefully (a forwarder hands over what it holds, or spills it).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from agent import losses
from agent.config import resolve
from agent.event import MAX_TAGS
from agent.forwarding.forwarder import Forwarder
from agent.forwarding.owner import Owner
from agent.losses import LossLedger
from agent.runtime import Agent
from agent.storage.dirlock import DataDirInUse, DataDirLock

log = logging.getLogger("sidecar_agent")

_lock = threading.Lock()
_agent: Agent | Forwarder | None = None
_owner: Owner | None = None
_thread: threading.Thread | None = None
_loop: asyncio.AbstractEventLoop | None = None
_hooks_installed = False
# Events recorded before start() (or after stop()): counted here, merged into the agent's ledger.
_early = LossLedger()
# The owner's record() events carry the producing pid as the tag `pid` (a forwarder adds
# it on its drain thread). None while this process is not the owner.
_pid = str(os.getpid())
_owner_tags: dict[str, str] | None = None


def _run(agent: Agent, ready: Future[Agent]) -> None:
    global _loop, _owner
    loop = asyncio.new_event_loop()
    _loop = loop
    asyncio.set_event_loop(loop)

    async def main() -> None:
        global _owner
        try:
            await agent.start()
            owner = Owner(agent)
            try:
                await owner.start()
            except BaseException:
                await agent.stop()
                raise
            _owner = owner
            agent.forwarding = owner  # type: ignore[attr-defined]  # read by status_of
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
    """In a child of fork(): the parent's agent and its threads do not exist here. When
    the parent had one (owner or forwarder), the child gets a forwarder to the same data
    dir; the fds it inherited (lock, listening socket, connection) are closed in the
    child only, so the parent's lock and socket end with the parent."""
    global _agent, _owner, _thread, _loop, _lock, _early, _pid, _owner_tags
    parent, owner = _agent, _owner
    _agent = _owner = _thread = _loop = None
    _lock = threading.Lock()
    _early = LossLedger()  # its lock may have been held by a parent thread at fork time
    _pid, _owner_tags = str(os.getpid()), None
    if owner is not None:
        owner.forget_in_child()
    if isinstance(parent, Agent):
        if parent.db is not None:
            parent.db.dir_lock.release()  # the child's copy of the fd; the parent's flock stays
    elif isinstance(parent, Forwarder):
        parent.forget_in_child()
    if parent is not None and parent.state in ("starting", "running"):
        _agent = Forwarder(parent.config).start()


def _lock_busy(data_dir: Path) -> bool:
    """Whether another agent (not a brief CLI command) holds the data dir now."""
    probe = DataDirLock(data_dir)
    holder = probe.try_acquire()
    probe.release()
    return holder is not None and not holder.endswith(" cli")


def start(config: Any = None, timeout: float = 30.0) -> Agent | Forwarder:
    """Start the process-wide agent (idempotent); config is a path, a dict or None.
    Returns the Agent when this process owns the data dir, else a Forwarder to its owner."""
    global _agent, _thread, _hooks_installed, _owner_tags
    with _lock:
        if _agent is not None and _agent.state in ("starting", "running"):
            return _agent
        cfg = resolve(config)
        started: Agent | Forwarder
        if _lock_busy(Path(cfg.agent.data_dir)):
            started = _start_forwarder(cfg)
        else:
            try:
                started, _thread = _start_owner(cfg, timeout)
            except DataDirInUse as exc:  # taken between the probe and the start
                if exc.by_cli:
                    raise
                started = _start_forwarder(cfg)
            else:
                _owner_tags = {"pid": _pid}
        _agent = started
        if not _hooks_installed:
            _hooks_installed = True
            _register_exit_hook()
            if hasattr(os, "register_at_fork"):
                os.register_at_fork(after_in_child=_after_fork_in_child)
        return started


def _merge_early(ledger: LossLedger) -> None:
    for (reason, sink), n in _early.snapshot().items():
        ledger.add(reason, n, sink)
    _early.__init__()  # type: ignore[misc]


def _start_forwarder(cfg: Any) -> Forwarder:
    fw = Forwarder(cfg)
    _merge_early(fw.ledger)
    log.info("data dir %s is owned by another process: pid %d forwards to it", cfg.agent.data_dir, fw.pid)
    return fw.start()


def _start_owner(cfg: Any, timeout: float) -> tuple[Agent, threading.Thread]:
    agent = Agent(cfg)
    _merge_early(agent.ledger)
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
    return agent, thread


def current() -> Agent | Forwarder | None:
    """The running process-wide agent (or forwarder), if any."""
    return _agent


def _call(coro_fn: Any, timeout: float) -> Any:
    agent, loop = _agent, _loop
    if agent is None or loop is None or loop.is_closed():
        return None
    fut = asyncio.run_coroutine_threadsafe(coro_fn(agent), loop)
    return fut.result(timeout + 1.0)


def flush(timeout: float = 10.0) -> bool:
    """Commit what was recorded and wait until every sink confirmed it (or timeout).
    In a forwarder: until the owner journaled it and the owner's sinks confirmed it."""
    agent = _agent
    if isinstance(agent, Forwarder):
        return agent.flush(timeout)
    return bool(_call(lambda a: a.flush(timeout), timeout))


def stop(timeout: float | None = None) -> None:
    """Stop the process-wide agent gracefully (a forwarder hands everything over first)."""
    global _agent, _thread, _owner, _owner_tags
    agent, thread, owner = _agent, _thread, _owner
    if agent is None:
        return
    t = agent.config.agent.shutdown_timeout_s if timeout is None else timeout
    if isinstance(agent, Forwarder):
        agent.stop(t)
    else:
        _call(lambda a: _stop_owner(a, owner, t), t + 5.0)
        if thread is not None:
            thread.join(t + 5.0)
    _agent = _thread = _owner = _owner_tags = None


async def _stop_owner(agent: Agent, owner: Owner | None, timeout: float) -> None:
    # Forwarders get a share of the deadline to have their queued batches acked; the
    # agent then commits and delivers as stop() always does.
    if owner is not None:
        await owner.stop(min(1.0, timeout / 4))
    await agent.stop(timeout)


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
    if _owner_tags is not None:  # the owner: tag the pid here (a forwarder does it off-thread)
        if tags is None:
            tags = _owner_tags  # the committer copies tags, so one shared dict is safe
        elif tags.__class__ is dict and "pid" not in tags and len(tags) < MAX_TAGS:
            tags = {**tags, "pid": _pid}
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
