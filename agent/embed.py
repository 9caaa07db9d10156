"""Embedding in sync apps: `agent.start()` runs an Agent on its own loop in a daemon thread.

start() is idempotent and returns the process's agent; record() and friends go straight
to it. One process owns a data dir (the data-dir lock: journal, sinks, sources, HTTP)
and listens on its Unix socket (agent.forwarding.owner); every other process calling
start() with the same data_dir gets a Forwarder (agent.forwarding.forwarder) with the
same recording API, whose events reach the owner's journal. A process forked after
start() gets a Forwarder at once (the at-fork hook), so pre-fork servers (gunicorn
--preload, multiprocessing with fork) need no code change. At interpreter exit the
agent stops gracefully (a forwarder hands over what it holds, or spills it).

Failover: when the owner is gone, a forwarder takes the data-dir lock and calls
`_take_over`, which starts an Agent here the way start() does for an owner; module-level
record() then goes to it, and the old Forwarder (`_retired`) hands what it still held to
this process's own listener. With `[agent] connect` the process only ever forwards.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from agent import celery_hook, losses
from agent.config import differences, resolve
from agent.errors import ConfigError
from agent.forwarding.failover import wait_port_free
from agent.forwarding.forwarder import Forwarder
from agent.forwarding.owner import Owner, serve_forwarders
from agent.loop_thread import close_loop, release_listeners
from agent.losses import LossLedger
from agent.pipeline.recording import RecordQueue
from agent.runtime import Agent
from agent.storage.dirlock import DataDirInUse, DataDirLock

log = logging.getLogger("sidecar_agent")
_time = time.time

_lock = threading.Lock()
_agent: Agent | Forwarder | None = None
# The deque record() appends to: _agent's intake (an Agent's committer, or the Forwarder
# itself). Set only with _agent, by _use(), so record() reads one global, not two.
_intake: RecordQueue | None = None
_owner: Owner | None = None
_thread: threading.Thread | None = None
_loop: asyncio.AbstractEventLoop | None = None
# The Forwarder this process was before it took the data dir over: it still hands what it
# held (and what callers holding it record) to this process's own listener, until stop().
_retired: Forwarder | None = None
_hooks_installed = False
# Events recorded before start() (or after stop()): counted here, merged into the agent's ledger.
_early = LossLedger()


def _run(agent: Agent, ready: Future[Agent]) -> None:
    global _loop, _owner
    loop = asyncio.new_event_loop()
    _loop = loop
    asyncio.set_event_loop(loop)

    async def main() -> None:
        global _owner
        try:
            await agent.start()
            try:
                _owner = await serve_forwarders(agent)
            except BaseException:
                await agent.stop()
                raise
        except BaseException as exc:
            ready.set_exception(exc)
            return
        ready.set_result(agent)
        await agent.wait_stopped()

    try:
        loop.run_until_complete(main())
    finally:
        close_loop(loop)


def _after_fork_in_child() -> None:
    """In a child of fork(): the parent's agent and its threads do not exist here. When
    the parent had one (owner or forwarder), the child gets a forwarder to the same data
    dir; the fds it inherited (lock, listening socket, connection) are closed in the
    child only, so the parent's lock and socket end with the parent."""
    global _owner, _thread, _loop, _lock, _early, _retired
    parent, owner, retired, loop = _agent, _owner, _retired, _loop
    _use(None)
    _owner = _thread = _loop = _retired = None
    if loop is not None:
        release_listeners(loop)
    _lock = threading.Lock()
    _early = LossLedger()  # its lock may have been held by a parent thread at fork time
    if owner is not None:
        owner.forget_in_child()
    if retired is not None:
        retired.forget_in_child()  # the parent sends what it queued, not the child
    if isinstance(parent, Agent):
        if parent.db is not None:
            parent.db.dir_lock.release()  # the child's copy of the fd; the parent's flock stays
    elif isinstance(parent, Forwarder):
        parent.forget_in_child()
    if parent is not None and parent.state in ("starting", "running"):
        _use(_start_forwarder(parent.config))  # it may take the data dir over, as any forwarder
        celery_hook.connect(stop)  # a Celery pool child ends with os._exit(): hand over before it


def _lock_busy(data_dir: Path) -> bool:
    """Whether another agent (not a brief CLI command) holds the data dir now."""
    probe = DataDirLock(data_dir)
    holder = probe.try_acquire()
    probe.release()
    return holder is not None and not holder.endswith(" cli")


def start(config: Any = None, timeout: float = 30.0) -> Agent | Forwarder:
    """Start the process-wide agent (idempotent); config is a path, a dict or None.
    Returns the Agent when this process owns the data dir, else a Forwarder to its owner."""
    global _thread, _hooks_installed
    with _lock:
        if _agent is not None and _agent.state in ("starting", "running"):
            # A forwarder (this data dir is another process's, or this is a fork child) takes
            # whatever config it is given: the owner's is the one that counts.
            if (
                isinstance(_agent, Agent)
                and config is not None
                and (differ := differences(_agent.config, resolve(config)))
            ):
                raise ConfigError(
                    f"agent.start(): an agent already runs in this process with another config ({', '.join(differ)}"
                    " differ); call agent.stop() first, or agent.start() without a config to get the running one"
                )
            return _agent
        cfg = resolve(config)
        started: Agent | Forwarder
        if cfg.agent.connect or _lock_busy(Path(cfg.agent.data_dir)):
            started = _start_forwarder(cfg)
        else:
            try:
                started, _thread = _start_owner(cfg, timeout)
            except DataDirInUse as exc:  # taken between the probe and the start
                if exc.by_cli:
                    raise
                started = _start_forwarder(cfg)
            else:
                log.info(
                    "sidecar-agent started in this process: dashboard %s, data dir %s, sinks: %s",
                    started.server_url or "off",
                    Path(cfg.agent.data_dir).absolute(),
                    ", ".join(started.workers) or "none",
                )
        _use(started)
        # Celery prefork: a pool child ends with os._exit(), skipping the exit hook below.
        celery_hook.connect(stop)
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
    if cfg.agent.connect:  # a separately run sidecar: never take its place
        log.info("pid %d forwards to %s", fw.pid, cfg.agent.connect)
    else:
        fw.takeover = _take_over
        log.info("data dir %s is owned by another process: pid %d forwards to it", cfg.agent.data_dir, fw.pid)
    return fw.start()


def _take_over(fw: Forwarder, lock: DataDirLock) -> bool:
    """Failover, on `fw`'s drain thread, which holds the data-dir lock: start an Agent
    on that lock (as start() does for an owner) and make it this process's agent. False
    when this forwarder is no longer the process's agent (stopped, replaced)."""
    global _thread, _retired
    with _lock:  # stop() and start() wait for the takeover to end, then see its outcome
        if _agent is not fw or fw.state != "running" or fw.takeover is None:
            return False
        cfg, lost_at = fw.config, fw.owner.lost_at
        wait_port_free(cfg)
        lock.reserve()  # the Agent's own DataDirLock adopts it: the data dir is never unlocked between
        try:
            agent, _thread = _start_owner(cfg, 30.0)
        except BaseException:
            DataDirLock.release_reserved(Path(cfg.agent.data_dir))
            raise
        gap = round(time.monotonic() - lost_at, 3) if lost_at is not None else None
        if _owner is not None:
            _owner.took_over = {"from_pid": fw.owner.owner_pid, "at": time.time(), "gap_s": gap}
        _use(agent)
        _retired = fw
    log.warning(
        "pid %d took over data dir %s (the owner, pid %s, is gone) after %ss",
        fw.pid,
        cfg.agent.data_dir,
        fw.owner.owner_pid,
        gap,
    )
    return True


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


def _use(agent: Agent | Forwarder | None) -> None:
    """Make `agent` the process-wide agent (None: there is none) for record() and friends."""
    global _agent, _intake
    _agent = agent
    _intake = intake_of(agent) if agent is not None else None


def intake_of(agent: Agent | Forwarder) -> RecordQueue:
    """The deque `agent` records into: an Agent's committer, or the Forwarder itself."""
    return agent.committer if isinstance(agent, Agent) else agent


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
    agent, retired = _agent, _retired
    if isinstance(agent, Forwarder):
        return agent.flush(timeout)
    if retired is not None:  # what this process recorded while it was a forwarder goes first
        end = time.monotonic() + timeout
        if not retired.flush(timeout):
            return False
        timeout = max(0.0, end - time.monotonic())
    return bool(_call(lambda a: a.flush(timeout), timeout))


def stop(timeout: float | None = None) -> None:
    """Stop the process-wide agent gracefully (a forwarder hands everything over first)."""
    global _thread, _owner, _retired
    with _lock:  # not during a takeover: stop what it leaves
        agent, thread, owner, retired = _agent, _thread, _owner, _retired
        if isinstance(agent, Forwarder):
            agent.takeover = None
    if agent is None:
        return
    t = agent.config.agent.shutdown_timeout_s if timeout is None else timeout
    if isinstance(agent, Forwarder):
        agent.stop(t)
    else:
        if retired is not None:  # hands over to this process's listener (or spills), within a share
            retired.stop(t / 2)
        _call(lambda a: _stop_owner(a, owner, t), t + 5.0)
        if thread is not None:
            thread.join(t + 5.0)
    _use(None)
    _thread = _owner = _retired = None


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
    q = _intake
    if q is None:
        _early.add(losses.NOT_STARTED)
        return
    # RecordQueue.record's body, inlined: this is the hot path, and a second call (with
    # its keywords) cost about a fifth of this function (bench/record_overhead.py).
    # Keep the two alike; tests/test_embed_record.py compares them. The pid tag is added
    # where the queue is drained, off this thread.
    records = q.records
    if len(records) >= q.capacity or q.refused:
        q.ledger.add(q.refused or losses.INTAKE_FULL)
        return
    records.append((name, value, kind, tags, ts or _time(), data, session_id))
    if len(records) >= q._signal_at:
        q._signal()


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
